"""The results schema: the four Parquet tables of ``results/<sweep>/``, their columns, types,
meanings and file metadata; the direction of each metric; value conversion to column types.

``runs.parquet`` has fixed columns (``_STR_BASE`` ... ``_STR_TAIL``) plus data-dependent ones
(quality ``<metric>[@<L>]``, ``ovr.*``, ``cfg.*``, ``attn.*``); the other three have fixed Arrow
schemas. :data:`SCHEMAS` documents every column and is rendered into docs/results-schema.md by
:func:`write_schema_doc` (a test keeps the doc, the dict and the written files in agreement).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from frontier.results.families import FAMILIES

# 2: frontier.parquet keeps every considered point (``on_front`` + ``reason``); modelled
#    ``peak_mem_bytes``; peak memory in crossovers. Documented in docs/results-schema.md.
SCHEMA_VERSION = "3"
CHOICE_GROUPS = ("model", "quant", "attention", "finetune", "eval")

_STR_BASE = ["sweep", "point_id", *CHOICE_GROUPS, "family", "status", "reason", "device", "quality_weights", "wandb_url",
             "metrics_path"]
_INT_BASE = ["weight_bytes", "params"]
_FLOAT_BASE = ["effective_bits", "wall_s", "gap_closed", "gap_closed_nats"]
_STR_TAIL = ["versions", "config_json"]
_KNOWN_RUN_COLS = set(_STR_BASE) | set(_INT_BASE) | set(_FLOAT_BASE) | set(_STR_TAIL)

COSTS_SCHEMA = pa.schema([
    ("point_id", pa.string()), ("context_len", pa.int64()), ("metric", pa.string()),
    ("value", pa.float64()), ("source", pa.string()), ("hardware", pa.string()),
])
FRONTIER_SCHEMA = pa.schema([
    ("cost_metric", pa.string()), ("context_len", pa.int64()), ("quality_metric", pa.string()),
    ("point_id", pa.string()), ("cost", pa.float64()), ("quality", pa.float64()),
    ("source", pa.string()), ("hardware", pa.string()), ("family", pa.string()),
    ("on_front", pa.bool_()), ("reason", pa.string()),
])
CROSSOVER_SCHEMA = pa.schema([
    ("level", pa.string()), ("metric", pa.string()), ("point_a", pa.string()),
    ("point_b", pa.string()), ("family_a", pa.string()), ("family_b", pa.string()),
    ("l_star", pa.float64()), ("quality_gap", pa.float64()), ("matched", pa.bool_()),
    ("l_min", pa.float64()), ("l_max", pa.float64()), ("method", pa.string()),
    ("source", pa.string()), ("hardware", pa.string()), ("kv_bits", pa.int64()),
])

# a quality metric indexed by context length: recall_acc@512, passkey_acc@1024, ...
INDEXED_Q = re.compile(r"^(?P<base>.+)@(?P<L>\d+)$")

# ---- the documented schema -------------------------------------------------------------------
# docs/results-schema.md embeds schema_markdown() (tests/test_report.py checks the doc, this dict
# and the files actually written agree). Per table: (column, Arrow type, meaning). A name with
# "<...>" is a pattern for data-dependent columns (runs only).
FILE_METADATA = {
    "sweep": "sweep name",
    "schema_version": "schema version of the writer (`frontier.results.schema.SCHEMA_VERSION`)",
    "versions": "JSON object {package: version} of the collecting environment",
    "git_commit": "commit of the frontier code that collected (env `FRONTIER_GIT_COMMIT`, else `git rev-parse HEAD`, else `unknown`)",
}
TABLE_METADATA = {"runs": {"quality_columns": "JSON list of the quality columns of this file, in display order"}}
SCHEMAS: dict[str, list[tuple[str, str, str]]] = {
    "runs": [
        ("sweep", "string", "sweep name"),
        ("point_id", "string", "`<model>/<quant>/<attention>/<finetune>/<eval>`: each segment the group's "
                               "choice, followed by `~key=value,...` when value overrides of that group "
                               "apply; primary key"),
        ("model", "string", "choice in config group `model`"),
        ("quant", "string", "choice in config group `quant`"),
        ("attention", "string", "choice in config group `attention`"),
        ("finetune", "string", "choice in config group `finetune`"),
        ("eval", "string", "choice in config group `eval`"),
        ("family", "string", "efficiency family: " + " | ".join(f"`{f}`" for f in FAMILIES)),
        ("status", "string", "`ok` | `failed`"),
        ("reason", "string", "why the point failed (`<ExceptionType>: message`); null when ok"),
        ("device", "string", "device the point was evaluated on (the `hardware` of its measured costs)"),
        ("quality_weights", "string", "what the quality metrics ran on for a quantized model: `kernel` (the "
                                      "quantized layers, the same ones the cost ladder times) | `dequantized` (cached "
                                      "dense copies; only in results written before issue 15); null when unquantized"),
        ("metrics_path", "string", "the `metrics.json` the row was read from"),
        ("weight_bytes", "int64", "bytes of all parameters and buffers as stored (quantized tensors at "
                                  "their storage size)"),
        ("params", "int64", "logical parameter count (quantized weights by their logical shape, tied ones once)"),
        ("effective_bits", "double", "stored bits per logical weight of the decoder's Linear layers, scales "
                                     "and zero points included (embeddings and lm_head excluded)"),
        ("wall_s", "double", "evaluation wall time, seconds"),
        ("wandb_url", "string", "the point's W&B evaluate run: its URL, or `file://<run dir>` for an offline "
                                "run (upload it with `wandb sync <dir>`); null without tracking"),
        ("gap_closed", "double", "fine-tuned points: (ppl_untuned - ppl) / (ppl_untuned - ppl_softmax), the "
                                 "fraction of the perplexity gap to softmax the fine-tuning closed (1 = softmax "
                                 "quality, 0 = no better than untuned); null otherwise or when the gap is ~0. "
                                 "References match on the perplexity protocol (eval.ppl and the KV cache), "
                                 "not the eval option's name"),
        ("gap_closed_nats", "double", "the same fraction of the gap in log-perplexity (loss in nats): "
                                      "(ln ppl_untuned - ln ppl) / (ln ppl_untuned - ln ppl_softmax); smaller "
                                      "than gap_closed when the untuned point is far off"),
        ("ppl", "double", "held-out perplexity (lower is better); null for a failed point"),
        ("<metric>@<L>", "double", "quality at context length L: `recall_acc@L`, `passkey_acc@L` "
                                   "(exact-match accuracy in [0, 1], higher is better)"),
        ("<quality>", "double", "any other quality metric a point reports (lower is better when the "
                                "name contains ppl/perplexity/loss/nll/bpb, else higher)"),
        ("ovr.<key>", "string", "a value override applied to the point, e.g. `ovr.attention.window`; "
                                "null where it does not apply"),
        ("cfg.<group>.<key>", "string", "the resolved config, flattened: scalars as strings, lists as JSON"),
        ("attn.<key>", "string", "swapped-attention layers, JSON: `attn.keep_softmax` (layers kept softmax; "
                                 "`[]` when every layer was swapped) and, for keep_softmax=auto, one list per "
                                 "layer of `attn.entropy` (normalised attention entropy), `attn.sink_mass`, "
                                 "`attn.massive` (max/median |hidden|), `attn.score` (need for softmax); absent "
                                 "or null for unswapped points"),
        ("versions", "string", "JSON object {package: version} of the evaluate job"),
        ("config_json", "string", "the full resolved config as JSON (modelled costs are recomputed "
                                  "from it when a later collect merges)"),
    ],
    "costs": [
        ("point_id", "string", "the point (`runs.point_id`)"),
        ("context_len", "int64", "context length L, tokens"),
        ("metric", "string", "cost metric (see *Cost metrics*)"),
        ("value", "double", "the cost, in the metric's unit; null when not measurable"),
        ("source", "string", "`measured` (the evaluate stage) | `modelled` (roofline, `frontier.costmodel`)"),
        ("hardware", "string", "measured: the device; modelled: the hardware config name"),
    ],
    "frontier": [
        ("cost_metric", "string", "cost axis (see *Cost metrics*); `weight_bytes` is the runs column"),
        ("context_len", "int64", "L of the cost (and of an `@L` quality); null for `weight_bytes`"),
        ("quality_metric", "string", "quality axis: `ppl`, or `<metric>@<L>` at the same L as the cost"),
        ("point_id", "string", "the point"),
        ("cost", "double", "its cost; null when missing or failed"),
        ("quality", "double", "its quality; null when missing or failed"),
        ("source", "string", "`measured` | `modelled`"),
        ("hardware", "string", "as in costs; null for `weight_bytes`"),
        ("family", "string", "efficiency family of the point"),
        ("on_front", "bool", "true for a Pareto-optimal point of this (cost_metric, context_len, "
                             "quality_metric, source, hardware) group"),
        ("reason", "string", "why a point is not on the front: `dominated by <point_id>`, "
                             "`failed: <reason>`, `missing <cost|quality>`; null on the front"),
    ],
    "crossover": [
        ("level", "string", "`family` (the lowest-perplexity point of each family) | `point` "
                            "(every pair of points within the quality tolerance) | `kv_bits` (the "
                            "lowest-perplexity linear, hybrid and sparse attention points with unquantized "
                            "weights against the lowest-perplexity `kv_quant` point of each KV bit width, "
                            "matched or not)"),
        ("metric", "string", "lower-is-better cost compared: measured `prefill_ms`, `decode_s` "
                             "(1 / decode_tok_s), `state_bytes`, `peak_mem_bytes`; modelled `prefill_s`, "
                             "`decode_s`, `state_bytes`, `peak_mem_bytes`"),
        ("point_a", "string", "the point that is not cheaper at `l_min` (the challenger)"),
        ("point_b", "string", "the other point"),
        ("family_a", "string", "family of point_a"),
        ("family_b", "string", "family of point_b"),
        ("l_star", "double", "smallest L in [l_min, l_max] from which a is strictly cheaper than b; "
                             "null: a never overtakes b in that range"),
        ("quality_gap", "double", "ppl_a / ppl_b - 1"),
        ("matched", "bool", "the two perplexities are within the quality tolerance (default 10 %)"),
        ("l_min", "double", "smallest L both points have"),
        ("l_max", "double", "largest L both points have"),
        ("method", "string", "`quadratic_fit` (measured: least-squares a + bL + cL² per point) | "
                             "`sampled` (modelled: piecewise linear between the modelled L)"),
        ("source", "string", "`measured` | `modelled`"),
        ("hardware", "string", "as in costs"),
        ("kv_bits", "int64", "level `kv_bits`: the KV-cache bits of the `kv_quant` point; null otherwise"),
    ],
}
# metric -> (sources, unit, meaning)
COST_METRICS: dict[str, tuple[str, str, str]] = {
    "prefill_ms": ("measured", "ms", "one forward over an L-token prompt (median of repeats)"),
    "decode_tok_s": ("measured, modelled", "tokens/s", "greedy decode throughput continuing from an L-token "
                     "prefill (higher is better); modelled: 1 / decode_s"),
    "peak_mem_bytes": ("measured, modelled", "bytes", "peak memory of a prefill at L: weights + activations + "
                       "cache (see `frontier.evaluate.measure`); modelled: weights + KV cache/state only, a "
                       "lower bound"),
    "state_bytes": ("measured, modelled", "bytes", "KV cache (softmax, window) or recurrent state (linear) "
                    "right after the prefill at L"),
    "prefill_s": ("modelled", "s", "roofline time of the prefill"),
    "decode_s": ("modelled", "s", "roofline time of one decode step at context L"),
    "weight_bytes": ("modelled", "bytes", "weight bytes the cost model predicts (the measured value is "
                     "`runs.weight_bytes`)"),
}


def schema_markdown() -> str:
    """The generated part of docs/results-schema.md (tables, columns, metadata keys)."""
    def row(*cells: str) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"Schema version: **{SCHEMA_VERSION}**", ""]
    for name, cols in SCHEMAS.items():
        out += [f"### `{name}.parquet`", "", row("column", "type", "meaning"), row("---", "---", "---")]
        out += [row(f"`{c}`", t, m) for c, t, m in cols]
        out.append("")
    out += ["### Cost metrics", "", row("metric", "source", "unit", "meaning"), row("---", "---", "---", "---")]
    out += [row(f"`{k}`", s, u, m) for k, (s, u, m) in COST_METRICS.items()]
    out += ["", "### File metadata (Parquet schema key/value metadata)", "",
            row("key", "files", "meaning"), row("---", "---", "---")]
    out += [row(f"`{k}`", "all four", m) for k, m in FILE_METADATA.items()]
    for table, keys in TABLE_METADATA.items():
        out += [row(f"`{k}`", f"{table}.parquet", m) for k, m in keys.items()]
    return "\n".join(out) + "\n"


SCHEMA_DOC = Path(__file__).resolve().parents[3] / "docs" / "results-schema.md"
SCHEMA_DOC_MARKERS = ("<!-- BEGIN GENERATED: frontier.results.schema.schema_markdown() -->",
                      "<!-- END GENERATED -->")


def write_schema_doc(path: str | Path = SCHEMA_DOC) -> Path:
    """Replace the generated section of docs/results-schema.md with :func:`schema_markdown`."""
    path = Path(path)
    begin, end = SCHEMA_DOC_MARKERS
    text = path.read_text() if path.exists() else f"# Results schema\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{schema_markdown()}{end}{tail}")
    return path


# ---- metric directions and value conversion ---------------------------------------------------


def quality_lower_is_better(name: str) -> bool:
    """ppl / loss-like metrics are lower-is-better; accuracies are higher-is-better."""
    n = name.lower()
    return any(t in n for t in ("ppl", "perplexity", "loss", "nll", "bpb", "bits_per"))


def cost_lower_is_better(metric: str) -> bool:
    """Costs are lower-is-better except throughputs (``*tok_s``)."""
    m = metric.lower()
    return not (m.endswith("tok_s") or "throughput" in m)


def to_float(v: Any) -> float | None:
    """A float column value: None for missing, NaN or unparsable."""
    if v is None or isinstance(v, bool):
        return None if v is None else float(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def to_int(v: Any) -> int | None:
    f = to_float(v)
    return None if f is None or math.isinf(f) else int(round(f))


def to_str(v: Any) -> str | None:
    """A string column value: strings as they are, anything else as JSON."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, default=str)
