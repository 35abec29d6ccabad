"""The HTML tables of report.html: runs, Pareto fronts, crossovers. Rendered here (readable
without JavaScript); report.js sorts them (click a header), filters them (the search box), shows
the columns of class ``more`` ("all columns") and the rows of class ``off`` (off-front points,
point-level crossovers). Every numeric cell carries its raw value in ``data-v`` for sorting."""

from __future__ import annotations

import html
import json

from frontier.results.families import hex_color
from frontier.results.labels import METRIC_WORDS, RECALL, fmt_cost, fmt_q, is_num, recall_sort_key
from frontier.results.runs import quality_columns

e = html.escape


def cell(text, v=None, raw: bool = False) -> tuple[str, object]:
    """A table cell: display text (escaped unless ``raw``) and an optional sort value."""
    return (str(text) if raw else e("-" if text is None else str(text)), v)


def fam_cell(f) -> tuple[str, object]:
    return (f"<span class='dot' style='background:{hex_color(f)}'></span>{e(str(f))}", f)


def point_link(pid: str, labels: dict, anchors: dict) -> tuple[str, object]:
    lab = labels.get(pid, pid)
    a = anchors.get(pid)
    shown = e(lab).replace("/", "/<wbr>")  # long labels may wrap after a slash
    txt = f"<a href='#{a}' title='{e(pid)}'>{shown}</a>" if a else shown
    return (f"<span class='pt'>{txt}</span>", lab)


def num_cell(v, text: str | None = None) -> tuple[str, object]:
    if not is_num(v):
        return ("-", None)
    return (e(text if text is not None else fmt_q(v)), float(v))


