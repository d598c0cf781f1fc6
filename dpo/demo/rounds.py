"""``fastdpo demo --rounds N``: does iterating help on the embedded task, and what does a round cost?

After the demo's task, tokenizer and SFT phases, two arms train with the headline arm's settings:

* **loop**: ``N`` rounds of ``fastdpo.generation.online_loop`` (each round mines its own slice of
  the mining prompts from the current policy, trains DPO from it with the previous policy as the
  reference, and must pass the quality gate against the previous policy);
* **one round** (the honest ablation): the same total number of pairs, mined once up front from
  the SFT model over the whole prompt pool, one DPO run over them (same epochs, so the same
  number of gradient steps as the loop's rounds together when it found as many pairs). The
  loop's budget is a ceiling: when the SFT model's answers over the pool give fewer usable pairs
  than the loop's later policies did, the ablation trains on what it found (fewer steps) and the
  report says so.

Both are judged on the held-out prompts at temperature 0.7 with the same seeds. Written under
``out/rounds/``: the loop's directory (``loop/round-k/...``), the ablation's (``one_round/``),
``rounds.json`` and ``rounds.png`` (judged accuracy at T=0.7 per round against the ablation, the
cost of each round by phase, mining throughput in pairs/min per round).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from fastdpo.demo import task as task_mod
from fastdpo.files import save_figure, write_json


def run_rounds(rounds: int, cfg: dict, out: Path, sft_ckpt: Path, judge, *, train_config, block_size: int,
               seed: int, dtype, device, log, say, progress: bool, n_mine: int) -> dict:
    """Both arms (module docstring); returns the ``rounds.json`` summary."""
    from fastdpo.generation.online_loop import BuiltinEngine, LoopConfig, run_loop
    from fastdpo.training.config import DPOConfig

    root = out / "rounds"
    root.mkdir(parents=True, exist_ok=True)
    mc, ec, arm = cfg["mine"], cfg["eval"], cfg["arms"][cfg["headline"]]
    if arm["kind"] != "dpo":
        raise ValueError(f"demo --rounds trains the headline arm's DPO settings; {cfg['headline']!r} is "
                         f"{arm['kind']!r}")
    dpo_cfg = DPOConfig(beta=float(arm["beta"]), loss_type=arm["loss_type"],
                        rpo_alpha=float(arm["rpo_alpha"]), max_length=block_size,
                        max_prompt_length=block_size)
    tc = dataclasses.replace(train_config("round", arm, 1), max_steps=None, epochs=float(arm["epochs"]),
                             progress=False)
    data = out / "data"
    common = dict(prompts=data / "mine_prompts.jsonl", eval_prompts=data / "eval_prompts.jsonl",
                  temps=[float(t) for t in mc["temps"]], max_new_tokens=int(mc["max_new_tokens"]),
                  top_k=mc.get("top_k") or None, min_gap=int(mc["min_gap"]), min_best=int(mc["min_best"]),
                  mine_batch_size=int(mc["batch_size"]), eval_temperature=float(ec["temperature"]),
                  eval_max_new_tokens=int(ec["max_new_tokens"]), eval_batch_size=int(ec["batch_size"]),
                  correct_score=task_mod.CORRECT_THRESHOLD, seed=seed)
    engine = BuiltinEngine(device, dtype, None)
    quiet = (lambda *a, **k: None) if not progress else say
    for stale in (root / "loop", root / "one_round"):   # a demo run always starts afresh
        if stale.exists():
            shutil.rmtree(stale)

    with log.phase("loop", "rounds") as row:
        loop_cfg = LoopConfig(rounds=rounds, prompts_per_round=max(1, n_mine // rounds), **common)
        loop = run_loop(sft_ckpt, root / "loop", judge, loop_cfg, tc, dpo_cfg, engine=engine, progress=False,
                        say=quiet)
        row["count"] = len(loop["rounds"])
    budget = sum(r["pairs_trained"] for r in loop["rounds"])   # what the loop's training saw
    one = None
    if budget:
        with log.phase("one_round", "rounds") as row:
            # the same pairs budget mined once from SFT over the whole pool; any gate passes: the
            # ablation is measured, not promoted
            one_cfg = LoopConfig(rounds=1, max_pairs_per_round=budget, min_win_rate=0.0, max_score_drop=1e9,
                                 max_retries=0, **common)
            one = run_loop(sft_ckpt, root / "one_round", judge, one_cfg, tc, dpo_cfg, engine=engine,
                           progress=False, say=quiet)
            row["count"] = 1
    summary = summarize(loop, one, budget)
    # beside judged accuracy: content accuracy (filler allowed) and the chatty rate, so that a gain
    # from dropping the habit is not passed off as a gain in content
    for row, r in zip(summary["rounds"], loop["rounds"]):
        row.update(answer_rates(root / "loop", r))
    if loop["rounds"]:
        summary["sft_rates"] = answer_rates(root / "loop", loop["rounds"][0], side="b")
    if one and one["rounds"]:
        summary["one_round"].update(answer_rates(root / "one_round", one["rounds"][0]))
    write_json(root / "rounds.json", summary)
    plot(summary, root / "rounds.png")
    summary["text"] = format_rounds(summary)
    write_json(root / "rounds.json", summary)
    return summary


def answer_rates(loop_dir: Path, r: dict, side: str = "a") -> dict:
    """Content accuracy and chatty rate at T=0.7 of a round's last attempt (``side`` b: the SFT
    model's answers in the same evaluation)."""
    if not r["attempts"]:
        return {}
    att = loop_dir / f"round-{r['round']}" / f"attempt-{r['attempts'][-1]['attempt']}"
    path = att / "eval_vs_sft.json" if (att / "eval_vs_sft.json").is_file() else att / "eval_vs_prev.json"
    items = json.loads(path.read_text())["items"]
    n = max(1, len(items))
    return {"content_t07": sum(task_mod.content_correct_score(it[f"score_{side}"] or 0) for it in items) / n,
            "chatty_t07": sum(task_mod.is_chatty(it[side]) for it in items) / n}


