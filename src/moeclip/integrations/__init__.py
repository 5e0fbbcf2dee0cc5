"""Bridges to other engines (Ray, ...). Each module imports its engine lazily: ``import moeclip`` never needs them."""
