"""Config classes checked by a schema: pydantic v2 dataclasses whose errors read as one line.

``config_class`` makes a dataclass validated at construction (types, ranges, finiteness, enum
values from ``Literal`` annotations), still a plain ``dataclasses`` dataclass for everything else
(attribute access, ``fields``, ``replace``, keyword constructors). A bad value raises
``ConfigError("<Class>.<field> must be ..., got <value>")`` with ``.field`` set, so the loader that
knows the file can say where the value came from. ``strict=True`` (model configs, written by
programs) refuses ``4.0`` for an integer; run configs, written by people, accept it.

The type aliases below are the vocabulary the config classes use: a boolean is never a number
(``True`` would otherwise pass as ``1``), and no float may be NaN or infinite.
"""
from __future__ import annotations

import functools
from typing import Annotated

from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fastdpo.errors import ConfigError


def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Bool = Annotated[bool, Strict()]   # true/false, not 1 or "yes"
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
PositiveInt = Annotated[Int, Field(gt=0)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]     # [0, 1)


def config_class(cls=None, *, strict: bool = False):
    """Decorate a config class (see the module docstring)."""
    def wrap(cls):
        cls = pydantic_dataclass(cls, config=ConfigDict(allow_inf_nan=False, strict=strict))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise schema_error(cls.__name__, e) from None

        cls.__init__ = __init__
        return cls

    return wrap if cls is None else wrap(cls)


_PHRASES = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number", "int_from_float": "must be a whole number",
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "literal_error": "must be one of [{expected}]",
    "tuple_type": "must be a list", "list_type": "must be a list", "dict_type": "must be a mapping",
    "too_short": "has too few items", "too_long": "has too many items",
    "unexpected_keyword_argument": "is not a field", "string_pattern_mismatch": "must match {pattern}",
}


def schema_error(name: str, e: ValidationError) -> ConfigError:
    """The first problem of a ``ValidationError`` as one ``ConfigError`` naming the field
    (``.field_name``: the field itself, for a loader to say where its value came from)."""
    err = e.errors(include_url=False)[0]
    parts = err["loc"]
    field_name = str(parts[0]) if parts else None
    # the field, then item indices ("adam_betas[1]"); a union's member names are left out
    where = f"{name}.{field_name}" + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))
    if err["type"] == "value_error":   # a __post_init__ rule or _not_bool: in their own words
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        what = f"{where} {message}, got {err['input']!r}" if field_name else message
    else:
        ctx = dict(err.get("ctx") or {})
        if "expected" in ctx:   # "'a', 'b' or 'c'" -> "'a', 'b', 'c'"
            ctx["expected"] = str(ctx["expected"]).replace(" or ", ", ")
        phrase = _PHRASES.get(err["type"], err["msg"][:1].lower() + err["msg"][1:]).format(**ctx)
        what = f"{where} {phrase}"
        if err["type"] != "unexpected_keyword_argument" and "input" in err:
            what += f", got {err['input']!r}"
    error = ConfigError(what)
    error.field_name = field_name
    return error
