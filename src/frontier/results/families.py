"""Efficiency families: which kind of efficiency a grid point buys, and how the families are
ordered, paired and coloured wherever results are shown.

A family is derived from the point's resolved config (:func:`family_of`). Adding a family means:
its name in :data:`FAMILIES` (display order), its rule in :func:`family_of`, a colour in
:data:`FAMILY_COLORS`, and, if it answers the product's question, its pairs in
:data:`QUESTION_PAIRS`. Everything else (schema doc, fronts, crossovers, terminal, HTML, W&B)
reads these.
"""

from __future__ import annotations

from frontier import costmodel

# display order; also the order of family-level crossover pairs
FAMILIES = ("baseline", "quantization", "kv_quant", "attention", "combined")
# matplotlib colour names and the same colours as hex (Plotly, HTML)
FAMILY_COLORS = {"baseline": "black", "quantization": "tab:blue", "kv_quant": "tab:purple",
                 "attention": "tab:orange", "combined": "tab:green"}
FAMILY_HEX = {"baseline": "#222222", "quantization": "#1f77b4", "kv_quant": "#9467bd", "attention": "#ff7f0e",
              "combined": "#2ca02c"}
OTHER_COLOR, OTHER_HEX = "tab:gray", "#7f7f7f"
# a family pair (x, y) is read "x against y": x is the restructured / combined side. This order
# puts the side that changes the shape of the cost curve first.
CHALLENGER_ORDER = ("attention", "combined", "kv_quant", "quantization", "baseline")
# the pairs the product's question is about (the "answer" lines and paragraphs)
QUESTION_PAIRS = (("attention", "quantization"), ("attention", "kv_quant"), ("combined", "quantization"),
                  ("combined", "kv_quant"))
# one sentence per family, for readers
FAMILY_MEANING = {
    "baseline": "no quantization, softmax attention",
    "quantization": "quantized weights, softmax attention",
    "kv_quant": "quantized KV cache (quant.kv_bits < 16) of softmax attention, unquantized weights",
    "attention": "restructured attention (linear, sliding window, ...), unquantized weights",
    "combined": "two or more of: quantized weights, quantized KV cache, restructured attention",
}


def family_of(choices: dict, config: dict) -> str:
    """baseline | quantization | kv_quant | attention | combined, from the resolved config (else
    names): one family per non-default axis (weights quantized; KV cache quantized, which counts
    only while some layer keeps softmax attention and so a KV cache; attention restructured),
    ``combined`` when several are."""
    qcfg = (config or {}).get("quant") or {}
    acfg = (config or {}).get("attention") or {}
    if qcfg:
        quantized = costmodel._is_quantized(qcfg)
    else:
        quantized = (choices or {}).get("quant", "none") not in ("none", None)
    if acfg:
        kind = acfg.get("kind") or acfg.get("name") or "softmax"
    else:
        kind = (choices or {}).get("attention", "softmax")
    restructured = kind not in ("softmax", None)
    keeps_kv = not restructured or bool(acfg.get("keep_softmax"))  # a hybrid keeps softmax layers
    kv_quant = int(qcfg.get("kv_bits") or 16) < 16 and keeps_kv
    axes = [name for name, on in (("quantization", quantized), ("kv_quant", kv_quant),
                                  ("attention", restructured)) if on]
    if len(axes) > 1:
        return "combined"
    return axes[0] if axes else "baseline"


def fam_rank(f: str | None) -> int:
    """Sort key: the position in :data:`FAMILIES`, unknown families last."""
    return FAMILIES.index(f) if f in FAMILIES else len(FAMILIES)


def color(f: str | None) -> str:
    return FAMILY_COLORS.get(f or "", OTHER_COLOR)


def hex_color(f: str | None) -> str:
    return FAMILY_HEX.get(f or "", OTHER_HEX)


def challenger_pairs(fams) -> list[tuple[str, str]]:
    """Every (x, y) pair of ``fams``, x before y in :data:`CHALLENGER_ORDER` (unknown ones last,
    by name)."""
    order = CHALLENGER_ORDER
    fams = sorted(set(fams), key=lambda f: (order.index(f) if f in order else len(order), f))
    return [(x, y) for i, x in enumerate(fams) for y in fams[i + 1:]]
