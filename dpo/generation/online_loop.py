"""Iterative (online) DPO: rounds of mine -> train -> evaluate -> quality gate -> promote.

Round k starts from the current policy (the SFT model, then the last promoted round's):

1. **pairs** ``round-k/pairs.jsonl``: mined from the current policy on the round's slice of the
   prompt pool (``fastdpo.generation.mining.mine_pairs``, itself resumable), or a given data set
   copied in;
2. **train** ``round-k/attempt-j/final``: DPO (``run_dpo``) from the current policy; the reference
   is the current policy (``reference: previous``) or the SFT model (``reference: sft``);
3. **eval** ``round-k/attempt-j/eval_vs_prev.json`` and ``eval_vs_sft.json``: the candidate
   against the previous policy and against SFT, position-swapped compare plus 1-10 scores;
4. **gate**: promoted when the win rate among decided prompts vs the previous policy is at least
   ``min_win_rate`` and the mean held-out score fell by no more than ``max_score_drop``. A round
   that fails is retried (attempt j+1) with the documented adjustment -- beta times
   ``beta_factor`` and the training steps (or epochs) times ``steps_factor`` per retry: a larger
   beta keeps the policy closer to its reference, fewer steps move it less -- up to ``max_retries``;
   then the loop stops (``on_fail: stop``) or goes on from the unchanged policy (``continue``);
5. **promote**: ``round-k/eval.json`` records the decision, then the passing attempt's ``final/``
   is renamed to ``round-k/final``.

Resuming. Every step's output is whole or absent (atomic writes and renames; mining keeps its own
progress log), and a step is skipped when its output exists, so a run killed at any point and
started again ends with the same artifacts as an uninterrupted one (same thread count): training
restarts the interrupted attempt from its start checkpoint with the same seed, the evaluations
and the gate are recomputed from the same weights with the same seeds. ``loop.json`` fingerprints
the settings that decide those artifacts; a different configuration refuses to resume in the same
directory (the number of rounds may grow).

Generation goes through a ``GenerationEngine`` (``BuiltinEngine``: the in-process KV-cached
sampler). ``engine.policy_changed(checkpoint)`` is called whenever the policy that generates
changes (the start, every promotion): the place where an engine serving the policy from another
process reloads its weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.errors import ConfigError
from fastdpo.files import atomic_write, write_json
from fastdpo.generation.judge import Judge
from fastdpo.generation.mining import DEFAULT_TEMPS, load_prompts

REFERENCES = ("previous", "sft")
ON_FAIL = ("stop", "continue")


@dataclass
class LoopConfig:
    """The loop's own settings (training and DPO settings come as ``TrainingConfig`` / ``DPOConfig``)."""
    rounds: int = 3
    prompts: Path | None = None               # prompt pool (JSONL with "prompt"), mined each round
    prompts_per_round: int | None = None      # round k mines pool[k*n:(k+1)*n] (wrapping); None: all
    datasets: list[Path] = field(default_factory=list)   # or a given pairs file per round
    eval_prompts: Path | None = None          # held-out prompts for the gate (required)
    n_eval_prompts: int | None = None
    reference: str = "previous"               # previous (the round's start policy) | sft
    max_pairs_per_round: int | None = None    # train on at most this many of the round's pairs
    # quality gate
    min_win_rate: float = 0.5                 # win / (win + loss) vs the previous policy
    max_score_drop: float = 0.0               # allowed fall of the mean held-out score
    correct_score: int = 9                    # "accuracy" in the report: answers scoring >= this
    max_retries: int = 1
    beta_factor: float = 2.0                  # per retry: beta *= beta_factor
    steps_factor: float = 0.5                 # per retry: steps (or epochs) *= steps_factor
    on_fail: str = "stop"                     # stop | continue (keep the previous policy)
    # mining
    temps: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPS))
    max_new_tokens: int = 128
    top_k: int | None = 50
    min_gap: int = 2
    min_best: int = 6
    mine_batch_size: int = 16
    # evaluation
    eval_temperature: float = 0.7
    eval_max_new_tokens: int | None = None    # default: max_new_tokens
    eval_batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"loop: rounds must be >= 1, got {self.rounds}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"loop: reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.on_fail not in ON_FAIL:
            raise ConfigError(f"loop: on_fail must be one of {ON_FAIL}, got {self.on_fail!r}")
        if not 0 <= self.min_win_rate <= 1:
            raise ConfigError(f"loop: min_win_rate must be in [0, 1], got {self.min_win_rate}")
        if self.max_retries < 0 or self.beta_factor <= 0 or not 0 < self.steps_factor <= 1:
            raise ConfigError("loop: max_retries >= 0, beta_factor > 0 and 0 < steps_factor <= 1")
        if self.prompts is None and not self.datasets:
            raise ConfigError("loop: give a prompt pool (prompts) or one data set per round (datasets)")
        if self.eval_prompts is None:
            raise ConfigError("loop: eval_prompts (held-out prompts for the quality gate) is required")
        self.datasets = [Path(p) for p in self.datasets]

    def dataset_for(self, k: int) -> Path | None:
        """Round k's given data set (0-based), if any: a pool of prompts takes over after the last."""
        return self.datasets[k] if k < len(self.datasets) else None


