"""Sparse softmax attention variants: StreamingLLM sinks + window, fixed block-sparse, exact top-k.

Three options, each a kernel (pure PyTorch, CPU and GPU), a naive quadratic masked-softmax
reference (tests), a :class:`~frontier.attention.modules.FrontierAttention` subclass and a
transformers cache layer:

* ``{"name": "sink_window", "kind": "sink_window", "window": 64, "sinks": 4}`` -- StreamingLLM:
  key ``j`` is visible to query ``i`` iff ``j < sinks`` or ``i - window < j <= i``.
  Cache: :class:`SinkWindowStateLayer`, bounded (the ``sinks`` first keys + the last
  ``window - 1`` keys). Optional ``block_size`` (default 128): prefill query-block size.
* ``{"name": "block_sparse", "kind": "block_sparse", "block_size": 32, "local_blocks": 2,
  "global_blocks": 1}`` -- fixed block pattern: with ``b(j) = j // block_size``, key ``j`` is
  visible to query ``i`` iff ``j <= i`` and (``b(i) - local_blocks < b(j)`` or
  ``b(j) < global_blocks``). Cache: :class:`BlockSparseStateLayer`, bounded (the
  ``global_blocks * block_size`` first keys + the last ``local_blocks * block_size - 1`` keys).
  Optional ``query_block`` (default ``block_size``): prefill query-block size.
* ``{"name": "topk", "kind": "topk", "k": 32, "block_size": 256}`` -- every query attends
  (softmax) to its ``k`` highest-scoring causal keys only (all of them when it has fewer); ties at
  the ``k``-th score go to the earlier keys. Cache: :class:`TopKStateLayer`, a *full* KV cache
  (exact top-k needs every past key: decode memory grows with the context, like softmax).
  ``block_size``: prefill query-block size.

Layout and conventions are those of :mod:`frontier.attention.kernels`: ``q: [B, Hq, Lq, D]``,
``k: [B, Hkv, Lk, D]``, ``v: [B, Hkv, Lk, Dv]`` with GQA never expanding K/V (query head ``h``
reads kv head ``h // (Hq // Hkv)``), queries aligned to the end of the keys, ``key_valid: [B, Lk]``
bool (False = padding; such keys are never visible), softmax in float32 (float64 for float64
inputs), a query with no visible key outputs zeros.

Positions (sink_window, block_sparse). Sinks and blocks need absolute positions, so a row's
positions are counted from its first valid key: ``pos(j) = j - offset`` where ``offset`` is the
index of the row's first valid key (the number of leading padding keys). A left-padded row
therefore behaves exactly like the same row run alone (its sinks are its first real tokens, its
blocks start at its first real token). Padding *after* the first valid key keeps occupying
positions (it is invisible but counts in the window/block arithmetic), as in the sliding-window
module; only leading padding is transparent. The cache layers keep each row's offset. top-k has
no positional structure (only causality and validity).

Cost. sink_window and block_sparse prefill run SDPA per query block over the keys that block can
see (the global keys, gathered per row, plus a band of recent keys): O(L) time and memory for a
fixed pattern, never an ``L x L`` mask. top-k prefill runs per query block over all causal keys:
O(block x L) memory, O(L^2) compute (inherent to exact top-k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from .kernels import _acc_dtype, _check_gqa, _expand_kv
from .softmax import cap_logits, masked_attention
from .caches import FamilyMaskSizes
from .modules import FrontierAttention, KeyValidityMixin, _ensure_cache_layer

__all__ = [
    "SPARSE_DEFAULTS",
    "SPARSE_KINDS",
    "SPARSE_MODULES",
    "BlockSparseAttention",
    "BlockSparseStateLayer",
    "GlobalLocalStateLayer",
    "SinkWindowAttention",
    "SinkWindowStateLayer",
    "SparseKV",
    "TopKAttention",
    "TopKStateLayer",
    "block_sparse_attention",
    "block_sparse_reference",
    "normalize_sparse_config",
    "sink_window_attention",
    "sink_window_reference",
    "topk_attention",
    "topk_reference",
]

SPARSE_KINDS = ("sink_window", "block_sparse", "topk")
SPARSE_DEFAULTS: dict[str, dict] = {
    "sink_window": {"name": "sink_window", "kind": "sink_window", "window": 64, "sinks": 4},
    "block_sparse": {
        "name": "block_sparse",
        "kind": "block_sparse",
        "block_size": 32,
        "local_blocks": 2,
        "global_blocks": 1,
    },
    "topk": {"name": "topk", "kind": "topk", "k": 32, "block_size": 256},
}
# int fields per kind: key -> minimum (optional keys are validated only when present)
_INT_FIELDS: dict[str, dict[str, int]] = {
    "sink_window": {"window": 1, "sinks": 0, "block_size": 1},
    "block_sparse": {"block_size": 1, "local_blocks": 1, "global_blocks": 0, "query_block": 1},
    "topk": {"k": 1, "block_size": 1},
}
_SINK_QUERY_BLOCK = 128  # default prefill query block of sink_window (as SlidingWindowAttention)


def normalize_sparse_config(cfg: dict) -> dict:
    """Validate a sparse attention cfg and fill defaults from :data:`SPARSE_DEFAULTS`.

    Raises ValueError naming the bad key, e.g. ``attention cfg 'window' must be an int >= 1``.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"attention cfg must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in SPARSE_KINDS:
        raise ValueError(f"attention cfg 'kind' must be one of {SPARSE_KINDS}, got {kind!r}")
    out = {**SPARSE_DEFAULTS[kind], **cfg}
    if "name" not in cfg:
        out["name"] = kind
    for key, lo in _INT_FIELDS[kind].items():
        if key not in out:
            continue
        val = out[key]
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"attention cfg {key!r} must be an int >= {lo}, got {val!r}")
    return out


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def first_valid_offsets(key_valid: torch.Tensor | None, B: int, Lk: int, device) -> torch.Tensor:
    """``[B]`` int64: index of each row's first valid key (``Lk`` for a row without one)."""
    if key_valid is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    kv = key_valid.to(torch.bool)
    first = kv.to(torch.int32).argmax(-1).to(torch.long)  # argmax returns the first maximum
    return torch.where(kv.any(-1), first, torch.full_like(first, Lk))


