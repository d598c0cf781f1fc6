"""The tokenizer interface every part of fastdpo uses, and fastdpo's own byte-level BPE with its
chat template.

``ChatTokenizer`` is what SFT, DPO, mining, eval and serve need of a tokenizer: text <-> ids, a
conversation rendered as the prompt the model continues, an answer closed by the end-of-turn token
(``eos_id``: where sampling stops), a pad id, a content hash and ``save``. Two kinds implement it:
``Tokenizer`` here (the default, used by the embedded task) and ``HFTokenizer``
(``fastdpo.models.hf_tokenizer``: a Hugging Face ``tokenizer.json`` with its own jinja chat
template). ``open_tokenizer`` picks the kind from the files, so nothing else branches on it.

fastdpo's template is the seed's: a user turn renders as ``<|user|>\\n{text}\\n<|end|>\\n`` and the
assistant answers after ``<|assistant|>\\n``, closing with ``<|end|>``; system text is folded into
the first user turn (the template has no system role). Special tokens are inserted by id, never
parsed out of text: ordinary text that happens to contain ``<|end|>`` encodes as ordinary bytes, so
a prompt can not forge a turn boundary.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastdpo.files import atomic_write, write_json
from fastdpo.models.chat_template import FASTDPO_TEMPLATE
from fastdpo.models.token_count import TokenCounter

PAD, USER, ASSISTANT, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, USER, ASSISTANT, END)
ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "human": "user",
              "assistant": "assistant", "gpt": "assistant", "model": "assistant"}
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


def normalize_turns(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Chat turns with canonical roles (system, user, assistant); a prompt's last turn other than a
    system one must be a user turn."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    out = []
    for role, text in turns:
        canonical = ROLE_NAMES.get(str(role).lower())
        if canonical is None:
            raise ValueError(f"unknown chat role {role!r}; expected one of {sorted(ROLE_NAMES)}")
        out.append((canonical, text))
    if [role for role, _ in out if role != "system"][-1:] != ["user"]:
        raise ValueError("a prompt must end with a user turn")
    return out


class ChatTokenizer(ABC):
    """The tokenizer contract (see the module docstring). Implementations wrap a ``tokenizers``
    object as ``self._hf`` and set ``eos_id`` (the end of an assistant turn) and ``pad_id``."""
    kind: str
    eos_id: int
    pad_id: int
    _hf: RawTokenizer

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids, without a BOS/EOS of the tokenizer's own."""

    @abstractmethod
    def render_conversation(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """``[(role, text), ...]`` (system, user, assistant; ending with a user turn) as the prompt
        the model continues: the chat template's text up to and including the assistant's opening."""

    @abstractmethod
    def render_answer(self, answer: str) -> list[int]:
        """The assistant's answer tokens, closed by ``eos_id`` (what DPO and SFT score)."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the files ``open_tokenizer`` reads back (into a directory, or as the given
        ``tokenizer.json``); returns the ``tokenizer.json`` path."""

    @abstractmethod
    def save_hf(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template as jinja) that
        transformers' ``AutoTokenizer`` loads without custom code."""

    @property
    @abstractmethod
    def hash(self) -> str:
        """Content hash (vocabulary, special tokens, template) stored in checkpoints and cache keys."""

    def special_ids(self) -> dict[str, int]:
        """The named special tokens' ids (``bos_token``, ``eos_token``, ``pad_token`` ... as set):
        what an exported model's config.json and generation_config.json name."""
        return {"eos_token": self.eos_id, "pad_token": self.pad_id}

    def render_prompt(self, instruction: str) -> list[int]:
        """A single user instruction as a prompt."""
        return self.render_conversation([("user", instruction)])

    def conversation_lengths(self, conversations: Sequence[Sequence[tuple[str, str]]]) -> list[int]:
        """``len(render_conversation(turns))`` for each history (the data audit's token counts;
        fastdpo's ``Tokenizer`` counts without building the ids)."""
        return [len(self.render_conversation(turns)) for turns in conversations]

    def answer_lengths(self, answers: Sequence[str]) -> list[int]:
        """``len(render_answer(a))`` for each answer."""
        return [len(self.render_answer(a)) for a in answers]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)


def open_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer in ``path`` (a directory or its ``tokenizer.json``): a Hugging Face tokenizer
    when a ``tokenizer_config.json`` sits next to it, fastdpo's otherwise."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    if (directory / TOKENIZER_CONFIG).is_file() and file.name == TOKENIZER_FILE:
        from fastdpo.models import hf_tokenizer  # it builds on this module
        return hf_tokenizer.HFTokenizer.load(directory)
    return Tokenizer.load(file)


