"""Pure attention kernels: causal linear attention (chunked and recurrent) and its naive quadratic
reference used by the tests (softmax kernels: :mod:`frontier.attention.softmax`).

Layout conventions (all functions):

* queries ``q``: ``[B, Hq, L, F]``; keys ``k``: ``[B, Hkv, L, F]``; values ``v``: ``[B, Hkv, L, Dv]``,
  with ``Hq`` a multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads kv head
  ``h // (Hq // Hkv)``, the same grouping as transformers' ``repeat_kv``). K/V are never expanded
  in the PyTorch paths.
* For linear attention ``q``/``k`` are *already feature-mapped* (non-negative features phi(x)).
* ``key_valid``: optional ``[B, L]`` bool, False for padding keys. Invalid keys contribute nothing.
* The linear-attention state is ``(S, z)`` with ``S: [B, Hkv, F, Dv]`` and ``z: [B, Hkv, F]``:
  ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` over the keys seen so far.

Normalised causal linear attention: ``out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)`` where
``S_i``/``z_i`` include key ``i`` itself.

The chunked form costs O(L * C * F) for the intra-chunk part and O(L * F * Dv) for the inter-chunk
part (chunk size ``C``), O(L) memory; accumulation happens in float32 (or float64 if given).
On CUDA, :func:`linear_attention_prefill` uses flash-linear-attention's Triton kernel when ``fla``
imports; on CPU (and without ``fla``) it always uses the PyTorch chunked form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "FEATURE_MAPS",
    "HAS_FLA",
    "apply_feature_map",
    "apply_feature_map_",
    "linear_attention_chunked",
    "linear_attention_prefill",
    "linear_attention_recurrent",
    "linear_attention_recurrent_step",
    "linear_attention_reference",
]

LinearState = tuple[torch.Tensor, torch.Tensor]

try:  # optional GPU kernels; never used on CPU
    from fla.ops.linear_attn import chunk_linear_attn as _fla_chunk_linear_attn  # type: ignore

    HAS_FLA = True
except Exception:  # ImportError, or a broken triton install
    _fla_chunk_linear_attn = None
    HAS_FLA = False

FEATURE_MAPS = ("elu", "relu")


def apply_feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """phi(x) for the supported fixed maps: ``elu`` -> elu(x) + 1, ``relu`` -> relu(x)."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {kind!r}; allowed: {FEATURE_MAPS}")


def apply_feature_map_(x: torch.Tensor, kind: str) -> torch.Tensor:
    """In-place :func:`apply_feature_map` (inference only: overwrites ``x``)."""
    if kind == "elu":
        return F.elu_(x).add_(1.0)
    if kind == "relu":
        return F.relu_(x)
    raise ValueError(f"unknown feature map {kind!r}; allowed: {FEATURE_MAPS}")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: [B, H, L, D]")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv != 0 or v.shape[1] != hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv} keys, {v.shape[1]} values)")
    if k.shape[2] != v.shape[2]:
        raise ValueError("k and v must have the same length")
    return hq // hkv


