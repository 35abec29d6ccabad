"""Plots (matplotlib, Agg), terminal summaries, a self-contained HTML report and the W&B
report of a sweep, from ``results/<sweep>/*.parquet``.

Everything reads the Parquet files written by :mod:`frontier.collect` and tolerates missing
files or columns (no recall → no heatmap; no measured costs → no cost-vs-L plot).

* :func:`show_text` — what ``frontier show`` prints: the Pareto fronts at the largest L and a
  crossover summary answering "from which L does attention surgery beat quantization".
* :func:`plot_all`, :func:`write_html` — ``frontier report`` and the collect rule.
* :func:`build_wandb_report`, :func:`wandb_report` — ``frontier report --wandb``: a
  ``wandb_workspaces.reports.v2`` report, saved when online, else its spec written to
  ``wandb_report.json`` (re-create and save it later with :func:`upload_wandb_report`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from frontier.collect import (
    FAMILIES,
    cost_lower_is_better,
    format_table,
    point_parts,
    read_metadata,
)

# ---- labels and units -------------------------------------------------------------------------


def short_labels(point_ids) -> dict[str, str]:
    """point_id -> a short label: ``<quant>/<attention>/<finetune>``, prefixed by the model
    and suffixed by the eval only when those vary among ``point_ids`` (full id on a clash)."""
    ids = sorted(set(point_ids))
    parts = {p: point_parts(p) for p in ids}
    five = [p for p in ids if parts[p] is not None]
    models = {parts[p][0] for p in five}
    evals = {parts[p][4] for p in five}
    out = {}
    for p in ids:
        if parts[p] is None:
            out[p] = p
            continue
        m, q, a, f, e = parts[p]
        lab = f"{q}/{a}/{f}"
        if len(models) > 1:
            lab = f"{m}/{lab}"
        if len(evals) > 1:
            lab = f"{lab}/{e}"
        out[p] = lab
    seen: dict[str, int] = {}
    for lab in out.values():
        seen[lab] = seen.get(lab, 0) + 1
    return {p: (lab if seen[lab] == 1 else p) for p, lab in out.items()}


def _human_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" or abs(v) >= 100 else f"{v:.3g} {unit}"
        v /= 1024.0
    return f"{v:.3g} TiB"  # pragma: no cover


def fmt_cost(metric: str, v: Any) -> str:
    """A cost value with its unit (see :data:`frontier.collect.COST_METRICS`)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if metric.endswith("bytes"):
        return _human_bytes(v)
    if metric.endswith("_ms"):
        return f"{v:.3g} ms"
    if metric.endswith("tok_s"):
        return f"{v:.4g} tok/s"
    if metric.endswith("_s"):
        return f"{v:.3g} s"
    return f"{v:.4g}"


_METRIC_WORDS = {"prefill_ms": "prefill latency", "prefill_s": "prefill latency",
                 "decode_s": "decode latency", "decode_tok_s": "decode tokens/s",
                 "state_bytes": "state memory", "peak_mem_bytes": "peak memory",
                 "weight_bytes": "weight bytes"}
# crossover metrics, in the order the summary shows them: latency, then memory
_XO_METRICS = {"measured": ("prefill_ms", "decode_s", "state_bytes", "peak_mem_bytes"),
               "modelled": ("prefill_s", "decode_s", "state_bytes", "peak_mem_bytes")}
_LATENCY = {"prefill_ms", "prefill_s", "decode_s"}

# workflow/rules/collect.smk declares these as outputs: always written (a "no data" placeholder
# when the sweep has nothing to show, e.g. no recall metric).
REQUIRED_PLOTS = ("frontier_weight_bytes", "frontier_state_bytes", "cost_vs_L", "recall_heatmap")
FAMILY_COLORS = {"baseline": "black", "quantization": "tab:blue", "attention": "tab:orange",
                 "combined": "tab:green"}
# accuracy columns indexed by L: recall_acc@L, passkey_acc@L, ...
_RECALL = re.compile(r"^(?P<base>.*acc.*)@(?P<L>\d+)$")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _read(out_dir: Path, name: str) -> list[dict]:
    p = Path(out_dir) / f"{name}.parquet"
    return pq.read_table(p).to_pylist() if p.exists() else []


