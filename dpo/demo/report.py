"""The demo's report: a per-phase table (time, CPU time, throughput, peak memory), the audit of the
mined pairs, the before/after table with the honest ablation, each arm's health alarms, and one
offline W&B run (the training curves are ``fastdpo.training.curves``)."""
from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path

import torch

from fastdpo.training.metrics import read_metrics


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseLog:
    """One row per phase: seconds, a work count with its unit, and peak memory."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    @contextlib.contextmanager
    def phase(self, name: str, unit: str = "tokens"):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row = {"phase": name, "unit": unit, "count": 0}
        t0, c0 = time.perf_counter(), _cpu_seconds()
        yield row
        row["seconds"] = time.perf_counter() - t0
        # CPU time of this process (all threads): on a shared machine the wall time says how
        # busy the neighbours were, this says what the phase itself cost.
        row["cpu_seconds"] = _cpu_seconds() - c0
        row["per_s"] = row["count"] / row["seconds"] if row["seconds"] > 0 else None
        row["peak_mem_mb"] = _peak_mem_mb(self.device)
        self.rows.append(row)

    def table(self) -> str:
        head = f"{'phase':<16}{'time':>9}{'cpu time':>10}{'throughput':>24}{'peak mem':>12}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            digits = 0 if (r["per_s"] or 0) >= 10 else 2
            thr = f"{r['per_s']:,.{digits}f} {r['unit']}/s" if r["per_s"] is not None else "-"
            lines.append(f"{r['phase']:<16}{r['seconds']:>8.1f}s{r['cpu_seconds']:>9.1f}s{thr:>24}"
                         f"{r['peak_mem_mb']:>9.0f} MB")
        total = sum(r["seconds"] for r in self.rows)
        cpu = sum(r["cpu_seconds"] for r in self.rows)
        lines.append(f"{'total':<16}{total:>8.1f}s{cpu:>9.1f}s")
        return "\n".join(lines)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def read_alarms(out: Path, run: str) -> list[dict]:
    """A run's health alarms (``alarm`` rows of its metrics.jsonl)."""
    return [m for m in _metrics(out, run) if m.get("split") == "alarm"]


def format_alarms(alarms: dict[str, list[dict]]) -> list[str]:
    lines = ["", "== health alarms during training (fastdpo.training.health; held-out answers vs the SFT "
             "model's) =="]
    for run, rows in alarms.items():
        if not rows:
            lines.append(f"{run}: none")
        for a in rows:
            lines.append(f"{run}: step {a['step']}: {a['message']}")
    return lines


def format_summary(s: dict, log: PhaseLog, audit_table: str = "") -> str:
    r = s["results"]
    lines = ["", "== fastdpo demo: phases ==", log.table(), "",
             f"mining: {s['mining']['samples_judged']} samples -> {s['mining']['pairs']} pairs"
             + (f" ({s['mining']['topped_up_with_reference']} reference pairs added: smoke run)"
                if s["mining"]["topped_up_with_reference"] else ""),
             *(["", "== audit of the mined pairs (fastdpo audit) ==", audit_table] if audit_table else []),
             *format_alarms(s.get("alarms", {})),
             "", f"== before/after on {s['data']['eval']} held-out prompts (judge: task) ==",
             f"{'model':<14}{'acc@T0.7':>10}{'acc greedy':>12}{'content@0.7':>13}{'chatty@0.7':>12}"
             f"{'win/tie/loss vs SFT':>22}{'win-loss':>10}{'win|decided':>13}"]
    for name, v in r.items():
        wtl = f"{v['win']}/{v['tie']}/{v['loss']}" if "win" in v else "-"
        wd = f"{100 * v['win_rate_decided']:.1f}%" if v.get("win_rate_decided") is not None else "-"
        wml = f"{100 * v['win_minus_loss']:+.1f}%" if "win_minus_loss" in v else "-"
        mark = " *" if name == s["headline"] else ""
        lines.append(f"{name + mark:<14}{100 * v['accuracy_t07']:>9.1f}%"
                     f"{100 * v['greedy']['accuracy']:>11.1f}%{100 * v['content_t07']:>12.1f}%"
                     f"{100 * v['habit_t07']:>11.1f}%{wtl:>22}{wml:>10}{wd:>13}")
    h = s["headline_result"]
    lines += ["", f"headline ({s['headline']}): accuracy at T=0.7 {100 * h['accuracy_t07_sft']:.1f}% -> "
              f"{100 * h['accuracy_t07']:.1f}% ({h['accuracy_t07_gain_points']:+.1f} points); "
              f"win rate among decided {100 * (h['win_rate_decided'] or 0):.1f}% "
              f"({h['win']} win / {h['tie']} tie / {h['loss']} loss)"]
    hv = r[s["headline"]]
    for name, v in r.items():
        if name not in ("sft", s["headline"]):
            # The honest comparison: same SFT start, same pairs, one ingredient different.
            d = {k: 100 * (hv[k] - v[k]) for k in ("accuracy_t07", "content_t07", "habit_t07",
                                                   "win_minus_loss")}
            lines.append(f"  {s['headline']} vs {name}: accuracy at T=0.7 {d['accuracy_t07']:+.1f} points, "
                         f"content {d['content_t07']:+.1f}, chatty {d['habit_t07']:+.1f}, "
                         f"win-loss vs SFT {d['win_minus_loss']:+.1f}")
    lines += [f"artifacts: {s['out']}/summary.json, {s['artifacts']['curves']}, "
              f"W&B: {s['artifacts']['wandb']}",
              f"total {s['total_seconds']:.1f}s"]
    return "\n".join(lines)


def _metrics(out: Path, run: str) -> list[dict]:
    path = out / run / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def log_wandb(out: Path, summary: dict, runs: list[str], mode: str) -> str | None:
    """One W&B run for the whole demo (offline unless ``wandb: online``): every phase's training
    curves under ``<run>/...``, the results table and the summary."""
    if mode == "disabled":
        return None
    import wandb
    run = wandb.init(project="fastdpo", name=f"demo-seed{summary['seed']}", mode=mode, dir=str(out),
                     config={"seed": summary["seed"], "quick": summary["quick"], **summary["config"]},
                     reinit="finish_previous")
    try:
        for name in runs:
            for m in _metrics(out, name):
                if m.get("split") == "train":
                    run.log({f"{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float))
                             and k not in ("step",)} | {f"{name}/step": m["step"]})
        cols = ["model", "accuracy_t07", "accuracy_greedy", "content_t07", "habit_t07", "win", "tie", "loss"]
        table = wandb.Table(columns=cols)
        for name, v in summary["results"].items():
            table.add_data(name, v["accuracy_t07"], v["greedy"]["accuracy"], v["content_t07"], v["habit_t07"],
                           v.get("win"), v.get("tie"), v.get("loss"))
        run.log({"results": table})
        run.log({"curves": wandb.Image(str(out / "curves.png"))})
        for k, v in summary["headline_result"].items():
            run.summary[k] = v
        for r in summary["phases"]:
            run.summary[f"phase/{r['phase']}/seconds"] = r["seconds"]
        return str(Path(run.dir).parent)
    finally:
        run.finish()
