"""Judges: who decides which answer is better.

One interface, two kinds of judge:

- ``OpenAIJudge`` asks any OpenAI-compatible chat server (vLLM serving Qwen2.5-7B-Instruct is the
  reference; ``fastdpo serve`` is the one CI talks to) with the rubric prompts in ``configs/``.
- ``ProgrammaticJudge`` wraps a checking function for tasks whose answers can be verified (the
  embedded demo task); its pairwise verdict is derived from the two scores.

``score`` returns an int 1-10 or ``None`` when the judge gave no usable score; ``compare`` returns
``"A"``, ``"B"`` or ``"TIE"`` (an unusable reply is a ``"TIE"``). Unusable replies are counted in
``judge.stats``, never raised: one odd reply must not end a multi-hour mining run. Transport
failures that survive the bounded retries *are* raised, as ``JudgeError``.

Judges are selectable by name (``make_judge("task")``, ``make_judge("openai", url=..., model=...)``
or ``make_judge("package.module:factory")``); other modules add names with ``register_judge``.
"""
from __future__ import annotations

import importlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from fastdpo.configs import config_path
from fastdpo.errors import ServiceError

VERDICTS = ("A", "B", "TIE")
SCORE_PROMPT = config_path("judge_score.txt")
COMPARE_PROMPT = config_path("judge_compare.txt")
API_KEY_ENV = ("FASTDPO_JUDGE_API_KEY", "OPENAI_API_KEY")


class JudgeError(ServiceError):
    """The judge could not be reached or refused the requests (after bounded retries)."""


@dataclass
class JudgeStats:
    """Counters over a judge's lifetime; ``invalid`` replies carried no verdict/score."""
    requests: int = 0      # calls answered by the judge (valid or not)
    invalid: int = 0       # replies without a parsable score / verdict -> None / "TIE"
    rejected: int = 0      # requests the server refused as malformed (HTTP 400/413/422) -> None / "TIE"
    retries: int = 0       # transport retries (connection errors, timeouts, 429, 5xx)

    def as_dict(self) -> dict:
        return asdict(self)


class Judge:
    """Base class. Subclasses implement ``_score`` and optionally ``_compare``.

    ``concurrency`` bounds how many requests ``score_many`` / ``compare_many`` keep in flight.
    """
    name = "judge"
    concurrency = 1

    def __init__(self):
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    # -- to implement --------------------------------------------------------------------
    def _score(self, instruction: str, response: str) -> int | None:
        raise TypeError(f"{type(self).__name__} must implement _score")

    def _compare(self, instruction: str, a: str, b: str) -> str | None:
        """Default: the higher score wins; equal or missing scores tie."""
        sa, sb = self._score(instruction, a), self._score(instruction, b)
        if sa is None or sb is None:
            return None
        return "A" if sa > sb else "B" if sb > sa else "TIE"

    # -- public API ----------------------------------------------------------------------
    def score(self, instruction: str, response: str) -> int | None:
        s = self._score(instruction, response)
        self._count(valid=s is not None)
        return s

    def compare(self, instruction: str, a: str, b: str) -> str:
        v = self._compare(instruction, a, b)
        self._count(valid=v is not None)
        return "TIE" if v is None else v

    def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """Scores for ``(instruction, response)`` pairs, in order."""
        return self._map(lambda p: self.score(*p), pairs)

    def compare_many(self, triples: Sequence[tuple[str, str, str]]) -> list[str]:
        """Verdicts for ``(instruction, a, b)`` triples, in order."""
        return self._map(lambda t: self.compare(*t), triples)

    def _map(self, fn, items):
        items = list(items)
        if self.concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _count(self, valid: bool) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.invalid += not valid

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass


