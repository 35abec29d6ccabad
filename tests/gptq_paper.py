"""GPTQ as published, written from the paper for the tests (not from frontier's code).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), Algorithm 1 with its three ingredients: a fixed column
order, lazy batch updates in blocks of B columns, and the Cholesky form of the inverse Hessian
(H = 2 X Xᵀ + λI, λ = 1% of the mean diagonal). Group-wise quantization (the paper's section 4
"grouping"): the grid of a group of g consecutive columns is chosen from the current (already
error-corrected) weights when the group's first column is reached.

The grid is the paper's min-max asymmetric grid, as in its released quantizer: the range is
[min(w, 0), max(w, 0)] (zero is always on the grid), scale = range / (2^b - 1), integer zero
point round(-min / scale). Symmetric: scale = 2·max|w| / (2^b - 1), zero (2^b) / 2 (that
quantizer's symmetric convention; frontier's differs, see tensors.choose_qparams).
"""
from __future__ import annotations

import torch


def paper_grid(block: torch.Tensor, bits: int, symmetric: bool):
    """(scale, zero) per row of `block` [N, g]."""
    maxq = 2 ** bits - 1
    xmin = torch.minimum(block.min(dim=1).values, torch.zeros(block.shape[0]))
    xmax = torch.maximum(block.max(dim=1).values, torch.zeros(block.shape[0]))
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero], xmax[both_zero] = -1.0, 1.0
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def paper_quant(col: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(col / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def gptq_paper(w: torch.Tensor, x: torch.Tensor, bits: int, group_size=None, symmetric: bool = False,
               block: int = 32, percdamp: float = 0.01) -> torch.Tensor:
    """Dequantized GPTQ weight of w [N, K] calibrated on inputs x [T, K] (Algorithm 1)."""
    W = w.double().clone()
    n, k = W.shape
    g = group_size or k
    assert k % g == 0 and (g % block == 0 or block % g == 0), "groups must start at a block boundary"
    X = x.double()
    H = 2.0 * X.T @ X / X.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    # the upper Cholesky factor of H^-1 carries every row of the sequential inverse updates
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i in range(0, k, block):
        j2 = min(i + block, k)
        E = torch.zeros(n, j2 - i, dtype=W.dtype)
        for j in range(i, j2):
            if j % g == 0:  # the group's grid, from its current weights
                scale, zero = paper_grid(W[:, j:j + g], bits, symmetric)
            Q[:, j] = paper_quant(W[:, j], scale, zero, bits)
            E[:, j - i] = (W[:, j] - Q[:, j]) / Hinv[j, j]
            W[:, j:j2] -= E[:, j - i:j - i + 1] @ Hinv[j:j + 1, j:j2]
        W[:, j2:] -= E @ Hinv[i:j2, j2:]
    return Q.float()