def _color(fam: str | None) -> str:
    return FAMILY_COLORS.get(fam or "", "tab:gray")


def _fam_rank(f: str | None) -> int:
    return FAMILIES.index(f) if f in FAMILIES else len(FAMILIES)


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _plt().close(fig)
    return path


def _frontier_plot(out_dir: Path, name: str, title: str, xlabel: str,
                   pts: list[tuple[str, str, float, float]], lower_better: bool,
                   labels: dict[str, str] | None = None) -> Path | None:
    """pts: (point_id, family, cost, ppl). Front points are ringed and joined."""
    pts = [p for p in pts if _ok(p[2]) and _ok(p[3])]
    if not pts:
        return None
    from frontier.pareto import pareto_front

    labels = labels or short_labels(p[0] for p in pts)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    pts = sorted(pts, key=lambda p: (_fam_rank(p[1]), p[0]))
    rows = [{"point_id": p[0], "cost": p[2], "quality": p[3]} for p in pts]
    front, _ = pareto_front(rows, "cost", "quality", lower_better, True)
    for pid, fam, c, q in pts:
        ax.scatter(c, q, color=_color(fam), label=None if fam in seen else fam, s=36, zorder=3)
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
        (lambda v, _: _human_bytes(v)) if name.endswith("bytes") else (lambda v, _: f"{v:g}")))
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


# cost-vs-L panels: (costs metric, crossover metric, y label, transform of the value)
_COST_PANELS = {
    "measured": [("prefill_ms", "prefill_ms", "prefill latency (ms)", None),
                 ("decode_tok_s", "decode_s", "decode latency (ms / token)", lambda v: 1000.0 / v if v > 0 else None),
                 ("state_bytes", "state_bytes", "KV cache / state (bytes)", None),
                 ("peak_mem_bytes", "peak_mem_bytes", "peak memory (bytes)", None)],
    "modelled": [("prefill_s", "prefill_s", "prefill latency (s)", None),
                 ("decode_s", "decode_s", "decode latency (s / token)", None),
                 ("state_bytes", "state_bytes", "KV cache / state (bytes)", None),
                 ("peak_mem_bytes", "peak_mem_bytes", "weights + state (bytes)", None)],
}