class BuiltinEngine:
    """Generation with the in-process sampler: checkpoints are loaded onto ``device`` (cached
    while they are in use). Another engine (a server holding the policy) implements the same
    four methods; ``policy_changed`` is its cue to reload."""

    def __init__(self, device="cpu", dtype=None, tokenizer=None):
        from fastdpo.runtime import resolve_device
        self.device, self.dtype, self.tokenizer = resolve_device(device), dtype, tokenizer
        self._models: dict[str, object] = {}

    def load(self, ckpt: str | Path):
        from fastdpo.models.checkpoint import load_policy
        key = str(Path(ckpt).resolve())
        if key not in self._models:
            model, tok = load_policy(ckpt, self.tokenizer, self.device)
            self._models[key] = (model, tok)
        return self._models[key]

    def policy_changed(self, ckpt: str | Path, keep: Sequence[str | Path] = ()) -> None:
        """The generating policy is now ``ckpt``: models other than it and ``keep`` (the SFT
        model, which every round is evaluated against) are dropped."""
        wanted = {str(Path(p).resolve()) for p in (ckpt, *keep)}
        self._models = {k: v for k, v in self._models.items() if k in wanted}

    def mine(self, ckpt, prompts, judge: Judge, out_path, *, settings: dict, progress: bool):
        from fastdpo.generation.mining import mine_pairs
        model, tok = self.load(ckpt)
        return mine_pairs(model, tok, prompts, judge, out_path, dtype=self.dtype, progress=progress,
                          **settings)

    def evaluate(self, ckpt_a, ckpt_b, prompts, judge: Judge, *, settings: dict, progress: bool,
                 names: tuple[str, str]) -> dict:
        from fastdpo.generation.evaluate import evaluate
        model_a, tok = self.load(ckpt_a)
        model_b, _ = self.load(ckpt_b)
        return evaluate(model_a, model_b, tok, prompts, judge, mode="both", dtype=self.dtype,
                        progress=progress, names=names, **settings)