def summarize(loop: dict, one: dict | None, budget: int) -> dict:
    """Per round: judged accuracy at T=0.7 (of the policy after the round), pairs, pairs/min,
    seconds by phase; the ablation's accuracy; the loop's final gain over it in points."""
    rows = []
    for r in loop["rounds"]:
        cost, mining = r["cost"], r["cost"].get("mining") or {}
        rows.append({"round": r["round"], "promoted": r["promoted"], "pairs": r["pairs_trained"],
                     "accuracy_t07": r.get("accuracy"),
                     "win_rate_vs_previous": r.get("win_rate_vs_previous"),
                     "win_rate_vs_sft": r.get("win_rate_vs_sft"),
                     "pairs_per_min": mining.get("pairs_per_min"),
                     "seconds": {"mine": mining.get("elapsed_s", 0.0), "train": cost.get("train_s", 0.0),
                                 "eval": cost.get("eval_s", 0.0)},
                     "reasons": r["reasons"]})
    first = loop["rounds"][0] if loop["rounds"] else {}
    sft_acc = first.get("accuracy_sft")
    promoted = [x for x in rows if x["promoted"]]
    final_acc = promoted[-1]["accuracy_t07"] if promoted else sft_acc
    one_acc = one["rounds"][0].get("accuracy") if one and one["rounds"] else None
    one_cost = one["rounds"][0]["cost"] if one and one["rounds"] else {}
    one_pairs = one["rounds"][0]["pairs_trained"] if one and one["rounds"] else 0
    return {"rounds": rows, "accuracy_t07_sft": sft_acc, "accuracy_t07_loop": final_acc,
            "pairs_budget": budget, "one_round": {
                "accuracy_t07": one_acc, "pairs": one_pairs,
                "seconds": {"mine": (one_cost.get("mining") or {}).get("elapsed_s", 0.0),
                            "train": one_cost.get("train_s", 0.0), "eval": one_cost.get("eval_s", 0.0)}},
            "loop_gain_over_one_round_points": None if final_acc is None or one_acc is None
            else 100 * (final_acc - one_acc)}


