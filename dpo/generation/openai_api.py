"""The OpenAI request and response shapes ``fastdpo serve`` speaks, with vLLM's extensions.

Requests are validated here (pydantic models for the plain fields, hand checks where a clear
message beats a union's error list) and turned into a ``Sampling``: token-id prompts and the
settings the sampler needs. Responses, stream chunks and log-probs are shaped here too, so the
HTTP layer (``generation.serve``) only moves bytes.

vLLM's extensions a sampling client relies on: prompts given as token ids, ``top_k``,
``stop_token_ids``, ``return_tokens_as_token_ids`` (log-prob tokens written ``"token_id:<id>"``)
and ``return_token_ids`` (each choice carries the ids it generated). Log-probs are those of the
model's own distribution (log-softmax of the raw logits, before temperature or top-k), as
vLLM returns by default.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 4


class RequestError(ValueError):
    """A request this server refuses; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request models ------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Unknown fields are ignored, as vLLM does: clients send extras for other servers.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)            # vLLM: -1 or 0 = no top-k cut
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: Any = None                                   # checked by _stops (clear message)
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: Any = None                               # checked by chat_turns (clear message)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(_Common):
    prompt: Any = None                                 # checked by _prompts (clear message)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def _validate(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        param = str(first["loc"][0]) if first["loc"] else None
        raise RequestError(400, f"'{where}': {first['msg']}{more}", param) from None


# -- messages, prompts, stops --------------------------------------------------------------------
def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            if not ok:
                raise RequestError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"{where}: 'content' must be a string or a list of text parts", "messages")


