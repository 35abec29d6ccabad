"""``report.html``: a self-contained page for people who read a sweep's results."""

from __future__ import annotations

import html
from pathlib import Path

from frontier.results.labels import fmt_cost, format_table, short_labels
from frontier.results.parquet_io import read_rows, sweep_metadata, write_text
from frontier.results.plots import plot_caption
from frontier.results.terminal import crossover_summary, frontier_summary


def write_html(out_dir: Path) -> Path:
    """A self-contained ``report.html`` in ``out_dir``: tables + the PNGs by relative path."""
    out_dir = Path(out_dir)
    runs = read_rows(out_dir, "runs")
    meta = sweep_metadata(out_dir)
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
    return write_text(out_dir / "report.html", "\n".join(parts))