def _gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, L, D]``, ``idx: [B, n]`` -> ``x[b, :, idx[b], :]``: ``[B, H, n, D]``."""
    B, H, _, D = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


@dataclass(frozen=True)
class _SinkWindowPattern:
    window: int
    sinks: int
    needs_offsets = False  # band_start does not depend on the rows' offsets

    @property
    def n_global(self) -> int:
        return self.sinks

    @property
    def lookback(self) -> int:  # keys before a query that its local part can reach
        return self.window - 1

    def local(self, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        return kp > qp - self.window

    def band_start(self, qa0: int, qa1: int, offsets: list[int]) -> int:
        return qa0 - self.window + 1


@dataclass(frozen=True)
class _BlockPattern:
    block_size: int
    local_blocks: int
    global_blocks: int
    needs_offsets = True

    @property
    def n_global(self) -> int:
        return self.global_blocks * self.block_size

    @property
    def lookback(self) -> int:
        return self.local_blocks * self.block_size - 1

    def local(self, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return torch.div(kp, bs, rounding_mode="floor") > torch.div(qp, bs, rounding_mode="floor") - self.local_blocks

    def band_start(self, qa0: int, qa1: int, offsets: list[int]) -> int:
        """First key index the local part of queries ``[qa0, qa1)`` can see, over all rows
        (rows whose blocks are not aligned with the query block pull it earlier)."""
        bs, lb = self.block_size, self.local_blocks
        starts = [o + (max(qa0 - o, 0) // bs - lb + 1) * bs for o in offsets if qa1 - 1 >= o]
        return min(starts) if starts else qa0


def _global_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    scale: float | None,
    key_valid: torch.Tensor | None,
    query_block: int,
    k_start: int = 0,
    offsets: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    softcap: float | None = None,
    layer_window: int | None = None,
) -> torch.Tensor:
    """Blockwise attention for a "global prefix + local band" pattern (sink_window, block_sparse).

    ``k[:, :, t]`` is the key of absolute index ``k_start + t``; query ``t`` sits at absolute index
    ``k_start + Lk - Lq + t``. ``offsets: [B]`` absolute index of each row's first valid key
    (default: from ``key_valid``). ``prefix = (pk, pv, p_index, p_valid)``: extra keys not in ``k``
    (a cache's global keys, ``p_index: [B, P]`` absolute indices); entries with ``p_index >=
    k_start`` are ignored (they are in ``k``). Each query block attends, in one SDPA call, to the
    prefix, the global keys of ``k`` before its band and the band ``[band_start, block end)``.
    ``softcap``: logits soft-capped; ``layer_window``: a local layer's own window, intersected with
    the pattern (key visible only if ``i - layer_window < j``).
    """
    groups = _check_gqa(q, k, v)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    if Lk < Lq:
        raise ValueError("fewer keys than queries")
    dev = q.device
    acc = _acc_dtype(v.dtype)
    out_dtype = v.dtype
    if key_valid is None:
        key_valid = torch.ones(B, Lk, dtype=torch.bool, device=dev)
    key_valid = key_valid.to(torch.bool)
    if offsets is None:
        offsets = first_valid_offsets(key_valid, B, Lk, dev) + k_start
    offsets = offsets.to(device=dev, dtype=torch.long)
    off_list = offsets.tolist() if pattern.needs_offsets else []  # (a device sync on GPU)
    n_glob = pattern.n_global
    qbase = k_start + Lk - Lq
    kabs = torch.arange(k_start, k_start + Lk, device=dev)

    pre = None
    if prefix is not None and prefix[0].shape[2] > 0:
        pk, pv, pidx, pvalid = prefix
        pre = (pk, pv, pidx.to(torch.long), pvalid.to(torch.bool) & (pidx < k_start))
    glob = None  # global keys inside k, gathered per row on first need

    outs = []
    bs = max(1, int(query_block))
    for s in range(0, Lq, bs):
        e = min(Lq, s + bs)
        qa0, qa1 = qbase + s, qbase + e
        b0 = min(max(k_start, pattern.band_start(qa0, qa1, off_list)), qa0)
        lb0, lb1 = b0 - k_start, qa1 - k_start
        ks, vs = [k[:, :, lb0:lb1]], [v[:, :, lb0:lb1]]
        pos = [kabs[lb0:lb1].expand(B, -1)]
        val = [key_valid[:, lb0:lb1]]
        if n_glob > 0 and lb0 > 0:
            if glob is None:
                gabs = offsets[:, None] + torch.arange(n_glob, device=dev)
                gloc = gabs - k_start
                inside = (gloc >= 0) & (gloc < Lk)
                gidx = gloc.clamp(0, Lk - 1)
                glob = (_gather_seq(k, gidx), _gather_seq(v, gidx), gabs, inside & key_valid.gather(1, gidx))
            gk, gv, gabs, gval = glob
            ks.insert(0, gk)
            vs.insert(0, gv)
            pos.insert(0, gabs)
            val.insert(0, gval & (gabs < b0))  # the band holds the rest
        if pre is not None:
            ks.insert(0, pre[0])
            vs.insert(0, pre[1])
            pos.insert(0, pre[2])
            val.insert(0, pre[3])
        kk = torch.cat(ks, 2) if len(ks) > 1 else ks[0]
        vv = torch.cat(vs, 2) if len(vs) > 1 else vs[0]
        kp = (torch.cat(pos, 1) if len(pos) > 1 else pos[0]) - offsets[:, None]  # [B, K]
        kval = torch.cat(val, 1) if len(val) > 1 else val[0]
        qp = torch.arange(qa0, qa1, device=dev)[None, :] - offsets[:, None]  # [B, C]
        qp3, kp3 = qp[:, :, None], kp[:, None, :]
        vis = kval[:, None, :] & (kp3 >= 0) & (kp3 <= qp3) & ((kp3 < n_glob) | pattern.local(qp3, kp3))
        if layer_window is not None:
            vis = vis & (kp3 > qp3 - layer_window)
        o = masked_attention(q[:, :, s:e].to(acc), kk.to(acc), vv.to(acc), vis[:, None], scale, softcap)
        o = torch.where(vis.any(-1)[:, None, :, None], o, torch.zeros((), dtype=o.dtype, device=dev))
        outs.append(o.to(out_dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _masked_softmax_reference(q, k, v, visible_fn, scale, key_valid) -> torch.Tensor:
    """Naive O(Lq x Lk) masked softmax; ``visible_fn(i, j)`` on positions relative to each row's
    first valid key (``[B, Lq, 1]`` and ``[B, 1, Lk]``); fully masked rows -> 0."""
    groups = _check_gqa(q, k, v)
    acc = _acc_dtype(v.dtype)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    off = first_valid_offsets(key_valid, B, Lk, q.device)[:, None, None]
    i = torch.arange(Lq, device=q.device)[None, :, None] + (Lk - Lq) - off
    j = torch.arange(Lk, device=q.device)[None, None, :] - off
    mask = (j >= 0) & (j <= i) & visible_fn(i, j)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :].to(torch.bool)
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), groups), _expand_kv(v.to(acc), groups)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return (p @ vf).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# sink + window (StreamingLLM)
# ----------------------------------------------------------------------------------------------


def sink_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive masked softmax: key ``j`` visible to query ``i`` iff ``j <= i`` and (``j < sinks`` or
    ``i - window < j``), positions counted from each row's first valid key; padding invisible."""
    return _masked_softmax_reference(q, k, v, lambda i, j: (j < sinks) | (j > i - window), scale, key_valid)


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sinks: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = _SINK_QUERY_BLOCK,
    *,
    k_start: int = 0,
    offsets: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    softcap: float | None = None,
    layer_window: int | None = None,
) -> torch.Tensor:
    """StreamingLLM attention, blockwise over query blocks of ``block_size``.

    Each query block runs one SDPA over the row's ``sinks`` first keys (gathered per row) and the
    band of at most ``block + window - 1`` recent keys: O(L * (sinks + window + block)) time.
    ``k_start``/``offsets``/``prefix`` describe a cache view (see :class:`SinkWindowStateLayer`);
    without them ``k`` is the whole sequence and offsets come from ``key_valid``. ``softcap`` /
    ``layer_window``: see :func:`_global_local_attention`.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    if sinks < 0:
        raise ValueError("sinks must be >= 0")
    return _global_local_attention(
        q, k, v, _SinkWindowPattern(int(window), int(sinks)), scale, key_valid, block_size, k_start, offsets, prefix,
        softcap, layer_window,
    )


# ----------------------------------------------------------------------------------------------
# fixed block-sparse
# ----------------------------------------------------------------------------------------------


def block_sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    local_blocks: int,
    global_blocks: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive masked softmax: key ``j`` visible to query ``i`` iff ``j <= i`` and
    (``j // bs > i // bs - local_blocks`` or ``j // bs < global_blocks``), positions counted from
    each row's first valid key; padding invisible."""
    bs = block_size

    def fn(i, j):
        bi, bj = torch.div(i, bs, rounding_mode="floor"), torch.div(j, bs, rounding_mode="floor")
        return (bj > bi - local_blocks) | (bj < global_blocks)

    return _masked_softmax_reference(q, k, v, fn, scale, key_valid)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    local_blocks: int,
    global_blocks: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    query_block: int | None = None,
    *,
    k_start: int = 0,
    offsets: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    softcap: float | None = None,
    layer_window: int | None = None,
) -> torch.Tensor:
    """Fixed block-sparse attention, per query block (``query_block``, default ``block_size``).

    A query block attends in one SDPA call to the global blocks (gathered per row) and the key
    blocks its local part reaches (its own block and the ``local_blocks - 1`` previous ones):
    O(L * (global_blocks + local_blocks + 1) * block_size) for the fixed pattern. With per-row
    offsets (left padding) the query blocks are not aligned to every row's pattern blocks; the band
    then covers the union over rows (at most ``block_size - 1`` extra keys, masked).
    """
    if block_size < 1 or local_blocks < 1 or global_blocks < 0:
        raise ValueError("block_size and local_blocks must be >= 1, global_blocks >= 0")
    pattern = _BlockPattern(int(block_size), int(local_blocks), int(global_blocks))
    qb = block_size if query_block is None else query_block
    return _global_local_attention(q, k, v, pattern, scale, key_valid, qb, k_start, offsets, prefix, softcap,
                                   layer_window)