def _settings_fingerprint(loop: LoopConfig, train_cfg, dpo_cfg, sft: Path, judge: Judge) -> str:
    from fastdpo.training.config import to_dict
    lc = {k: v for k, v in dataclasses.asdict(loop).items() if k != "rounds"}
    tc = {k: v for k, v in to_dict(train_cfg).items()
          if k not in ("output_dir", "run_name", "progress", "overwrite", "wandb", "report_to")}
    blob = json.dumps({"loop": lc, "train": tc, "dpo": to_dict(dpo_cfg), "sft": str(Path(sft).resolve()),
                       "judge": judge.name}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def attempt_configs(train_cfg, dpo_cfg, loop: LoopConfig, attempt: int):
    """Attempt ``attempt`` (0 = first try) of a round: beta x beta_factor^attempt, steps (or
    epochs when no max_steps) x steps_factor^attempt, at least one step."""
    if attempt == 0:
        return train_cfg, dpo_cfg
    f = loop.steps_factor ** attempt
    if train_cfg.max_steps:
        train_cfg = dataclasses.replace(train_cfg, max_steps=max(1, math.ceil(train_cfg.max_steps * f)))
    else:
        train_cfg = dataclasses.replace(train_cfg, epochs=train_cfg.epochs * f)
    return train_cfg, dataclasses.replace(dpo_cfg, beta=dpo_cfg.beta * loop.beta_factor ** attempt)


def gate(vs_prev: dict, loop: LoopConfig) -> dict:
    """The quality gate on a candidate's report against the previous policy."""
    c, s = vs_prev["compare"], vs_prev["score"]
    wr = c["win_rate_decided"]
    drop = None if s["mean_a"] is None or s["mean_b"] is None else s["mean_b"] - s["mean_a"]
    # every prompt tied: no evidence either way, which passes only a gate asking for none
    win_ok = wr >= loop.min_win_rate if wr is not None else loop.min_win_rate == 0
    score_ok = drop is not None and drop <= loop.max_score_drop
    reasons = []
    if not win_ok:
        reasons.append("no decided prompt vs the previous policy" if wr is None else
                       f"win rate among decided {wr:.3f} < {loop.min_win_rate}")
    if not score_ok:
        reasons.append("no held-out score" if drop is None else
                       f"held-out score fell by {drop:.3f} > {loop.max_score_drop}")
    return {"passed": win_ok and score_ok, "win_rate_decided": wr, "score_drop": drop,
            "reasons": reasons}


def eval_summary(report: dict, correct_score: int) -> dict:
    """The figures a round's table shows from one head-to-head report (A = the candidate)."""
    c, s, ln = report["compare"], report["score"], report["length"]
    items = report["items"]

    def acc(key):
        vals = [it.get(key) for it in items]
        return sum(v is not None and v >= correct_score for v in vals) / max(1, len(vals))

    out = {"win": c["win"], "tie": c["tie"], "loss": c["loss"], "win_rate_decided": c["win_rate_decided"],
           "mean_score_a": s["mean_a"], "mean_score_b": s["mean_b"], "accuracy_a": acc("score_a"),
           "accuracy_b": acc("score_b"), "avg_tokens_a": ln["avg_tokens_a"],
           "avg_tokens_b": ln["avg_tokens_b"]}
    if "dimensions" in report:
        out["dimensions"] = {d: v["win_rate_decided"] for d, v in report["dimensions"].items()}
    return out


def run_loop(sft_checkpoint: str | Path, out_dir: str | Path, judge: Judge, loop: LoopConfig,
             train_config, dpo_config, *, tokenizer: str | Path | None = None, engine=None,
             progress: bool = True, say: Callable = print,
             on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) the loop in ``out_dir``; returns the summary (also ``out_dir/report.json``,
    ``report.md`` and ``report.png``). ``train_config`` / ``dpo_config`` are the templates each
    round's training starts from (``output_dir`` / ``run_name`` / ``overwrite`` are set per
    attempt); ``on_round(k, round_summary)`` is called after each decided round."""
    from fastdpo.generation.loop_report import write_report
    sft = Path(sft_checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = engine or BuiltinEngine(train_config.device, tokenizer=tokenizer)
    fp = _settings_fingerprint(loop, train_config, dpo_config, sft, judge)
    state_path = out / "loop.json"
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        if old.get("fingerprint") != fp:
            raise ConfigError(f"{out}: holds a loop run with other settings (fingerprint "
                              f"{old.get('fingerprint')} != {fp}); use another directory")
    write_json(state_path, {"fingerprint": fp, "sft_checkpoint": str(sft), "rounds": loop.rounds,
                            "judge": judge.name, "loop": dataclasses.asdict(loop)})
    pool = load_prompts(loop.prompts) if loop.prompts is not None else []
    eval_prompts = load_prompts(loop.eval_prompts, loop.n_eval_prompts)
    eval_settings = dict(temperature=loop.eval_temperature,
                         max_new_tokens=loop.eval_max_new_tokens or loop.max_new_tokens, top_k=loop.top_k,
                         seed=loop.seed + 1, batch_size=loop.eval_batch_size)
    policy = sft
    engine.policy_changed(policy, keep=[sft])
    rounds: list[dict] = []
    stopped = None
    for k in range(1, loop.rounds + 1):
        rdir = out / f"round-{k}"
        rdir.mkdir(exist_ok=True)
        cost: dict = {}
        # 1. pairs ------------------------------------------------------------------------
        t0 = time.perf_counter()
        pairs, mined = _round_pairs(k, rdir, loop, pool, policy, judge, engine, progress, say)
        cost["pairs_s"] = time.perf_counter() - t0
        decision_path = rdir / "eval.json"
        if decision_path.is_file():
            decision = json.loads(decision_path.read_text())
        else:
            t0 = time.perf_counter()
            decision = _decide_round(k, rdir, loop, policy, sft, pairs, judge, engine, train_config,
                                     dpo_config, tokenizer, eval_prompts, eval_settings, progress, say, cost)
            cost["decide_s"] = time.perf_counter() - t0
            write_json(decision_path, decision)
        # 5. promote (idempotent: the rename happens once) ------------------------------------
        if decision["promoted"]:
            policy = _promote(rdir, decision["promoted_attempt"])
            engine.policy_changed(policy, keep=[sft])
        # what the round cost in this process (a resumed round: the part done after the restart)
        cost_path = rdir / "cost.json"
        if "decide_s" in cost or not cost_path.is_file():
            write_json(cost_path, {**cost, "mining": mined})
        summary = {**decision, "pairs": _count_lines(pairs), "policy": str(policy),
                   "cost": json.loads(cost_path.read_text())}
        rounds.append(summary)
        if on_round is not None:
            on_round(k, summary)
        say(f"round {k}: {'promoted' if decision['promoted'] else 'rejected'} "
            f"({'; '.join(decision['reasons']) or 'gate passed'})", flush=True)
        if not decision["promoted"] and loop.on_fail == "stop":
            stopped = k
            break
    report = {"sft_checkpoint": str(sft), "policy": str(policy), "rounds": rounds, "stopped_at": stopped,
              "settings": dataclasses.asdict(loop)}
    return write_report(out, report)


def _promote(rdir: Path, attempt: int) -> Path:
    """Rename the passing attempt's checkpoint to ``round-k/final`` (once: a rerun finds it there)."""
    final = rdir / "final"
    if not final.exists():
        os.replace(rdir / f"attempt-{attempt}" / "final", final)
    return final