class Tokenizer(ChatTokenizer):
    """A thin wrapper over a ``tokenizers`` byte-level BPE with fastdpo's special tokens."""
    kind = "fastdpo"

    def __init__(self, hf: RawTokenizer):
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
        hf = RawTokenizer(models.BPE())
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
            hf = RawTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names no file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        try:
            return cls(hf)
        except ValueError as e:
            raise ValueError(f"{path}: {e} (a Hugging Face tokenizer is read with the "
                             f"{TOKENIZER_CONFIG} next to it, which holds its chat template)") from None

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

    # -- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; never yields a special token."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    # -- chat template -------------------------------------------------------------------
    def _turn_parts(self, role: str, text: str, closed: bool = True) -> tuple[list[int], str, list[int]]:
        """A turn as (ids before, text to encode, ids after): the one statement of the template,
        shared by the renderers and the length counters."""
        canonical = ROLE_NAMES.get(role.lower())
        if canonical not in ("user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}; fastdpo's template has user and assistant turns")
        if canonical == "user":
            return [self.user_id], f"\n{text}\n", [self.end_id, *self._nl]
        return [self.assistant_id], f"\n{text}", [self.end_id, *self._nl] if closed else []

    def _prompt_parts(self, turns: Sequence[tuple[str, str]]) -> list[tuple[list[int], str, list[int]]]:
        """A history's turns as parts, system turns folded into the first user turn, then the
        assistant's opening (the part with no text)."""
        turns = normalize_turns(turns)
        system = [text for role, text in turns if role == "system"]
        turns = [t for t in turns if t[0] != "system"]
        if system:
            first = next(i for i, t in enumerate(turns) if t[0] == "user")
            turns[first] = ("user", "\n\n".join([*system, turns[first][1]]))
        return [*(self._turn_parts(role, text) for role, text in turns), ([self.assistant_id], "", self._nl)]

    def render_turn(self, role: str, text: str, closed: bool = True) -> list[int]:
        """One turn. User turns: ``<|user|>\\n{text}\\n<|end|>\\n``; assistant turns:
        ``<|assistant|>\\n{text}<|end|>\\n`` (``closed=False`` leaves the answer open)."""
        before, text, after = self._turn_parts(role, text, closed)
        return [*before, *self.encode(text), *after]

    def render_conversation(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        """A multi-turn history ending in a user turn, followed by the assistant's opening. System
        turns are folded into the first user turn: ``{system}\\n\\n{user text}``."""
        ids: list[int] = []
        for before, text, after in self._prompt_parts(turns):
            ids += [*before, *self.encode(text), *after]
        return ids

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
        parts = [self._prompt_parts(turns) for turns in conversations]
        counts = iter(self.count_tokens([text for conv in parts for _, text, _ in conv]))
        return [sum(len(before) + next(counts) + len(after) for before, _, after in conv) for conv in parts]

    def answer_lengths(self, answers: Sequence[str]) -> list[int]:
        return [n + len(self.render_answer("")) for n in self.count_tokens(answers)]

    def save_hf(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """tokenizer.json (special tokens parsed from text, as transformers does) and a
        tokenizer_config.json whose jinja template renders what ``render_conversation`` does."""
        directory = Path(directory)
        self.save(directory / TOKENIZER_FILE)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": FASTDPO_TEMPLATE,
                  "bos_token": None, "eos_token": END, "pad_token": PAD, "unk_token": None,
                  "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        write_json(directory / TOKENIZER_CONFIG, config)


def train_tokenizer(files: Sequence[str | Path], out: str | Path, vocab_size: int = 8192,
                    min_frequency: int = 2) -> Path:
    """Train fastdpo's tokenizer on text files (.txt: the whole text; .jsonl / .json: every string
    value in each row, e.g. prompts, answers and message contents) and save it as ``out``
    (a ``tokenizer.json`` path or a directory). Returns the written file."""
    if not files:
        raise ValueError("no training files given")
    texts: list[str] = []
    for f in map(Path, files):
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")
        try:
            texts += list(_training_texts(f))
        except UnicodeDecodeError as e:
            line = e.object.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{f}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not any(t.strip() for t in texts):
        raise ValueError(f"no text found in {[str(f) for f in files]}")
    return Tokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency).save(out)


def _training_texts(file: Path) -> Iterable[str]:
    text = file.read_text(encoding="utf-8")
    if file.suffix not in (".jsonl", ".json"):
        yield text
        return
    rows = json.loads(text) if text.lstrip().startswith("[") and file.suffix == ".json" else None
    if rows is None:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{i}: invalid JSON ({e.msg})") from e
    for row in rows:
        yield from _strings(row)


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _as_files(texts) -> list[Path] | None:
    if isinstance(texts, (str, Path)):
        return [Path(texts)]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, Path) for t in texts):
        return list(texts)
    return None

