"""Byte-level BPE tokenizer and the chat template.

The template is the seed's: a user turn renders as ``<|user|>\\n{text}\\n<|end|>\\n`` and the
assistant answers after ``<|assistant|>\\n``, closing with ``<|end|>``. Special tokens are
inserted by id, never parsed out of text: ordinary text that happens to contain
``<|end|>`` encodes as ordinary bytes, so a prompt can not forge a turn boundary.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastdpo.files import atomic_write
from fastdpo.models.token_count import TokenCounter

PAD, USER, ASSISTANT, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, USER, ASSISTANT, END)
ROLES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT}


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` byte-level BPE with fastdpo's special tokens."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks fastdpo's special tokens {missing}")
        # Literal "<|end|>" in user text must stay text: see the module docstring.
        hf.encode_special_tokens = True
        self._hf = hf
        self.pad_id, self.user_id, self.assistant_id, self.end_id = (
            hf.token_to_id(t) for t in SPECIAL_TOKENS)
        self.eos_id = self.end_id
        self._nl = self.encode("\n")
        self._counter = None   # a TokenCounter, made on first use

    # -- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str] | Iterable[Path] | Path | str, vocab_size: int = 2048,
              min_frequency: int = 2) -> Tokenizer:
        """Train on an iterator of strings, or on text files (a path or a list of paths)."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        files = _as_files(texts)
        if files is not None:
            for f in files:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"tokenizer training file not found: {f}")
            hf.train([str(f) for f in files], trainer)
        else:
            hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names no file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(hf)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        return atomic_write(path, self.to_str())

    def to_str(self) -> str:
        return self._hf.to_str()

    @property
    def hash(self) -> str:
        """Content hash stored in checkpoints and cache keys."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    # -- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; never yields a special token."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    # -- chat template -------------------------------------------------------------------
    def _turn_parts(self, role: str, text: str, closed: bool = True) -> tuple[list[int], str, list[int]]:
        """A turn as (ids before, text to encode, ids after): the one statement of the template,
        shared by the renderers and the length counters."""
        marker = ROLES.get(role.lower())
        if marker is None:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLES)}")
        if marker == USER:
            return [self.user_id], f"\n{text}\n", [self.end_id, *self._nl]
        return [self.assistant_id], f"\n{text}", [self.end_id, *self._nl] if closed else []

    def _opening(self) -> list[int]:
        """What follows the history: the assistant's marker, which the model continues."""
        return [self.assistant_id, *self._nl]

    def render_turn(self, role: str, text: str, closed: bool = True) -> list[int]:
        """One turn. User turns: ``<|user|>\\n{text}\\n<|end|>\\n``; assistant turns:
        ``<|assistant|>\\n{text}<|end|>\\n`` (``closed=False`` leaves the answer open)."""
        before, text, after = self._turn_parts(role, text, closed)
        return [*before, *self.encode(text), *after]

    def render_prompt(self, instruction: str) -> list[int]:
        """``<|user|>\\n{instruction}\\n<|end|>\\n<|assistant|>\\n``: what the model continues."""
        return self.render_conversation([("user", instruction)])

    def render_conversation(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """A multi-turn history ending in a user turn, followed by the assistant's opening."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        ids: list[int] = []
        for role, text in turns:
            ids += self.render_turn(role, text)
        return ids + self._opening()

    def render_answer(self, answer: str) -> list[int]:
        """The assistant's answer tokens, closed by ``<|end|>`` (what DPO and SFT score)."""
        return [*self.encode(answer), self.end_id]

    # -- lengths without ids (the data audit) --------------------------------------------
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """``len(encode(t))`` for each text, without building the ids (``models.token_count``)."""
        if self._counter is None:
            self._counter = TokenCounter(self.encode, self.encode_batch, self._hf)
        return self._counter(texts)

    def conversation_lengths(self, conversations: Sequence[Sequence[tuple[str, str]]]) -> list[int]:
        """``len(render_conversation(turns))`` for each history."""
        parts = [[self._turn_parts(role, text) for role, text in turns] for turns in conversations]
        counts = iter(self.count_tokens([text for turns in parts for _, text, _ in turns]))
        tail = len(self._opening())
        return [sum(len(before) + next(counts) + len(after) for before, _, after in turns) + tail
                for turns in parts]

    def answer_lengths(self, answers: Sequence[str]) -> list[int]:
        """``len(render_answer(a))`` for each answer."""
        return [n + len(self.render_answer("")) for n in self.count_tokens(answers)]


def _as_files(texts) -> list[Path] | None:
    if isinstance(texts, (str, Path)):
        return [Path(texts)]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, Path) for t in texts):
        return list(texts)
    return None