def _round_pairs(k: int, rdir: Path, loop: LoopConfig, pool: Sequence[str], policy: Path, judge: Judge,
                 engine, progress: bool, say) -> tuple[Path, dict | None]:
    pairs = rdir / "pairs.jsonl"
    given = loop.dataset_for(k - 1)
    if given is not None:
        if not pairs.is_file():
            if not given.is_file():
                raise FileNotFoundError(f"loop: round {k}'s data set not found: {given}")
            atomic_write(pairs, lambda tmp: shutil.copyfile(given, tmp))
        return pairs, None
    done = rdir / "mined.json"
    if done.is_file():
        return pairs, json.loads(done.read_text())
    prompts = list(pool)
    if loop.prompts_per_round:
        n = loop.prompts_per_round
        prompts = [pool[(i + (k - 1) * n) % len(pool)] for i in range(n)]
    say(f"round {k}: mining {len(prompts)} prompts from {policy}", flush=True)
    stats = engine.mine(policy, prompts, judge, pairs, progress=progress, settings=dict(
        temps=loop.temps, max_new_tokens=loop.max_new_tokens, top_k=loop.top_k, min_gap=loop.min_gap,
        min_best=loop.min_best, batch_size=loop.mine_batch_size, seed=loop.seed + k))
    mined = stats.as_dict()
    write_json(done, mined)
    return pairs, mined


