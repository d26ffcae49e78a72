"""The Pareto view of a KV evaluation: which method is best at each target compression, whether
it is better than each other method with a paired interval excluding zero, and the plot of
quality and decode speed against measured compression.

Rows are `pikv.eval.kv.KVEvalRow`s (PiKV methods, and any other library's rows built the same
way, e.g. kvpress presses in bench/kv_learned_smollm2.py). A row competes at its requested ratio
when its measured ratio (peak bytes of the fp16 full cache / its peak bytes) reaches the target
within BYTES_TOLERANCE: positions and scores that an evicting cache stores cost it 2-4% of the
target, which is measured and reported, not hidden. The paired comparison is per held-out window:
best minus other, mean and bootstrap 95% interval (`pikv.eval.kv.bootstrap_ci`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pikv.eval.stats import bootstrap_ci

# Singles and compositions of `train/eval.py --kv pareto`. Quest is left out: it frees no bytes
# (it reads a subset of a full cache), so it has no place on a bytes axis; `--kv quest` reports
# its read ratio. Learned storages need a model trained with kv.compressor=learned.
PARETO_SINGLES = ("window", "streaming", "h2o", "snapkv", "pyramid", "lru", "quant", "rquant", "svd",
                  "learned")
PARETO_COMPOSED = ("quant+h2o", "quant+snapkv", "quant+streaming", "rquant+h2o", "svd+h2o", "learned+h2o",
                   "learned+snapkv")
PARETO_METHODS = PARETO_SINGLES + PARETO_COMPOSED
PARETO_RATIOS = "2,4,8,16"
BYTES_TOLERANCE = 0.05  # a row competes at target r when measured >= r * (1 - this)


def _competes(row, target: float) -> bool:
    return not row.skipped and row.compression_ratio >= target * (1 - BYTES_TOLERANCE)


def pareto_summary(rows) -> list[dict]:
    """Per target ratio (the requested ratios of `rows`, full cache excluded): the best competing
    method (lowest mean ΔNLL vs full), and for every other measured row at that ratio the paired
    difference best - other per sequence (mean, bootstrap 95% interval, whether it excludes 0),
    and the impossible ones with their reason."""
    out = []
    for target in sorted({r.ratio for r in rows if r.policy != "full" and r.ratio is not None}):
        at = [r for r in rows if r.ratio == target and r.policy != "full"]
        competing = [r for r in at if _competes(r, target)]
        entry = {"ratio": target, "best": None, "vs": [], "impossible": {r.policy: r.skipped for r in at if r.skipped},
                 "under_budget": {r.policy: r.compression_ratio for r in at if not r.skipped and not _competes(r, target)}}
        if competing:
            best = min(competing, key=lambda r: r.delta_nll)
            entry["best"] = best.policy
            for other in (r for r in at if not r.skipped and r is not best):
                d = np.asarray(best.nll_per_sequence) - np.asarray(other.nll_per_sequence)
                ci = bootstrap_ci(d)
                entry["vs"].append({"other": other.policy, "delta_nll": float(d.mean()), "ci95": ci,
                                    "excludes_zero": bool(ci[1] < 0 or ci[0] > 0)})
            entry["better_than_all"] = bool(entry["vs"]) and all(v["excludes_zero"] and v["delta_nll"] < 0
                                                                for v in entry["vs"])
        out.append(entry)
    return out


def _cell(r, full_speed) -> str:
    speed = f"{r.tokens_per_s:.0f}" + (f" ({r.tokens_per_s / full_speed:.2f}x)" if full_speed else "")
    given = f" (given {r.budget_ratio:.2f}x)" if r.budget_ratio else ""
    return (f"{r.compression_ratio:.2f}x{given} | {r.delta_nll:+.4f} [{r.delta_nll_ci95[0]:+.4f}, {r.delta_nll_ci95[1]:+.4f}] "
            f"| {r.ppl_change_pct:+.2f}% | {speed}")


def pareto_markdown(rows, summary: list[dict]) -> str:
    """One table per target ratio, methods by ΔNLL, the best in bold with its paired difference
    against each other method; impossible methods listed with the reason."""
    full = next((r for r in rows if r.policy == "full" and not r.skipped), None)
    full_speed = full.tokens_per_s if full else None
    text = (f"## Pareto: the best method at each target ratio\n\nA method competes at a target when its measured "
            f"ratio is >= {1 - BYTES_TOLERANCE:g} x the target. ΔNLL: nats/token vs the full cache, bootstrap 95% "
            "interval over windows paired with the full cache; `given`: the budget a method was given to reach the "
            "target's bytes (`match_bytes`). best - other: paired per window; `yes` = the interval "
            "excludes 0. Decode speed: tokens/s (x the full cache in the same run).\n")
    for s in summary:
        at = sorted((r for r in rows if r.ratio == s["ratio"] and r.policy != "full" and not r.skipped),
                    key=lambda r: r.delta_nll)
        vs = {v["other"]: v for v in s["vs"]}
        verdict = ("none competes" if s["best"] is None else f"**{s['best']}**, better than every other method with "
                   f"the paired interval excluding 0: {'yes' if s['better_than_all'] else 'no'}")
        text += (f"\n### {s['ratio']:g}x: best {verdict}\n\n| method | measured | ΔNLL [95% CI] | Δppl | decode tok/s "
                 "| best - this [95% CI] | excludes 0 |\n|---|---|---|---|---|---|---|\n")
        for r in at:
            name = f"**{r.policy}** (best)" if r.policy == s["best"] else r.policy
            if r.policy in s["under_budget"]:
                name += " (under target bytes)"
            v = vs.get(r.policy)
            pair = "" if v is None else f"{v['delta_nll']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] | " \
                                        f"{'yes' if v['excludes_zero'] else 'no'}"
            text += f"| {name} | {_cell(r, full_speed)} | {pair or ' | '} |\n"
        for policy, why in s["impossible"].items():
            text += f"| {policy} | impossible: {why} | | | | | |\n"
    return text


def _x(r) -> float:
    # Quest frees nothing: it is placed at its read ratio (bytes read per decode step)
    return (r.read_ratio or r.compression_ratio) if r.policy == "quest" else r.compression_ratio


def pareto_figure(rows):
    """Figure: ΔNLL vs measured compression with 95% error bars, decode speed vs the full cache,
    and (when measured) the retrieval probe; log2 x axes ticked at the target ratios ("4x");
    one line per method, the legend outside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_policy: dict[str, list] = {}
    for r in rows:
        if not r.skipped and r.policy != "full":
            by_policy.setdefault(r.policy, []).append(r)
    full = next((r for r in rows if r.policy == "full" and not r.skipped), None)
    panels = [("delta_nll", "ΔNLL vs full cache (nats/token, 95% CI)"), ("speed", "decode tokens/s ÷ full cache")]
    if any(r.probe_accuracy is not None for r in rows):
        panels.append(("probe_accuracy", "retrieval probe accuracy (black: full cache)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 4.8), squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20")
    for i, (policy, rs) in enumerate(sorted(by_policy.items())):
        rs = sorted(rs, key=_x)
        xs, style = [_x(r) for r in rs], {"marker": "o", "color": colors(i % 20),
                                          "label": "quest (read ratio)" if policy == "quest" else policy}
        lo = [r.delta_nll - r.delta_nll_ci95[0] for r in rs]
        hi = [r.delta_nll_ci95[1] - r.delta_nll for r in rs]
        axes[0].errorbar(xs, [r.delta_nll for r in rs], yerr=[lo, hi], capsize=3, **style)
        if full is not None and full.tokens_per_s:
            axes[1].plot(xs, [(r.tokens_per_s or math.nan) / full.tokens_per_s for r in rs], **style)
        if len(panels) > 2:
            axes[2].plot(xs, [r.probe_accuracy for r in rs], **style)
    targets = sorted({r.ratio for r in rows if r.policy != "full" and r.ratio})
    xs = targets + [_x(r) for rs in by_policy.values() for r in rs]
    lows = [r.delta_nll_ci95[0] for rs in by_policy.values() for r in rs]
    for ax, (field, label) in zip(axes, panels):
        ax.axhline({"delta_nll": 0.0, "speed": 1.0}.get(field, full.probe_accuracy if full else 0.0) or 0.0,
                   color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(targets, [f"{t:g}x" for t in targets])
        ax.minorticks_off()
        if xs:  # a margin around the points, so a single target's tick is not on the frame
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        ax.set_xlabel("measured compression (fp16 full bytes / peak bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.05)  # +0.01 and +2 nats on one readable axis
    if lows:
        axes[0].set_ylim(bottom=min(min(lows) * 1.2, -0.005))  # no empty negative decade
    if len(panels) > 2:
        axes[2].set_ylim(-0.03, 1.03)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    return fig


def plot(rows, path: Path) -> None:
    """Write `pareto_figure(rows)` as a PNG."""
    import matplotlib.pyplot as plt
    fig = pareto_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)
