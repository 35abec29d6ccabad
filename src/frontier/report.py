"""Plots (matplotlib, Agg) and a self-contained HTML report from ``results/<sweep>/*.parquet``.

Everything reads the Parquet files written by :mod:`frontier.collect` and tolerates missing
files or columns (no recall → no heatmap; no measured costs → no cost-vs-L plot).
"""

from __future__ import annotations

import html
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
    crossover_table,
    format_table,
    frontier_table,
    read_metadata,
)

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
                   pts: list[tuple[str, str, float, float]], lower_better: bool) -> Path | None:
    """pts: (point_id, family, cost, ppl)."""
    pts = [p for p in pts if _ok(p[2]) and _ok(p[3])]
    if not pts:
        return None
    from frontier.pareto import pareto_front

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    pts = sorted(pts, key=lambda p: (_fam_rank(p[1]), p[0]))
    for pid, fam, c, q in pts:
        ax.scatter(c, q, color=_color(fam), label=None if fam in seen else fam, s=36, zorder=3)
        seen.add(fam)
        ax.annotate(pid.split("/")[1] + "/" + pid.split("/")[2] if pid.count("/") >= 2 else pid,
                    (c, q), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    rows = [{"point_id": p[0], "cost": p[2], "quality": p[3]} for p in pts]
    front, _ = pareto_front(rows, "cost", "quality", lower_better, True)
    fp = sorted(((p[2], p[3]) for p in pts if p[0] in front))
    if fp:
        ax.step([x for x, _ in fp], [y for _, y in fp], where="post" if lower_better else "pre", color="crimson", lw=1.2,
                alpha=0.7, label="Pareto front", zorder=2)
    if all(p[2] > 0 for p in pts):
        ax.set_xscale("log")
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


def plot_all(out_dir: Path) -> list[Path]:
    """Write the PNGs into ``out_dir``; returns the paths written.

    Always writes :data:`REQUIRED_PLOTS` (placeholders when there is no data for one), plus
    ``frontier_<metric>.png`` for prefill_ms / decode_tok_s / peak_mem_bytes when measured.
    Stale ``frontier_*.png`` from an earlier collect that no longer apply are removed.
    """
    out_dir = Path(out_dir)
    runs = [r for r in _read(out_dir, "runs") if r.get("status") == "ok"]
    costs = _read(out_dir, "costs")
    cross = _read(out_dir, "crossover")
    fam = {r["point_id"]: r.get("family") for r in runs}
    ppl = {r["point_id"]: r.get("ppl") for r in runs}
    written: list[Path] = []

    # --- frontier_<cost>.png: ppl vs cost ------------------------------------------------------
    p = _frontier_plot(out_dir, "weight_bytes", "perplexity vs weight bytes", "weight bytes",
                       [(r["point_id"], r.get("family"), r.get("weight_bytes"), r.get("ppl")) for r in runs],
                       True)
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
                           f"{label} at L={L}", pts, cost_lower_is_better(metric))
        if p:
            written.append(p)

    # --- cost_vs_L.png -------------------------------------------------------------------------
    panels = [m for m in ("prefill_ms", "state_bytes") if any(c["metric"] == m for c in measured)]
    if panels:
        plt = _plt()
        fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.4), squeeze=False)
        reps = {(r["family_a"], r["point_a"]) for r in cross if r.get("level") == "family"}
        reps |= {(r["family_b"], r["point_b"]) for r in cross if r.get("level") == "family"}
        rep_ids = {pid for _, pid in reps}
        for ax, metric in zip(axes[0], panels):
            per: dict[str, list[tuple[int, float]]] = {}
            for c in measured:
                if c["metric"] == metric and _ok(c["value"]) and c["context_len"] and c["value"] > 0:
                    per.setdefault(c["point_id"], []).append((c["context_len"], c["value"]))
            seen = set()
            for pid in sorted(per, key=lambda p: (_fam_rank(fam.get(p)), p)):
                xs, ys = zip(*sorted(per[pid]))
                f = fam.get(pid)
                thick = pid in rep_ids or not rep_ids
                ax.plot(xs, ys, marker="o", ms=3, color=_color(f), lw=2.0 if thick else 0.8,
                        alpha=1.0 if thick else 0.35, label=None if f in seen else f)
                seen.add(f)
            xmetric = "decode_s" if metric == "decode_tok_s" else metric
            # one marker per distinct L*; prefer naming a pair against the baseline
            marks: dict[float, list[dict]] = {}
            for r in cross:
                if (r.get("level") == "family" and r["source"] == "measured" and r["metric"] == xmetric
                        and r["l_star"] is not None):
                    marks.setdefault(round(float(r["l_star"]), 1), []).append(r)
            for x, rs in sorted(marks.items()):
                rs.sort(key=lambda r: (r["family_b"] != "baseline", r["family_a"], r["family_b"]))
                label = f"L*={x:.0f}: {rs[0]['family_a']} < {rs[0]['family_b']}"
                if len(rs) > 1:
                    label += f" (+{len(rs) - 1})"
                ax.axvline(x, color="crimson", ls="--", lw=1, alpha=0.7)
                ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=6, va="top",
                            rotation=90, xytext=(2, -4), textcoords="offset points")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length L")
            ax.set_ylabel(metric)
            ax.set_title(f"measured {metric} vs L", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "cost_vs_L.png"))

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
        fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(rcols), 1.2 + 0.32 * len(pids)))
        im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        single = len({_RECALL.match(x)["base"] for x in rcols}) == 1
        ax.set_xticks(range(len(rcols)), [c.split("@")[1] if single else c for c in rcols], fontsize=7,
                      rotation=0 if single else 30, ha="center" if single else "right")
        ax.set_yticks(range(len(pids)), pids, fontsize=6)
        for i in range(len(pids)):
            for j in range(len(rcols)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] < 0.6 else "black")
        ax.set_xlabel("context length L")
        ax.set_title("long-context recall accuracy", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
        written.append(_save(fig, out_dir / "recall_heatmap.png"))

    names = {p.stem for p in written}
    reasons = {"frontier_weight_bytes": "no ok point with weight_bytes and ppl",
               "frontier_state_bytes": "no measured state_bytes with ppl",
               "cost_vs_L": "no measured prefill_ms / state_bytes",
               "recall_heatmap": "no recall metric in this sweep"}
    for name in REQUIRED_PLOTS:
        if name not in names:
            written.append(_placeholder(out_dir, name, f"no data: {reasons[name]}"))
    keep = {p.name for p in written}
    for stale in out_dir.glob("frontier_*.png"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


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
    pngs = sorted(out_dir.glob("frontier_*.png")) + [p for p in (out_dir / "cost_vs_L.png",
                                                                 out_dir / "recall_heatmap.png") if p.exists()]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>frontier report: {e(meta.get('sweep', out_dir.name))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}</style></head><body>",
        f"<h1>frontier report: {e(meta.get('sweep', out_dir.name))}</h1>",
        f"<p>schema {e(meta.get('schema_version', '?'))}, git {e(meta.get('git_commit', '?'))}, "
        f"versions {e(meta.get('versions', '{}'))}</p>",
        "<h2>Runs</h2>", f"<pre>{e(runs_txt)}</pre>",
        "<h2>Pareto frontiers (ppl, largest L)</h2>", f"<pre>{e(frontier_table(out_dir))}</pre>",
        "<h2>Crossover L*</h2>", f"<pre>{e(crossover_table(out_dir))}</pre>",
        "<h2>Plots</h2>",
    ]
    for p in pngs:
        parts.append(f"<figure><img src='{e(p.name)}' alt='{e(p.stem)}'><figcaption>{e(p.stem)}"
                     "</figcaption></figure>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report.html.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(parts))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def wandb_report(out_dir: Path, entity: str | None = None, project: str = "frontier") -> str:
    """Write ``wandb_report.json``: the spec of the sweep's W&B report (runs grouped by sweep,
    one section per stage job_type, the plots and tables of this directory).

    The spec is plain JSON, built offline; turning it into a saved report needs the
    ``wandb-workspaces`` package and the server (not a dependency of this project).
    Returns the path written.
    """
    import json

    out_dir = Path(out_dir)
    meta = read_metadata(out_dir / "runs.parquet") if (out_dir / "runs.parquet").exists() else {}
    sweep = meta.get("sweep", out_dir.name)
    spec = {
        "entity": entity, "project": project,
        "title": f"frontier: {sweep}",
        "description": "Quantization vs attention surgery: quality and cost vs context length.",
        "runset": {"group": sweep},
        "sections": [
            {"title": "Pareto frontiers", "images": sorted(p.name for p in out_dir.glob("frontier_*.png"))},
            {"title": "Cost vs context length", "images": ["cost_vs_L.png"]},
            {"title": "Recall", "images": ["recall_heatmap.png"]},
            {"title": "Tables", "wandb_tables": ["runs", "frontier", "crossover"], "job_type": "collect"},
        ],
        "metadata": meta,
    }
    path = out_dir / "wandb_report.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".wandb_report.json.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return str(path)
