"""β sweeps and other grids: one DPO run per combination of values, all sharing the cached
reference log-probs, then a comparison table."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

from fastdpo import runtime
from fastdpo.training.config import DPOConfig, HealthConfig, PreferenceDatasetConfig, TrainingConfig
from fastdpo.training.dpo import run_dpo
from fastdpo.training.metrics import read_metrics
from fastdpo.training.runs import resolve_tokenizer


def _replace_field(configs: dict, key: str, value) -> dict:
    section, _, name = key.rpartition(".")
    owners = [s for s, c in configs.items() if (not section or s == section)
              and name in {f.name for f in dataclasses.fields(c)}]
    if len(owners) != 1:
        raise ValueError(f"--sweep {key}: matches {owners or 'no'} config section; write section.key")
    out = dict(configs)
    out[owners[0]] = dataclasses.replace(configs[owners[0]], **{name: value})
    return out


def run_sweep(sft_checkpoint, train_config: TrainingConfig, dpo_config: DPOConfig,
              preference_config: PreferenceDatasetConfig, tokenizer=None, *, sweep: dict[str, list],
              resume: bool = False, health: HealthConfig | None = None, heldout_probe=None) -> list[dict]:
    """One run per combination of ``sweep`` values (e.g. ``{"beta": [0.05, 0.1, 0.5]}``), all in
    ``output_dir`` so they share the cached reference log-probs; prints a comparison table and
    returns its rows."""
    tok = resolve_tokenizer(tokenizer, Path(sft_checkpoint), train_config)
    rows = []
    keys = list(sweep)
    for values in itertools.product(*(sweep[k] for k in keys)):
        configs = {"train": train_config, "dpo": dpo_config, "data": preference_config}
        for k, v in zip(keys, values):
            configs = _replace_field(configs, k, v)
        suffix = "-".join(f"{k.rpartition('.')[2]}{v}" for k, v in zip(keys, values))
        configs["train"] = dataclasses.replace(configs["train"], run_name=f"{train_config.run_name}-{suffix}")
        final = run_dpo(sft_checkpoint, configs["train"], configs["dpo"], configs["data"], tok, resume=resume,
                        health=health, heldout_probe=heldout_probe)
        history = read_metrics(configs["train"].run_dir / "metrics.jsonl")
        last_train = next((h for h in reversed(history) if h["split"] == "train"), {})
        last_val = next((h for h in reversed(history) if h["split"] == "val"), {})
        rows.append({**dict(zip(keys, values)), "run": configs["train"].run_name, "checkpoint": str(final),
                     **{f"train/{k}": v for k, v in last_train.items() if k not in ("step", "split")},
                     **{f"val/{k}": v for k, v in last_val.items() if k not in ("step", "split")}})
    if runtime.is_main():
        print(format_sweep_table(rows, keys))
    return rows


def format_sweep_table(rows: list[dict], keys: Sequence[str]) -> str:
    cols = [*keys, "train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/rewards/chosen",
            "train/rewards/rejected", "val/loss", "val/rewards/accuracies", "val/rewards/margins"]
    cols = [c for c in cols if any(c in r for r in rows)]
    head = [c.replace("rewards/", "") for c in cols]

    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    table = [head] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
