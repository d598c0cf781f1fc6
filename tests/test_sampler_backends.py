"""Generation backends: mining through an OpenAI-compatible server (``fastdpo serve`` in a thread)
and through in-process vLLM (a fake ``vllm`` module with the LLM/SamplingParams surface), compared
with the built-in sampler on the same checkpoint."""
import json
import sys
import types
from pathlib import Path

import httpx
import pytest
import torch

from fastdpo.bench.judge import make_tiny_checkpoint
from fastdpo.errors import ConfigError, ServiceError
from fastdpo.generation import vllm_sampler
from fastdpo.generation.backends import BuiltinSampler, GenerationConfig
from fastdpo.generation.judge import Judge, ProgrammaticJudge
from fastdpo.generation.mining import mine_pairs
from fastdpo.generation.openai_sampler import OpenAISampler
from fastdpo.generation.sampler import sample
from fastdpo.generation.serve import ChatServer
from fastdpo.models.checkpoint import load_policy, save_checkpoint

PROMPTS = [f"Reverse the words: {w} cat {i}" for i, w in
           enumerate("fox dog elk gnu hen ink jam kit owl pig".split())]
SETTINGS = dict(batch_size=3, max_new_tokens=12, seed=5)
GREEDY = (0.0, 0.0, 0.0)
GREEDY_SETTINGS = dict(batch_size=3, max_new_tokens=7, seed=5)


def toy_score(instruction, response):
    return 1 + (len(response) * 7 + len(instruction)) % 10


class ByPosition(Judge):
    """Scores by place in the batch: pairs even from equal answers, so a pairs file compares
    every sampled token id and finish reason of two runs."""
    name = "by-position"

    def score_many(self, pairs):
        return [1 + (7 * i) % 10 for i in range(len(pairs))]


def _served(d: Path, stop_logit: float):
    ckpt = make_tiny_checkpoint(d / "tiny", block_size=96, stop_logit=stop_logit)
    model, tok = load_policy(ckpt)
    log = d / "interactions.jsonl"
    srv = ChatServer(model, tok, port=0, model_name="tiny", log_interactions=log, batch_window_ms=2,
                     allow_reload=True).start_in_thread()
    return dict(dir=d, ckpt=ckpt, model=model, tok=tok, srv=srv, log=log)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random model that ends most of its turns when sampled, behind fastdpo serve."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model's small ops: OpenMP barriers only cost on a shared box
    served = _served(tmp_path_factory.mktemp("backends"), stop_logit=3.0)
    yield served
    served["srv"].stop()
    served["srv"].close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy_env(env, tmp_path_factory):
    """One whose greedy answers are neither all empty nor all cut at GREEDY_SETTINGS' length."""
    served = _served(tmp_path_factory.mktemp("greedy"), stop_logit=0.5)
    yield served
    served["srv"].stop()
    served["srv"].close()


def _openai(env, transport=None, **kw):
    config = GenerationConfig(backend="openai", url=env["srv"].url, **kw)
    return OpenAISampler(config, env["tok"], block_size=96, policy=env["ckpt"], transport=transport)


