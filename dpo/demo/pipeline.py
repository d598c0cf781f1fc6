"""``fastdpo demo``: the whole preference loop on the embedded task, end to end, in minutes on a CPU.

Phases (each timed, with its throughput and the process's peak memory):

1. ``task``      build the seeded task (``fastdpo.demo.task``): SFT demonstrations, mining and eval prompts;
2. ``tokenizer`` train a byte-level BPE on the task's corpus;
3. ``sft``       supervised fine-tuning of a fresh ``tiny`` GPT on the sloppy demonstrations;
4. ``mine``      sample K answers per mining prompt (KV-cached sampler), judge them with the task's
   programmatic judge, keep best/worst pairs;
   ``audit``     the mined pairs audited (``fastdpo audit``: length bias, near-identical pairs, ...);
5. one phase per arm: the headline DPO run and its ablation arms (plain DPO, DPO + NLL on chosen,
   SFT on the chosen answers only), each from the SFT checkpoint, on the same pairs, with the
   health alarms watching held-out answers;
6. ``eval``      every arm against SFT on held-out prompts: position-swapped win/tie/loss at
   temperature 0.7, and judged accuracy at temperature 0.7 and greedy.

Everything goes under ``--out`` (default ``runs/demo``): data, tokenizer, checkpoints,
``pairs.jsonl``, ``audit.json`` / ``audit.png``, per-arm eval reports, ``summary.json``,
``curves.png`` and one offline W&B run.
A demo run rebuilds all of it; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from fastdpo.demo import task as task_mod
from fastdpo.demo.config import load_demo_config
from fastdpo.demo.report import PhaseLog, format_summary, log_wandb, read_alarms, read_jsonl
from fastdpo.files import write_json, write_jsonl


def _set_threads(threads) -> int:
    """``auto``: all cores, unless other processes already keep them busy: OpenMP threads then
    spin-wait for cores they never get (a tiny-model training step measured 7 s with 2 threads
    and 0.4 s with 1 on two cores under a load of ~7)."""
    if threads in (None, "auto"):
        cores = os.cpu_count() or 1
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = 1 if busy >= cores else cores
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or 'auto', got {threads}")
    torch.set_num_threads(threads)
    return threads


# -- the demo --------------------------------------------------------------------------------------
def run_demo(config: str | Path | dict | None = None, quick: bool = False, out: str | Path = "runs/demo",
             seed: int | None = None, progress: bool = True, rounds: int = 1) -> dict:
    """Run every phase; returns (and writes to ``out/summary.json``) the summary dict. ``rounds`` > 1
    replaces the arms with ``fastdpo.demo.rounds``: that many online rounds against one round with
    the same pairs budget."""
    from fastdpo.generation.heldout import HeldoutProbe
    from fastdpo.generation.judge import ProgrammaticJudge
    from fastdpo.generation.mining import mine_pairs
    from fastdpo.models.checkpoint import load_checkpoint
    from fastdpo.models.gpt import config_from_preset
    from fastdpo.models.tokenizer import Tokenizer
    from fastdpo.runtime import resolve_device, resolve_precision
    from fastdpo.training.audit import audit_preferences
    from fastdpo.training.audit_report import format_audit
    from fastdpo.training.config import (
        DPOConfig,
        PreferenceDatasetConfig,
        SFTConfig,
        SFTDatasetConfig,
        TrainingConfig,
    )
    from fastdpo.training.curves import plot_curves
    from fastdpo.training.dpo import run_dpo
    from fastdpo.training.sft import run_sft

    t_start = time.perf_counter()
    cfg = load_demo_config(config, quick)
    if seed is not None:
        cfg["seed"] = int(seed)
    seed = int(cfg.get("seed", 0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = _set_threads(cfg.get("threads", "auto"))
    device = resolve_device("auto")
    precision = resolve_precision(cfg.get("mixed_precision", "auto"), device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    wandb_mode = cfg.get("wandb", "offline")
    say = print if progress else (lambda *a, **k: None)
    log = PhaseLog(device)
    judge = ProgrammaticJudge(task_mod.score, name="task")
    say(f"fastdpo demo{' --quick' if quick else ''}: seed {seed}, {threads} thread(s), {device}, "
        f"{precision}, out {out}", flush=True)

    # 1. task ---------------------------------------------------------------------------------
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    with log.phase("task", "examples") as row:
        data = task_mod.build(seed, task_mod.TaskConfig(**{**cfg["task"],
                                                          "families": tuple(cfg["task"]["families"])}))
        sft_path = write_jsonl(data_dir / "sft.jsonl", (
            {"prompt": ex["instruction"], "response": ex["response"]} for ex in data.sft))
        write_jsonl(data_dir / "mine_prompts.jsonl", ({"prompt": it.instruction} for it in data.mine))
        write_jsonl(data_dir / "eval_prompts.jsonl", (it.to_dict() for it in data.eval))
        row["count"] = len(data.sft) + len(data.mine) + len(data.eval)
    demo_stats = task_mod.demonstration_stats(data.sft)

    # 2. tokenizer ------------------------------------------------------------------------------
    with log.phase("tokenizer", "tokens") as row:
        tok = Tokenizer.train(data.corpus, vocab_size=int(cfg["tokenizer"]["vocab_size"]))
        tok_path = tok.save(out / "tokenizer.json")
        row["count"] = sum(len(ids) for ids in tok.encode_batch(data.corpus))

    def train_config(run_name: str, section: dict, n_examples: int) -> TrainingConfig:
        batch = int(section["batch_size"])
        steps = section.get("steps")
        if steps is None:   # whole epochs over the examples, at least one step
            steps = max(1, int(round(float(section.get("epochs", 1)) * n_examples / batch)))
        return TrainingConfig(
            run_name=run_name, output_dir=out, batch_size=batch,
            learning_rate=float(section["learning_rate"]), max_steps=int(steps),
            warmup_steps=int(section.get("warmup_steps", 0)),
            min_lr_ratio=float(section.get("min_lr_ratio", 0.0)),
            weight_decay=float(section.get("weight_decay", 0.0)), log_every=int(section.get("log_every", 10)),
            eval_every=0, save_every=0, keep_checkpoints=0, mixed_precision=precision, seed=seed,
            wandb="disabled", overwrite=True, progress=progress,
            length_bucket=int(section.get("length_bucket", 1)))

    # 3. SFT ------------------------------------------------------------------------------------
    mcfg = dict(cfg["model"])
    preset = mcfg.pop("preset", "tiny")
    gpt_config = config_from_preset(preset, vocab_size=tok.vocab_size, **mcfg)
    sft_tc = train_config("sft", cfg["sft"], len(data.sft))
    sft_seq = sum(len(tok.render_prompt(ex["instruction"])) + len(tok.render_answer(ex["response"]))
                  for ex in data.sft) / max(1, len(data.sft))
    with log.phase("sft", "tokens") as row:
        sft_ckpt = run_sft(gpt_config, sft_tc, SFTConfig(max_length=gpt_config.block_size,
                                                         max_prompt_length=gpt_config.block_size),
                           SFTDatasetConfig(path=[sft_path], format="prompt"), tok)
        row["count"] = sft_tc.max_steps * sft_tc.batch_size * sft_seq
    sft_model, _ = load_checkpoint(sft_ckpt, tokenizer=tok, map_location=device)
    sft_model.eval()
    if rounds > 1:   # iterative rounds against one round with the same pairs budget (demo.rounds)
        from fastdpo.demo.rounds import run_rounds
        result = run_rounds(rounds, cfg, out, sft_ckpt, judge, train_config=train_config,
                            block_size=gpt_config.block_size, seed=seed, dtype=dtype, device=device, log=log,
                            say=say, progress=progress, n_mine=len(data.mine))
        summary = {"seed": seed, "quick": quick, "threads": threads, "device": str(device),
                   "precision": precision, "config": cfg, "out": str(out), "rounds": result,
                   "phases": log.rows, "total_seconds": time.perf_counter() - t_start}
        summary["report"] = log.table() + "\n\n" + result["text"]
        write_json(out / "summary.json", summary)
        say(summary["report"], flush=True)
        return summary

    # 4. mining ---------------------------------------------------------------------------------
    mc = cfg["mine"]
    pairs_path = out / "pairs.jsonl"
    for stale in (pairs_path, pairs_path.with_name(pairs_path.name + ".progress.jsonl")):
        stale.unlink(missing_ok=True)   # a demo run always mines afresh from its own SFT model
    with log.phase("mine", "samples") as row:
        stats = mine_pairs(sft_model, tok, [it.instruction for it in data.mine], judge, pairs_path,
                           temps=[float(t) for t in mc["temps"]], max_new_tokens=int(mc["max_new_tokens"]),
                           top_k=mc.get("top_k") or None, min_gap=int(mc["min_gap"]),
                           min_best=int(mc["min_best"]), batch_size=int(mc["batch_size"]), seed=seed,
                           dtype=dtype, progress=progress)
        row["count"] = stats.samples_judged
    pairs = read_jsonl(pairs_path)
    topped_up = 0
    min_pairs = int(mc.get("min_pairs", 1))
    if len(pairs) < min_pairs:
        if not mc.get("top_up_with_reference", False):
            raise ValueError(f"mining kept {len(pairs)} pairs (< mine.min_pairs={min_pairs}) from "
                             f"{stats.samples_judged} samples; the SFT model is too weak for this recipe")
        # Smoke runs only (``--quick``): a barely trained model yields no pairs, so the plumbing
        # is exercised with the task's reference answer vs a slip. Reported in the summary.
        topped_up = min_pairs - len(pairs)
        pairs += task_mod.reference_pairs(data.mine, topped_up, seed)
        write_jsonl(pairs_path.with_name("pairs_topped_up.jsonl"), pairs)
        pairs_path = pairs_path.with_name("pairs_topped_up.jsonl")
    # What DPO is about to learn from: the audit of the mined pairs (table in the report, audit.png).
    with log.phase("audit", "rows") as row:
        block = gpt_config.block_size
        audit = audit_preferences([pairs_path], tokenizer=tok, max_length=block, max_prompt_length=block,
                                  block_size=block, json_path=out / "audit.json", png_path=out / "audit.png")
        row["count"] = audit["rows"]
    chosen_path = write_jsonl(data_dir / "chosen.jsonl", (
        {"prompt": p["prompt"], "response": p["chosen"]} for p in pairs))
    pair_seq = sum(len(tok.render_prompt(p["prompt"])) * 2 + len(tok.render_answer(p["chosen"]))
                   + len(tok.render_answer(p["rejected"])) for p in pairs) / max(1, len(pairs))
    chosen_seq = sum(len(tok.render_prompt(p["prompt"])) + len(tok.render_answer(p["chosen"]))
                     for p in pairs) / max(1, len(pairs))

    # 5. arms -----------------------------------------------------------------------------------
    # Health alarms watch every arm: greedy answers to held-out prompts, scored by the task's judge,
    # at four evaluations per run against the SFT model's answers.
    ec = cfg["eval"]
    probe = HeldoutProbe([it.instruction for it in data.eval], n_prompts=64, judge=judge, seed=seed,
                         max_new_tokens=int(ec["max_new_tokens"]), batch_size=int(ec["batch_size"]))
    arm_ckpts: dict[str, Path] = {}
    for name, arm in cfg["arms"].items():
        tc = train_config(name, arm, len(pairs))
        tc = dataclasses.replace(tc, eval_every=max(1, tc.max_steps // 4))
        with log.phase(name, "tokens") as row:
            if arm["kind"] == "sft_chosen":
                arm_ckpts[name] = run_sft(sft_ckpt, tc, SFTConfig(max_length=gpt_config.block_size,
                                                                  max_prompt_length=gpt_config.block_size),
                                          SFTDatasetConfig(path=[chosen_path], format="prompt"), tok,
                                          heldout_probe=probe)
                row["count"] = tc.max_steps * tc.batch_size * chosen_seq
            else:
                dcfg = DPOConfig(beta=float(arm.get("beta", 0.1)), loss_type=arm.get("loss_type", "sigmoid"),
                                 rpo_alpha=float(arm.get("rpo_alpha", 0.0)), max_length=gpt_config.block_size,
                                 max_prompt_length=gpt_config.block_size,
                                 reference_cache_dir=out / name / "ref_cache")
                # Mined rows carry their sampled token ids: an answer that is <|end|> alone (empty
                # text) trains as sampled. on_error=skip keeps any unusable row from ending the demo;
                # such rows are counted in the data line.
                pref = PreferenceDatasetConfig(path=[pairs_path], format="prompt", on_error="skip")
                arm_ckpts[name] = run_dpo(sft_ckpt, tc, dcfg, pref, tok, heldout_probe=probe)
                row["count"] = tc.max_steps * tc.batch_size * pair_seq

    # 6. evaluation -----------------------------------------------------------------------------
    eval_items = data.eval
    with log.phase("eval", "tokens") as row:
        results, row["count"] = evaluate_arms(sft_model, arm_ckpts, tok, eval_items, judge, ec, seed, dtype,
                                              device, out, progress)

    headline = cfg["headline"]
    summary = {
        "seed": seed, "quick": quick, "threads": threads, "device": str(device), "precision": precision,
        "config": cfg, "out": str(out),
        "tokenizer": {"path": str(tok_path), "vocab_size": tok.vocab_size},
        "model": {"preset": preset, "params": sum(p.numel() for p in sft_model.parameters()),
                  "config": gpt_config.to_dict()},
        "data": {"sft": len(data.sft), "mine": len(data.mine), "eval": len(data.eval),
                 "demonstrations": demo_stats},
        "mining": {**stats.as_dict(), "pairs": len(pairs), "topped_up_with_reference": topped_up,
                   "pairs_path": str(pairs_path)},
        "audit": {k: audit[k] for k in ("rows", "bad_rows", "length_unit", "lengths", "limits", "length_bias",
                                        "formatting_only", "near_identical", "duplicate_prompts",
                                        "duplicate_pairs", "contradictions")},
        "alarms": {name: read_alarms(out, name) for name in arm_ckpts},
        "checkpoints": {"sft": str(sft_ckpt), **{k: str(v) for k, v in arm_ckpts.items()}},
        "results": results, "headline": headline,
        "phases": log.rows,
    }
    h = results[headline]
    summary["headline_result"] = {
        "accuracy_t07_sft": results["sft"]["accuracy_t07"], "accuracy_t07": h["accuracy_t07"],
        "accuracy_t07_gain_points": 100 * (h["accuracy_t07"] - results["sft"]["accuracy_t07"]),
        "win_rate_decided": h["win_rate_decided"], "win": h["win"], "tie": h["tie"], "loss": h["loss"]}

    with log.phase("report", "files") as row:
        curves = plot_curves({name: out / name for name in ["sft", *arm_ckpts]}, out / "curves.png")
        summary["artifacts"] = {"summary": str(out / "summary.json"), "curves": str(curves),
                                "wandb": log_wandb(out, summary, ["sft", *arm_ckpts], wandb_mode)}
        row["count"] = 3
    summary["phases"] = log.rows
    summary["total_seconds"] = time.perf_counter() - t_start
    text = format_summary(summary, log, format_audit(audit))
    summary["report"] = text
    write_json(out / "summary.json", summary)
    say(text, flush=True)
    return summary


def evaluate_arms(sft_model, arm_ckpts: dict, tok, items, judge, ec: dict, seed: int, dtype, device,
                  out: Path, progress: bool) -> tuple[dict, int]:
    """Each arm vs SFT at ``ec['temperature']`` (position-swapped compare + scores), plus greedy
    accuracy for every model. Returns (results per model, generated tokens)."""
    from fastdpo.generation.evaluate import evaluate, generate
    from fastdpo.models.checkpoint import load_checkpoint

    instructions = [it.instruction for it in items]
    rendered = [tok.render_prompt(p) for p in instructions]
    kw = dict(max_new_tokens=int(ec["max_new_tokens"]), top_k=ec.get("top_k") or None, seed=seed + 1,
              batch_size=int(ec["batch_size"]), dtype=dtype)
    n_tokens = 0
    results: dict = {}

    def greedy(model) -> dict:
        nonlocal n_tokens
        ids = generate(model, tok, rendered, temperature=0.0, **kw)
        n_tokens += sum(map(len, ids))
        return rate_answers(instructions, [tok.decode(x) for x in ids])

    results["sft"] = {"greedy": greedy(sft_model)}
    for name, ckpt in arm_ckpts.items():
        model, _ = load_checkpoint(ckpt, tokenizer=tok, map_location=device)
        model.eval()
        rep = evaluate(model, sft_model, tok, instructions, judge, mode="both",
                       temperature=float(ec["temperature"]), report_path=out / name / "eval.json",
                       progress=progress, **kw)
        n_tokens += round(rep["n_prompts"] * (rep["length"]["avg_tokens_a"] + rep["length"]["avg_tokens_b"]))
        ans_a = [it["a"] for it in rep["items"]]
        ans_b = [it["b"] for it in rep["items"]]
        c = rep["compare"]
        t07 = rate_answers(instructions, ans_a)
        results[name] = {
            "accuracy_t07": t07["accuracy"], "content_t07": t07["content"], "habit_t07": t07["habit"],
            "mean_score_t07": t07["mean_score"], "greedy": greedy(model),
            "win": c["win"], "tie": c["tie"], "loss": c["loss"], "win_rate_decided": c["win_rate_decided"],
            "win_minus_loss": (c["win"] - c["loss"]) / rep["n_prompts"],
            "avg_tokens": rep["length"]["avg_tokens_a"]}
        if "accuracy_t07" not in results["sft"]:   # same seeds for every arm: SFT's side is identical
            s = rate_answers(instructions, ans_b)
            results["sft"].update(accuracy_t07=s["accuracy"], content_t07=s["content"], habit_t07=s["habit"],
                                  mean_score_t07=s["mean_score"], avg_tokens=rep["length"]["avg_tokens_b"])
    return results, n_tokens


def rate_answers(instructions, answers) -> dict:
    """Judged accuracy (right answer in the requested form), content accuracy (right answer,
    filler allowed), the chatty-habit rate and the mean 1-10 score."""
    scores = [task_mod.score(p, a) for p, a in zip(instructions, answers)]
    n = max(1, len(scores))
    return {"accuracy": sum(s >= task_mod.CORRECT_THRESHOLD for s in scores) / n,
            "content": sum(task_mod.content_correct_score(s) for s in scores) / n,
            "habit": sum(task_mod.is_chatty(a) for a in answers) / n,
            "mean_score": sum(scores) / n}


