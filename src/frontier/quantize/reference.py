"""Plain-PyTorch reference implementations of the quantization methods, written for clarity.

The tests check each production path (torchao, bitsandbytes, frontier's packed tensors)
against these: same error level on random matrices, and exact agreement where the
method is deterministic and the production path stores the same codes. Each returns the
dequantized weight (float32), group by group, with explicit loops where that reads better.
(RTN's grid is also checked against torchao's `quant_primitives`, and GPTQ against the paper's
Algorithm 1 in `tests/gptq_paper.py`.)
"""
from __future__ import annotations

import torch

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def _groups(w: torch.Tensor, group_size):
    n, k = w.shape
    g = group_size or k
    assert k % g == 0, (k, g)
    return [w[:, j:j + g] for j in range(0, k, g)], g


def rtn(w: torch.Tensor, bits: int, group_size=None, symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest, per output row and group of input columns.

    symmetric: scale = max|w| / (2**(bits-1) - 1), codes in [-2**(bits-1), 2**(bits-1) - 1].
    asymmetric: the range [min(w, 0), max(w, 0)] (it always holds 0, so one-sign groups are
    not clipped), scale = range / (2**bits - 1), integer zero point = round(-min / scale).
    """
    w = w.float()
    out = []
    blocks, _ = _groups(w, group_size)
    for blk in blocks:
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = (blk.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
            q = torch.clamp(torch.round(blk / scale), -qmax - 1, qmax)
            out.append(q * scale)
        else:
            qmax = 2 ** bits - 1
            lo = blk.amin(dim=1, keepdim=True).clamp(max=0)
            hi = blk.amax(dim=1, keepdim=True).clamp(min=0)
            scale = ((hi - lo) / qmax).clamp(min=1e-12)
            zero = torch.round(-lo / scale)
            q = torch.clamp(torch.round(blk / scale) + zero, 0, qmax)
            out.append((q - zero) * scale)
    return torch.cat(out, dim=1)


def hqq(w: torch.Tensor, bits: int, group_size: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> torch.Tensor:
    """Half-quadratic quantization (Badri & Shaji 2023): asymmetric codes whose zero point is
    fitted to minimise an l_p (p < 1) reconstruction error by alternating a generalized
    soft-threshold (shrinkage) step on the error and a closed-form zero-point update."""
    w = w.float()
    qmax = 2 ** bits - 1
    out = []
    blocks, _ = _groups(w, group_size)
    for blk in blocks:
        lo, hi = blk.amin(dim=1, keepdim=True), blk.amax(dim=1, keepdim=True)
        inv_scale = (qmax / (hi - lo)).clamp(max=2e4)  # codes per unit
        zero = -lo * inv_scale
        best_err, best = float("inf"), None
        for _ in range(iters):
            q = torch.clamp(torch.round(blk * inv_scale + zero), 0, qmax)
            rec = (q - zero) / inv_scale
            err = blk - rec
            # shrinkage of the error (prox of |.|^p), then the zero point that fits what remains
            e = torch.sign(err) * torch.relu(err.abs() - (1.0 / beta) * err.abs().clamp(min=1e-8).pow(p - 1))
            zero = torch.mean(q - (blk - e) * inv_scale, dim=1, keepdim=True)
            beta *= kappa
            cur = (blk - rec).abs().mean().item()
            if cur < best_err:
                best_err, best = cur, rec
            else:
                break
        out.append(best)
    return torch.cat(out, dim=1)


def nf4(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """NF4: per block of `block_size` consecutive weights (row-major), scale by max|w| and
    round to the nearest of the 16 NormalFloat levels. (No double quantization of the scales.)"""
    levels = torch.tensor(NF4_LEVELS)
    flat = w.float().reshape(-1, block_size)
    absmax = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    x = flat / absmax
    idx = (x.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[idx] * absmax).reshape(w.shape)


def effective_bits(bits: int, group_size, k: int, scale_bits: int = 16, zero: bool = True) -> float:
    """Bits per weight including one scale (and zero point) per group."""
    g = group_size or k
    return bits + (scale_bits * (2 if zero else 1)) / g


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.float() - w_hat.float()).norm() / w.float().norm().clamp(min=1e-12))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X Ŵ^T|| / ||X W^T||: the error GPTQ and AWQ minimise."""
    ref = x.float() @ w.float().T
    return float((ref - x.float() @ w_hat.float().T).norm() / ref.norm().clamp(min=1e-12))


def w8a8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x wᵀ with int8 weights (symmetric, per output row) and int8 activations (symmetric,
    per token, computed on the fly), integer products rescaled in float."""
    ws = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    wq = torch.clamp(torch.round(w.float() / ws), -128, 127)
    x2 = x.float().reshape(-1, x.shape[-1])
    xs = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    xq = torch.clamp(torch.round(x2 / xs), -128, 127)
    y = (xq @ wq.T) * xs * ws.T
    return y.reshape(*x.shape[:-1], w.shape[0])


__all__ = ["NF4_LEVELS", "rtn", "hqq", "nf4", "w8a8_linear", "effective_bits", "relative_error", "output_error"]
