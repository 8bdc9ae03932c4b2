"""Records, synthetic generators, format loaders and validation (import the submodules directly)."""