def _mask_keys(
    k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys/values of padding positions (``torch.where``, so NaN/inf there cannot leak)."""
    if key_valid is None:
        return k, v
    m = key_valid[:, None, :, None].to(torch.bool)
    return torch.where(m, k, torch.zeros((), dtype=k.dtype, device=k.device)), torch.where(
        m, v, torch.zeros((), dtype=v.dtype, device=v.device)
    )


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


# ----------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    key_valid: torch.Tensor | None = None,
    initial_state: LinearState | None = None,
) -> torch.Tensor:
    """Naive O(L^2) causal linear attention: ``(phi(Q) phi(K)^T * causal) V`` normalised row-wise.

    ``initial_state`` (optional) is added to every prefix, as if its keys came before position 0.
    """
    groups = _check_gqa(q, k, v)
    out_dtype = v.dtype
    acc = _acc_dtype(v.dtype)
    k, v = _mask_keys(k, v, key_valid)
    qf, kf, vf = q.to(acc), _expand_kv(k.to(acc), groups), _expand_kv(v.to(acc), groups)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    a = (qf @ kf.transpose(-1, -2)).masked_fill(~causal, 0.0)
    num = a @ vf
    den = a.sum(-1)
    if initial_state is not None:
        s0, z0 = initial_state
        s0 = _expand_kv(s0.to(acc), groups)
        z0 = _expand_kv(z0.to(acc)[..., None], groups)[..., 0]
        num = num + qf @ s0
        den = den + (qf * z0[:, :, None, :]).sum(-1)
    return (num / (den[..., None] + eps)).to(out_dtype)


def linear_attention_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    eps: float = 1e-6,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """One decoding step per token (loops over ``L``, normally 1). Returns ``(out, (S, z))``.

    The state is kept in float32 (float64 if inputs are float64) whatever the input dtype.
    """
    groups = _check_gqa(q, k, v)
    B, Hq, L, Fd = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    acc = _acc_dtype(v.dtype)
    k, v = _mask_keys(k, v, key_valid)
    if state is None:
        S = torch.zeros(B, Hkv, Fd, Dv, dtype=acc, device=q.device)
        z = torch.zeros(B, Hkv, Fd, dtype=acc, device=q.device)
    else:
        S, z = state[0].to(acc), state[1].to(acc)
    qg = q.to(acc).view(B, Hkv, groups, L, Fd)
    kf, vf = k.to(acc), v.to(acc)
    outs = []
    for t in range(L):
        kt, vt = kf[:, :, t], vf[:, :, t]  # [B,Hkv,F], [B,Hkv,Dv]
        S = S + kt[..., :, None] * vt[..., None, :]
        z = z + kt
        qt = qg[:, :, :, t]  # [B,Hkv,G,F]
        num = torch.einsum("bhgf,bhfd->bhgd", qt, S)
        den = torch.einsum("bhgf,bhf->bhg", qt, z)
        outs.append(num / (den[..., None] + eps))
    out = torch.stack(outs, dim=3).reshape(B, Hq, L, Dv).to(v.dtype)
    return out, (S, z)


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    eps: float = 1e-6,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Alias of :func:`linear_attention_recurrent_step` (token-by-token over all of ``L``)."""
    return linear_attention_recurrent_step(q, k, v, state, eps=eps, key_valid=key_valid)


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    eps: float = 1e-6,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    key_valid: torch.Tensor | None = None,
    segment_size: int = 512,
    q_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LinearState]:
    """Chunked causal linear attention in PyTorch (CPU and GPU), O(L) time and memory.

    Within a chunk of ``C = chunk_size`` tokens: masked quadratic ``(phi(Q_c) phi(K_c)^T * tril) V_c``;
    across chunks: exclusive prefix sums of the chunk states ``phi(K_c)^T V_c`` (and key sums for
    the normaliser ``phi(q) . z``). The sequence is processed in segments of ``segment_size``
    tokens (a multiple of ``C``) carrying the state ``(S, z)`` from one segment to the next, so the
    temporaries of each step stay cache-sized: on a 2-core CPU this ran ~2x faster than doing each
    op over the whole sequence. ``q_map``/``k_map`` (optional) turn raw q/k slices into features
    per segment (fusing the feature map into the same cache-resident pass); without them ``q``/``k``
    are already features. ``L`` need not be a multiple of ``C`` (zero padding; zero features add
    nothing). Differentiable (autograd). ``return_parts=True`` returns the unnormalised numerator
    ``[B, Hq, L, Dv]`` and normaliser ``[B, Hq, L]`` (accumulation dtype) as a pair instead of their
    ratio, for layers that mix linear attention with another term (LoLCATs' window + linear).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    groups = _check_gqa(q, k, v)
    B, Hq, L, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    out_dtype = v.dtype
    acc = _acc_dtype(v.dtype)
    C = min(chunk_size, max(L, 1))
    T = max(C, (segment_size // C) * C)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    S = z = None
    if initial_state is not None:
        S, z = initial_state[0].to(acc), initial_state[1].to(acc)
    outs = []
    for s in range(0, max(L, 1), T):
        e = min(L, s + T)
        n_tok = e - s
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        if q_map is not None:
            qs = q_map(qs)
        if k_map is not None:
            ks = k_map(ks)
        qs, ks, vs = qs.to(acc), ks.to(acc), vs.to(acc)
        if key_valid is not None:
            ks, vs = _mask_keys(ks, vs, key_valid[:, s:e])
        n = math.ceil(n_tok / C)
        pad = n * C - n_tok
        if pad:
            qs = F.pad(qs, (0, 0, 0, pad))
            ks = F.pad(ks, (0, 0, 0, pad))
            vs = F.pad(vs, (0, 0, 0, pad))
        Fd = qs.shape[-1]
        if S is None:
            S = torch.zeros(B, Hkv, Fd, Dv, dtype=acc, device=q.device)
            z = torch.zeros(B, Hkv, Fd, dtype=acc, device=q.device)
        qc = qs.reshape(B, Hkv, groups, n, C, Fd)
        kc = ks.reshape(B, Hkv, n, C, Fd)
        vc = vs.reshape(B, Hkv, n, C, Dv)

        # intra-chunk (causal, diagonal included); in-place ops only touch fresh matmul/sum outputs
        scores = torch.einsum("bhgncf,bhnmf->bhgncm", qc, kc)
        scores.masked_fill_(~tril, 0.0)
        num = torch.einsum("bhgncm,bhnmd->bhgncd", scores, vc)
        den = scores.sum(-1)

        # inter-chunk: state before each chunk = carried state + exclusive prefix of chunk states
        incl = torch.einsum("bhncf,bhncd->bhnfd", kc, vc).cumsum(2)  # [B,Hkv,n,F,Dv]
        z_incl = kc.sum(3).cumsum(2)  # [B,Hkv,n,F]
        S0, z0 = S[:, :, None], z[:, :, None]
        excl = torch.cat([S0, incl[:, :, :-1] + S0], dim=2)
        z_excl = torch.cat([z0, z_incl[:, :, :-1] + z0], dim=2)
        num += torch.einsum("bhgncf,bhnfd->bhgncd", qc, excl)
        den += torch.einsum("bhgncf,bhnf->bhgnc", qc, z_excl)
        S = S + incl[:, :, -1]
        z = z + z_incl[:, :, -1]
        if return_parts:
            outs.append((num.reshape(B, Hq, n * C, Dv)[:, :, :n_tok], den.reshape(B, Hq, n * C)[:, :, :n_tok]))
        else:
            outs.append((num / (den + eps)[..., None]).reshape(B, Hq, n * C, Dv)[:, :, :n_tok])

    if return_parts:
        res = tuple(o[0] if len(outs) == 1 else torch.cat(o, dim=2) for o in zip(*outs))
    else:
        res = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).to(out_dtype)
    if not return_state:
        return res
    return res, (S, z)


_FLA_WARNED = False


def _linear_attention_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    initial_state: LinearState | None,
) -> tuple[torch.Tensor, LinearState]:
    """flash-linear-attention (``fla.ops.linear_attn.chunk_linear_attn``, [B, T, H, *] layout).

    fla has no GQA here, so K/V (and the state) are expanded to the query heads; the normaliser is
    the extra all-ones value column (``normalize=False``, ``scale=1``), so the final state carries
    ``z`` too and an initial state is honoured exactly.
    """
    groups = _check_gqa(q, k, v)
    B, Hq, L, Fd = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    dtype = v.dtype
    v1 = torch.cat([v, torch.ones(B, Hkv, L, 1, dtype=v.dtype, device=v.device)], dim=-1)
    ke, ve = _expand_kv(k, groups), _expand_kv(v1, groups)
    init = None
    if initial_state is not None:
        s0, z0 = initial_state
        init = _expand_kv(torch.cat([s0, z0[..., None]], dim=-1).float(), groups).contiguous()
    o, final = _fla_chunk_linear_attn(
        q.transpose(1, 2).contiguous(),
        ke.transpose(1, 2).contiguous(),
        ve.transpose(1, 2).contiguous(),
        scale=1.0,
        initial_state=init,
        output_final_state=True,
        normalize=False,
    )
    o = o.transpose(1, 2).float()
    out = (o[..., :Dv] / (o[..., Dv:] + eps)).to(dtype)
    final = final.float()[:, ::groups]  # heads of one group hold identical states
    return out, (final[..., :Dv].contiguous(), final[..., Dv].contiguous())


def linear_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    eps: float = 1e-6,
    initial_state: LinearState | None = None,
    key_valid: torch.Tensor | None = None,
    use_fla: bool | None = None,
    segment_size: int = 512,
    q_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Prefill dispatcher: fla's Triton kernel on CUDA when ``fla`` imports, else the PyTorch
    chunked form. Returns ``(out, (S, z))``. ``q_map``/``k_map`` as in :func:`linear_attention_chunked`."""
    if use_fla is None:
        use_fla = HAS_FLA and q.is_cuda
    if use_fla and _fla_chunk_linear_attn is not None:
        global _FLA_WARNED
        try:
            fq = q_map(q) if q_map is not None else q
            fk = k_map(k) if k_map is not None else k
            fk, vv = _mask_keys(fk, v, key_valid)
            return _linear_attention_fla(fq, fk, vv, eps, initial_state)
        except Exception as exc:  # pragma: no cover - GPU only
            if not _FLA_WARNED:
                warnings.warn(f"fla chunk_linear_attn failed ({exc!r}); using the PyTorch chunked kernel")
                _FLA_WARNED = True
    return linear_attention_chunked(
        q,
        k,
        v,
        chunk_size=chunk_size,
        eps=eps,
        initial_state=initial_state,
        return_state=True,
        key_valid=key_valid,
        segment_size=segment_size,
        q_map=q_map,
        k_map=k_map,
    )
