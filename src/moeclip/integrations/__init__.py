"""Bridges to other frameworks (anomalib, Ray); each submodule imports its framework only when imported itself,
so ``import moeclip`` never needs them."""
