"""Jinja chat templates rendered the way transformers' ``apply_chat_template`` renders them.

Same environment (sandboxed, ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson``
that keeps non-ASCII text, ``raise_exception``, ``strftime_now``, the ``{% generation %}`` block)
and the same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the
tokenizer's named special tokens as strings), so the rendered text, and therefore the tokens, are
the ones transformers and vLLM produce for the same messages.

``FASTDPO_TEMPLATE`` is fastdpo's own template written as jinja, for exported tokenizers: it renders
exactly what ``fastdpo.models.tokenizer.Tokenizer`` renders (system text folded into the first
user turn, as that template has no system role).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")

FASTDPO_TEMPLATE = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] + '\\n\\n' -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<|user|>\\n' + (ns.system if ns.first else '') + m['content'] + '\\n<|end|>\\n' -}}"
    "{%- set ns.first = false -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant|>\\n' + m['content'] + '<|end|>\\n' -}}"
    "{%- elif m['role'] != 'system' -%}{{- raise_exception('unknown chat role ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


class TemplateError(ValueError):
    """A chat template that does not compile, or refuses the messages it is given."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    transformers; rendering keeps its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"chat template line {e.lineno}: {e.message}") from e


def render(source: str, messages: list[dict], *, add_generation_prompt: bool,
           special_tokens: dict[str, str] | None = None, **extra) -> str:
    """The template's text for ``messages`` (``[{"role", "content"}, ...]``)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(messages=messages, tools=None, documents=None,
                                               add_generation_prompt=add_generation_prompt,
                                               **(special_tokens or {}), **extra)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"chat template: {e}") from e