class ProgrammaticJudge(Judge):
    """A judge backed by a checking function ``score_fn(instruction, response) -> int (1-10)``.

    A score outside 1-10 (or not an int) is a bug in ``score_fn``, so it raises instead of
    being counted as an invalid reply. ``score_fn`` may return ``None`` for "cannot judge".
    """

    def __init__(self, score_fn: Callable[[str, str], int | None], name: str = "programmatic"):
        super().__init__()
        self.score_fn, self.name = score_fn, name

    def _score(self, instruction: str, response: str) -> int | None:
        s = self.score_fn(instruction, response)
        if s is None:
            return None
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 10:
            raise ValueError(f"judge {self.name!r}: score function returned {s!r}; expected an int 1-10")
        return s


# -- parsing replies -------------------------------------------------------------------------
_SCORE_RE = re.compile(r"(?<![\d.\-])(10|[1-9])(?:\.\d+)?(?!\d)")
_VERDICT_RE = re.compile(
    r"^[\s\W]*(?:(?:final\s+)?(?:answer|verdict|better(?:\s+answer)?|winner)\s*(?:is)?\s*[:\-]?\s*)?"
    r"[\s\[\(\*\"'`]*(A|B|TIE)[\s\]\)\*\"'`.!]*$", re.IGNORECASE)


def parse_score(text: str | None) -> int | None:
    """The first integer 1-10 in a reply ("7", "Score: 7", "7/10", "**8**"); else ``None``.

    Numbers outside the scale ("0", "11", "42") are not scores: the reply is invalid."""
    if not text:
        return None
    m = _SCORE_RE.search(text)
    return int(m.group(1)) if m else None


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"TIE"`` when the whole reply is one verdict ("A", "[[B]]",
    "Verdict: tie", "Answer A."); anything else (prose, "A or B", empty) is ``None``."""
    if not text:
        return None
    m = _VERDICT_RE.match(text.strip())
    return m.group(1).upper() if m else None


def load_prompt(path: str | Path, fields: Sequence[str]) -> str:
    """A rubric template; every ``{field}`` must appear in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge prompt not found: {path}")
    text = path.read_text()
    missing = [f for f in fields if "{" + f + "}" not in text]
    if missing:
        names = ", ".join("{" + f + "}" for f in missing)
        raise ValueError(f"{path}: judge prompt lacks the placeholder(s) {names}")
    return text


def fill_prompt(template: str, **values: str) -> str:
    # str.format would choke on braces elsewhere in a template; plain replacement does not.
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