def _logged_answers(env, since: int) -> dict:
    """prompt ids -> [(token ids, finish, text)] as the server logged its answers."""
    out: dict = {}
    with open(env["log"], encoding="utf-8") as f:
        f.seek(since)
        for line in f:
            rec = json.loads(line)
            n = rec["sampling"]["n"]
            for c in rec["choices"]:
                prompt = tuple(rec["prompt"][c["index"] // n])
                out.setdefault(prompt, []).append((c["token_ids"], c["finish_reason"], c["text"]))
    return out


def _rows(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def test_openai_pairs_are_the_token_ids_the_server_returned(env, tmp_path):
    since = env["log"].stat().st_size
    backend = _openai(env)
    judge = ProgrammaticJudge(toy_score, name="toy")
    stats = mine_pairs(backend, env["tok"], PROMPTS, judge, tmp_path / "p.jsonl", progress=False, **SETTINGS)
    backend.close()
    assert backend.mode == "token_ids" and backend.counts["reencoded"] == 0
    served = _logged_answers(env, since)
    eos = env["tok"].eos_id
    assert sum(map(len, served.values())) == 40          # 10 prompts x K = 4 temperatures
    n_cut = sum(f == "length" for a in served.values() for _, f, _ in a)
    assert stats.samples_truncated == n_cut > 0 and stats.prompts_done == 10
    rows = _rows(tmp_path / "p.jsonl")
    assert len(rows) == stats.pairs_kept > 0
    for r in rows:
        finished = [ids + [eos] for ids, f, _ in served[tuple(r["prompt_ids"])] if f == "stop"]
        assert r["chosen_ids"] in finished and r["rejected_ids"] in finished   # truncated ones excluded
        assert r["chosen_finish"] == r["rejected_finish"] == "stop"
        assert r["score_chosen"] == toy_score(r["prompt"], r["chosen"])
    # the seed goes through: the same run again gives the same file
    again = _openai(env)
    mine_pairs(again, env["tok"], PROMPTS, judge, tmp_path / "q.jsonl", progress=False, **SETTINGS)
    again.close()
    assert (tmp_path / "q.jsonl").read_bytes() == (tmp_path / "p.jsonl").read_bytes()


@pytest.mark.parametrize("token_ids", ["token_ids", "logprobs"])
def test_openai_greedy_pairs_equal_builtin(greedy_env, tmp_path, token_ids):
    env = greedy_env
    kw = dict(temps=GREEDY, progress=False, **GREEDY_SETTINGS)
    ref = mine_pairs(env["model"], env["tok"], PROMPTS, ByPosition(), tmp_path / "builtin.jsonl", **kw)
    backend = _openai(env, token_ids=token_ids, prompts_per_request=2)
    got = mine_pairs(backend, env["tok"], PROMPTS, ByPosition(), tmp_path / "openai.jsonl", **kw)
    backend.close()
    assert ref.pairs_kept > 0 and ref.samples_truncated > 0
    assert (got.pairs_kept, got.samples_truncated, got.samples_judged) == \
        (ref.pairs_kept, ref.samples_truncated, ref.samples_judged)
    assert (tmp_path / "openai.jsonl").read_bytes() == (tmp_path / "builtin.jsonl").read_bytes()
    # greedy groups ask for one answer per prompt, 2 prompts a request: batches of 3, 3, 3, 1 prompts
    assert backend.counts["requests"] == 1 + 2 + 2 + 2 + 1    # /models, then the completions


def _strip_ids(env):
    """A transport to the server that drops token ids and log-probs from its answers, like an
    OpenAI-compatible server without vLLM's extensions."""
    real = httpx.Client()

    def handler(request: httpx.Request) -> httpx.Response:
        r = real.send(real.build_request(request.method, str(request.url), content=request.content,
                                         headers={"content-type": "application/json"}))
        body = r.json()
        for c in body.get("choices", []) if isinstance(body, dict) else []:
            c.pop("token_ids", None)
            c["logprobs"] = None
        return httpx.Response(r.status_code, json=body)
    return httpx.MockTransport(handler)


def test_a_server_without_token_ids_takes_the_reencode_path(env, tmp_path):
    since = env["log"].stat().st_size
    backend = _openai(env, transport=_strip_ids(env))
    stats = mine_pairs(backend, env["tok"], PROMPTS, ProgrammaticJudge(toy_score, name="toy"),
                       tmp_path / "p.jsonl", progress=False, **SETTINGS)
    backend.close()
    tok, eos = env["tok"], env["tok"].eos_id
    served = _logged_answers(env, since)
    # the random model samples bytes that are not whole characters: their text cannot stand for them
    lossy = sum("\ufffd" in text for a in served.values() for _, _, text in a)
    assert backend.mode == "text" and backend.counts["reencoded"] == 40
    assert stats.samples_unverified == backend.counts["roundtrip_failures"] == lossy > 0
    rows = _rows(tmp_path / "p.jsonl")
    assert rows
    for r in rows:
        texts = [text for _, f, text in served[tuple(r["prompt_ids"])] if f == "stop"]
        assert r["chosen"] in texts and r["rejected"] in texts
        assert r["chosen_ids"] == tok.encode(r["chosen"]) + [eos]
    # a server that did return ids: the re-encoded ones are what it sampled where the text is whole
    whole = [(ids, text) for a in served.values() for ids, _, text in a if "\ufffd" not in text]
    assert sum(tok.encode(text) == ids for ids, text in whole) >= 0.9 * len(whole)


def test_retries_then_refusals(env):
    calls = []
    real = httpx.Client()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/completions") and len(calls) <= 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        r = real.send(real.build_request(request.method, str(request.url), content=request.content,
                                         headers={"content-type": "application/json"}))
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})

    backend = _openai(env, transport=httpx.MockTransport(flaky), max_retries=2)
    ids, finish = backend.sample([env["tok"].render_prompt("hi")], [0.0], 8, None, env["tok"].eos_id, 1)
    ref = BuiltinSampler(env["model"]).sample([env["tok"].render_prompt("hi")], [0.0], 8, None,
                                               env["tok"].eos_id, 1)
    assert (ids, finish) == ref and backend.counts["retries"] == 2
    refused = _openai(env, transport=httpx.MockTransport(
        lambda r: httpx.Response(401, json={"error": {"message": "bad key"}})
        if r.url.path.endswith("/completions") else flaky(r)))
    with pytest.raises(ServiceError, match="HTTP 401: .*bad key"):
        refused.sample([[1, 2, 3]], [0.7], 4, None, env["tok"].eos_id, 0)
    assert refused.counts["retries"] == 0
    with pytest.raises(ConfigError, match="'nope' is not served there"):
        _openai(env, model="nope")


