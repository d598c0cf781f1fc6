"""The errors fastdpo anticipates. Every one is a ``FastdpoError``: the CLI prints its message as
one line, ``fastdpo <command>: error: <message>``, and exits with status 2. Messages name what went
wrong and where (file, line, field, URL), so no traceback is needed to act on them."""
from __future__ import annotations


class FastdpoError(ValueError):
    """An anticipated failure of input, configuration, environment or a remote service.

    A ``ValueError`` so that callers that already handle bad values keep working.
    """


class ConfigError(FastdpoError):
    """A run config, a ``--set`` override or a model config value that is wrong or cannot fit."""


class ServiceError(FastdpoError):
    """A remote service (judge, sampler server) failed in a way retries did not fix."""
