"""A Hugging Face tokenizer used as is: its ``tokenizer.json``, its special tokens and its jinja chat
template (from ``tokenizer_config.json`` or ``chat_template.jinja``).

Prompts are the template's text tokenized the way ``apply_chat_template`` tokenizes it (special
tokens in the text become their ids, no BOS/EOS added by the tokenizer), so they are token-exact
with transformers and vLLM. As there, a message whose text spells a special token gets that token.

Where an answer ends is read off the template once, at load: a probe conversation is rendered with
and without its assistant turn; the text between the generation prompt and the probe answer is the
answer's prefix (empty for most templates; Qwen3 writes an empty thinking block), and the first
special token after the answer is the end-of-turn token (``eos_id``: ``<|im_end|>``, ``<|eot_id|>``,
``</s>`` ...), where sampling stops and what closes every trained answer. Answers are tokenized on
their own (``prefix + answer + end-of-turn``), as TRL tokenizes completions.

If the tokenizer has no pad token, its eos token (or the end-of-turn token) pads: padded positions
are masked everywhere, so no embedding row needs to be added.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer

from fastdpo.files import atomic_write, write_json
from fastdpo.models import chat_template
from fastdpo.models.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE, ChatTokenizer, normalize_turns

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_PROBE_QUESTION, _PROBE_ANSWER = "fastdpo probe question", "fastdpo probe answer"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(ChatTokenizer):
    kind = "hf"

    def __init__(self, tok: RawTokenizer, config: dict, template: str, source: str = "<memory>",
                 template_source: str | None = None):
        """``source`` names the tokenizer_config.json in errors; ``template_source`` where the
        template came from (default: that file's ``chat_template`` field)."""
        self._hf, self.config, self.template, self.source = tok, dict(config), template, source
        self.template_source = template_source or f"{source}: field 'chat_template'"
        self.special_tokens = {name: text for name in chat_template.SPECIAL_TOKEN_NAMES
                               if (text := _token_text(config.get(name))) is not None}
        for name, text in self.special_tokens.items():
            if tok.token_to_id(text) is None:
                raise ValueError(f"{source}: field '{name}': {text!r} is not in tokenizer.json's vocabulary")
        self.answer_prefix, self.before_end, self.end_token = self._probe()
        self.eos_id = tok.token_to_id(self.end_token)
        pad = self.special_tokens.get("pad_token") or self.special_tokens.get("eos_token")
        self.pad_id = tok.token_to_id(pad) if pad else self.eos_id

    # -- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, special_tokens_map.json)."""
        directory = Path(directory)
        file, config_file = directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG
        for f in (file, config_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (fastdpo reads a tokenizer's tokenizer.json and "
                                        f"tokenizer_config.json)")
        try:
            tok = RawTokenizer.from_file(str(file))
        except Exception as e:  # the Rust error names no file
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        config = _read_json(config_file)
        if (directory / SPECIAL_TOKENS_MAP).is_file():   # older files keep the special tokens here
            legacy = _read_json(directory / SPECIAL_TOKENS_MAP)
            config = {**{k: v for k, v in legacy.items() if k in chat_template.SPECIAL_TOKEN_NAMES}, **config}
        template, template_source = config.get("chat_template"), None
        if (directory / TEMPLATE_FILE).is_file():   # newer transformers keep the template here
            template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
            template_source = str(directory / TEMPLATE_FILE)
        if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"{config_file}: field 'chat_template': missing; fastdpo renders every prompt "
                             f"with the tokenizer's chat template (an instruct model's tokenizer has one; "
                             f"for a base model add one to tokenizer_config.json)")
        return cls(tok, config, template, str(config_file), template_source)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return chat_template.render(self.template, messages, add_generation_prompt=add_generation_prompt,
                                        special_tokens=self.special_tokens)
        except chat_template.TemplateError as e:
            raise ValueError(f"{self.template_source}: {e}") from None

    def _probe(self) -> tuple[str, str, str]:
        """(answer prefix, text between answer and end-of-turn, end-of-turn token): see the module
        docstring."""
        question = [{"role": "user", "content": _PROBE_QUESTION}]
        prompt = self._render(question, add_generation_prompt=True)
        full = self._render([*question, {"role": "assistant", "content": _PROBE_ANSWER}], False)
        where = self.template_source
        if not full.startswith(prompt) or _PROBE_ANSWER not in full[len(prompt):]:
            raise ValueError(f"{where}: the generation prompt is not the start of the rendered assistant "
                             f"turn; fastdpo cannot tell where an answer starts")
        rest = full[len(prompt):]
        start = rest.index(_PROBE_ANSWER)
        after = rest[start + len(_PROBE_ANSWER):]
        added = [t.content for t in self._hf.get_added_tokens_decoder().values()]
        hits = [(after.find(t), -len(t), t) for t in added if t and after.find(t) >= 0]
        if not hits:
            raise ValueError(f"{where}: no special token closes the assistant turn; fastdpo needs an "
                             f"end-of-turn token to stop sampling and to close trained answers")
        at, _, end = min(hits)
        return rest[:start], after[:at], end

    # -- the contract ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text to ids as transformers encodes it (special-token text becomes the token)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def render_text(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The template's text for ``turns`` (what ``apply_chat_template(..., tokenize=False)`` gives)."""
        messages = [{"role": role, "content": text} for role, text in turns]
        return self._render(messages, add_generation_prompt)

    def render_conversation(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        return self.encode(self.render_text(normalize_turns(turns)))

    def render_answer(self, answer: str) -> list[int]:
        """``prefix + answer + end``; an answer that already opens with the template's prefix (a
        sampled one decoded as is, e.g. with Qwen3's empty thinking block) keeps just that one."""
        prefix = "" if answer.startswith(self.answer_prefix) else self.answer_prefix
        return [*self.encode(prefix + answer + self.before_end), self.eos_id]

    def special_ids(self) -> dict[str, int]:
        return {name: self._hf.token_to_id(text) for name, text in self.special_tokens.items()}

    @property
    def hash(self) -> str:
        """Over what decides the ids: the tokenizer.json, the template and the special tokens (not
        the rest of tokenizer_config.json, which export rewrites)."""
        h = hashlib.sha256(self._hf.to_str().encode())
        h.update(json.dumps([self.template, self.special_tokens], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """tokenizer.json and tokenizer_config.json (the chat template inline) into ``path``'s
        directory (``path`` is the directory or its tokenizer.json), as they were read."""
        path = Path(path)
        directory = path.parent if path.suffix == ".json" else path
        self._write(directory, {**self.config, "chat_template": self.template})
        return directory / TOKENIZER_FILE

    def save_hf(self, directory: str | Path, model_max_length: int | None = None) -> None:
        config = {**self.config, "chat_template": self.template}
        if config.get("tokenizer_class") == "TokenizersBackend":
            # transformers 5 writes this name, which transformers 4 (and a vLLM built on it) cannot
            # resolve; both read the generic fast-tokenizer class from tokenizer.json alike
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if model_max_length and not config.get("model_max_length"):
            config["model_max_length"] = int(model_max_length)
        self._write(Path(directory), config)

    def _write(self, directory: Path, config: dict) -> None:
        atomic_write(directory / TOKENIZER_FILE, self._hf.to_str())
        write_json(directory / TOKENIZER_CONFIG, config)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value