def _cost_vs_l(out_dir: Path, name: str, source: str, costs: list[dict], cross: list[dict],
               fam: dict[str, str | None]) -> Path | None:
    """Cost against L, one line per point coloured by family (family representatives thick),
    the family-level L* of each panel's metric marked; one row of panels per hardware."""
    rows = [c for c in costs if c["source"] == source and c["point_id"] in fam and _ok(c["value"]) and c["context_len"]]
    hws = sorted({str(c["hardware"]) for c in rows})
    if not hws:
        return None
    panels = [p for p in _COST_PANELS[source] if any(c["metric"] == p[0] for c in rows)]
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
                    if _ok(v) and v > 0:
                        per.setdefault(c["point_id"], []).append((c["context_len"], v))
            seen = set()
            for pid in sorted(per, key=lambda p: (_fam_rank(fam.get(p)), p)):
                xs, ys = zip(*sorted(per[pid]))
                f = fam.get(pid)
                thick = pid in reps or not reps
                ax.plot(xs, ys, marker="o", ms=3, color=_color(f), lw=2.0 if thick else 0.8,
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
            ax.set_title(f"{source} on {hw}: {_METRIC_WORDS.get(xmetric, xmetric)} vs L", fontsize=10)
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
    runs = [r for r in _read(out_dir, "runs") if r.get("status") == "ok"]
    costs = _read(out_dir, "costs")
    cross = _read(out_dir, "crossover")
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
        rows = [c for c in measured if c["metric"] == metric and _ok(c["value"]) and c["context_len"]]
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
    rcols = sorted({k for r in runs for k, v in r.items() if _RECALL.match(k) and _ok(v)},
                   key=lambda k: (_RECALL.match(k)["base"], int(_RECALL.match(k)["L"])))
    if rcols:
        import numpy as np

        plt = _plt()
        pids = [r["point_id"] for r in sorted(runs, key=lambda r: (_fam_rank(r.get("family")), r["point_id"]))]
        by = {r["point_id"]: r for r in runs}
        data = np.array([[by[p].get(c) if _ok(by[p].get(c)) else np.nan for c in rcols] for p in pids],
                        dtype=float)
        fig, ax = plt.subplots(figsize=(2.4 + 0.8 * len(rcols), 1.2 + 0.32 * len(pids)))
        im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        single = len({_RECALL.match(x)["base"] for x in rcols}) == 1
        ax.set_xticks(range(len(rcols)), [c.split("@")[1] if single else c for c in rcols], fontsize=7,
                      rotation=0 if single else 30, ha="center" if single else "right")
        ax.set_yticks(range(len(pids)), [f"{labels[p]} ({by[p].get('family')})" for p in pids], fontsize=7)
        for tick, p in zip(ax.get_yticklabels(), pids):
            tick.set_color(_color(by[p].get("family")))
        for i in range(len(pids)):
            for j in range(len(rcols)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] < 0.6 else "black")
        ax.set_xlabel("context length L" if single else "metric @ context length L")
        ax.set_title("long-context recall accuracy" + (f" ({_RECALL.match(rcols[0])['base']})" if single else ""),
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


# ---- terminal summaries ---------------------------------------------------------------------


def _largest_l_rows(rows: list[dict]) -> list[dict]:
    """Keep each (source, hardware, cost_metric) group at its largest context length."""
    top: dict[tuple, int | None] = {}
    for r in rows:
        k = (r["source"], r["hardware"], r["cost_metric"])
        L = r["context_len"]
        if k not in top or (L is not None and (top[k] is None or L > top[k])):
            top[k] = L
    return [r for r in rows if r["context_len"] == top[(r["source"], r["hardware"], r["cost_metric"])]]


def frontier_summary(out_dir: Path, quality_metric: str = "ppl") -> str:
    """The Pareto front of every cost metric at its largest context length (measured first,
    then modelled per hardware), short point labels, costs with units; and how many points
    are off those fronts and why (every L and quality metric is in ``frontier.parquet``)."""
    out_dir = Path(out_dir)
    rows = [r for r in _read(out_dir, "frontier") if r["quality_metric"] == quality_metric]
    if not rows:
        return f"(no {quality_metric} frontier in {out_dir / 'frontier.parquet'})"
    rows = _largest_l_rows(rows)
    labels = short_labels(r["point_id"] for r in rows)
    runs = {r["point_id"]: r for r in _read(out_dir, "runs")}
    rcols = [k for k in next(iter(runs.values()), {}) if _RECALL.match(k) and k.startswith("recall")]
    rcol = max(rcols, key=lambda k: int(_RECALL.match(k)["L"]), default=None)
    front = [r for r in rows if r.get("on_front", True)]
    front.sort(key=lambda r: (r["source"] != "measured", str(r["hardware"]), list(_METRIC_WORDS).index(r["cost_metric"])
                              if r["cost_metric"] in _METRIC_WORDS else 99, r["cost_metric"],
                              r["cost"] if cost_lower_is_better(r["cost_metric"]) else -r["cost"]))
    table, prev = [], None
    for r in front:
        key = (r["source"], r["hardware"], r["cost_metric"], r["context_len"])
        head = [r["source"], r["hardware"] or "-", r["cost_metric"], r["context_len"]] if key != prev else ["", "", "", ""]
        prev = key
        extra = [runs.get(r["point_id"], {}).get(rcol)] if rcol else []
        table.append([*head, labels[r["point_id"]], r["family"], fmt_cost(r["cost_metric"], r["cost"]),
                      _fmt_q(r["quality"]), *[_fmt_q(v) for v in extra]])
    headers = ["source", "hardware", "cost", "L", "point", "family", "value", quality_metric]
    txt = format_table(headers + ([rcol] if rcol else []), table)
    off = [r for r in rows if not r.get("on_front", True) and r.get("reason")]
    if off:
        kinds: dict[str, set] = {}
        for r in off:
            kinds.setdefault(r["reason"].split(" ")[0].rstrip(":"), set()).add(r["point_id"])
        txt += ("\noff these fronts: " + ", ".join(f"{len(v)} point(s) {k}" for k, v in sorted(kinds.items()))
                + " (frontier.parquet: on_front = false, reason)")
    return txt


def _cell(r: dict | None, x: str, series: dict | None = None) -> str:
    """Where the point of family ``x`` is strictly cheaper, from one family-level crossover row
    (``series``: collect's cost series, to tell a tie from "the other one is cheaper")."""
    if r is None:
        return "-"
    a_is_x = r["family_a"] == x
    ls = r["l_star"]
    if ls is None and series is not None:
        per = series.get((r["source"], r["hardware"], r["metric"]), {})
        sa, sb = per.get(r["point_a"], {}), per.get(r["point_b"], {})
        common = set(sa) & set(sb)
        if common and all(math.isclose(sa[L], sb[L], rel_tol=1e-6) for L in common):
            return "tied"
    if a_is_x:
        if ls is None:
            return "never"
        return "all L" if ls <= r["l_min"] else f"L >= {ls:.0f}"
    if ls is None:
        return "all L"
    return "never" if ls <= r["l_min"] else f"L < {ls:.0f}"


def _phrase(r: dict | None, x: str, series: dict | None = None) -> str:
    c = _cell(r, x, series)
    rng = f"{r['l_min']:.0f}..{r['l_max']:.0f}" if r else ""
    return {"-": "not measured", "never": f"never (L {rng})", "all L": f"at every L ({rng})",
            "tied": f"tied (L {rng})"}.get(
        c, ("from L ≈ " + c[5:]) if c.startswith("L >=") else f"only below L ≈ {c[4:]}")


def _fam_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """(x, y) family pairs, x the restructured/combined side, ordered with the question first."""
    fams = {r["family_a"] for r in rows} | {r["family_b"] for r in rows}
    order = ("attention", "combined", "quantization", "baseline")
    fams = sorted(fams, key=lambda f: (order.index(f) if f in order else len(order), f))
    return [(x, y) for i, x in enumerate(fams) for y in fams[i + 1:]]


def crossover_summary(out_dir: Path) -> str:
    """Family-level crossovers, one block per (source, hardware): the answer lines ("from which
    L does attention beat quantization in latency and memory, at matched perplexity") and a
    matrix of where the first family of each pair is cheaper."""
    out_dir = Path(out_dir)
    rows = [r for r in _read(out_dir, "crossover") if r["level"] == "family"]
    if not rows:
        return "(no family-level crossover rows: it needs two families with costs at two or more L)"
    runs = {r["point_id"]: r for r in _read(out_dir, "runs")}
    labels = short_labels(list(runs) or [r["point_a"] for r in rows] + [r["point_b"] for r in rows])
    series = _cost_series(_read(out_dir, "costs"))
    reps = {}
    for r in rows:
        reps[r["family_a"]], reps[r["family_b"]] = r["point_a"], r["point_b"]
    parts = ["family representatives (lowest ppl of each family): " + ", ".join(
        f"{f} = {labels.get(p, p)} (ppl {_fmt_q(runs.get(p, {}).get('ppl'))})"
        for f, p in sorted(reps.items(), key=lambda kv: _fam_rank(kv[0])))]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["hardware"]), []).append(r)
    for (source, hw), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "measured", str(kv[0][1]))):
        metrics = [m for m in _XO_METRICS.get(source, ()) if any(r["metric"] == m for r in rs)]
        metrics += sorted({r["metric"] for r in rs} - set(metrics))
        idx = {(frozenset((r["family_a"], r["family_b"])), r["metric"]): r for r in rs}
        lo, hi = min(r["l_min"] for r in rs), max(r["l_max"] for r in rs)
        parts.append(f"\n{source} on {hw}, L = {lo:.0f}..{hi:.0f}:")
        pairs = _fam_pairs(rs)
        for x, y in pairs:
            if (x, y) not in (("attention", "quantization"), ("combined", "quantization")):
                continue
            any_r = next((idx.get((frozenset((x, y)), m)) for m in metrics if idx.get((frozenset((x, y)), m))), None)
            if any_r is None:
                continue
            gap = any_r["quality_gap"]
            gap_x = gap if any_r["family_a"] == x else (None if gap is None else 1.0 / (1.0 + gap) - 1.0)
            matched = ("at matched perplexity" if any_r["matched"] else "NOT at matched perplexity") + (
                f" (ppl gap {gap_x:+.1%})" if gap_x is not None else "")
            lat = "; ".join(f"{_METRIC_WORDS.get(m, m)} {_phrase(idx.get((frozenset((x, y)), m)), x, series)}"
                            for m in metrics if m in _LATENCY)
            mem = "; ".join(f"{_METRIC_WORDS.get(m, m)} {_phrase(idx.get((frozenset((x, y)), m)), x, series)}"
                            for m in metrics if m not in _LATENCY)
            parts.append(f"answer: {x} ({labels.get(reps.get(x), reps.get(x))}) beats {y} "
                         f"({labels.get(reps.get(y), reps.get(y))}) {matched} — latency: {lat or '-'}; "
                         f"memory: {mem or '-'}")
        table = [[f"{x} vs {y}", *[_cell(idx.get((frozenset((x, y)), m)), x, series) for m in metrics],
                  "yes" if all(r["matched"] for r in rs if {r["family_a"], r["family_b"]} == {x, y}) else "no"]
                 for x, y in pairs]
        parts.append("where the first family is cheaper:")
        parts.append(format_table(["pair", *metrics, "matched ppl"], table))
    n_pt = len([r for r in _read(out_dir, "crossover") if r["level"] == "point"])
    if n_pt:
        parts.append(f"\n(+ {n_pt} point-level rows for matched-quality point pairs in crossover.parquet, level = point)")
    return "\n".join(parts)


