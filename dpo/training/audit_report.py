"""The data audit's report as a plain-text table and as a PNG of the length distributions
(``fastdpo.training.audit`` makes the report)."""
from __future__ import annotations

from pathlib import Path

from fastdpo.files import save_figure


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "-"


def format_audit(r: dict) -> str:
    """The report as a plain-text table."""
    n, unit = r["good_rows"], r["length_unit"]
    fmts = ", ".join(f"{k} format" for k in r["formats"])
    lines = [f"fastdpo audit: {len(r['files'])} file(s), {r['rows']:,} rows: {n:,} good ({fmts}), "
             f"{r['bad_rows']:,} bad; lengths in {unit}", ""]
    lines.append(f"{'length (' + unit + ')':<20}{'mean':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for name in ("prompt", "chosen", "rejected"):
        s = r["lengths"][name]
        if s:
            lines.append(f"{name:<20}{s['mean']:>9.1f}{s['p50']:>8.0f}{s['p90']:>8.0f}{s['p99']:>8.0f}"
                         f"{s['max']:>8}")
    b = r["length_bias"]
    lines += ["", f"{'check':<34}{'rows':>10}{'share':>9}"]
    checks = [("bad rows (skipped by train)", r["bad_rows"], r["rows"])]
    if b["chosen_longer_fraction"] is not None:
        checks.append(("chosen longer than rejected", round(b["chosen_longer_fraction"] * n), n))
    checks += [("formatting-only pairs", r["formatting_only"], n),
               (f"near-identical pairs (>= {r['near_identical_threshold']:.2f})", r["near_identical"], n),
               ("duplicate prompts", r["duplicate_prompts"], n), ("duplicate pairs", r["duplicate_pairs"], n),
               ("contradictions (swapped labels)", r["contradictions"], n)]
    lim = r["limits"]
    if lim:
        checks += [(f"prompt > {lim['max_prompt_length']} tokens (dropped)", lim["dropped_long_prompt"], n),
                   ("answer truncated by the limits", lim["truncated"], n)]
    lines += [f"{name:<34}{k:>10,}{_pct(k, m):>9}" for name, k, m in checks]
    if b["mean_ratio"] is not None:
        lines.append(f"chosen/rejected length ratio: mean {b['mean_ratio']:.2f}, "
                     f"median {b['median_ratio']:.2f}")
    for msg in r["bad_row_errors"][:5]:
        lines.append(f"  bad row: {msg}")
    lc = r.get("label_consistency")
    if lc:
        k = lc["sampled"]
        lines.append(f"label consistency ({lc['judge']}, {k} sampled pairs, position-swapped): agrees "
                     f"{_pct(lc['agree'], k)}, contradicts {_pct(lc['disagree'], k)}, undecided "
                     f"{_pct(lc['undecided'], k)}")
    cl = r.get("clean")
    if cl:
        by = ", ".join(f"{k} {v:,}" for k, v in cl["dropped_by_class"].items())
        lines.append(f"clean copy: {cl['path']}: kept {cl['kept']:,}, dropped {cl['dropped']:,} ({by}; a row "
                     f"may be in several classes)")
    return "\n".join(lines)


def plot_audit(r: dict, path: str | Path) -> Path:
    """Length distributions per field and the chosen/rejected length ratio, from the report."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = r["histograms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for name in ("prompt", "chosen", "rejected"):
        ax1.stairs(h[name], h["length_edges"], label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel(f"length ({r['length_unit']})")
    ax1.set_ylabel("rows")
    ax1.set_title("length distributions")
    ax1.legend()
    ax2.stairs(h["log2_ratio"], h["log2_ratio_edges"], fill=True, alpha=0.6)
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("log2(chosen length / rejected length)")
    share = r["length_bias"]["chosen_longer_fraction"]
    if share is not None:
        ax2.set_title(f"length bias: chosen longer in {100 * share:.1f}% of pairs")
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
