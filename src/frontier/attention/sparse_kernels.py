"""Kernels of the sparse softmax attention variants (:mod:`.sparse`): StreamingLLM sinks + window,
fixed block-sparse and exact top-k, each as a blockwise kernel (pure PyTorch, CPU and GPU) and a
naive quadratic masked-softmax reference (tests).

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

import torch

from .kernels import _acc_dtype, _check_gqa, _expand_kv
from .softmax import cap_logits, masked_attention

__all__ = [
    "block_sparse_attention",
    "block_sparse_reference",
    "first_valid_offsets",
    "sink_window_attention",
    "sink_window_reference",
    "topk_attention",
    "topk_reference",
]

_SINK_QUERY_BLOCK = 128  # default prefill query block of sink_window (as SlidingWindowAttention)


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