# ----------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------


def topk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive top-k: full score matrix, a stable descending sort per query (ties: earlier key first),
    softmax over the ``k_top`` first visible (causal, valid) keys."""
    groups = _check_gqa(q, k, v)
    acc = _acc_dtype(v.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), groups), _expand_kv(v.to(acc), groups)
    i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=q.device)[None, :]
    vis = (j <= i)[None, None]
    if key_valid is not None:
        vis = vis & key_valid[:, None, None, :].to(torch.bool)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(Lk, device=q.device).expand_as(order))
    sel = vis & (rank < k_top)
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~sel, float("-inf")), dim=-1), nan=0.0)
    return (p @ vf).to(v.dtype)


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 256,
    softcap: float | None = None,
    layer_window: int | None = None,
) -> torch.Tensor:
    """Exact top-k softmax attention, blockwise over query blocks (never an ``Lq x Lk`` matrix).

    Per query: scores (float32) over its causal valid keys; with more than ``k_top`` of them, the
    keys above the ``k_top``-th score are kept plus, among those equal to it, the earliest ones
    up to ``k_top`` in all (deterministic ties); softmax over the kept keys. GQA: scores per kv
    head for all its query heads in one matmul. O(block x Lk) memory, O(Lq x Lk) compute.
    ``softcap``: scores soft-capped; ``layer_window``: only keys with ``i - layer_window < j``.
    """
    if k_top < 1:
        raise ValueError("k must be >= 1")
    groups = _check_gqa(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Lk < Lq:
        raise ValueError("fewer keys than queries")
    dev = q.device
    acc = _acc_dtype(v.dtype)
    scale = D**-0.5 if scale is None else scale
    off = Lk - Lq
    kv_valid = None if key_valid is None else key_valid.to(torch.bool)
    outs = []
    bs = max(1, int(block_size))
    for s in range(0, Lq, bs):
        e = min(Lq, s + bs)
        C, n = e - s, off + e  # queries, keys reachable (causal)
        qc = q[:, :, s:e].to(acc).reshape(B, Hkv, groups * C, D)
        kc, vc = k[:, :, :n].to(acc), v[:, :, :n].to(acc)
        sc = cap_logits((qc @ kc.transpose(-1, -2)).mul_(scale), softcap).view(B, Hkv, groups, C, n)
        kpos, qpos = torch.arange(n, device=dev)[None, :], torch.arange(off + s, off + e, device=dev)[:, None]
        vis = kpos <= qpos  # [C, n]
        if layer_window is not None:
            vis = vis & (kpos > qpos - layer_window)
        vis = vis[None, None, None]
        if kv_valid is not None:
            vis = vis & kv_valid[:, None, None, None, :n]
        sc = sc.masked_fill(~vis, float("-inf"))
        if k_top < n:
            tau = sc.topk(k_top, dim=-1).values[..., -1:]
            above = sc > tau
            ties = (sc == tau) & vis
            need = k_top - above.sum(-1, keepdim=True)
            sel = above | (ties & (ties.cumsum(-1) <= need))
            sc = sc.masked_fill(~sel, float("-inf"))
        any_vis = torch.isfinite(sc).any(-1, keepdim=True)
        sc = torch.where(any_vis, sc, torch.zeros((), dtype=sc.dtype, device=dev))  # no NaN, even in backward
        p = torch.where(any_vis, torch.softmax(sc, dim=-1), torch.zeros((), dtype=sc.dtype, device=dev))
        o = p.view(B, Hkv, groups * C, n) @ vc  # [B, Hkv, G*C, Dv]
        outs.append(o.view(B, Hq, C, Dv).to(v.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------------------------
# cache layers
# ----------------------------------------------------------------------------------------------


class SparseKV(NamedTuple):
    """What a bounded sparse cache layer hands to the kernel for one call (see
    :func:`sink_window_attention`): cached recent keys followed by the new ones, their validity,
    the absolute index of ``keys[:, :, 0]``, per-row offsets and the cached global keys."""

    keys: torch.Tensor
    values: torch.Tensor
    key_valid: torch.Tensor
    k_start: int
    offsets: torch.Tensor
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


class GlobalLocalStateLayer(FamilyMaskSizes, CacheLayerMixin):
    """Bounded cache of a "global prefix + local band" pattern, as a transformers cache layer.

    Keeps (all per row, ``B`` rows):

    * ``global_keys/global_values: [B, Hkv, n_global, D]`` and ``global_valid: [B, n_global]``:
      slot ``s`` holds the key at position ``s`` of the row (absolute index ``offset + s``) once
      seen; allocated at full size on first use;
    * ``keys/values: [B, Hkv, <= lookback, D]`` and ``key_valid: [B, <= lookback]``: the last
      ``lookback`` keys (what the next query's local part can reach);
    * ``offsets: [B]`` int64: absolute index of each row's first valid key (equal to the number of
      tokens seen while a row has none yet);
    * ``cumulative_length``: tokens seen (padding included), returned by ``get_seq_length`` so that
      generate()'s positions work.

    Size is bounded: ``n_global + lookback`` keys per row whatever the context length.
    Mask sizes: those of the layer it replaced (:class:`~frontier.attention.caches.FamilyMaskSizes`);
    the module reads only the new keys' validity from its mask.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, n_global: int, lookback: int, **kwargs):
        super().__init__()
        self.n_global = int(n_global)
        self.lookback = int(lookback)
        self.key_valid: torch.Tensor | None = None
        self.global_keys: torch.Tensor | None = None
        self.global_values: torch.Tensor | None = None
        self.global_valid: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.cumulative_length = 0
        self.device = None

    def __repr__(self):
        name = self.__class__.__name__
        return f"{name}(n_global={self.n_global}, lookback={self.lookback}, tokens={self.cumulative_length})"

    def _tensors(self) -> tuple[str, ...]:
        return ("keys", "values", "key_valid", "global_keys", "global_values", "global_valid", "offsets")

    # --- abstract API of CacheLayerMixin -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        dev = key_states.device
        self.device = dev
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.key_valid = torch.ones(B, 0, dtype=torch.bool, device=dev)
        self.global_keys = key_states.new_zeros(B, H, self.n_global, D)
        self.global_values = value_states.new_zeros(B, H, self.n_global, value_states.shape[-1])
        self.global_valid = torch.zeros(B, self.n_global, dtype=torch.bool, device=dev)
        self.offsets = torch.zeros(B, dtype=torch.long, device=dev)
        self.is_initialized = True

    def update_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> SparseKV:
        """Add the new keys and return the view the kernel needs for the new queries."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        dev = key_states.device
        if key_valid is None:
            key_valid = torch.ones(B, q, dtype=torch.bool, device=dev)
        key_valid = key_valid.to(torch.bool)
        cum0 = self.cumulative_length
        # rows without a valid key so far have offset == cum0: start them at their first valid new key
        started = self.offsets < cum0
        offsets = torch.where(started, self.offsets, first_valid_offsets(key_valid, B, q, dev) + cum0)
        n = self.keys.shape[-2]
        k_start = cum0 - n
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        full_valid = torch.cat([self.key_valid, key_valid], dim=-1)
        G = self.n_global
        prefix = None
        slots = torch.arange(G, device=dev)
        if G > 0 and cum0 > 0:
            # keys of the global buffer seen before this call (slots filled now are read from full_k)
            prefix = (self.global_keys, self.global_values, offsets[:, None] + slots, self.global_valid)
        if G > 0:
            loc = offsets[:, None] + slots - cum0  # slot positions inside the new keys
            inside = (loc >= 0) & (loc < q)
            if bool(inside.any()):
                idx = loc.clamp(0, q - 1)
                m = inside[:, None, :, None]
                self.global_keys = torch.where(m, _gather_seq(key_states, idx), self.global_keys)
                self.global_values = torch.where(m, _gather_seq(value_states, idx), self.global_values)
                self.global_valid = torch.where(inside, key_valid.gather(1, idx), self.global_valid)
        start = max(full_k.shape[-2] - self.lookback, 0)
        if start > 0:  # copy, so the cache does not pin the whole prefill's storage
            self.keys = full_k[:, :, start:].clone()
            self.values = full_v[:, :, start:].clone()
            self.key_valid = full_valid[:, start:].clone()
        else:
            self.keys, self.values, self.key_valid = full_k, full_v, full_valid
        self.offsets = offsets
        self.cumulative_length += q
        return SparseKV(full_k, full_v, full_valid, k_start, offsets, prefix)

    def update(self, key_states, value_states, *args, **kwargs):
        view = self.update_with_validity(key_states, value_states, kwargs.get("key_valid"))
        return view.keys, view.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def state_bytes(self) -> int:
        """Bytes of the cached keys/values (recent + global), as counted for KV layers; the
        bookkeeping (validity bools, per-row offsets) is not counted."""
        total = 0
        for t in (self.keys, self.values, self.global_keys, self.global_values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    # --- housekeeping ------------------------------------------------------------------------
    def reset(self) -> None:
        for name in self._tensors():
            setattr(self, name, None)
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            for name in self._tensors():
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise RuntimeError(f"{type(self).__name__} does not support crop (evicted keys cannot come back)")


class SinkWindowStateLayer(GlobalLocalStateLayer):
    """Bounded StreamingLLM cache: each row's first ``sinks`` keys + the last ``window - 1`` keys."""

    def __init__(self, sinks: int, window: int, **kwargs):
        super().__init__(n_global=sinks, lookback=window - 1)
        self.sinks = int(sinks)
        self.window = int(window)