def test_openai_reload_loads_the_new_policy_through_load_lora_adapter(env, tmp_path):
    model, tok = load_policy(env["ckpt"])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    new = save_checkpoint(tmp_path / "round1", model, tokenizer=tok)
    prompts = [tok.render_prompt(p) for p in PROMPTS]
    args = ([0.0] * len(prompts), 12, None, tok.eos_id, 0)
    backend = _openai(env, reload="lora")
    before = backend.sample(prompts, *args)
    assert before == BuiltinSampler(env["model"]).sample(prompts, *args)
    backend.reload(new)
    after = backend.sample(prompts, *args)
    assert backend.model == "tiny-policy-1" and after != before
    assert after == BuiltinSampler(model).sample(prompts, *args)
    backend.reload(new)                                  # the previous adapter's name is unloaded
    names = [m["id"] for m in httpx.get(env["srv"].url + "/models").json()["data"]]
    assert names == ["tiny", "tiny-policy-2"]
    with pytest.raises(ConfigError, match="generation.reload"):
        _openai(env).reload(new)
    # leave the fixture's server serving its own checkpoint again
    httpx.post(env["srv"].url + "/load_lora_adapter",
               json={"lora_name": "back", "lora_path": str(env["ckpt"])})


# --------------------------------------------------------------------------- in-process vLLM (fake)
class FakeSamplingParams:
    """vLLM's SamplingParams, for the fields the backend sets."""

    def __init__(self, n=1, temperature=1.0, top_k=-1, seed=None, max_tokens=16, stop_token_ids=None,
                 detokenize=True):
        self.n, self.temperature, self.top_k, self.seed = n, temperature, top_k, seed
        self.max_tokens, self.stop_token_ids, self.detokenize = max_tokens, stop_token_ids, detokenize


