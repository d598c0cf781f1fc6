"""The error every model/checkpoint reader raises: a ``ValueError`` whose message names the file and
the field, so the CLI prints it as one line."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsupported, or does not fit what it is loaded with."""
