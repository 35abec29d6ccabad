"""Softmax kernels: causal, sliding-window (blockwise, never an ``L x L`` mask), masked attention
with an optional logit soft-cap, and the naive sliding-window reference used by the tests.

Layout conventions: those of :mod:`frontier.attention.kernels` (``q: [B, Hq, L, D]``, ``k/v:
[B, Hkv, L, *]`` never GQA-expanded, ``key_valid: [B, L]`` bool, queries aligned to the end of the
keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import _acc_dtype, _check_gqa, _expand_kv

__all__ = [
    "cap_logits",
    "masked_attention",
    "sliding_window_attention",
    "sliding_window_reference",
    "softmax_attention",
]


def cap_logits(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2); identity for None."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q [B, Hq, C, D]`` over ``k/v [B, Hkv, K, *]`` with a bool ``mask``
    ``[B|1, 1, C, K]`` (True = visible), GQA without expanding K/V. Without ``softcap``: SDPA. With
    it: explicit logits ``cap_logits(q.k * scale)`` in float32 (float64 for float64 inputs); a query
    with no visible key outputs zeros."""
    groups = _check_gqa(q, k, v)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    acc = _acc_dtype(v.dtype)
    B, Hq, C, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    s = (q.to(acc).reshape(B, Hkv, groups * C, D) @ k.to(acc).transpose(-1, -2)).view(B, Hkv, groups, C, Lk)
    s = cap_logits(s * scale, softcap)
    m = mask.to(torch.bool)[:, :, None]  # [B|1, 1, 1, C, K]
    any_vis = m.any(-1, keepdim=True)
    s = s.masked_fill(~m, float("-inf"))
    s = torch.where(any_vis, s, torch.zeros((), dtype=acc, device=q.device))  # no NaN, even in backward
    p = torch.where(any_vis, torch.softmax(s, dim=-1), torch.zeros((), dtype=acc, device=q.device))
    out = p.view(B, Hkv, groups * C, Lk) @ v.to(acc)
    return out.view(B, Hq, C, Dv).to(v.dtype)



def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention via SDPA (GQA without expanding K/V), padding keys masked.

    Queries are aligned to the end of the keys (query ``i`` sits at key index ``Lk - Lq + i``).
    A query with no visible key (a left-padding position) gets zeros, as torch's SDPA does.
    ``softcap`` / ``window`` (a family's logit cap / a local layer's window): the family's own
    attention, through :func:`sliding_window_attention`.
    """
    _check_gqa(q, k, v)
    Lq, Lk = q.shape[2], k.shape[2]
    if softcap is not None or window is not None:
        w = Lk if window is None else min(int(window), Lk)
        return sliding_window_attention(q, k, v, w, scale=scale, key_valid=key_valid, softcap=softcap)
    gqa = q.shape[1] != k.shape[1]
    if key_valid is None and Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(Lq, device=q.device) + (Lk - Lq)
    kpos = torch.arange(Lk, device=q.device)
    mask = (kpos[None, :] <= qpos[:, None])[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].to(torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sliding_window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive masked softmax: key ``j`` visible to query ``i`` iff ``i - window < j <= i`` (and valid).

    Positions are key indices; queries are aligned to the end of the keys. Fully masked rows -> 0.
    """
    groups = _check_gqa(q, k, v)
    acc = _acc_dtype(v.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), groups), _expand_kv(v.to(acc), groups)
    qpos = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    kpos = torch.arange(Lk, device=q.device)[None, :]
    mask = ((kpos <= qpos) & (kpos > qpos - window))[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].to(torch.bool)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return (p @ vf).to(v.dtype)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 256,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sliding-window causal softmax, blockwise over query blocks (never an ``Lq x Lk`` mask).
    ``softcap``: logits soft-capped (:func:`masked_attention`).

    Key ``j`` is visible to query ``i`` iff ``pos_i - window < j <= pos_i`` where queries are aligned
    to the end of the keys (``pos_i = Lk - Lq + i``), so a cache holding the last ``window - 1`` keys
    followed by the new keys works as is. Each query block runs SDPA over its band of at most
    ``block + window - 1`` keys: O(L * (window + block)) time, O(block * (block + window)) extra memory.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    _check_gqa(q, k, v)
    Lq, Lk = q.shape[2], k.shape[2]
    off = Lk - Lq
    if off < 0:
        raise ValueError("fewer keys than queries")
    outs = []
    bs = max(1, block_size)
    for s in range(0, Lq, bs):
        e = min(Lq, s + bs)
        k0 = max(0, off + s - window + 1)
        k1 = off + e
        qpos = torch.arange(s, e, device=q.device)[:, None] + off
        kpos = torch.arange(k0, k1, device=q.device)[None, :]
        band = (kpos <= qpos) & (kpos > qpos - window)
        mask = band[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, k0:k1].to(torch.bool)
        outs.append(masked_attention(q[:, :, s:e], k[:, :, k0:k1], v[:, :, k0:k1], mask, scale, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