def _decide_round(k, rdir, loop, policy, sft, pairs, judge, engine, train_config, dpo_config, tokenizer,
                  eval_prompts, eval_settings, progress, say, cost) -> dict:
    from fastdpo.training.config import PreferenceDatasetConfig
    from fastdpo.training.dpo import run_dpo
    attempts = []
    n_pairs = min(_count_lines(pairs), loop.max_pairs_per_round or math.inf)
    if n_pairs < (train_config.batch_size or 1):   # not one optimizer step: nothing to train
        return {"round": k, "promoted": False, "promoted_attempt": None, "attempts": [], "pairs_trained": 0,
                "reasons": [f"{n_pairs} pairs, fewer than one batch ({train_config.batch_size})"]}
    for j in range(loop.max_retries + 1):
        adir = rdir / f"attempt-{j}"
        tc, dc = attempt_configs(train_config, dpo_config, loop, j)
        tc = dataclasses.replace(tc, output_dir=rdir, run_name=f"attempt-{j}", overwrite=True,
                                 seed=train_config.seed + k)
        # reference "previous": the start checkpoint itself, run_dpo's default reference
        dc = dataclasses.replace(dc, reference_checkpoint=sft if loop.reference == "sft" else None,
                                 reference_cache_dir=adir / "ref_cache")
        ckpt = adir / "final"
        if not ckpt.is_dir():
            say(f"round {k} attempt {j}: DPO from {policy} (beta {dc.beta}, "
                f"{tc.max_steps or tc.epochs} {'steps' if tc.max_steps else 'epochs'})", flush=True)
            t0 = time.perf_counter()
            data = PreferenceDatasetConfig(path=[pairs], format="prompt", on_error="skip",
                                           max_rows=loop.max_pairs_per_round)
            run_dpo(policy, tc, dc, data, tokenizer)
            cost["train_s"] = cost.get("train_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        vs_prev = _eval(engine, ckpt, policy, adir / "eval_vs_prev.json", eval_prompts, judge,
                        eval_settings, progress, (f"round-{k}", "previous"))
        vs_sft = vs_prev if Path(policy) == Path(sft) else _eval(
            engine, ckpt, sft, adir / "eval_vs_sft.json", eval_prompts, judge, eval_settings, progress,
            (f"round-{k}", "sft"))
        cost["eval_s"] = cost.get("eval_s", 0.0) + time.perf_counter() - t0
        g = gate(vs_prev, loop)
        attempts.append({"attempt": j, "beta": dc.beta, "max_steps": tc.max_steps, "epochs": tc.epochs,
                         "checkpoint": str(ckpt.relative_to(rdir)), "gate": g,
                         "vs_previous": eval_summary(vs_prev, loop.correct_score),
                         "vs_sft": eval_summary(vs_sft, loop.correct_score)})
        if g["passed"]:
            return {"round": k, "promoted": True, "promoted_attempt": j, "attempts": attempts,
                    "pairs_trained": n_pairs, "reasons": [], **_headline(attempts[-1])}
        say(f"round {k} attempt {j}: gate failed ({'; '.join(g['reasons'])})", flush=True)
    return {"round": k, "promoted": False, "promoted_attempt": None, "attempts": attempts,
            "pairs_trained": n_pairs, "reasons": attempts[-1]["gate"]["reasons"], **_headline(attempts[-1])}


def _headline(attempt: dict) -> dict:
    p, s = attempt["vs_previous"], attempt["vs_sft"]
    return {"win_rate_vs_previous": p["win_rate_decided"], "win_rate_vs_sft": s["win_rate_decided"],
            "mean_score": s["mean_score_a"], "accuracy": s["accuracy_a"], "accuracy_sft": s["accuracy_b"],
            "avg_tokens": s["avg_tokens_a"], **({"dimensions": s["dimensions"]} if "dimensions" in s else {})}


def _eval(engine, a, b, path: Path, prompts, judge: Judge, settings, progress, names) -> dict:
    """A head-to-head report, computed once: the judge's running counters are replaced by this
    evaluation's own, so the file is the same whether or not the run was resumed."""
    if path.is_file():
        return json.loads(path.read_text())
    before = judge.stats.as_dict()
    report = engine.evaluate(a, b, prompts, judge, settings=settings, progress=progress, names=names)
    report["judge_stats"] = judge.stats.since(before)
    write_json(path, report)
    return report


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
