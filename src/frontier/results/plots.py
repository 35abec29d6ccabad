"""The static PNG plots of a sweep (matplotlib, Agg): quality-vs-cost frontiers, cost vs L with
the crossovers L* marked, the recall heatmap. They feed Snakemake's report (workflow/report/)
and the docs; report.html has the interactive versions (:mod:`frontier.results.html`)."""

from __future__ import annotations

import math
from pathlib import Path

from frontier.results.families import color, fam_rank
from frontier.results.fronts import pareto_front
from frontier.results.labels import (COST_PANELS, METRIC_WORDS, RECALL, human_bytes, is_num, recall_sort_key,
                                     short_labels)
from frontier.results.parquet_io import atomic_save, read_rows
from frontier.results.schema import cost_lower_is_better

# workflow/rules/collect.smk declares these as outputs: always written (a "no data" placeholder
# when the sweep has nothing to show, e.g. no recall metric).
REQUIRED_PLOTS = ("frontier_weight_bytes", "frontier_state_bytes", "cost_vs_L", "recall_heatmap")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"), suffix=".tmp.png")
    finally:
        _plt().close(fig)
    return path


def _frontier_plot(out_dir: Path, name: str, title: str, xlabel: str,
                   pts: list[tuple[str, str, float, float]], lower_better: bool,
                   labels: dict[str, str] | None = None) -> Path | None:
    """pts: (point_id, family, cost, ppl). Front points are ringed and joined."""
    pts = [p for p in pts if is_num(p[2]) and is_num(p[3])]
    if not pts:
        return None
    labels = labels or short_labels(p[0] for p in pts)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    pts = sorted(pts, key=lambda p: (fam_rank(p[1]), p[0]))
    rows = [{"point_id": p[0], "cost": p[2], "quality": p[3]} for p in pts]
    front, _ = pareto_front(rows, "cost", "quality", lower_better, True)
    for pid, fam, c, q in pts:
        ax.scatter(c, q, color=color(fam), label=None if fam in seen else fam, s=36, zorder=3)
        seen.add(fam)
        ax.annotate(labels.get(pid, pid), (c, q), fontsize=6, alpha=0.8, xytext=(4, 3), textcoords="offset points")
    fp = sorted((p[2], p[3]) for p in pts if p[0] in front)
    if fp:
        ax.scatter([x for x, _ in fp], [y for _, y in fp], s=110, facecolors="none", edgecolors="crimson",
                   lw=1.2, zorder=4, label=f"Pareto front ({len(fp)})")
        if len(fp) > 1:
            ax.step([x for x, _ in fp], [y for _, y in fp], where="post" if lower_better else "pre",
                    color="crimson", lw=1.0, alpha=0.6, zorder=2)
    if all(p[2] > 0 for p in pts) and max(p[2] for p in pts) / min(p[2] for p in pts) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if ax.get_xscale() == "log":  # majors at 1-2-5, no crowded minor labels
        ax.xaxis.set_major_locator(LogLocator(base=4) if name.endswith("bytes")
                                   else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(
        (lambda v, _: human_bytes(v)) if name.endswith("bytes") else (lambda v, _: f"{v:g}")))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / f"frontier_{name}.png")


def _placeholder(out_dir: Path, name: str, message: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 2.0))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, wrap=True)
    ax.set_title(name, fontsize=10)
    return _save(fig, Path(out_dir) / f"{name}.png")