def render(tid: str, cols: list[tuple[str, bool]], rows: list[list[tuple[str, object]]],
           row_attrs: list[dict] | None = None, off_label: str | None = None, caption: str = "") -> str:
    """A table with its controls. ``cols``: (header, more) — ``more`` columns hide until "all
    columns"; ``row_attrs``: per row {"id", "off"}."""
    head = "".join(f"<th class='{'more' if more else ''}' title='click to sort'>{e(h)}</th>" for h, more in cols)
    body = []
    for i, r in enumerate(rows):
        attrs = (row_attrs or [{}] * len(rows))[i]
        ida = f" id='{e(attrs['id'])}'" if attrs.get("id") else ""
        cls = " class='off'" if attrs.get("off") else ""
        tds = []
        for (txt, v), (_, more) in zip(r, cols):
            dv = "" if v is None or isinstance(v, str) else f" data-v='{v!r}'"
            tds.append(f"<td{' class=more' if more else ''}{dv}>{txt}</td>")
        body.append(f"<tr{ida}{cls}>{''.join(tds)}</tr>")
    ctl = [f"<input type='search' placeholder='filter rows (words, e.g. int8 attention)' data-filter='{tid}'>"]
    if any(more for _, more in cols):
        ctl.append(f"<button type='button' data-more='{tid}'>show all columns</button>")
    if off_label and any(a.get("off") for a in (row_attrs or [])):
        ctl.append(f"<label><input type='checkbox' data-off='{tid}'> {e(off_label)}</label>")
    ctl.append(f"<span class='count' data-count='{tid}'></span>")
    cap = f"<p class='note'>{caption}</p>" if caption else ""
    return (f"{cap}<div class='ctl'>{' '.join(ctl)}</div><div class='tw'><table class='tbl' id='{tid}'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _where(r: dict) -> str:
    """``measured on cpu`` / ``modelled on h100`` / ``measured`` (no hardware: weight bytes)."""
    return f"{r['source']} on {r['hardware']}" if r.get("hardware") else str(r["source"])


def recall_column(runs: list[dict]) -> str | None:
    """The recall column shown first: ``recall_acc@<largest L>`` (else any accuracy@L)."""
    cols = sorted({k for r in runs for k, v in r.items() if RECALL.match(k) and is_num(v)}, key=recall_sort_key)
    rec = [c for c in cols if c.startswith("recall")] or cols
    return max(rec, key=lambda c: recall_sort_key(c)[1]) if rec else None


def runs_table(runs: list[dict], labels: dict, anchors: dict) -> str:
    qcols = quality_columns(runs)
    rcol = recall_column(runs)
    extra_q = [q for q in qcols if q not in ("ppl", rcol)]
    ovr = sorted({k for r in runs for k in r if k.startswith("ovr.")})
    cols = [("point", False), ("family", False), ("status", False), ("ppl", False)]
    cols += [(rcol, False)] if rcol else []
    cols += [("weights", False), ("bits/weight", False), ("gap closed (ppl / nats)", False), ("config", False)]
    cols += [(c, True) for c in ("model", "quant", "attention", "finetune", "eval")]
    cols += [(c[4:], True) for c in ovr] + [(q, True) for q in extra_q]
    cols += [(c, True) for c in ("params", "device", "quality weights", "eval wall s", "reason", "point_id",
                                 "metrics.json")]
    has_wb = any(r.get("wandb_url") for r in runs)
    if has_wb:
        cols.append(("W&B run", False))
    rows, attrs = [], []
    for r in sorted(runs, key=lambda r: r["point_id"]):
        pid = r["point_id"]
        try:
            cfg = json.dumps(json.loads(r.get("config_json") or "{}"), indent=1, sort_keys=True)
        except ValueError:
            cfg = r.get("config_json") or ""
        status = r.get("status") or "ok"
        row = [(f"<b>{e(labels.get(pid, pid))}</b>", labels.get(pid, pid)), fam_cell(r.get("family")),
               (e(status) if status == "ok" else f"<span class='bad'>{e(status)}</span>", status),
               num_cell(r.get("ppl"))]
        if rcol:
            row.append(num_cell(r.get(rcol), None if not is_num(r.get(rcol)) else f"{float(r[rcol]):.2f}"))
        row += [num_cell(r.get("weight_bytes"), fmt_cost("weight_bytes", r.get("weight_bytes"))),
                num_cell(r.get("effective_bits"), None if not is_num(r.get("effective_bits"))
                         else f"{float(r['effective_bits']):.3g}"),
                num_cell(r.get("gap_closed_nats"), None if not is_num(r.get("gap_closed"))
                         else f"{float(r['gap_closed']):.0%} / " + (f"{float(r['gap_closed_nats']):.0%}"
                                                                    if is_num(r.get("gap_closed_nats")) else "-")),
                cell(f"<details><summary>config</summary><pre>{e(cfg)}</pre></details>", None, raw=True)]
        row += [cell(r.get(c)) for c in ("model", "quant", "attention", "finetune", "eval")]
        row += [cell(r.get(c)) for c in ovr] + [num_cell(r.get(q)) for q in extra_q]
        row += [num_cell(r.get("params"), None if r.get("params") is None else f"{r['params']:,}"),
                cell(r.get("device")), cell(r.get("quality_weights")), num_cell(r.get("wall_s")),
                cell(r.get("reason")), cell(pid), cell(r.get("metrics_path"))]
        if has_wb:
            url = r.get("wandb_url")
            row.append(cell(f"<a href='{e(url)}'>run</a>" if url else "-", None, raw=True))
        rows.append(row)
        attrs.append({"id": anchors.get(pid)})
    return render("runs-table", cols, rows, attrs,
                  caption="One row per grid point. A click on a point in a plot, or on a label in the answer, "
                          "brings you to its row; <i>config</i> opens the resolved configuration.")


def fronts_table(front: list[dict], labels: dict, anchors: dict) -> str:
    rows_in = [r for r in front if r["quality_metric"] == "ppl"]
    rows_in.sort(key=lambda r: (r["source"] != "measured", str(r["hardware"]), r["cost_metric"],
                                r["context_len"] or 0, not r.get("on_front", True), r["point_id"]))
    cols = [("where", False), ("cost", False), ("L", False), ("point", False), ("family", False),
            ("value", False), ("ppl", False), ("on front", False), ("why not", False)]
    rows, attrs = [], []
    for r in rows_in:
        m = r["cost_metric"]
        rows.append([cell(_where(r)), cell(METRIC_WORDS.get(m, m)),
                     num_cell(r["context_len"], None if r["context_len"] is None else f"{r['context_len']:,}"),
                     point_link(r["point_id"], labels, anchors), fam_cell(r.get("family")),
                     num_cell(r.get("cost"), fmt_cost(m, r.get("cost"))), num_cell(r.get("quality")),
                     cell("yes" if r.get("on_front", True) else "no"), cell(r.get("reason") or "")])
        attrs.append({"off": not r.get("on_front", True)})
    return render("fronts-table", cols, rows, attrs, off_label="show points off the front",
                  caption="Pareto-optimal points (perplexity against each cost) per cost metric and context "
                          "length L. Filter e.g. <code>measured 256</code>.")


def crossover_table(cross: list[dict], labels: dict, anchors: dict) -> str:
    rows_in = sorted(cross, key=lambda r: (r["level"] != "family", r["source"] != "measured", str(r["hardware"]),
                                           r["metric"], r["point_a"], r["point_b"]))
    cols = [("where", False), ("cost", False), ("a (cheaper from L*)", False), ("family a", False), ("b", False),
            ("family b", False), ("L*", False), ("ppl gap a/b", False), ("matched", False), ("level", True),
            ("L range", True), ("method", True)]
    rows, attrs = [], []
    for r in rows_in:
        ls = r["l_star"]
        lstar = ("never", None) if ls is None else (
            (f"{ls:,.0f} (all L)" if ls <= r["l_min"] else f"{ls:,.0f}"), float(ls))
        gap = r.get("quality_gap")
        rows.append([cell(_where(r)), cell(METRIC_WORDS.get(r["metric"], r["metric"])),
                     point_link(r["point_a"], labels, anchors), fam_cell(r.get("family_a")),
                     point_link(r["point_b"], labels, anchors), fam_cell(r.get("family_b")),
                     (e(lstar[0]), lstar[1]), num_cell(gap, None if not is_num(gap) else f"{gap:+.1%}"),
                     cell("yes" if r.get("matched") else "no"), cell(r["level"]),
                     cell(f"{r['l_min']:,.0f}–{r['l_max']:,.0f}"), cell(r.get("method"))])
        attrs.append({"off": r["level"] != "family"})
    return render("crossover-table", cols, rows, attrs, off_label="show point-level pairs",
                  caption="L*: from this context length on, a is strictly cheaper than b (within the L range "
                          "both were costed at). Family level: each family's lowest-perplexity point.")