def _fmt_q(v: Any) -> str:
    return "-" if not _ok(v) else f"{float(v):.5g}"


def _cost_series(costs: list[dict]) -> dict:
    from frontier.collect import _series

    return _series(costs)


def show_text(out_dir: Path) -> str:
    """What ``frontier show results/<sweep>`` prints."""
    out_dir = Path(out_dir)
    runs = _read(out_dir, "runs")
    meta = read_metadata(out_dir / "runs.parquet") if (out_dir / "runs.parquet").exists() else {}
    ok = [r for r in runs if r.get("status") == "ok"]
    fams = sorted({r.get("family") for r in ok}, key=_fam_rank)
    head = (f"sweep {meta.get('sweep', out_dir.name)}: {len(runs)} points ({len(ok)} ok, "
            f"{len(runs) - len(ok)} failed); families: {', '.join(map(str, fams)) or '-'}; "
            f"schema {meta.get('schema_version', '?')}")
    failed = [f"  failed {short_labels(r['point_id'] for r in runs)[r['point_id']]}: {r.get('reason')}"
              for r in runs if r.get("status") != "ok"]
    return "\n".join([head, *failed, "",
                      "== Pareto frontiers (quality: ppl, lower is better; each cost at its largest L) ==",
                      frontier_summary(out_dir), "",
                      "== Crossover: context length L* where one family overtakes another ==",
                      crossover_summary(out_dir)])


