"""The online loop's report: one row per round (pairs, pairs/min, the gate's figures, accuracy,
win rates, answer length, cost) as ``report.json``, a Markdown table (``report.md``) and a PNG
(``report.png``: accuracy, win rates and answer length per round)."""
from __future__ import annotations

from pathlib import Path

from fastdpo.files import atomic_write, save_figure, write_json

COLUMNS = (("round", "round"), ("status", "status"), ("attempts", "attempts"), ("pairs", "pairs mined"),
           ("pairs_trained", "trained on"), ("pairs_per_min", "pairs/min"),
           ("win_rate_vs_previous", "win rate vs prev"),
           ("win_rate_vs_sft", "win rate vs SFT"), ("accuracy", "accuracy"), ("mean_score", "mean score"),
           ("avg_tokens", "avg tokens"), ("seconds", "seconds"))


def round_rows(report: dict) -> list[dict]:
    """The table's rows: round 0 is the SFT model (its accuracy from round 1's evaluation)."""
    rows = []
    first = report["rounds"][0] if report["rounds"] else None
    if first is not None and first.get("accuracy_sft") is not None:
        sft = first["attempts"][-1]["vs_sft"]
        rows.append({"round": 0, "status": "sft", "accuracy": sft["accuracy_b"],
                     "mean_score": sft["mean_score_b"], "avg_tokens": sft["avg_tokens_b"]})
    for r in report["rounds"]:
        mining = r["cost"].get("mining") or {}
        rows.append({"round": r["round"], "status": "promoted" if r["promoted"] else "rejected",
                     "attempts": len(r["attempts"]), "pairs": r["pairs"],
                     "pairs_trained": r.get("pairs_trained"),
                     "pairs_per_min": mining.get("pairs_per_min"),
                     **{k: r.get(k) for k in ("win_rate_vs_previous", "win_rate_vs_sft", "accuracy",
                                              "mean_score", "avg_tokens")},
                     "seconds": sum(v for k, v in r["cost"].items() if k.endswith("_s") and k != "decide_s")
                     + mining.get("elapsed_s", 0.0),
                     **({"dimensions": r["dimensions"]} if r.get("dimensions") else {})})
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    dims = sorted({d for r in rows for d in r.get("dimensions", {})})
    if dims:
        lines += ["", "win rate vs SFT per dimension (among decided):", "",
                  "| round | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
        lines += [f"| {r['round']} | " + " | ".join(cell(r["dimensions"].get(d)) for d in dims) + " |"
                  for r in rows if r.get("dimensions")]
    return "\n".join(lines)


def plot_rounds(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, keys, title in ((axes[0], ("accuracy",), "judged accuracy"),
                            (axes[1], ("win_rate_vs_previous", "win_rate_vs_sft"), "win rate among decided"),
                            (axes[2], ("avg_tokens",), "answer length (tokens)")):
        for key in keys:
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel("round (0 = SFT)")
        ax.set_xticks([r["round"] for r in rows])
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()

    return save_figure(fig, path)


def write_report(out: Path, report: dict) -> dict:
    """``report.json`` / ``report.md`` / ``report.png`` under ``out``; returns the report with its rows."""
    rows = round_rows(report)
    report = {**report, "table": rows}
    write_json(out / "report.json", report)
    atomic_write(out / "report.md", "# fastdpo loop\n\n" + format_table(rows) + "\n")
    plot_rounds(rows, out / "report.png")
    return report
