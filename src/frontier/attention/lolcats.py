"""LoLCATs attention: sliding-window softmax + linear attention in one layer, mixed by a learned gate.

For query ``i`` (positions are key indices) with window ``W``, feature map ``phi`` (Hedgehog by
default) and per-head gate ``g = sigmoid(gate_logit)``::

    a_ij = g * exp(q_i.k_j * scale - m_i)     for i - W < j <= i   (softmax part, m_i = its row max)
    a_ij = c * phi(q_i).phi(k_j)              for j <= i - W       (linear part)
    out_i = sum_j a_ij v_j / sum_j a_ij

Both terms share one normalisation: the numerators and the denominators of the window and linear
parts are summed before the division. The linear weight ``c`` is the mixing convention
(``mix``):

* ``published`` (default): ``c = 1``, gate logit initialised at ``-2.197`` (g = 0.1). The
  released LoLCATs configs (Zhang et al. 2024, github.com/HazyResearch/lolcats:
  ``affine_attention_factors: false``, ``init_window_factor: -2.1972245773362196``), the
  setting of the paper's reported numbers.
* ``affine``: ``c = 1 - g``, gate logit initialised at ``0`` (g = 0.5): the released code's
  ``affine_attention_factors: true``, and frontier's only convention before ``mix`` existed
  (checkpoints whose manifest spec has no ``mix`` load with it).

``gate_init`` overrides the initial logit. This is LoLCATs' ``linear_window_attention_sw`` (the
row max only stabilises the window term, the gate learns the balance). Cost: O(L * W) for the
window part (blockwise, never an ``L x L`` matrix) plus O(L) chunked linear attention over keys
lagged by ``W``; decode keeps the last ``W - 1`` keys/values and the fixed-size linear state of
every key that left the window (``LolcatsStateLayer``), so memory is bounded in L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as K
from .softmax import cap_logits
from .modules import (
    FrontierAttention,
    SlidingWindowStateLayer,
    _ensure_cache_layer,
    _float_dtype,
    check_softcap,
    make_module_feature_map,
)

MIX = ("published", "affine")
GATE_INIT = {"published": -2.1972245773362196, "affine": 0.0}  # logit(0.1), logit(0.5)
LEGACY_MIX = "affine"  # surgery manifests written before `mix` existed

__all__ = [
    "GATE_INIT",
    "LEGACY_MIX",
    "MIX",
    "LolcatsAttention",
    "LolcatsStateLayer",
    "lolcats_attention",
    "lolcats_reference",
    "window_softmax_parts",
]


def window_softmax_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_size: int = 128,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised sliding-window softmax: ``(sum_j e_ij v_j, sum_j e_ij)`` with
    ``e_ij = exp(s_ij - max_j s_ij)`` over the visible window keys (queries aligned to the end of
    the keys; ``s_ij`` soft-capped when ``softcap`` is given). Returns ``[B, Hq, Lq, Dv]`` and
    ``[B, Hq, Lq]`` in fp32 (fp64 for fp64 inputs); rows without a visible key are zero."""
    groups = K._check_gqa(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = K._acc_dtype(v.dtype)
    off = Lk - Lq
    nums, dens = [], []
    for s in range(0, Lq, max(1, block_size)):
        e = min(Lq, s + block_size)
        k0, k1 = max(0, off + s - window + 1), off + e
        qb = q[:, :, s:e].to(acc).reshape(B, Hkv, groups, e - s, D)
        kb, vb = k[:, :, k0:k1].to(acc), v[:, :, k0:k1].to(acc)
        sc = cap_logits(torch.einsum("bhgqd,bhkd->bhgqk", qb, kb) * scale, softcap)
        qpos = torch.arange(s, e, device=q.device)[:, None] + off
        kpos = torch.arange(k0, k1, device=q.device)[None, :]
        mask = ((kpos <= qpos) & (kpos > qpos - window))[None, None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, None, k0:k1].to(torch.bool)
        sc = sc.masked_fill(~mask, float("-inf"))
        m = sc.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=q.device))
        a = torch.exp(sc - m)
        nums.append(torch.einsum("bhgqk,bhkd->bhgqd", a, vb).reshape(B, Hq, e - s, Dv))
        dens.append(a.sum(-1).reshape(B, Hq, e - s))
    return torch.cat(nums, 2), torch.cat(dens, 2)


