"""Roofline cost model: FLOPs and bytes per phase from the architecture, bit widths and L.

Pure-python arithmetic (no torch at import time), so the planner can call :func:`estimate`
thousands of times to size a sweep. :func:`measure_cpu` imports torch lazily.

Accounting (per batch row unless stated; ``batch`` multiplies every token-wise term, never the
weights):

* Linear layers: ``2·in·out`` FLOPs per token — q, k, v, o, the MLP (gate/up/down for the
  gated MLP of Llama/Qwen2/Mistral; up/down when ``model_cfg["gated_mlp"]`` is false) and
  lm_head. Prefill computes logits of the last position only (``prefill_logits="last"``, what
  generate() / an inference server does, and what evaluate's prefill_ms measures); pass
  ``prefill_logits="all"`` for the training-style forward (logits for all L tokens).
* Weight bytes: ``in·out·bits/8`` per quantized linear, plus overhead: group-wise
  (``group_size`` set) one scale and one zero point per group of ``group_size`` inputs, each
  in the model dtype (bf16: effective bits = bits + 32/group_size); per-channel
  (``group_size`` null) one scale per output row. Unquantized linears, embeddings and lm_head
  stay in the model dtype: ``model_cfg["dtype"]`` (bfloat16/float16 → 16 bit, the default;
  float32 → 32 bit, e.g. the embedded tiny model). Norms and biases are neglected.
  ``weight_bytes`` is everything stored (embedding table + linears + untied lm_head).
* Bytes streamed per forward: all linear weights (incl. lm_head, which is the embedding table
  when tied) + the gathered embedding rows (``tokens·hidden·2``) — an untied embedding table is
  gathered, not streamed. Decode adds the KV cache / recurrent state read; prefill adds the
  KV cache / state written. Activations are neglected.
* Softmax attention, per layer: scores and values ``2·Leff·head_dim·heads`` FLOPs each per
  token; a decode token at context L sees ``Leff = L`` positions; prefill sums over positions,
  ``Σ_{i=1..L} eff(i)`` (causal). KV bytes ``2·kv_heads·head_dim·Leff·kv_bits/8``.
* Sliding window W (+ ``sinks``): ``eff(i) = min(i, W + sinks)`` for FLOPs and KV bytes.
* Linear attention with feature dim F (``feature_dim`` null → head_dim) and Dv = head_dim, per
  layer per token: state update ``2·kv_heads·F·Dv``, readout ``2·heads·F·Dv``, normaliser
  ``2·kv_heads·F + 2·heads·F``, and when F != head_dim a feature projection
  ``2·head_dim·F·(heads + kv_heads)``. State bytes ``kv_heads·(F·Dv + F)·4`` (fp32),
  independent of L. Prefill = L × the per-token cost (recurrent accounting). A learned
  feature map (``learned_map: true``) is counted as that projection too.
* KV bits default to the model dtype's bits (``kv_bits=None``; otherwise ``quant_cfg["kv_bits"]``
  when it is below 16). A quantized cache is kept by the softmax layers only (the swapped layers
  keep their own state in the model dtype), per layer and KV head (:func:`kv_layer_bytes`):
  ``kv_bits=8`` int8 codes + one fp32 scale per token for keys and for values; ``kv_bits`` 4/2
  KIVI with ``kv_group`` G and ``kv_residual`` R (``quant_cfg``, default 32 / 128): keys
  ``nk = B·floor(L/B)`` tokens packed (B = R, or G when R = 0) + an fp16 scale and zero per
  channel per G tokens, ``L - nk`` keys in the model dtype; values ``nv = max(L - R, 0)`` packed
  (``ceil(nv·bits/8)`` bytes per channel: rows of 8/bits tokens, the last one possibly part-filled)
  + an fp16 scale and zero per token per G channels, ``min(L, R)`` in the model dtype.
* Feature dims per map: elu/relu F = head_dim; hedgehog 2·feature_dim (null → head_dim);
  taylor ``1 + d' + d'(d'+1)/2`` with d' = feature_dim (16); performer feature_dim (64);
  cosformer 2·head_dim.
* ``linear_sliding`` (LoLCATs: linear + window in one layer) pays both.
* Block-sparse (block b, local l, global g): a query sees at most ``(l + g)·b`` keys, so
  ``eff(i) = min(i, (l + g)·b)`` (an upper bound within a block); the cache holds as many.
* Top-k (k keys per query): exact top-k still scores every causal key (``2·L·head_dim·heads``
  per token for the scores) but reads only k values (``2·min(L, k)·head_dim·heads``); the
  cache holds all L keys and values (no memory saving).
* Hybrids: layers listed in ``attention_cfg["keep_softmax"]`` stay softmax; with
  ``keep_softmax: auto`` the layers are chosen at surgery time, so the model counts
  ``n_softmax`` softmax layers (the first ones; only the count matters for cost).
* seconds = max(flops / peak_flops, bytes / mem_bw) per phase (roofline).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

# Named accelerators (dense bf16 peak FLOP/s, HBM bytes/s, memory bytes). conf/hardware/*.yaml
# carries the same numbers; these let the planner and tests work without Hydra.
PRESETS: dict[str, dict[str, Any]] = {
    "h100": {"name": "h100", "peak_flops": 9.89e14, "mem_bw": 3.35e12, "mem_bytes": 8.0e10},
    "a100_80g": {"name": "a100_80g", "peak_flops": 3.12e14, "mem_bw": 2.039e12, "mem_bytes": 8.0e10},
    "h200": {"name": "h200", "peak_flops": 9.89e14, "mem_bw": 4.8e12, "mem_bytes": 1.41e11},
}

ATTENTION_KINDS = ("softmax", "sliding_window", "block_sparse", "topk", "linear", "linear_sliding")
_KIND_ALIASES = {
    "softmax": "softmax",
    "full": "softmax",
    "sdpa": "softmax",
    "sliding_window": "sliding_window",
    "sliding": "sliding_window",
    "swa": "sliding_window",
    "sinks_window": "sliding_window",
    "sink_window": "sliding_window",
    "block_sparse": "block_sparse",
    "topk": "topk",
    "linear": "linear",
    "linear_elu": "linear",
    "linear_sliding": "linear_sliding",
    "lolcats": "linear_sliding",
}


# --------------------------------------------------------------------------------------------
# architecture helpers


def _dims(model_cfg: dict) -> dict[str, Any]:
    hidden = int(model_cfg["hidden"])
    heads = int(model_cfg["heads"])
    head_dim = int(model_cfg.get("head_dim") or hidden // heads)
    kv_heads = int(model_cfg.get("kv_heads") or heads)
    return {
        "layers": int(model_cfg["layers"]),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate": int(model_cfg["intermediate"]),
        "vocab": int(model_cfg["vocab"]),
        "tie": bool(model_cfg.get("tie_embeddings", False)),
        "gated": bool(model_cfg.get("gated_mlp", True)),
        "bits": dtype_bits(model_cfg),
    }


_DTYPE_BITS = {"float32": 32, "fp32": 32, "float": 32, "bfloat16": 16, "bf16": 16, "float16": 16,
               "fp16": 16, "half": 16}


def dtype_bits(model_cfg: dict | None) -> int:
    """Bits of the model's (unquantized) dtype; 16 when unspecified."""
    dt = str((model_cfg or {}).get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPE_BITS.get(dt, 16)


def linear_shapes(model_cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of every linear in one decoder layer (q, k, v, o, MLP)."""
    d = _dims(model_cfg)
    h, hd, inter = d["hidden"], d["head_dim"], d["intermediate"]
    shapes = [
        (h, d["heads"] * hd),  # q
        (h, d["kv_heads"] * hd),  # k
        (h, d["kv_heads"] * hd),  # v
        (d["heads"] * hd, h),  # o
    ]
    if d["gated"]:
        shapes += [(h, inter), (h, inter), (inter, h)]  # gate, up, down
    else:
        shapes += [(h, inter), (inter, h)]
    return shapes


def param_count(model_cfg: dict) -> int:
    """Parameters of linears + embeddings (+ untied lm_head); norms/biases neglected."""
    d = _dims(model_cfg)
    per_layer = sum(i * o for i, o in linear_shapes(model_cfg))
    emb = d["vocab"] * d["hidden"]
    return d["layers"] * per_layer + emb + (0 if d["tie"] else emb)


def _is_quantized(quant_cfg: dict | None) -> bool:
    if not quant_cfg:
        return False
    method = quant_cfg.get("method")
    bits = quant_cfg.get("bits")
    if method in (None, "none"):
        return False
    return bits is None or int(bits) < 16


def effective_bits(quant_cfg: dict | None, model_cfg: dict | None = None) -> float:
    """Bits per linear weight including group scale/zero overhead (per-channel: ~bits)."""
    base = dtype_bits(model_cfg)
    if not _is_quantized(quant_cfg):
        return float(base)
    bits = float(quant_cfg.get("bits") or 8)
    gs = quant_cfg.get("group_size")
    return bits + 2.0 * base / float(gs) if gs else bits


def linear_weight_bytes(in_f: int, out_f: int, quant_cfg: dict | None, base_bits: int = 16) -> float:
    """Bytes of one linear's weight under ``quant_cfg`` (scales/zeros in ``base_bits``)."""
    sb = base_bits / 8.0
    if not _is_quantized(quant_cfg):
        return in_f * out_f * sb
    bits = float(quant_cfg.get("bits") or 8)
    gs = quant_cfg.get("group_size")
    data = in_f * out_f * bits / 8.0
    if gs:
        groups = math.ceil(in_f / int(gs)) * out_f
        return data + groups * 2.0 * sb  # one scale + one zero point per group
    return data + out_f * sb  # per-channel: one scale per output row


def weight_bytes(model_cfg: dict, quant_cfg: dict | None) -> dict[str, float]:
    """Stored and streamed weight bytes: {"total", "linears", "embedding", "lm_head"}.

    ``lm_head`` is 0 when tied (the embedding table serves as lm_head).
    """
    d = _dims(model_cfg)
    lin = d["layers"] * sum(linear_weight_bytes(i, o, quant_cfg, d["bits"]) for i, o in linear_shapes(model_cfg))
    emb = d["vocab"] * d["hidden"] * d["bits"] / 8.0
    head = 0.0 if d["tie"] else emb
    return {"total": lin + emb + head, "linears": lin, "embedding": emb, "lm_head": head}


# --------------------------------------------------------------------------------------------
# attention


def _attn_kind(attention_cfg: dict | None) -> str:
    if not attention_cfg:
        return "softmax"
    raw = attention_cfg.get("kind") or attention_cfg.get("name") or "softmax"
    kind = _KIND_ALIASES.get(str(raw))
    if kind is None:
        raise ValueError(
            f"costmodel: unknown attention kind {raw!r}; known: {sorted(set(_KIND_ALIASES))}"
        )
    return kind


def _window(attention_cfg: dict) -> int:
    if attention_cfg.get("kind") == "block_sparse":
        return int(attention_cfg["block_size"]) * (int(attention_cfg.get("local_blocks", 1))
                                                   + int(attention_cfg.get("global_blocks", 0)))
    w = attention_cfg.get("window")
    if w is None:
        raise ValueError("costmodel: sliding-window attention needs attention.window")
    return int(w) + int(attention_cfg.get("sinks") or 0)


def _causal_sum(L: int, window: int | None) -> int:
    """Σ_{i=1..L} min(i, window) (window None → Σ i)."""
    if window is None or L <= window:
        return L * (L + 1) // 2
    return window * (window + 1) // 2 + (L - window) * window


def feature_dim(attention_cfg: dict, head_dim: int) -> int:
    """Features per head of a linear attention's feature map (see the module docstring)."""
    fm = attention_cfg.get("feature_map") or ("hedgehog" if attention_cfg.get("kind") == "lolcats" else "elu")
    fd = attention_cfg.get("feature_dim")
    if fm == "hedgehog":
        return 2 * int(fd or head_dim)
    if fm == "taylor":
        d = int(fd or 16)
        return 1 + d + d * (d + 1) // 2
    if fm == "performer":
        return int(fd or 64)
    if fm == "cosformer":
        return 2 * head_dim
    return int(fd or head_dim)


def layer_kinds(model_cfg: dict, attention_cfg: dict | None) -> list[str]:
    """The attention kind of every layer (hybrids keep ``keep_softmax`` layers softmax)."""
    n = _dims(model_cfg)["layers"]
    kind = _attn_kind(attention_cfg)
    keep_cfg = (attention_cfg or {}).get("keep_softmax") or []
    if keep_cfg == "auto":
        from .config import softmax_layer_count

        keep_cfg = range(min(softmax_layer_count(attention_cfg or {}, n), n))
    keep = {int(i) % n for i in keep_cfg}
    return ["softmax" if i in keep else kind for i in range(n)]


KIVI_SCALE_BYTES = 2  # fp16 scale and fp16 zero point per group (frontier.kivi.SCALE_DTYPE)


def kv_spec(quant_cfg: dict | None, kv_bits: int | None, model_cfg: dict | None) -> dict:
    """{"bits", "group", "residual", "dtype_bits"} of the KV cache: ``kv_bits`` when given, else
    ``quant_cfg["kv_bits"]`` below 16, else the model dtype's bits."""
    q = quant_cfg or {}
    dt = dtype_bits(model_cfg)
    if kv_bits is None:
        qb = int(q.get("kv_bits") or 16)
        kv_bits = qb if qb < 16 else dt
    return {"bits": int(kv_bits), "group": int(q.get("kv_group") or 32),
            "residual": 128 if q.get("kv_residual") is None else int(q["kv_residual"]), "dtype_bits": dt}


def kv_layer_bytes(L: int, kv_heads: int, head_dim: int, kv: dict) -> float:
    """Bytes of one softmax layer's KV cache holding ``L`` tokens (one batch row); see the module
    docstring. ``kv`` from :func:`kv_spec`."""
    bits, n = kv["bits"], kv_heads * head_dim
    if bits == 8:
        return 2.0 * kv_heads * L * (head_dim + 4)
    if bits in (4, 2):
        g, r, db = kv["group"], kv["residual"], kv["dtype_bits"] / 8.0
        block = r or g
        nk, nv = (L // block) * block, max(L - r, 0)
        keys = nk * n * bits / 8.0 + (nk // g) * n * 2 * KIVI_SCALE_BYTES + (L - nk) * n * db
        values = -(-nv * bits // 8) * n + nv * (n // g) * 2 * KIVI_SCALE_BYTES + (L - nv) * n * db
        return keys + values
    return 2.0 * n * L * bits / 8.0


def _layer_attention(kind: str, d: dict, attention_cfg: dict | None, L: int, kv: dict) -> dict:
    """Per-layer, per-batch-row attention cost: decode/prefill FLOPs and state bytes at L."""
    heads, kvh, hd = d["heads"], d["kv_heads"], d["head_dim"]
    own = {**kv, "bits": kv["dtype_bits"]}  # swapped layers keep their own state in the model dtype
    dec = pre = state = 0.0
    if kind in ("softmax", "sliding_window", "block_sparse", "linear_sliding"):
        window = None if kind == "softmax" else _window(attention_cfg or {})
        leff = L if window is None else min(L, window)
        dec += 4.0 * heads * hd * leff  # scores + values
        pre += 4.0 * heads * hd * _causal_sum(L, window)
        state += kv_layer_bytes(leff, kvh, hd, kv if kind == "softmax" else own)
    if kind == "topk":
        k = int((attention_cfg or {}).get("k", 32))
        dec += 2.0 * heads * hd * (L + min(L, k))  # every score, k values
        pre += 2.0 * heads * hd * (_causal_sum(L, None) + _causal_sum(L, k))
        state += kv_layer_bytes(L, kvh, hd, own)
    if kind in ("linear", "linear_sliding"):
        f = feature_dim(attention_cfg or {}, hd)
        dv = hd
        per_tok = 2.0 * kvh * f * dv + 2.0 * heads * f * dv + 2.0 * kvh * f + 2.0 * heads * f
        if f != hd or (attention_cfg or {}).get("learned_map"):
            per_tok += 2.0 * hd * f * (heads + kvh)  # feature projection of q and k
        dec += per_tok
        pre += per_tok * L
        state += kvh * (f * dv + f) * 4.0
    return {"decode_flops": dec, "prefill_flops": pre, "state_bytes": state}


def state_bytes(model_cfg: dict, attention_cfg: dict | None, context_len: int, batch: int = 1,
                kv_bits: int | None = None, quant_cfg: dict | None = None) -> float:
    """KV-cache / recurrent-state bytes held at context ``context_len``."""
    d = _dims(model_cfg)
    kv = kv_spec(quant_cfg, kv_bits, model_cfg)
    return batch * sum(
        _layer_attention(k, d, attention_cfg, int(context_len), kv)["state_bytes"]
        for k in layer_kinds(model_cfg, attention_cfg)
    )


# --------------------------------------------------------------------------------------------
# the estimate


def _roofline(flops: float, nbytes: float, hw: dict) -> float:
    return max(flops / float(hw["peak_flops"]), nbytes / float(hw["mem_bw"]))


def estimate(model_cfg: dict, quant_cfg: dict | None, attention_cfg: dict | None,
             hardware_cfg: dict, context_len: int, batch: int = 1, kv_bits: int | None = None,
             prefill_logits: str = "last") -> dict:
    """Modelled prefill (L tokens) and decode (one token at context L) cost.

    Returns ``{"prefill": {"flops", "bytes", "seconds"}, "decode": {...}, "weight_bytes",
    "state_bytes", "params"}``. See the module docstring for the accounting.
    """
    L = int(context_len)
    if L < 1:
        raise ValueError(f"costmodel: context_len must be >= 1, got {context_len}")
    hw = resolve_hardware(hardware_cfg)
    d = _dims(model_cfg)
    kv = kv_spec(quant_cfg, kv_bits, model_cfg)
    wb = weight_bytes(model_cfg, quant_cfg)

    if prefill_logits not in ("last", "all"):
        raise ValueError(f"costmodel: prefill_logits must be 'last' or 'all', got {prefill_logits!r}")
    # per-token linear FLOPs: decoder linears (+ lm_head)
    body_flops = d["layers"] * sum(2.0 * i * o for i, o in linear_shapes(model_cfg))
    head_flops = 2.0 * d["hidden"] * d["vocab"]
    lin_flops = body_flops + head_flops

    att_dec = att_pre = st = 0.0
    for kind in layer_kinds(model_cfg, attention_cfg):
        a = _layer_attention(kind, d, attention_cfg, L, kv)
        att_dec += a["decode_flops"]
        att_pre += a["prefill_flops"]
        st += a["state_bytes"]
    st *= batch

    streamed = wb["linears"] + (wb["lm_head"] if not d["tie"] else wb["embedding"])
    emb_row = d["hidden"] * d["bits"] / 8.0

    logit_positions = L if prefill_logits == "all" else 1
    pre_flops = batch * (L * body_flops + logit_positions * head_flops + att_pre)
    pre_bytes = streamed + batch * L * emb_row + st
    dec_flops = batch * (lin_flops + att_dec)
    dec_bytes = streamed + batch * emb_row + st
    return {
        "prefill": {"flops": pre_flops, "bytes": pre_bytes, "seconds": _roofline(pre_flops, pre_bytes, hw)},
        "decode": {"flops": dec_flops, "bytes": dec_bytes, "seconds": _roofline(dec_flops, dec_bytes, hw)},
        "weight_bytes": wb["total"],
        "state_bytes": st,
        "params": param_count(model_cfg),
    }


def eval_seconds(model_cfg: dict, quant_cfg: dict | None, attention_cfg: dict | None,
                 hardware_cfg: dict, context_lens: list[int], decode_tokens: int = 32,
                 batch: int = 1, repeats: int = 1, kv_bits: int | None = None) -> float:
    """Roofline seconds for an eval ladder: per L one prefill + ``decode_tokens`` decode steps."""
    total = 0.0
    for L in context_lens:
        e = estimate(model_cfg, quant_cfg, attention_cfg, hardware_cfg, L, batch=batch, kv_bits=kv_bits)
        total += e["prefill"]["seconds"] + decode_tokens * e["decode"]["seconds"]
    return total * repeats


def train_seconds(model_cfg: dict, quant_cfg: dict | None, attention_cfg: dict | None,
                  hardware_cfg: dict, seq_len: int, tokens: int, batch: int = 1,
                  utilization: float = 1.0) -> float:
    """Roofline seconds to train on ``tokens`` tokens at ``seq_len`` (fwd+bwd ≈ 3× forward)."""
    e = estimate(model_cfg, quant_cfg, attention_cfg, hardware_cfg, seq_len, batch=batch,
                 prefill_logits="all")
    steps = tokens / float(seq_len * batch)
    return 3.0 * e["prefill"]["seconds"] * steps / max(utilization, 1e-9)


def gpu_hours(seconds: float, gpus: int = 1) -> float:
    return seconds * gpus / 3600.0


# --------------------------------------------------------------------------------------------
# hardware


def resolve_hardware(hardware_cfg: dict | str | None, measure: bool = False) -> dict:
    """A hardware dict with ``peak_flops`` and ``mem_bw``.

    Accepts a preset name, a dict with the numbers, or a dict/name ``cpu`` without numbers
    (measured once per process with :func:`measure_cpu`). With ``measure=True`` a cpu config
    that says ``measure: true`` (conf/hardware/cpu.yaml) is measured too, its numbers being
    only the planner's fallback; :func:`estimate` itself never measures a config that has
    numbers, so planning stays fast.
    """
    if hardware_cfg is None:
        hardware_cfg = "cpu"
    if isinstance(hardware_cfg, str):
        if hardware_cfg in PRESETS:
            return dict(PRESETS[hardware_cfg])
        if hardware_cfg == "cpu":
            return measure_cpu()
        raise ValueError(f"costmodel: unknown hardware {hardware_cfg!r}; known: {sorted(PRESETS) + ['cpu']}")
    name = hardware_cfg.get("name")
    given = {k: v for k, v in hardware_cfg.items() if v is not None}
    if name == "cpu" and measure and hardware_cfg.get("measure") and not hardware_cfg.get("measured"):
        return {**given, **measure_cpu()}
    if hardware_cfg.get("peak_flops") and hardware_cfg.get("mem_bw"):
        return hardware_cfg
    if name == "cpu":
        return {**given, **measure_cpu()}
    if name in PRESETS:
        return {**PRESETS[name], **given}
    raise ValueError(f"costmodel: hardware {name!r} has no peak_flops/mem_bw and is not a preset")


def measure_cpu(budget_s: float = 0.4) -> dict:
    """Measure this CPU: fp32 matmul FLOP/s and copy bandwidth (read+write), ~``budget_s``.

    Measured once per process and budget (cached); returns a fresh dict each call.
    """
    return dict(_measure_cpu(float(budget_s)))


@functools.lru_cache(maxsize=4)
def _measure_cpu(budget_s: float) -> dict:
    import torch

    half = budget_s / 2.0
    n = 1024
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b  # warm up
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        dt = time.perf_counter() - t0
        if dt >= half:
            break
    peak_flops = 2.0 * n**3 * count / dt

    x = torch.empty(32 * 1024 * 1024, dtype=torch.float32).fill_(1.0)  # 128 MiB
    y = torch.empty_like(x)
    y.copy_(x)  # warm up (page in)
    count, t0 = 0, time.perf_counter()
    while True:
        y.copy_(x)
        count += 1
        dt = time.perf_counter() - t0
        if dt >= half:
            break
    mem_bw = 2.0 * x.numel() * x.element_size() * count / dt
    try:
        mem_bytes = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        mem_bytes = None
    return {"name": "cpu", "peak_flops": peak_flops, "mem_bw": mem_bw, "mem_bytes": mem_bytes,
            "threads": torch.get_num_threads(), "measured": True}