class FakeLLM:
    """vllm.LLM on an exported directory: loads it as transformers would see it (fastdpo's
    Hugging Face import) and samples with fastdpo's sampler; like vLLM, an answer that ended keeps
    its end-of-turn token."""
    made: list = []

    def __init__(self, model, gpu_memory_utilization=0.9, dtype="auto", max_model_len=None):
        self.dir, self.kwargs = Path(model), dict(gpu_memory_utilization=gpu_memory_utilization,
                                                  dtype=dtype, max_model_len=max_model_len)
        assert (self.dir / "config.json").is_file() and "model_type" in json.loads(
            (self.dir / "config.json").read_text())
        self.policy, _ = load_policy(self.dir)
        self.calls = []
        FakeLLM.made.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        out = []
        for p, sp in zip(prompts, sampling_params):
            self.calls.append(sp)
            eos = sp.stop_token_ids[0]
            new, finish = sample(self.policy, [p["prompt_token_ids"]] * sp.n, sp.temperature, sp.max_tokens,
                                 None if sp.top_k == -1 else sp.top_k, eos, sp.seed, return_finish=True)
            out.append(types.SimpleNamespace(outputs=[
                types.SimpleNamespace(token_ids=tuple(x + [eos] if f == "stop" else x), finish_reason=f)
                for x, f in zip(new, finish)]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.made = []
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(vllm_sampler, "cuda_available", lambda: True)
    return mod


def test_vllm_backend_needs_the_extra_and_a_gpu(env, monkeypatch):
    config = GenerationConfig(backend="vllm")
    monkeypatch.setitem(sys.modules, "vllm", None)           # not installed
    with pytest.raises(ConfigError, match=r"pip install 'fastdpo\[vllm\]'"):
        vllm_sampler.VLLMSampler(config, env["ckpt"], env["tok"])
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(vllm_sampler, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        vllm_sampler.VLLMSampler(config, env["ckpt"], env["tok"])


def test_vllm_backend_mines_what_builtin_mines_and_reloads(greedy_env, tmp_path, fake_vllm):
    env = greedy_env
    config = GenerationConfig(backend="vllm", gpu_memory_utilization=0.3)
    backend = vllm_sampler.VLLMSampler(config, env["ckpt"], env["tok"])
    kw = dict(temps=GREEDY, progress=False, **GREEDY_SETTINGS)
    ref = mine_pairs(env["model"], env["tok"], PROMPTS, ByPosition(), tmp_path / "builtin.jsonl", **kw)
    got = mine_pairs(backend, env["tok"], PROMPTS, ByPosition(), tmp_path / "vllm.jsonl", **kw)
    assert ref.pairs_kept > 0 and got.samples_truncated == ref.samples_truncated > 0
    assert (tmp_path / "vllm.jsonl").read_bytes() == (tmp_path / "builtin.jsonl").read_bytes()
    (llm,) = FakeLLM.made
    assert llm.kwargs == dict(gpu_memory_utilization=0.3, dtype="auto", max_model_len=96)
    sp = llm.calls[0]
    assert (sp.n, sp.temperature, sp.top_k, sp.max_tokens, sp.stop_token_ids) == \
        (1, 0.0, 50, 7, [env["tok"].eos_id])
    # K samples at one temperature: one request with n = K, its own seed per prompt
    tok = env["tok"]
    ids, finish = backend.sample([tok.render_prompt("a b")] * 3 + [tok.render_prompt("c")] * 3,
                                 [0.9] * 6, 8, 5, tok.eos_id, 11)
    assert [(c.n, c.temperature, c.top_k) for c in llm.calls[-2:]] == [(3, 0.9, 5), (3, 0.9, 5)]
    assert llm.calls[-1].seed != llm.calls[-2].seed and all(i is not None for i in ids)
    # training frees the GPU; the next round samples from the new policy, exported anew
    backend.release()
    assert backend._llm is None
    model, _ = load_policy(env["ckpt"])
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.5)
    new = save_checkpoint(tmp_path / "round1", model, tokenizer=tok)
    backend.reload(new)
    prompts = [tok.render_prompt(p) for p in PROMPTS]
    args = ([0.0] * len(prompts), 12, None, tok.eos_id, 0)
    assert backend.sample(prompts, *args) == BuiltinSampler(model).sample(prompts, *args)
    assert len(FakeLLM.made) == 2 and FakeLLM.made[1].dir != llm.dir
    exported = FakeLLM.made[1].dir
    backend.close()
    assert not exported.exists()     # the temporary export goes with the backend


def test_pairs_cli_with_the_openai_sampler(env, tmp_path, capsys, monkeypatch):
    from fastdpo.cli import main
    (tmp_path / "toyjudge_cli.py").write_text(
        "def score(instruction, response):\n    return 1 + (len(response) * 7 + len(instruction)) % 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = ["pairs", "--ckpt", str(env["ckpt"]), "--prompts", str(prompts), "--judge", "toyjudge_cli:score",
            "--no-progress", "--batch-size", "3", "--max-new-tokens", "12", "--seed", "5"]
    out = tmp_path / "cli.jsonl"
    assert main([*base, "--out", str(out), "--sampler", "openai", "--sampler-url", env["srv"].url]) == 0
    printed = capsys.readouterr().out
    assert "sampler tiny at" in printed and "'token_ids': 'token_ids'" in printed
    backend = _openai(env)
    mine_pairs(backend, env["tok"], PROMPTS, ProgrammaticJudge(toy_score, name="toy"), tmp_path / "lib.jsonl",
               progress=False, **SETTINGS)
    backend.close()
    assert out.read_bytes() == (tmp_path / "lib.jsonl").read_bytes() and out.stat().st_size > 0
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main([*base, "--out", str(tmp_path / "v.jsonl"), "--sampler", "vllm"]) == 2
    assert "fastdpo[vllm]" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "w.jsonl"), "--sampler", "openai"]) == 2
    assert "--sampler-url" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval and label