def lagged_linear_parts(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    lag: int,
    state: K.LinearState | None = None,
    key_valid: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised linear attention of each query over the keys at least ``lag`` positions back
    (``j <= i - lag``) plus an initial state of older keys: ``(phi(q_i) S, phi(q_i) z)``.

    ``fq`` holds the features of the last ``Lq`` of the ``N`` key positions. Implemented as causal
    chunked linear attention over keys shifted right by ``lag``."""
    groups = K._check_gqa(fq, fk, v)
    B, Hq, Lq, Fd = fq.shape
    N, Dv = fk.shape[2], v.shape[-1]
    acc = K._acc_dtype(v.dtype)
    fk, v = K._mask_keys(fk, v, key_valid)
    off = N - Lq
    if N - lag <= 0:  # no key of this call is old enough (decode): only the carried state
        if state is None:
            return (torch.zeros(B, Hq, Lq, Dv, dtype=acc, device=fq.device),
                    torch.zeros(B, Hq, Lq, dtype=acc, device=fq.device))
        S, z = K._expand_kv(state[0].to(acc), groups), K._expand_kv(state[1].to(acc)[..., None], groups)[..., 0]
        qf = fq.to(acc)
        return qf @ S, (qf * z[:, :, None, :]).sum(-1)
    k_lag = F.pad(fk, (0, 0, lag, 0))[:, :, :N]
    v_lag = F.pad(v, (0, 0, lag, 0))[:, :, :N]
    q_all = F.pad(fq, (0, 0, off, 0)) if off else fq
    num, den = K.linear_attention_chunked(
        q_all, k_lag, v_lag, chunk_size=chunk_size, initial_state=state, return_parts=True
    )
    return num[:, :, off:], den[:, :, off:]


def _factors(gate: torch.Tensor, mix: str, dtype):
    """(window factor g, linear factor c) per head: c = 1 (published) or 1 - g (affine)."""
    if mix not in MIX:
        raise ValueError(f"lolcats mix must be one of {MIX}, got {mix!r}")
    g = torch.sigmoid(gate.to(dtype))
    return g, (1 - g) if mix == "affine" else torch.ones_like(g)


def _mix(num_w, den_w, num_l, den_l, gate: torch.Tensor, out_dtype, mix: str = "published") -> torch.Tensor:
    g, c = (t.view(1, -1, 1) for t in _factors(gate, mix, num_w.dtype))
    num = g[..., None] * num_w + c[..., None] * num_l
    den = g * den_w + c * den_l
    return (num / torch.where(den > 0, den, torch.ones((), dtype=den.dtype, device=den.device))[..., None]).to(out_dtype)


def lolcats_attention(
    q, k, v, fq, fk, gate, window: int, scale: float, key_valid=None, state=None,
    block_size: int = 128, chunk_size: int = 64, softcap: float | None = None, mix: str = "published",
) -> torch.Tensor:
    """LoLCATs attention for the last ``Lq`` queries over ``Lk`` keys (cached window keys first).

    ``q``/``k``: RoPE'd queries/keys (window part); ``fq``/``fk``: their features (linear part);
    ``gate``: ``[Hq]`` logits; ``state``: linear state of keys older than ``k[0]``; ``softcap``: the
    family's logit cap, applied to the window part (the linear part has no logits); ``mix``:
    ``published`` (linear term weighted 1) or ``affine`` (weighted 1 - g)."""
    num_w, den_w = window_softmax_parts(q, k, v, window, scale, key_valid, block_size, softcap)
    num_l, den_l = lagged_linear_parts(fq, fk, v, window, state, key_valid, chunk_size)
    return _mix(num_w, den_w, num_l, den_l, gate, v.dtype, mix)


def lolcats_reference(q, k, v, fq, fk, gate, window: int, scale: float, key_valid=None,
                      mix: str = "published") -> torch.Tensor:
    """Naive O(L^2) LoLCATs attention with explicit masks (LoLCATs' reference formulation)."""
    groups = K._check_gqa(q, k, v)
    acc = K._acc_dtype(v.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    kf, vf = K._expand_kv(k.to(acc), groups), K._expand_kv(v.to(acc), groups)
    fkf = K._expand_kv(fk.to(acc), groups)
    qpos = torch.arange(Lq)[:, None] + (Lk - Lq)
    kpos = torch.arange(Lk)[None, :]
    win = (kpos <= qpos) & (kpos > qpos - window)
    lin = kpos <= qpos - window
    valid = torch.ones(q.shape[0], 1, 1, Lk, dtype=torch.bool) if key_valid is None else key_valid[:, None, None, :]
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~(win & valid), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    g, c = (t.view(1, -1, 1, 1) for t in _factors(gate, mix, acc))
    a = g * torch.exp(s - m) + c * (fq.to(acc) @ fkf.transpose(-1, -2)) * (lin & valid)
    den = a.sum(-1, keepdim=True)
    return ((a @ vf) / torch.where(den > 0, den, torch.ones_like(den))).to(v.dtype)


class LolcatsStateLayer(SlidingWindowStateLayer):
    """Window cache (last ``W - 1`` keys/values + validity) plus the linear state ``(S, z)`` of every
    key that left the window: bounded in L."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.S: torch.Tensor | None = None
        self.z: torch.Tensor | None = None

    def get_state(self):
        return None if self.S is None else (self.S, self.z)

    def set_state(self, state) -> None:
        self.S, self.z = state

    def state_bytes(self) -> int:
        total = 0
        for t in (self.keys, self.values, self.S, self.z):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    def reset(self) -> None:
        super().reset()
        self.S = self.z = None

    def _apply_state(self, fn) -> None:
        if self.S is not None:
            self.S, self.z = fn(self.S), fn(self.z)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_state(lambda t: t[indices, ...])


class LolcatsAttention(FrontierAttention):
    """Sliding-window softmax + linear attention (feature map from ``cfg["feature_map"]``,
    Hedgehog by default) mixed by a learned per-head gate (``gate``: logits, ``gate_init`` at init;
    ``mix``: the convention, see the module docstring). On a local layer the softmax window is
    ``min(window, layer window)``; the linear part covers every older key. A soft-capped family's
    cap applies to the window part."""

    kind = "lolcats"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__(orig, cfg)
        self.window = int(cfg["window"])
        self.chunk_size = int(cfg.get("chunk_size", 64))
        self.block_size = int(cfg.get("block_size", 128))
        self.feature_map = make_module_feature_map(self, cfg, "hedgehog")
        self.mix = cfg.get("mix", "published")
        if self.mix not in MIX:
            raise ValueError(f"attention cfg 'mix' must be one of {MIX}, got {self.mix!r}")
        init = cfg.get("gate_init")
        init = GATE_INIT[self.mix] if init is None else float(init)
        self.gate = nn.Parameter(torch.full((self.num_heads,), init, dtype=_float_dtype(self),
                                            device=self.o_proj.weight.device))

    def _attend(self, q, k, v, valid, cache, *, scale, softcap=None, layer_window=None):
        check_softcap(self, softcap)
        window = self.window if layer_window is None else min(self.window, layer_window)
        L = q.shape[2]
        layer, state, start = None, None, 0
        if cache is not None:
            layer = _ensure_cache_layer(cache, self.layer_idx, LolcatsStateLayer, sliding_window=window)
            cached = layer.keys.shape[-2] if layer.is_initialized else 0
            start = layer.cumulative_length - cached
            state = layer.get_state()
            full_k, full_v, full_valid = layer.update_with_validity(k, v, valid)
            kv_valid = None if bool(full_valid.all()) else full_valid
        else:
            full_k, full_v, kv_valid = k, v, valid
        N = full_k.shape[2]
        pos_k = torch.arange(start, start + N, device=q.device)
        fm = self.feature_map
        fq, fk = fm.forward_q(q, pos_k[N - L:]), fm.forward_k(full_k, pos_k)
        out = lolcats_attention(q, full_k, full_v, fq, fk, self.gate, window, scale, kv_valid, state,
                                self.block_size, self.chunk_size, softcap, self.mix)
        if layer is not None:
            E = N - (window - 1)  # keys that left the window: into the linear state
            acc = K._acc_dtype(v.dtype)
            if state is None:
                S = torch.zeros(q.shape[0], fk.shape[1], fk.shape[-1], v.shape[-1], dtype=acc, device=q.device)
                z = torch.zeros(q.shape[0], fk.shape[1], fk.shape[-1], dtype=acc, device=q.device)
            else:
                S, z = state
            if E > 0:
                ke, ve = K._mask_keys(fk[:, :, :E], full_v[:, :, :E], None if kv_valid is None else kv_valid[:, :E])
                ke, ve = ke.to(acc), ve.to(acc)
                S = S + torch.einsum("bhnf,bhnd->bhfd", ke, ve)
                z = z + ke.sum(2)
            layer.set_state((S.detach() if not torch.is_grad_enabled() else S, z))
        return out