def format_rounds(s: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    sft = s.get("sft_rates", {})
    same = s["one_round"]["pairs"] == s["pairs_budget"]
    budget = "the same pair budget" if same else "the loop's pair budget"
    lines = [f"== rounds: the loop vs one round with {budget} (judged accuracy at T=0.7) ==",
             f"{'round':<7}{'status':<10}{'pairs':>7}{'pairs/min':>11}{'acc T=0.7':>11}{'content':>9}"
             f"{'chatty':>8}{'win vs prev':>13}{'mine s':>8}{'train s':>9}{'eval s':>8}",
             f"{'SFT':<7}{'':<10}{'':>7}{'':>11}{pct(s['accuracy_t07_sft']):>11}"
             f"{pct(sft.get('content_t07')):>9}{pct(sft.get('chatty_t07')):>8}"]
    for r in s["rounds"]:
        sec = r["seconds"]
        ppm = "-" if r["pairs_per_min"] is None else f"{r['pairs_per_min']:.0f}"
        status = "promoted" if r["promoted"] else "rejected"
        lines.append(f"{r['round']:<7}{status:<10}{r['pairs']:>7}{ppm:>11}{pct(r['accuracy_t07']):>11}"
                     f"{pct(r.get('content_t07')):>9}{pct(r.get('chatty_t07')):>8}"
                     f"{pct(r['win_rate_vs_previous']):>13}{sec['mine']:>8.1f}"
                     f"{sec['train']:>9.1f}{sec['eval']:>8.1f}")
    o = s["one_round"]
    lines.append(f"{'1 round':<7}{'':<10}{o['pairs']:>7}{'':>11}{pct(o['accuracy_t07']):>11}"
                 f"{pct(o.get('content_t07')):>9}{pct(o.get('chatty_t07')):>8}{'':>13}"
                 f"{o['seconds']['mine']:>8.1f}{o['seconds']['train']:>9.1f}{o['seconds']['eval']:>8.1f}")
    gain = s["loop_gain_over_one_round_points"]
    pairs = (f"with the same {s['pairs_budget']} pairs" if same else
             f"with {o['pairs']} pairs (the SFT model's answers over the pool gave fewer than the "
             f"loop's {s['pairs_budget']})")
    lines.append(f"loop ends at {pct(s['accuracy_t07_loop'])} vs {pct(o['accuracy_t07'])} for one round "
                 f"{pairs}: " + ("n/a" if gain is None else f"{gain:+.1f} points"))
    return "\n".join(lines)


def plot(s: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = s["rounds"]
    xs = [0] + [r["round"] for r in rows]
    acc = [s["accuracy_t07_sft"]] + [r["accuracy_t07"] for r in rows]
    pts = [(x, y) for x, y in zip(xs, acc) if y is not None]
    if pts:
        axes[0].plot(*zip(*pts), marker="o", label="loop (round 0 = SFT)")
    if s["one_round"]["accuracy_t07"] is not None:
        axes[0].axhline(s["one_round"]["accuracy_t07"], color="gray", linestyle="--",
                        label=f"one round, {s['one_round']['pairs']} pairs (loop: {s['pairs_budget']})")
    axes[0].set_title("judged accuracy at T=0.7")
    axes[0].set_xlabel("round")
    axes[0].legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for phase in ("mine", "train", "eval"):
        vals = [r["seconds"][phase] for r in rows]
        axes[1].bar([r["round"] for r in rows], vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_title("cost per round (seconds)")
    axes[1].set_xlabel("round")
    axes[1].legend(fontsize=8)
    axes[2].bar([r["round"] for r in rows], [r["pairs_per_min"] or 0 for r in rows])
    axes[2].set_title("mining throughput (pairs/min)")
    axes[2].set_xlabel("round")
    for ax in axes:
        ax.set_xticks(xs if ax is axes[0] else xs[1:])
    fig.tight_layout()

    return save_figure(fig, path)