def _cost_vs_l(out_dir: Path, name: str, source: str, costs: list[dict], cross: list[dict],
               fam: dict[str, str | None]) -> Path | None:
    """Cost against L, one line per point coloured by family (family representatives thick),
    the family-level L* of each panel's metric marked; one row of panels per hardware."""
    rows = [c for c in costs if c["source"] == source and c["point_id"] in fam and is_num(c["value"]) and c["context_len"]]
    hws = sorted({str(c["hardware"]) for c in rows})
    if not hws:
        return None
    panels = [p for p in COST_PANELS[source] if any(c["metric"] == p[0] for c in rows)]
    if not panels:
        return None
    plt = _plt()
    ncol = min(len(panels), 2 if len(hws) == 1 else len(panels))
    nrow_per_hw = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow_per_hw * len(hws), ncol, figsize=(6.0 * ncol, 4.2 * nrow_per_hw * len(hws)),
                             squeeze=False)
    reps = {r["point_a"] for r in cross if r.get("level") == "family"} | {
        r["point_b"] for r in cross if r.get("level") == "family"}
    for h, hw in enumerate(hws):
        for i, (metric, xmetric, ylabel, tf) in enumerate(panels):
            ax = axes[h * nrow_per_hw + i // ncol][i % ncol]
            per: dict[str, list[tuple[int, float]]] = {}
            for c in rows:
                if c["metric"] == metric and str(c["hardware"]) == hw:
                    v = tf(c["value"]) if tf else c["value"]
                    if is_num(v) and v > 0:
                        per.setdefault(c["point_id"], []).append((c["context_len"], v))
            seen = set()
            for pid in sorted(per, key=lambda p: (fam_rank(fam.get(p)), p)):
                xs, ys = zip(*sorted(per[pid]))
                f = fam.get(pid)
                thick = pid in reps or not reps
                ax.plot(xs, ys, marker="o", ms=3, color=color(f), lw=2.0 if thick else 0.8,
                        alpha=1.0 if thick else 0.35, label=None if f in seen else f)
                seen.add(f)
            # one marker per cluster of L* (within 10 %) of matched-perplexity family pairs, naming the first
            marks = sorted(((float(r["l_star"]), r) for r in cross
                            if r.get("level") == "family" and r["source"] == source and str(r["hardware"]) == hw
                            and r["metric"] == xmetric and r["l_star"] is not None and r["l_star"] > r["l_min"] * 1.001
                            and r.get("matched", True)),
                           key=lambda t: t[0])
            clusters: list[list[tuple[float, dict]]] = []
            for x, r in marks:
                if clusters and x <= clusters[-1][0][0] * 1.1:
                    clusters[-1].append((x, r))
                else:
                    clusters.append([(x, r)])
            for cl in clusters:
                cl.sort(key=lambda t: (t[1]["family_b"] != "quantization", t[1]["family_b"] != "baseline",
                                       t[1]["family_a"]))
                x, r = cl[0]
                label = f"L*≈{x:.0f}: {r['family_a']} < {r['family_b']}" + (f" (+{len(cl) - 1})" if len(cl) > 1 else "")
                ax.axvline(x, color="crimson", ls="--", lw=1, alpha=0.7)
                ax.annotate(label, (x, 0), xycoords=("data", "axes fraction"), fontsize=6, va="bottom",
                            rotation=90, xytext=(2, 4), textcoords="offset points", color="crimson",
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
            ax.set_xscale("log", base=2)
            ys = [v for pts in per.values() for _, v in pts]
            if ys and max(ys) / min(ys) > 10:
                ax.set_yscale("log")
            ax.set_xlabel("context length L")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{source} on {hw}: {METRIC_WORDS.get(xmetric, xmetric)} vs L", fontsize=10)
            ax.grid(alpha=0.3, which="both")

        for j in range(len(panels), nrow_per_hw * ncol):
            axes[h * nrow_per_hw + j // ncol][j % ncol].axis("off")
    handles = {}
    for ax in axes.flat:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, hd)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=max(1, len(handles)), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    # fixed spacing (tight_layout costs a full extra draw); savefig's tight bbox trims the margins
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.06, top=1.0 - 0.6 / fig.get_figheight(),
                        wspace=0.22, hspace=0.32)
    return _save(fig, Path(out_dir) / f"{name}.png")


def plot_all(out_dir: Path) -> list[Path]:
    """Write the PNGs into ``out_dir``; returns the paths written.

    Always writes :data:`REQUIRED_PLOTS` (placeholders when there is no data for one), plus
    ``frontier_<metric>.png`` for prefill_ms / decode_tok_s / peak_mem_bytes when measured and
    ``cost_vs_L_modelled.png`` when there are modelled costs.
    Stale ``frontier_*.png`` from an earlier collect that no longer apply are removed.
    """
    out_dir = Path(out_dir)
    runs = [r for r in read_rows(out_dir, "runs") if r.get("status") == "ok"]
    costs = read_rows(out_dir, "costs")
    cross = read_rows(out_dir, "crossover")
    fam = {r["point_id"]: r.get("family") for r in runs}
    ppl = {r["point_id"]: r.get("ppl") for r in runs}
    labels = short_labels(fam)
    written: list[Path] = []

    # --- frontier_<cost>.png: ppl vs cost ------------------------------------------------------
    p = _frontier_plot(out_dir, "weight_bytes", "perplexity vs weight bytes", "weight bytes",
                       [(r["point_id"], r.get("family"), r.get("weight_bytes"), r.get("ppl")) for r in runs],
                       True, labels)
    if p:
        written.append(p)
    measured = [c for c in costs if c["source"] == "measured" and c["point_id"] in fam]
    for metric, label in (("state_bytes", "KV-cache / state bytes"), ("prefill_ms", "prefill ms"),
                          ("decode_tok_s", "decode tokens/s (higher is better)"),
                          ("peak_mem_bytes", "peak memory bytes")):
        rows = [c for c in measured if c["metric"] == metric and is_num(c["value"]) and c["context_len"]]
        if not rows:
            continue
        L = max(c["context_len"] for c in rows)
        pts = [(c["point_id"], fam[c["point_id"]], c["value"], ppl.get(c["point_id"]))
               for c in rows if c["context_len"] == L]
        p = _frontier_plot(out_dir, metric, f"perplexity vs {label} at L={L} (measured)",
                           f"{label} at L={L}", pts, cost_lower_is_better(metric), labels)
        if p:
            written.append(p)

    # --- cost_vs_L.png (measured), cost_vs_L_modelled.png ----------------------------------------
    for name, source in (("cost_vs_L", "measured"), ("cost_vs_L_modelled", "modelled")):
        p = _cost_vs_l(out_dir, name, source, costs, cross, fam)
        if p:
            written.append(p)
        elif name != "cost_vs_L":
            (out_dir / f"{name}.png").unlink(missing_ok=True)

    # --- recall_heatmap.png --------------------------------------------------------------------
    rcols = sorted({k for r in runs for k, v in r.items() if RECALL.match(k) and is_num(v)},
                   key=recall_sort_key)
    if rcols:
        import numpy as np

        plt = _plt()
        pids = [r["point_id"] for r in sorted(runs, key=lambda r: (fam_rank(r.get("family")), r["point_id"]))]
        by = {r["point_id"]: r for r in runs}
        data = np.array([[by[p].get(c) if is_num(by[p].get(c)) else np.nan for c in rcols] for p in pids],
                        dtype=float)
        fig, ax = plt.subplots(figsize=(2.4 + 0.8 * len(rcols), 1.2 + 0.32 * len(pids)))
        im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        single = len({RECALL.match(x)["base"] for x in rcols}) == 1
        ax.set_xticks(range(len(rcols)), [c.split("@")[1] if single else c for c in rcols], fontsize=7,
                      rotation=0 if single else 30, ha="center" if single else "right")
        ax.set_yticks(range(len(pids)), [f"{labels[p]} ({by[p].get('family')})" for p in pids], fontsize=7)
        for tick, p in zip(ax.get_yticklabels(), pids):
            tick.set_color(color(by[p].get("family")))
        for i in range(len(pids)):
            for j in range(len(rcols)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] < 0.6 else "black")
        ax.set_xlabel("context length L" if single else "metric @ context length L")
        ax.set_title("long-context recall accuracy" + (f" ({RECALL.match(rcols[0])['base']})" if single else ""),
                     fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
        written.append(_save(fig, out_dir / "recall_heatmap.png"))

    names = {p.stem for p in written}
    reasons = {"frontier_weight_bytes": "no ok point with weight_bytes and ppl",
               "frontier_state_bytes": "no measured state_bytes with ppl",
               "cost_vs_L": "no measured costs at two or more L",
               "recall_heatmap": "no recall metric in this sweep"}
    for name in REQUIRED_PLOTS:
        if name not in names:
            written.append(_placeholder(out_dir, name, f"no data: {reasons[name]}"))
    keep = {p.name for p in written}
    for stale in out_dir.glob("frontier_*.png"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


_CAPTIONS = {
    "frontier_weight_bytes": "Perplexity (lower is better) against stored weight bytes, one marker per ok point, "
                             "coloured by efficiency family; Pareto-optimal points ringed and joined.",
    "frontier_state_bytes": "Perplexity against the KV cache / recurrent state at the longest measured context.",
    "frontier_prefill_ms": "Perplexity against measured prefill latency at the longest measured context.",
    "frontier_decode_tok_s": "Perplexity against measured decode throughput (higher is better) at the longest "
                             "measured context.",
    "frontier_peak_mem_bytes": "Perplexity against measured peak memory at the longest measured context.",
    "cost_vs_L": "Measured cost against context length L (prefill and decode latency, state and peak memory), "
                 "one line per point coloured by family, family representatives thick; dashed lines mark the "
                 "crossover L* where one family overtakes another at matched perplexity.",
    "cost_vs_L_modelled": "Roofline-modelled cost against L up to long contexts, on the sweep's hardware, with the "
                          "modelled crossovers L*.",
    "recall_heatmap": "Long-context recall accuracy (exact match) per point and context length.",
}


def plot_caption(stem: str) -> str:
    return _CAPTIONS.get(stem, stem)
