"""Commands besides training: trainer evaluate (and the others the CLI dispatches to)."""