class BlockSparseStateLayer(GlobalLocalStateLayer):
    """Bounded block-sparse cache: each row's ``global_blocks`` first blocks + the last
    ``local_blocks * block_size - 1`` keys (the most the next query's own block and its
    ``local_blocks - 1`` previous blocks can span; a fixed size, independent of where each row's
    blocks start, so at most ``block_size - 1`` keys more than the exact pattern needs)."""

    def __init__(self, block_size: int, local_blocks: int, global_blocks: int, **kwargs):
        super().__init__(n_global=global_blocks * block_size, lookback=local_blocks * block_size - 1)
        self.block_size = int(block_size)
        self.local_blocks = int(local_blocks)
        self.global_blocks = int(global_blocks)


class TopKStateLayer(FamilyMaskSizes, KeyValidityMixin, DynamicLayer):
    """Full KV cache (``DynamicLayer``) plus a ``[B, n]`` bool validity buffer: exact top-k needs
    every past key, so its decode memory grows linearly with the context."""

    def __init__(self, **kwargs):
        super().__init__()
        self.key_valid: torch.Tensor | None = None

    @property
    def cumulative_length(self) -> int:  # tokens seen (every key is kept), for FamilyMaskSizes
        return self.get_seq_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.key_valid = torch.ones(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)

    def update_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        if key_valid is None:
            key_valid = torch.ones(B, q, dtype=torch.bool, device=key_states.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.key_valid = torch.cat([self.key_valid, key_valid.to(torch.bool)], dim=-1)
        return self.keys, self.values, self.key_valid

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.key_valid is not None and self.keys is not None:
            self.key_valid = self.key_valid[:, : self.keys.shape[-2]]


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


def _module_cfg(kind: str, cfg: dict) -> dict:
    if cfg.get("kind", kind) != kind:
        raise ValueError(f"attention cfg 'kind' must be {kind!r} for this module, got {cfg.get('kind')!r}")
    return normalize_sparse_config({**cfg, "kind": kind})


class SinkWindowAttention(FrontierAttention):
    """StreamingLLM: softmax over each row's first ``sinks`` keys and the last ``window`` keys
    (query included). Prefill: :func:`sink_window_attention` per query block (``block_size``,
    default 128). Decode: :class:`SinkWindowStateLayer` (bounded: ``sinks + window - 1`` keys).
    Positions are counted from each row's first valid token (left padding is transparent)."""

    kind = "sink_window"

    def __init__(self, orig: nn.Module, cfg: dict):
        cfg = _module_cfg(self.kind, cfg)
        super().__init__(orig, cfg)
        self.window = int(cfg["window"])
        self.sinks = int(cfg["sinks"])
        self.block_size = int(cfg.get("block_size", _SINK_QUERY_BLOCK))

    def _kernel(self, q, k, v, valid, **view):
        return sink_window_attention(
            q, k, v, self.window, self.sinks, key_valid=valid, block_size=self.block_size, **view
        )

    def _attend(self, q, k, v, valid, cache, **call):
        if cache is None:
            return self._kernel(q, k, v, valid, **call)
        layer = _ensure_cache_layer(cache, self.layer_idx, SinkWindowStateLayer, sinks=self.sinks, window=self.window)
        kv = layer.update_with_validity(k, v, valid)
        return self._kernel(
            q, kv.keys, kv.values, kv.key_valid, k_start=kv.k_start, offsets=kv.offsets, prefix=kv.prefix, **call
        )


class BlockSparseAttention(FrontierAttention):
    """Fixed block-sparse softmax: a query in block ``b`` sees (causally) blocks
    ``b - local_blocks + 1 .. b`` and the first ``global_blocks`` blocks. Prefill:
    :func:`block_sparse_attention` per query block. Decode: :class:`BlockSparseStateLayer`
    (bounded: ``(global_blocks + local_blocks) * block_size - 1`` keys). Blocks are counted from
    each row's first valid token (left padding is transparent)."""

    kind = "block_sparse"

    def __init__(self, orig: nn.Module, cfg: dict):
        cfg = _module_cfg(self.kind, cfg)
        super().__init__(orig, cfg)
        self.block_size = int(cfg["block_size"])
        self.local_blocks = int(cfg["local_blocks"])
        self.global_blocks = int(cfg["global_blocks"])
        self.query_block = int(cfg.get("query_block", self.block_size))

    def _kernel(self, q, k, v, valid, **view):
        return block_sparse_attention(
            q,
            k,
            v,
            self.block_size,
            self.local_blocks,
            self.global_blocks,
            key_valid=valid,
            query_block=self.query_block,
            **view,
        )

    def _attend(self, q, k, v, valid, cache, **call):
        if cache is None:
            return self._kernel(q, k, v, valid, **call)
        layer = _ensure_cache_layer(
            cache,
            self.layer_idx,
            BlockSparseStateLayer,
            block_size=self.block_size,
            local_blocks=self.local_blocks,
            global_blocks=self.global_blocks,
        )
        kv = layer.update_with_validity(k, v, valid)
        return self._kernel(
            q, kv.keys, kv.values, kv.key_valid, k_start=kv.k_start, offsets=kv.offsets, prefix=kv.prefix, **call
        )


class TopKAttention(FrontierAttention):
    """Exact top-k softmax: each query attends to its ``k`` highest-scoring causal keys.

    Prefill: :func:`topk_attention` per query block (``block_size``). Decode needs every past key:
    :class:`TopKStateLayer` is a full KV cache (memory grows with the context, like softmax).
    """

    kind = "topk"

    def __init__(self, orig: nn.Module, cfg: dict):
        cfg = _module_cfg(self.kind, cfg)
        super().__init__(orig, cfg)
        self.k_top = int(cfg["k"])
        self.block_size = int(cfg["block_size"])

    def _attend(self, q, k, v, valid, cache, **call):
        if cache is not None:
            layer = _ensure_cache_layer(cache, self.layer_idx, TopKStateLayer)
            k, v, full_valid = layer.update_with_validity(k, v, valid)
            valid = None if bool(full_valid.all()) else full_valid
        return topk_attention(q, k, v, self.k_top, key_valid=valid, block_size=self.block_size, **call)


SPARSE_MODULES: dict[str, type[FrontierAttention]] = {
    "sink_window": SinkWindowAttention,
    "block_sparse": BlockSparseAttention,
    "topk": TopKAttention,
}
