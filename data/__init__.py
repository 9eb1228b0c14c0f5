"""Dataset loaders and generators, run from the repository root as ``python -m data.<name>``."""