# -- the OpenAI-compatible judge -------------------------------------------------------------
class OpenAIJudge(Judge):
    """Judge through an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Temperature 0 and a few ``max_tokens`` (the rubric asks for one number or one letter).
    Connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with
    exponential backoff and jitter, then raise ``JudgeError``. HTTP 400/413/422 (e.g. a
    response too long for the judge's context) make that one judgement ``None``/``"TIE"`` and are
    counted in ``stats.rejected``; other 4xx (bad key, unknown model) raise at once, since every
    later request would fail the same way. The API key comes from ``$FASTDPO_JUDGE_API_KEY`` or
    ``$OPENAI_API_KEY`` (vLLM ignores it) and is never logged or shown in ``repr``.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 score_prompt: str | Path = SCORE_PROMPT, compare_prompt: str | Path = COMPARE_PROMPT,
                 max_tokens: int = 8, concurrency: int = 16, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_chars: int = 4000):
        super().__init__()
        import openai  # imported here: programmatic judging must not need it

        if not base_url:
            raise ValueError("OpenAIJudge needs a base URL, e.g. http://localhost:8000/v1")
        if not model:
            raise ValueError("OpenAIJudge needs a model name (the one the server serves)")
        if concurrency < 1 or max_retries < 0 or max_tokens < 1:
            raise ValueError("OpenAIJudge: concurrency and max_tokens must be >= 1, max_retries >= 0")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.name = f"openai:{model}"
        self.max_tokens, self.concurrency, self.timeout = max_tokens, concurrency, timeout
        self.max_retries, self.backoff, self.max_chars = max_retries, backoff, max_chars
        self.score_template = load_prompt(score_prompt, ("instruction", "response"))
        self.compare_template = load_prompt(compare_prompt, ("instruction", "a", "b"))
        key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), "EMPTY")
        self._openai = openai
        # Our own retry loop (max_retries=0 here) so the bound and the count are ours.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout,
                                     max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def _score(self, instruction: str, response: str) -> int | None:
        reply = self._ask(fill_prompt(self.score_template, instruction=instruction,
                                      response=response[: self.max_chars]))
        return parse_score(reply)

    def _compare(self, instruction: str, a: str, b: str) -> str | None:
        reply = self._ask(fill_prompt(self.compare_template, instruction=instruction,
                                      a=a[: self.max_chars], b=b[: self.max_chars]))
        return parse_verdict(reply)

    def _ask(self, content: str) -> str | None:
        """The reply text, or ``None`` when the server refused this one request."""
        oa = self._openai
        for attempt in range(self.max_retries + 1):
            try:
                out = self._client.chat.completions.create(
                    model=self.model, temperature=0.0, max_tokens=self.max_tokens,
                    messages=[{"role": "user", "content": content}])
                if not out.choices:
                    return None
                return out.choices[0].message.content
            except (oa.APIConnectionError, oa.APITimeoutError, oa.RateLimitError,
                    oa.InternalServerError) as e:
                err = e
            except oa.APIStatusError as e:
                if e.status_code in (400, 413, 422):
                    with self._lock:
                        self.stats.rejected += 1
                    return None
                raise JudgeError(f"judge {self.describe()}: HTTP {e.status_code}: {_brief(e)}") from None
            if attempt < self.max_retries:
                with self._lock:
                    self.stats.retries += 1
                # Full jitter keeps 32 threads from retrying in lockstep.
                time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random() / 2))
        raise JudgeError(f"judge {self.describe()} unreachable after {self.max_retries + 1} attempts: "
                         f"{type(err).__name__}: {_brief(err)}") from None

    def close(self) -> None:
        self._client.close()


def _brief(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.splitlines()[0][:300] if msg else type(e).__name__


# -- selection by name -----------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Judge]] = {}
# Installed packages add judges through this entry-point group (name = factory), read lazily: the
# embedded task registers its checker as "task" this way, so this module never imports it.
ENTRY_POINT_GROUP = "fastdpo.judges"


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``make_judge(name, **kw)`` call ``factory(**kw)``; kw may be ignored by the factory."""
    _REGISTRY[name] = factory


def _openai_factory(url: str | None = None, model: str | None = None, **kw) -> Judge:
    if not url or not model:
        raise ValueError("the openai judge needs --judge-url and --judge-model")
    return OpenAIJudge(url, model, **kw)


register_judge("openai", _openai_factory)


def available_judges() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def _load_plugins() -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def make_judge(name: str | None = None, *, url: str | None = None, model: str | None = None,
               **kw) -> Judge:
    """A judge by name: ``"openai"`` (default when ``url`` is given), a registered name such as
    ``"task"``, or ``"module:attr"`` where ``attr`` is a ``Judge``, a factory returning one, or a
    scoring function ``(instruction, response) -> int`` (wrapped in a ``ProgrammaticJudge``)."""
    if name is None:
        if not url:
            raise ValueError("choose a judge: --judge NAME, or --judge-url URL --judge-model MODEL")
        name = "openai"
    if ":" in name and name not in _REGISTRY:
        return _judge_from_path(name)
    _load_plugins()  # plugins may add names or override the built-in ones
    if name not in _REGISTRY:
        raise ValueError(f"unknown judge {name!r}; available: {', '.join(available_judges())} "
                         f"(or module:attr)")
    factory = _REGISTRY[name]
    return factory(url=url, model=model, **kw) if name == "openai" else factory(**kw)


def _judge_from_path(spec: str) -> Judge:
    mod_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import ({e})") from e
    if isinstance(obj, Judge):
        return obj
    if isinstance(obj, type) and issubclass(obj, Judge):
        return obj()
    if callable(obj):
        try:
            import inspect
            n_params = len(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            n_params = 2
        out = obj() if n_params == 0 else obj
        return out if isinstance(out, Judge) else ProgrammaticJudge(out, name=spec)
    raise ValueError(f"judge {spec!r} is neither a Judge nor a callable")