def test_eval_and_label_through_servers_answer_as_builtin(env, greedy_env):
    from fastdpo.generation.evaluate import evaluate
    from fastdpo.generation.label.answers import Answerer
    from fastdpo.generation.label.sources import Item
    judge = ProgrammaticJudge(toy_score, name="toy")
    kw = dict(mode="score", temperature=0.0, max_new_tokens=7, batch_size=4, progress=False)
    a, b = _openai(env), _openai(greedy_env)
    got = evaluate(a, b, env["tok"], PROMPTS, judge, **kw)
    ref = evaluate(env["model"], greedy_env["model"], env["tok"], PROMPTS, judge, **kw)
    a.close()
    b.close()
    assert got["items"] == ref["items"] and any(it["b"] for it in ref["items"])
    answers = []
    for gen, gen_b in ((None, None), (GenerationConfig(backend="openai", url=env["srv"].url),
                                      GenerationConfig(backend="openai", url=greedy_env["srv"].url))):
        answerer = Answerer(env["ckpt"], greedy_env["ckpt"], temperature=0.0, max_new_tokens=7,
                            generation=gen, generation_b=gen_b)
        item = Item("x", [("user", "a long question " * 30)], ("model-a", "model-b"), "test")
        answerer.answer(item)          # the prompt is longer than the context: its end is kept
        answers.append((item.answers, item.truncated))
    assert answers[0] == answers[1] and answers[0][0][1]


def test_bench_mining_rows_per_backend_at_equal_work(env, monkeypatch):
    from fastdpo.bench.mining_backends import bench_mining_backends, format_rows
    monkeypatch.setitem(sys.modules, "vllm", None)
    rows = bench_mining_backends(env["ckpt"], sampler_url=env["srv"].url, n_prompts=6, batch_size=3,
                                 max_new_tokens=8)
    got = {r["backend"]: r for r in rows}
    assert set(got) == {"builtin", "openai", "vllm"} and "fastdpo[vllm]" in got["vllm"]["skipped"]
    for name in ("builtin", "openai"):
        r = got[name]
        assert (r["prompts"], r["k"], r["max_new_tokens"]) == (6, 4, 8) and r["prompts_per_min"] > 0
    assert got["openai"]["sampler_stats"]["token_ids"] == "token_ids"
    assert got["builtin"]["vs_builtin_prompts"] == 1.0 and got["openai"]["vs_builtin_prompts"] > 0
    assert "skipped" in format_rows(rows)


def test_the_gpu_script_runs_on_the_fake_engine(greedy_env, tmp_path, fake_vllm, capsys):
    from fastdpo.bench import vllm_gpu
    out = tmp_path / "gpu.json"
    assert vllm_gpu.main(["--ckpt", str(greedy_env["ckpt"]), "--sampler-url", greedy_env["srv"].url,
                          "--n-prompts", "4", "--max-new-tokens", "7", "--repeats", "1",
                          "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["vllm_greedy"]["identical_fraction"] == got["openai_greedy"]["identical_fraction"] == 1.0
    assert {r["backend"] for r in got["mining"] if "skipped" not in r} == {"builtin", "openai", "vllm"}


def test_a_config_files_generation_section_under_the_flags(tmp_path):
    import argparse

    from fastdpo.cli.common import add_sampler_args, add_sampler_b_args, generation_config_from_args
    from fastdpo.training.config import load_config
    p = argparse.ArgumentParser()
    add_sampler_args(p, reload=True)
    add_sampler_b_args(p)
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("generation:\n  backend: openai\n  url: http://a:8000/v1\n  concurrency: 4\n"
                   "  reload: lora\n")
    base = load_config(cfg, ["generation.model=sft"], kind="dpo")["generation"]
    got = generation_config_from_args(p.parse_args(["--sampler-concurrency", "2"]), base=base)
    assert (got.backend, got.url, got.model, got.concurrency, got.reload) == \
        ("openai", "http://a:8000/v1", "sft", 2, "lora")
    assert generation_config_from_args(p.parse_args([])).backend == "builtin"
    b = generation_config_from_args(p.parse_args(["--sampler-model-b", "dpo"]), side="b", base=base)
    assert (b.url, b.model) == ("http://a:8000/v1", "dpo")
    with pytest.raises(ConfigError, match="--sampler-model-b"):
        generation_config_from_args(p.parse_args([]), side="b", base=base)
    with pytest.raises(ConfigError, match="generation: unknown key 'urls'"):
        generation_config_from_args(p.parse_args([]), base={"urls": "x"})
    with pytest.raises(ConfigError, match="needs generation.url"):
        generation_config_from_args(p.parse_args(["--sampler", "openai"]))