def chat_turns(messages) -> list[tuple[str, str]]:
    """OpenAI messages -> template turns, system turns included (the tokenizer's chat template
    renders them; fastdpo's own folds them into the first user turn); the last message other than
    a system one must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", "messages")
        role, text = m.get("role"), _text_content(m.get("content"), f"messages[{i}]")
        if role in ("system", "developer"):
            turns.append(("system", text))
        elif role in ("user", "assistant"):
            turns.append((role, text))
        else:
            raise RequestError(400, f"messages[{i}]: unsupported role {role!r}", "messages")
    if [role for role, _ in turns if role != "system"][-1:] != ["user"]:
        raise RequestError(400, "the last non-system message must have role 'user'", "messages")
    return turns


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(raw, tokenizer, vocab_size: int) -> list[list[int]]:
    """A completion prompt: text, a list of texts, token ids, or a list of token-id lists."""
    if isinstance(raw, str):
        raw = [raw]
    elif _is_ids(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not (all(isinstance(p, str) for p in raw)
                                                    or all(_is_ids(p) for p in raw)):
        raise RequestError(400, "'prompt' must be a string, a list of strings, a non-empty list of token "
                                "ids or a list of such lists", "prompt")
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            out.append(tokenizer.encode(p) or [tokenizer.eos_id])
        else:
            bad = next((t for t in p if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise RequestError(400, f"prompt[{i}] has token id {bad} outside [0, {vocab_size})", "prompt")
            out.append(list(p))
    return out


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOPS:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them",
                           "stop")
    return stops


def _unsupported(req: _Common, chat: bool) -> None:
    """Settings this server cannot honour are refused rather than silently ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise RequestError(400, f"'{name}' is not supported by fastdpo serve (send 0)", name)
    if req.logit_bias:
        raise RequestError(400, "'logit_bias' is not supported by fastdpo serve", "logit_bias")
    if chat:
        if req.tools:
            raise RequestError(400, "'tools' are not supported by fastdpo serve", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise RequestError(400, "only response_format {'type': 'text'} is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        if req.echo:
            raise RequestError(400, "'echo' is not supported by fastdpo serve", "echo")
        if req.suffix:
            raise RequestError(400, "'suffix' is not supported by fastdpo serve", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise RequestError(400, "'best_of' other than n is not supported by fastdpo serve", "best_of")


# -- a validated request -------------------------------------------------------------------------
@dataclass
class Limits:
    """What the server allows and its defaults (set from ``fastdpo serve``'s flags)."""
    model_name: str
    block_size: int
    vocab_size: int
    default_max_tokens: int = 256
    default_top_k: int | None = 50
    max_n: int = 16
    max_rows: int = 64                 # prompts x n in one request
    tokens_as_ids: bool = False        # default of return_tokens_as_token_ids
    aliases: set = field(default_factory=set)   # more names the model answers to (loaded adapters)


@dataclass
class Sampling:
    """A request reduced to what the sampler and the response need."""
    chat: bool
    prompts: list[list[int]]
    n: int
    temperature: float
    top_p: float
    top_k: int | None
    budgets: list[int]                 # per prompt: max_tokens, clamped to the context left
    stops: list[str]
    stop_ids: frozenset[int]
    seeds: list[int]                   # per row (prompt-major, n per prompt)
    logprobs: int | None               # None: no log-probs; k: the chosen token and k alternatives
    stream: bool
    include_usage: bool
    tokens_as_ids: bool
    return_token_ids: bool
    record: dict = field(default_factory=dict)  # the request as the interaction log keeps it

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


def parse_request(body: dict, chat: bool, tokenizer, limits: Limits, rng: random.Random) -> Sampling:
    """Validate a chat or completion request body and render its prompts to token ids.
    ``rng`` draws the row seeds of an unseeded request."""
    req = _validate(ChatRequest if chat else CompletionRequest, body)
    if req.model is not None and req.model != limits.model_name and req.model not in limits.aliases:
        raise RequestError(404, f"model {req.model!r} not found; this server serves {limits.model_name!r}",
                           "model", "model_not_found")
    _unsupported(req, chat)
    if chat:
        turns = chat_turns(req.messages)
        try:
            prompts = [tokenizer.render_conversation(turns)]
        except ValueError as e:   # the chat template refused the messages
            raise RequestError(400, str(e), "messages") from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        record = {"messages": req.messages}
    else:
        prompts = _prompts(req.prompt, tokenizer, limits.vocab_size)
        logprobs = req.logprobs
        max_tokens = req.max_tokens
        record = {"prompt": req.prompt}
    if req.n > limits.max_n:
        raise RequestError(400, f"'n' = {req.n} exceeds this server's limit of {limits.max_n}", "n")
    if len(prompts) * req.n > limits.max_rows:
        raise RequestError(400, f"{len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} answers "
                                f"exceeds this server's limit of {limits.max_rows} per request", "n")
    max_tokens = max_tokens or limits.default_max_tokens
    budgets = []
    for i, ids in enumerate(prompts):
        room = limits.block_size - len(ids)
        if room < 1:
            where = "messages" if chat else f"prompt[{i}]"
            raise RequestError(400, f"{where} is {len(ids)} tokens; this model's context is "
                                    f"{limits.block_size} tokens", where.split("[")[0],
                               "context_length_exceeded")
        budgets.append(min(max_tokens, room))
    stop_ids = frozenset(req.stop_token_ids or ())
    if any(not 0 <= t < limits.vocab_size for t in stop_ids):
        raise RequestError(400, f"'stop_token_ids' must be token ids in [0, {limits.vocab_size})",
                           "stop_token_ids")
    seed_rng = random.Random(req.seed) if req.seed is not None else rng
    top_k = limits.default_top_k if req.top_k is None else (req.top_k if req.top_k > 0 else None)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    stops = _stops(req.stop)
    sampling = Sampling(
        chat=chat, prompts=prompts, n=req.n, temperature=temperature, top_p=top_p, top_k=top_k,
        budgets=budgets, stops=stops, stop_ids=stop_ids,
        seeds=[seed_rng.getrandbits(62) for _ in range(len(prompts) * req.n)], logprobs=logprobs,
        stream=req.stream, include_usage=bool(req.stream_options and req.stream_options.include_usage),
        tokens_as_ids=limits.tokens_as_ids if req.return_tokens_as_token_ids is None
        else req.return_tokens_as_token_ids,
        return_token_ids=req.return_token_ids)
    sampling.record = {**record, "sampling": {
        "n": req.n, "temperature": temperature, "top_p": top_p, "top_k": top_k, "max_tokens": max_tokens,
        "seed": req.seed, "stop": stops, "stop_token_ids": sorted(stop_ids), "logprobs": logprobs,
        "stream": req.stream}}
    return sampling


# -- responses -----------------------------------------------------------------------------------
# A log-prob entry: (token id, its log-prob, [(alternative id, log-prob), ...] most likely first).
Entry = tuple[int, float, list[tuple[int, float]]]


class TokenNames:
    """How tokens are written in log-probs: their text, or ``token_id:<id>`` (vLLM's
    ``return_tokens_as_token_ids``, which survives tokens that are not whole characters)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def name(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.text(token)


def chat_logprobs(entries: list[Entry], names: TokenNames) -> dict:
    def one(t: int, lp: float) -> dict:
        return {"token": names.name(t), "logprob": lp, "bytes": list(names.text(t).encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]}
                        for t, lp, top in entries], "refusal": None}


def completion_logprobs(entries: list[Entry], names: TokenNames, offset: int = 0) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, top in entries:
        out["tokens"].append(names.name(t))
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({names.name(a): alp for a, alp in top})
        out["text_offset"].append(offset)
        offset += len(names.text(t))
    return out


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    n_prompt = sum(map(len, prompts))
    return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
            "total_tokens": n_prompt + completion_tokens}


def choice_payload(s: Sampling, index: int, text: str, finish: str | None, entries: list[Entry] | None,
                   names: TokenNames, token_ids: list[int] | None = None, *, stop_reason=None,
                   delta: bool = False, first: bool = False, offset: int = 0) -> dict:
    """One choice of a response (``delta=False``) or of a stream chunk (``delta=True``).
    ``offset``: where ``entries``' first token starts in the answer (completions' ``text_offset``)."""
    want_lp = entries is not None and s.logprobs is not None
    if s.chat:
        lp = chat_logprobs(entries, names) if want_lp else None
        if delta:
            d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            out = {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish}
        else:
            out = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                   "finish_reason": finish}
    else:
        lp = completion_logprobs(entries, names, offset) if want_lp else None
        out = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
    if finish is not None:
        out["stop_reason"] = stop_reason
    if s.return_token_ids and token_ids is not None:
        out["token_ids"] = token_ids
    return out


def envelope(s: Sampling, request_id: str, created: int, model: str, choices: list[dict], *,
             chunk: bool = False) -> dict:
    if s.chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
