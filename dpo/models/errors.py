"""The error every model/checkpoint reader raises: a ``ValueError`` whose message names the file and
the field, so the CLI prints it as one line."""
from fastdpo.errors import FastdpoError


class CheckpointError(FastdpoError):
    """A checkpoint that is missing, corrupt, unsupported, or does not fit what it is loaded with."""
