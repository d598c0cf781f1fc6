"""Training curves as one PNG: the loss of every run, and for DPO runs the reward margin and the
preference accuracy, read from the runs' ``metrics.jsonl`` (train lines, val points). ``fastdpo
sft`` and ``fastdpo train`` write ``run_dir/curves.png`` at the end of a run; the demo draws all of
its runs in one figure."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fastdpo.files import save_figure
from fastdpo.training.metrics import read_metrics

PANELS = (("loss", "loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "preference accuracy"))


def plot_curves(runs: Mapping[str, str | Path], path: str | Path) -> Path:
    """``runs`` maps a label to a run directory (or its ``metrics.jsonl``); writes ``path``. Panels
    no run logged (the DPO ones, for SFT alone) are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for label, where in runs.items():
        where = Path(where)
        file = where / "metrics.jsonl" if where.is_dir() else where
        rows[label] = read_metrics(file) if file.is_file() else []
    panels = [(k, t) for k, t in PANELS if any(k in m for ms in rows.values() for m in ms)] or PANELS[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, ms in rows.items():
            for split, style in (("train", dict(marker=".")), ("val", dict(marker="x", linestyle="--"))):
                pts = [(m["step"], m[key]) for m in ms if m.get("split") == split and key in m]
                if pts:
                    ax.plot(*zip(*pts), label=label if split == "train" else f"{label} (val)", **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