def write_html(out_dir: Path) -> Path:
    """A self-contained ``report.html`` in ``out_dir``: tables + the PNGs by relative path."""
    out_dir = Path(out_dir)
    runs = _read(out_dir, "runs")
    meta = read_metadata(out_dir / "runs.parquet") if (out_dir / "runs.parquet").exists() else {}
    qcols = [c for c in (runs[0].keys() if runs else []) if c == "ppl" or "@" in c]
    run_rows = [[r["point_id"], r.get("family"), r.get("status"), r.get("weight_bytes"),
                 r.get("effective_bits"), *[r.get(q) for q in qcols], r.get("reason")] for r in runs]
    runs_txt = format_table(["point", "family", "status", "weight_bytes", "eff_bits", *qcols, "reason"],
                            run_rows) if runs else "(no runs)"
    labels = short_labels(r["point_id"] for r in runs)
    run_rows = [[labels[r["point_id"]], r.get("family"), r.get("status"), fmt_cost("weight_bytes", r.get("weight_bytes")),
                 r.get("effective_bits"), *[r.get(q) for q in qcols], r["point_id"], r.get("reason")] for r in runs]
    runs_txt = format_table(["point", "family", "status", "weight", "eff_bits", *qcols, "point_id", "reason"],
                            run_rows) if runs else "(no runs)"
    pngs = sorted(out_dir.glob("frontier_*.png")) + [
        p for p in (out_dir / "cost_vs_L.png", out_dir / "cost_vs_L_modelled.png", out_dir / "recall_heatmap.png")
        if p.exists()]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>frontier report: {e(meta.get('sweep', out_dir.name))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "figcaption{font-size:13px;color:#444;max-width:900px}</style></head><body>",
        f"<h1>frontier report: {e(meta.get('sweep', out_dir.name))}</h1>",
        f"<p>schema {e(meta.get('schema_version', '?'))} (docs/results-schema.md), git "
        f"{e(meta.get('git_commit', '?'))}, versions {e(meta.get('versions', '{}'))}</p>",
        "<h2>Runs</h2>", f"<pre>{e(runs_txt)}</pre>",
        "<h2>Pareto frontiers (ppl; each cost at its largest L)</h2>", f"<pre>{e(frontier_summary(out_dir))}</pre>",
        "<h2>Crossover L*</h2>", f"<pre>{e(crossover_summary(out_dir))}</pre>",
        "<h2>Plots</h2>",
    ]
    for p in pngs:
        parts.append(f"<figure><img src='{e(p.name)}' alt='{e(p.stem)}'><figcaption><b>{e(p.stem)}</b>: "
                     f"{e(plot_caption(p.stem))}</figcaption></figure>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report.html.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(parts))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# ---- W&B report (wandb_workspaces.reports.v2) -------------------------------------------------

WANDB_REPORT_FORMAT = "frontier.wandb_report/1"


def _sweep_facts(out_dir: Path) -> dict:
    runs = _read(out_dir, "runs")
    meta = read_metadata(out_dir / "runs.parquet") if (out_dir / "runs.parquet").exists() else {}
    measured = [c for c in _read(out_dir, "costs") if c["source"] == "measured" and c["context_len"]]
    ls = sorted({int(c["context_len"]) for c in measured})
    metrics = [m for m in ("state_bytes", "prefill_ms", "decode_tok_s", "peak_mem_bytes")
               if any(c["metric"] == m for c in measured)]
    cols = list(runs[0]) if runs else []
    recall = sorted((c for c in cols if _RECALL.match(c)),
                    key=lambda k: (_RECALL.match(k)["base"], int(_RECALL.match(k)["L"])))
    return {"sweep": meta.get("sweep", out_dir.name), "ls": ls, "metrics": metrics, "recall": recall,
            "has_ppl": "ppl" in cols}


def build_wandb_report(out_dir: Path, entity: str, project: str = "frontier"):
    """The sweep's W&B report as a ``wandb_workspaces.reports.v2.Report`` (built locally; nothing
    is sent). Panel grids over the sweep's runs (``group`` = sweep): the evaluate runs' summary
    metrics (``ppl``, ``weight_bytes``, ``<cost>@<L>``, ``recall_acc@<L>``) as the frontier
    scatters, cost-vs-L and recall-vs-L parallel coordinates; the collect run's W&B Tables
    (runs, frontier, crossover); and the ``frontier show`` text."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    out_dir = Path(out_dir)
    f = _sweep_facts(out_dir)
    sweep, lmax = f["sweep"], (f["ls"][-1] if f["ls"] else None)

    def runset(job_type: str) -> Any:
        return wr.Runset(entity=entity, project=project, name=f"{sweep}: {job_type} runs",
                         filters=[expr.Metric("Group") == sweep, expr.Metric("JobType") == job_type])

    ident = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k), display_name=k.split(".")[0])
             for k in ("quant.name", "attention.name", "finetune.name")]
    frontier_panels = [wr.ScatterPlot(title="perplexity vs weight bytes", x="weight_bytes", y="ppl", log_x=True)]
    for m in f["metrics"]:
        frontier_panels.append(wr.ScatterPlot(title=f"perplexity vs {_METRIC_WORDS.get(m, m)} at L={lmax} (measured)",
                                              x=f"{m}@{lmax}", y="ppl", log_x=True))
    cost_panels = [wr.ParallelCoordinatesPlot(
        title=f"{_METRIC_WORDS.get(m, m)} vs L (measured)", columns=ident + [
            wr.ParallelCoordinatesPlotColumn(metric=f"{m}@{L}", display_name=f"L={L}", log=True) for L in f["ls"]])
        for m in f["metrics"]]
    recall_panels = [wr.ParallelCoordinatesPlot(title="recall accuracy vs L", columns=ident + [
        wr.ParallelCoordinatesPlotColumn(metric=c) for c in f["recall"]])] if f["recall"] else []
    table_panels = [wr.WeavePanelSummaryTable(table_name=t, layout=wr.Layout(w=24, h=12))
                    for t in ("runs", "frontier", "crossover")]
    blocks = [
        wr.P(f"Sweep {sweep}: quantization vs attention surgery, quality and cost as a function of context "
             f"length L. Runs are grouped by sweep (group = {sweep}) with job_type = pipeline stage; the "
             "Parquet files in results/" + sweep + "/ are the store (docs/results-schema.md)."),
        wr.H1("Pareto frontiers"),
        wr.P("Perplexity (lower is better) against each cost; one point per evaluate run."),
        wr.PanelGrid(runsets=[runset("evaluate")], panels=frontier_panels),
    ]
    if cost_panels:
        blocks += [wr.H1("Cost vs context length"),
                   wr.P("Each line is a point of the grid across its measured context lengths."),
                   wr.PanelGrid(runsets=[runset("evaluate")], panels=cost_panels)]
    if recall_panels:
        blocks += [wr.H1("Recall accuracy vs context length"),
                   wr.PanelGrid(runsets=[runset("evaluate")], panels=recall_panels)]
    blocks += [wr.H1("Collected tables"),
               wr.P("The collect run's W&B Tables: runs, frontier (on_front + reason), crossover (L*)."),
               wr.PanelGrid(runsets=[runset("collect")], panels=table_panels)]
    if (out_dir / "crossover.parquet").exists():
        blocks += [wr.H1("Frontier and crossover summary"),
                   wr.CodeBlock(code=show_text(out_dir), language="markdown")]
    return wr.Report(project=project, entity=entity, title=f"frontier: {sweep}"[:128],
                     description="Quantization vs attention surgery: Pareto frontiers and crossover context lengths.",
                     blocks=blocks, width="fluid")


def _to_spec(obj: Any) -> Any:
    """A report object as JSON: every dataclass (``_type`` = its wr class) with its init fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {"_type": type(obj).__name__}
        for fld in dataclasses.fields(obj):
            if fld.init and not fld.name.startswith("_"):
                d[fld.name] = _to_spec(getattr(obj, fld.name))
        return d
    if isinstance(obj, (list, tuple)):
        return [_to_spec(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_spec(v) for k, v in obj.items()}
    return obj


def _from_spec(obj: Any) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if isinstance(obj, dict) and "_type" in obj:
        return getattr(wr, obj["_type"])(**{k: _from_spec(v) for k, v in obj.items() if k != "_type"})
    if isinstance(obj, list):
        return [_from_spec(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _from_spec(v) for k, v in obj.items()}
    return obj


def _panel_index(spec: dict) -> list[dict]:
    out, section = [], None
    for b in spec["blocks"]:
        if b["_type"] in ("H1", "H2", "H3"):
            section = b["text"]
        for p in b.get("panels", []) if b["_type"] == "PanelGrid" else []:
            row = {"section": section, "type": p["_type"], "title": p.get("title") or p.get("table_name")}
            if p["_type"] == "ScatterPlot":
                row.update(x=p["x"], y=p["y"])
            if p["_type"] == "WeavePanelSummaryTable":
                row["table"] = p["table_name"]
            row["runset"] = [rs["filters"] for rs in b["runsets"]]
            out.append(row)
    return out


def load_wandb_report(path: str | Path, entity: str | None = None, project: str | None = None):
    """Re-create the Report of a ``wandb_report.json``; ``entity``/``project`` replace the
    spec's (in the report and every run set)."""
    spec = json.loads(Path(path).read_text())
    if spec.get("format") != WANDB_REPORT_FORMAT:
        raise ValueError(f"{path}: not a {WANDB_REPORT_FORMAT} file")
    rep = spec["report"]
    for obj in [rep] + [rs for b in rep["blocks"] for rs in b.get("runsets", [])]:
        if entity is not None:
            obj["entity"] = entity
        if project is not None:
            obj["project"] = project
    return _from_spec(rep)


def _wandb_online() -> tuple[bool, str]:
    if os.environ.get("WANDB_MODE") != "online":
        return False, "WANDB_MODE is not 'online'"
    if os.environ.get("WANDB_API_KEY"):
        return True, ""
    try:
        import wandb

        wandb.Api()
        return True, ""
    except Exception as e:  # noqa: BLE001 - no key: stay offline
        return False, f"no W&B API key ({type(e).__name__})"


def _default_entity() -> str:
    import wandb

    return wandb.Api().default_entity or ""


def upload_wandb_report(path: str | Path, entity: str | None = None, project: str | None = None) -> str:
    """Save the report of a ``wandb_report.json`` to the W&B server (online, API key needed;
    upload the runs first with ``wandb sync``). Returns the report URL."""
    spec = json.loads(Path(path).read_text())
    entity = entity or os.environ.get("WANDB_ENTITY") or spec.get("entity") or _default_entity()
    report = load_wandb_report(path, entity=entity, project=project)
    report.save()
    return report.url


def wandb_report(out_dir: Path, entity: str | None = None, project: str | None = None) -> dict:
    """Build the sweep's W&B report; write its spec to ``<out_dir>/wandb_report.json``; save it
    on the server when online (``WANDB_MODE=online`` and an API key). Returns ``{"path", "saved",
    "url", "message"}``; ``message`` says how to upload when it was not saved."""
    import importlib.metadata as md

    out_dir = Path(out_dir)
    online, why = _wandb_online()
    entity = entity or os.environ.get("WANDB_ENTITY") or ""
    project = project or os.environ.get("WANDB_PROJECT") or "frontier"
    if online and not entity:
        try:
            entity = _default_entity()
        except Exception as e:  # noqa: BLE001
            online, why = False, f"no default W&B entity ({type(e).__name__}: {e})"
    report = build_wandb_report(out_dir, entity, project)
    rep = _to_spec(report)
    facts = _sweep_facts(out_dir)
    spec = {"format": WANDB_REPORT_FORMAT, "sweep": facts["sweep"], "entity": entity or None,
            "project": project, "wandb_workspaces": md.version("wandb-workspaces"),
            "panels": _panel_index(rep), "report": rep}
    path = out_dir / "wandb_report.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".wandb_report.json.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(spec, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    result = {"path": str(path), "saved": False, "url": None, "message": ""}
    if online:
        try:
            report.save()
            result.update(saved=True, url=report.url, message=f"W&B report saved: {report.url}")
            return result
        except Exception as e:  # noqa: BLE001 - report the failure, keep the spec
            why = f"saving failed: {type(e).__name__}: {e}"
    wdir = out_dir.resolve().parents[1] / "work" / "wandb" if len(out_dir.resolve().parents) > 1 else None
    runs_glob = f"{wdir}/offline-run-*" if wdir is not None and wdir.is_dir() else "work/wandb/offline-run-*"
    ent = f"entity={entity!r}" if entity else "entity='<your-entity>'"
    result["message"] = (
        f"W&B report not saved ({why}); its spec is in {path}.\n"
        "To publish it:\n"
        f"  1. upload the offline runs:  wandb sync {runs_glob}\n"
        f"  2. save the report, online:  WANDB_MODE=online WANDB_API_KEY=... frontier report {out_dir} --wandb\n"
        f"     or from the spec:         python -c \"from frontier.report import upload_wandb_report as u; "
        f"print(u('{path}', {ent}))\"")
    return result
