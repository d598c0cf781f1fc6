"""The ``openai`` generation backend: answers from an OpenAI-compatible server serving the policy.

Prompts arrive rendered (token ids, the policy's own chat template applied on fastdpo's side) and go
to ``/v1/completions`` as token ids, several prompts per request. Rows that share a prompt and a
temperature become one prompt with ``n`` samples; each distinct temperature is its own request;
a greedy group asks for one sample and repeats it. ``seed`` goes with every request (derived from
the rows' seeds, so a rerun sends the same requests); requests run ``concurrency`` at a time.

Token ids come back, in order of preference: a choice's ``token_ids`` (vLLM's and fastdpo serve's
``return_token_ids``), the log-prob tokens written ``token_id:<id>`` (vLLM's
``return_tokens_as_token_ids`` with ``logprobs: 0``), or, from a server offering neither, the
answer's text re-encoded, kept only if it round-trips (``roundtrips``; a row that does not is
``None``/``"unverified"`` and counted). ``token_ids: auto`` asks for both the first time and
keeps what the server answered with. ``finish_reason`` gives ``stop`` or ``length``; a trailing
end-of-turn token (vLLM keeps it) is removed, as the built-in sampler leaves it out.

Connection errors, timeouts, 429 and 5xx are retried under the judge's policy
(``generation.retry``: exponential backoff with jitter, ``Retry-After`` honoured, at most
``max_retries`` retries within ``timeout`` seconds of failing), then raise ``ServiceError``; any
other refusal raises at once (every later request would fail the same way).

``reload(policy_dir)``: ``reload: lora`` loads the directory (a fastdpo LoRA adapter checkpoint is
in PEFT format) through vLLM's ``/v1/load_lora_adapter`` and samples from it by its new name
(vLLM needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``; ``fastdpo serve``
needs ``--allow-reload``); ``reload: command`` runs ``reload_command`` (``{policy}`` and
``{hf_dir}`` filled in; ``{hf_dir}`` exports the policy first) and waits for the server to answer.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastdpo.errors import ConfigError, ServiceError
from fastdpo.generation.backends import (
    UNVERIFIED,
    GenerationConfig,
    SamplerBackend,
    group_rows,
    row_seeds,
    strip_end,
)
from fastdpo.generation.retry import BadReply, GiveUp, Retrier, RetryPolicy, failure_from_openai

API_KEY_ENV = "FASTDPO_SAMPLER_API_KEY"
MAX_ROWS_PER_REQUEST = 64      # prompts x n: fastdpo serve's default cap per request


class OpenAISampler(SamplerBackend):
    name = "openai"

    def __init__(self, config: GenerationConfig, tokenizer, *, block_size: int | None = None,
                 policy: str | Path | None = None, transport=None):
        """``transport``: an ``httpx`` transport to send requests through (tests, proxies)."""
        import httpx
        self.config, self.tokenizer, self.policy = config, tokenizer, policy
        self.url = config.url.rstrip("/")
        key = config.api_key or os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._httpx = httpx
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=config.timeout,
                                    transport=transport,
                                    limits=httpx.Limits(max_connections=config.concurrency,
                                                        max_keepalive_connections=config.concurrency))
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="fastdpo-sampler-http")
        # the judge's policy: backoff with jitter and Retry-After, within max_retries and a time budget
        self._retrier = Retrier(RetryPolicy(budget_s=config.timeout, max_attempts=config.max_retries + 1),
                                failure_from_openai, on_failure=self._on_failure)
        self._lock = threading.Lock()
        self.mode = config.token_ids          # "auto" until the first answer says what the server offers
        self.counts = {"requests": 0, "retries": 0, "reencoded": 0, "roundtrip_failures": 0, "reloads": 0}
        served = self._served_model(config.model)
        self.model, self.base_model = served["id"], served["id"]
        limits = [x for x in (block_size, served.get("max_model_len")) if x]
        if not limits:
            raise ConfigError(f"sampler {self.url}: the server does not say its context length "
                              f"(max_model_len) and no local checkpoint gives it")
        self.block_size = min(limits)
        self._adapters = 0

    def describe(self) -> str:
        return f"{self.model} at {self.url}"

    def identity(self) -> str:
        # not the URL: a run resumed against the same model restarted on another port continues
        return f"openai:{self.model}:{Path(self.policy).resolve() if self.policy else ''}"

    @property
    def stats(self) -> dict:
        return {**self.counts, "token_ids": self.mode}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, prompts, temperatures, max_new_tokens, top_k, eos_id, seed):
        n_rows = len(prompts)
        seeds = row_seeds(seed, n_rows)
        # one request per temperature and samples-per-prompt, up to prompts_per_request prompts each
        by_kind: dict[tuple[float, int], list[tuple[tuple, list[int]]]] = {}
        for p, t, rows, n in group_rows(prompts, temperatures):
            by_kind.setdefault((t, n), []).append((p, rows))
        requests = []
        for (t, n), items in by_kind.items():
            step = max(1, min(self.config.prompts_per_request, MAX_ROWS_PER_REQUEST // n))
            for lo in range(0, len(items), step):
                chunk = items[lo:lo + step]
                requests.append((t, n, chunk, seeds[chunk[0][1][0]]))
        futures = [self._pool.submit(self._complete, [p for p, _ in chunk], t, n, max_new_tokens, top_k,
                                     eos_id, s) for t, n, chunk, s in requests]
        out: list = [None] * n_rows
        finish: list = [None] * n_rows
        for (_, _, chunk, _), fut in zip(requests, futures):
            answers = fut.result()            # per prompt: n (ids, finish)
            for (_, rows), got in zip(chunk, answers):
                for j, r in enumerate(rows):
                    out[r], finish[r] = got[j % len(got)]
        return out, finish

    def _complete(self, prompts: list[tuple], temperature: float, n: int, max_tokens: int,
                  top_k: int | None, eos_id: int, seed: int) -> list[list[tuple]]:
        body = {"model": self.model, "prompt": [list(p) for p in prompts], "n": n,
                "temperature": temperature, "max_tokens": max_tokens, "top_k": top_k or -1,
                "seed": seed, "stop_token_ids": [eos_id]}
        mode = self.mode
        if mode in ("auto", "token_ids"):
            body["return_token_ids"] = True
        if mode in ("auto", "logprobs"):
            body["logprobs"], body["return_tokens_as_token_ids"] = 0, True
        reply = self._post("/completions", body)
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) * n:
            raise ServiceError(f"sampler {self.describe()}: asked for {len(prompts) * n} answers, "
                               f"got {len(choices)}")
        if mode == "auto":
            self._settle(choices[0])
        answers = []
        for i in range(len(prompts)):
            answers.append([self._answer(c, eos_id) for c in choices[i * n:(i + 1) * n]])
        return answers

    def _settle(self, choice: dict) -> None:
        with self._lock:
            if self.mode != "auto":
                return
            if isinstance(choice.get("token_ids"), list):
                self.mode = "token_ids"
            elif _logprob_ids(choice) is not None:
                self.mode = "logprobs"
            else:
                self.mode = "text"

    def _answer(self, choice: dict, eos_id: int) -> tuple[list[int] | None, str]:
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        ids = choice.get("token_ids") if isinstance(choice.get("token_ids"), list) else _logprob_ids(choice)
        if ids is None:
            text = choice.get("text") or ""
            ids = self.tokenizer.encode(text)
            ok = roundtrips(self.tokenizer, text, ids)
            with self._lock:
                self.counts["reencoded"] += 1
                self.counts["roundtrip_failures"] += not ok
            if not ok:
                return None, UNVERIFIED
        return strip_end([int(t) for t in ids], finish, eos_id), finish

    # -- HTTP --------------------------------------------------------------------------------------
    def _post(self, route: str, body: dict) -> dict:
        return self._request("POST", route, body)

    def _request(self, method: str, route: str, body: dict | None = None) -> dict:
        def attempt():
            with self._lock:
                self.counts["requests"] += 1
            r = self._client.request(method, route, json=body)
            if r.status_code >= 400:
                r.raise_for_status()              # classified by failure_from_openai: 429/5xx retried
            if not r.content:
                return {}
            try:
                return r.json()
            except json.JSONDecodeError:
                if "json" in r.headers.get("content-type", ""):
                    raise BadReply("the reply is not JSON", r.text[:300], r.status_code) from None
                return {"text": r.text}           # vLLM's adapter routes answer in plain text
        try:
            return self._retrier.call(attempt)
        except GiveUp as e:
            raise ServiceError(f"sampler {self.url}{route}: {e}") from None

    def _on_failure(self, failure, retrying: bool) -> None:
        if retrying:
            with self._lock:
                self.counts["retries"] += 1

    def _served_model(self, name: str | None) -> dict:
        data = self._request("GET", "/models").get("data") or []
        if not data:
            raise ServiceError(f"sampler {self.url}/models: the server lists no model")
        if name is None:
            return data[0]
        for m in data:
            if m.get("id") == name:
                return m
        raise ConfigError(f"sampler {self.url}: model {name!r} is not served there "
                          f"(served: {', '.join(str(m.get('id')) for m in data)}); fix --sampler-model")

    # -- a new policy ------------------------------------------------------------------------------
    def reload(self, policy_dir) -> None:
        policy_dir = Path(policy_dir).resolve()
        how = self.config.reload
        if how == "none":
            raise ConfigError(f"sampler {self.url}: the server would keep sampling the old policy; set "
                              f"generation.reload to 'lora' (vLLM's /v1/load_lora_adapter) or 'command' "
                              f"(generation.reload_command restarts the server on {policy_dir})")
        if how == "lora":
            self._adapters += 1
            name = f"{self.base_model}-policy-{self._adapters}"
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(policy_dir)})
            old, self.model = self.model, name
            if old != self.base_model:      # keep one adapter slot busy, not one per round
                try:
                    self._post("/unload_lora_adapter", {"lora_name": old})
                except ServiceError:
                    pass
        else:
            self._run_command(policy_dir)
        self.policy = policy_dir
        self.counts["reloads"] += 1

    def _run_command(self, policy_dir: Path) -> None:
        command = self.config.reload_command
        hf_dir = ""
        if "{hf_dir}" in command:
            from fastdpo.models.hf_export import export_hf
            hf_dir = str(export_hf(policy_dir, policy_dir.with_name(policy_dir.name + "-hf"), overwrite=True,
                                   merge=True))
        filled = command.replace("{policy}", shlex.quote(str(policy_dir)))
        filled = filled.replace("{hf_dir}", shlex.quote(hf_dir))
        done = subprocess.run(filled, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServiceError(f"generation.reload_command exited with {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")
        deadline = time.monotonic() + self.config.timeout
        while True:                           # a restarted server takes a while to load the model
            self._retrier.reset()             # its refusals while down must not keep the circuit open
            try:
                self.model = self._served_model(self.config.model)["id"]
                return
            except ServiceError:
                if time.monotonic() > deadline:
                    raise


def roundtrips(tokenizer, text: str, ids: list[int]) -> bool:
    """Whether ``ids`` (``text`` re-encoded) can stand for what the server sampled: they decode to
    the text, and the text holds no U+FFFD, which a server writes for sampled bytes that are not
    whole characters (their tokens are lost, and re-encoding the replacement gives others)."""
    return "\ufffd" not in text and tokenizer.decode(ids) == text


def _logprob_ids(choice: dict) -> list[int] | None:
    """Token ids from log-prob tokens written ``token_id:<id>``, else None."""
    lp = choice.get("logprobs")
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t.startswith("token_id:")
                                               for t in tokens):
        return None
    if not tokens and choice.get("text"):
        return None
    try:
        return [int(t[len("token_id:"):]) for t in tokens]
    except ValueError:
        return None

