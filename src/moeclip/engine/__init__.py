"""Training and evaluation loops, shared by the CLI and the Python API."""
