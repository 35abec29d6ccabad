"""Words, units and labels shared by every presentation of the results (terminal, HTML, plots,
W&B): short point labels, costs with their units, metric names in words, plain-text tables."""

from __future__ import annotations

import math
import re
from typing import Any

from frontier.results.runs import point_parts

METRIC_WORDS = {"prefill_ms": "prefill latency", "prefill_s": "prefill latency",
                "decode_s": "decode latency", "decode_tok_s": "decode tokens/s",
                "state_bytes": "state memory", "peak_mem_bytes": "peak memory",
                "weight_bytes": "weight bytes"}
# crossover metrics, in the order the summaries show them: latency, then memory
XO_METRICS = {"measured": ("prefill_ms", "decode_s", "state_bytes", "peak_mem_bytes"),
              "modelled": ("prefill_s", "decode_s", "state_bytes", "peak_mem_bytes")}
LATENCY = {"prefill_ms", "prefill_s", "decode_s"}
# the cost-vs-L panels per source (report.html and the PNGs): (costs metric, crossover metric,
# axis title, transform of the value)
COST_PANELS = {
    "measured": [("prefill_ms", "prefill_ms", "prefill latency (ms)", None),
                 ("decode_tok_s", "decode_s", "decode latency (ms / token)", lambda v: 1000.0 / v if v > 0 else None),
                 ("state_bytes", "state_bytes", "KV cache / state (bytes)", None),
                 ("peak_mem_bytes", "peak_mem_bytes", "peak memory (bytes)", None)],
    "modelled": [("prefill_s", "prefill_s", "prefill latency (s)", None),
                 ("decode_s", "decode_s", "decode latency (s / token)", None),
                 ("state_bytes", "state_bytes", "KV cache / state (bytes)", None),
                 ("peak_mem_bytes", "peak_mem_bytes", "weights + state (bytes)", None)],
}
# the frontier panels after weight bytes, per source: (costs metric, axis words); report.html and
# the W&B report title them "<axis> at L = <L>"
FRONT_AXES = {
    "measured": [("state_bytes", "KV cache / state"), ("prefill_ms", "prefill latency (ms)"),
                 ("decode_tok_s", "decode tokens/s (higher is better)"), ("peak_mem_bytes", "peak memory")],
    "modelled": [("state_bytes", "KV cache / state"), ("prefill_s", "prefill latency (s)"),
                 ("decode_tok_s", "decode tokens/s (higher is better)"), ("peak_mem_bytes", "weights + state")],
}
WEIGHT_PANEL_TITLE = "weight bytes (stored)"
SECTIONS = {"answer": "Answer", "frontiers": "Pareto frontiers", "cost": "Cost against context length",
            "recall": "Long-context recall", "tables": "Tables"}


def front_panel_title(axis: str, L: int) -> str:
    return f"{axis} at L = {L:,}"
# accuracy columns indexed by L: recall_acc@L, passkey_acc@L, ...
RECALL = re.compile(r"^(?P<base>.*acc.*)@(?P<L>\d+)$")


def recall_sort_key(col: str) -> tuple[str, int]:
    m = RECALL.match(col)
    return (m["base"], int(m["L"]))


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


def is_num(v: Any) -> bool:
    """A finite number (not None, NaN or inf)."""
    return v is not None and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))


def human_bytes(v: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" or abs(v) >= 100 else f"{v:.3g} {unit}"
        v /= 1024.0
    return f"{v:.3g} TiB"  # pragma: no cover


def fmt_cost(metric: str, v: Any) -> str:
    """A cost value with its unit (see :data:`frontier.results.schema.COST_METRICS`)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if metric.endswith("bytes"):
        return human_bytes(v)
    if metric.endswith("_ms"):
        return f"{v:.3g} ms"
    if metric.endswith("tok_s"):
        return f"{v:.4g} tok/s"
    if metric.endswith("_s"):
        return f"{v:.3g} s"
    return f"{v:.4g}"


def fmt_q(v: Any) -> str:
    """A quality value: 5 significant digits, "-" when missing."""
    return "-" if not is_num(v) else f"{float(v):.5g}"


def fmt(v: Any) -> str:
    """A table cell: "-" for missing, floats to 4 significant digits (3 in e-notation)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A left-aligned plain-text table with a dashed rule under the headers."""
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
