"""The errors fastdpo anticipates. Every one is a ``FastdpoError``: the CLI prints its message as
one line, ``fastdpo <command>: error: <message>``, and exits with status 2. Messages name what went
wrong and where (file, line, field, URL), so no traceback is needed to act on them."""
from __future__ import annotations


class FastdpoError(ValueError):
    """An anticipated failure of input, configuration, environment or a remote service.

    A ``ValueError`` so that callers that already handle bad values keep working. Given where it
    happened, the message reads ``<what> (<file>[:<line>][ <field>])``; the parts stay readable as
    attributes for callers that report them otherwise.
    """

    def __init__(self, what: str = "", *, file=None, line: int | None = None, field: str | None = None):
        self.what, self.file, self.line, self.field = what, file, line, field
        where = " ".join(p for p in (f"{file}{'' if line is None else f':{line}'}" if file else "",
                                     field or "") if p)
        super().__init__(f"{what} ({where})" if where else what)


class ConfigError(FastdpoError):
    """A run config, a ``--set`` override or a model config value that is wrong or cannot fit."""


class ServiceError(FastdpoError):
    """A remote service (judge, sampler server) failed in a way retries did not fix."""
