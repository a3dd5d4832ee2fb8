"""Errors shared across the package (kept here so light modules can raise them without cycles)."""


class CheckpointError(RuntimeError):
    """A checkpoint (or weights file) that is missing, corrupt, or does not fit the model asked for."""
