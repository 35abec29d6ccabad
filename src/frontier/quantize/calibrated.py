"""Calibration-based methods, run decoder layer by decoder layer: GPTQ and AWQ.

Calibration data: `calib_samples` windows of `calib_seq_len` tokens drawn (seeded) from the
training split of the sweep's own corpus (`frontier.data.token_splits(tokenizer, data)[0]`).

Layer-wise ("sequential") like the reference implementations: the inputs of decoder layer 0
are captured once; each layer is calibrated on its inputs, quantized, and then run again
(now quantized) to produce the next layer's inputs, so later layers see the error of
earlier ones. Memory holds one layer's activations and Hessians at a time.

* GPTQ (Frantar et al. 2022): frontier's own implementation (`gptq_codes`, Algorithm 1 with
  lazy batch updates, per-group grids fixed when the group's first column is reached, no
  act-order). torchao 0.18's `prototype.gptq` asserts CUDA and needs `mslk` for int4, and
  llm-compressor 0.14 requires transformers<=5.17 (the project pins 5.24), so neither runs
  here. The codes are stored by `tensors.pack` (CPU int4 kernel, int8 kernel or packed).
* AWQ (Lin et al. 2023): torchao `prototype.awq.AWQConfig` (observe inputs, grid-search a
  per-input-channel scale s = mean|x|^α minimising the layer's output error, quantize W·s,
  keep 1/s as the weight's `act_pre_scale`), on top of frontier's `WeightOnlyConfig`, so the
  result is torchao's CPU int4 kernel tensor at 4 bits/g32-128 and packed codes otherwise.
  Then AWQ's weight clipping (`awq_clip`, the paper's `auto_clip`, which torchao's prototype
  leaves out): per output row and group, the max |w| of the scaled weight shrinks by the grid
  ratio that minimises that group's output error on calibration tokens (q/k projections are
  not clipped, as in the reference); the clipped weight is rounded to nearest.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .tensors import Codes, choose_qparams, pack, quantize_with


# ------------------------------------------------------------------ calibration data
def calibration_ids(tokenizer, data_cfg: dict, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token windows from the training split of the configured corpus."""
    from .. import data

    train_ids, _ = data.token_splits(tokenizer, data_cfg)
    n = train_ids.numel() - seq_len - 1
    if n <= 0:
        raise ValueError(f"calibration needs more than {seq_len} tokens; the corpus has {train_ids.numel()}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n, (samples,), generator=g).tolist()
    return torch.stack([train_ids[s:s + seq_len] for s in starts])


# ------------------------------------------------------------------ layer-by-layer driver
class _Captured(Exception):
    pass


def decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList):
            return mod
    raise TypeError(f"{type(model).__name__}: no decoder layer list found")


def _batch_size(samples: int, cap: int = 8) -> int:
    return max(d for d in range(1, min(cap, samples) + 1) if samples % d == 0)


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor) -> list:
    """[(hidden_states, args, kwargs)] entering decoder layer 0, one per calibration batch."""
    layers = decoder_layers(model)
    captured = []

    def hook(mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(model.parameters()).device
    bs = _batch_size(ids.shape[0])
    try:
        for i in range(0, ids.shape[0], bs):
            try:
                model(input_ids=ids[i:i + bs].to(dev), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer, inputs: list) -> list:
    out = []
    for hidden, args, kwargs in inputs:
        h = layer(hidden, *args, **kwargs)
        out.append((h[0] if isinstance(h, (tuple, list)) else h, args, kwargs))
    return out


def layerwise(model, ids: torch.Tensor, per_layer: Callable) -> None:
    """per_layer(index, layer, run) calibrates and quantizes one layer; run() feeds it its inputs."""
    inputs = layer_inputs(model, ids)
    for i, layer in enumerate(decoder_layers(model)):
        per_layer(i, layer, lambda: run_layer(layer, inputs))
        inputs = run_layer(layer, inputs)


def _linears(layer):
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------ GPTQ
def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size, symmetric: bool,
               damp: float = 0.01, block: int = 128) -> Codes:
    """GPTQ codes of w [N, K] given H = 2/n Σ x xᵀ [K, K] (Algorithm 1, lazy batch updates)."""
    W = w.detach().to(torch.float32).clone()
    n, k = W.shape
    g = group_size or k
    H = hessian.detach().to(torch.float32, copy=True).to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        try:
            Hd = H + (damp * (10 ** attempt)) * mean_diag * torch.eye(k, device=H.device)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except torch.linalg.LinAlgError:
            if attempt == 5:
                raise
    G = k // g
    scale = torch.zeros(n, G, device=W.device)
    zero = torch.zeros(n, G, device=W.device)
    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)

    def params(blk):  # the group's grid (same as RTN's), from its current error-corrected weights
        return choose_qparams(blk, bits, symmetric)

    if g == k:
        scale[:, 0], zero[:, 0] = params(W)
        bs = block
    else:
        bs = g * max(1, block // g)  # a block holds whole groups
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if g != k and col % g == 0:
                scale[:, gi], zero[:, gi] = params(W1[:, i:i + g])
            s, z = scale[:, gi], zero[:, gi]
            wc = W1[:, i]
            q = quantize_with(wc, s, z, bits)
            Q[:, col] = q.to(torch.uint8)
            err = (wc - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Codes(Q, scale, zero, bits, g, symmetric)


def gptq_quantize(model, ids: torch.Tensor, q: dict, device: str = "cpu") -> None:
    """Quantize every decoder linear with GPTQ, layer by layer, in place."""
    bits, gsz, sym = q["bits"], q.get("group_size"), bool(q.get("symmetric", False))
    damp = float(q.get("damp", 0.01))

    def per_layer(i, layer, run):
        lins = _linears(layer)
        stats = {name: [torch.zeros(m.in_features, m.in_features, device=m.weight.device), 0] for name, m in lins}
        hooks = []
        for name, m in lins:
            def hook(mod, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float32)
                st = stats[name]
                tot = st[1] + x.shape[0]
                st[0].mul_(st[1] / tot)
                x = x * math.sqrt(2.0 / tot)
                st[0].addmm_(x.T, x)
                st[1] = tot
            hooks.append(m.register_forward_hook(hook))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        for name, m in lins:
            codes = gptq_codes(m.weight, stats[name][0], bits, gsz, sym, damp)
            t, _ = pack(codes, m.weight.dtype, m.weight.device.type)
            m.weight = nn.Parameter(t, requires_grad=False)
            del stats[name]

    layerwise(model, ids, per_layer)


# ------------------------------------------------------------------ AWQ
def repack(w):
    """A `PackedIntxTensor` moved to the low-bit kernel format where one exists (same codes,
    same activation pre-scale)."""
    from .tensors import PackedIntxTensor

    if not isinstance(w, PackedIntxTensor):
        return w
    zero = (w.zero_point.float() if w.zero_point is not None
            else torch.full_like(w.scale, 2 ** (w.bits - 1), dtype=torch.float32))
    codes = Codes(w.codes(), w.scale.float(), zero, w.bits, w.group_size, w.zero_point is None)
    t, _ = pack(codes, w.dtype, w.device.type)
    if isinstance(t, PackedIntxTensor):
        t = w
    elif w.act_pre_scale is not None:
        t.act_pre_scale = w.act_pre_scale
    return t


AWQ_NO_CLIP = ("q_proj", "k_proj", "query", "key")  # their errors are amplified by the q·k product


@torch.no_grad()
def awq_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size, symmetric: bool, grid: int = 20,
             max_shrink: float = 0.5, row_batch: int = 256) -> torch.Tensor:
    """AWQ weight clipping (Lin et al. 2023, `auto_clip`): `w` [N, K] clamped per output row and
    group to ±max|w|·(1 - i/grid), i < max_shrink·grid, choosing for each group the i whose
    round-to-nearest codes give the least squared error of that group's partial output x_g·w_gᵀ
    over the calibration tokens `x` [T, K]. i = 0 is plain RTN, so no group gets worse on `x`."""
    from .rtn import rtn_codes

    n, k = w.shape
    g = group_size or k
    W = w.detach().to(torch.float32).reshape(n, k // g, g)
    X = x.detach().to(torch.float32).reshape(-1, k // g, g)  # [T, G, g]
    out = torch.empty_like(W)
    for r0 in range(0, n, row_batch):
        Wb = W[r0:r0 + row_batch]  # [n_b, G, g]
        ref = torch.einsum("tgk,ngk->tng", X, Wb)
        org_max = Wb.abs().amax(-1, keepdim=True)  # [n_b, G, 1]
        best_err = torch.full(org_max.shape[:2], float("inf"))
        best = org_max.clone()
        for i in range(max(1, int(max_shrink * grid))):
            mv = org_max * (1 - i / grid)
            cw = torch.maximum(torch.minimum(Wb, mv), -mv)
            wq = rtn_codes(cw.reshape(-1, k), bits, g, symmetric).dequantize().reshape(cw.shape)
            err = (torch.einsum("tgk,ngk->tng", X, wq) - ref).pow(2).mean(0)  # [n_b, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(-1), mv, best)
        out[r0:r0 + row_batch] = torch.maximum(torch.minimum(Wb, best), -best)
    return out.reshape(n, k).to(w.dtype)


def _calib_tokens(inputs: list, k: int, tokens: int) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, k) for t in inputs])
    step = max(1, x.shape[0] // tokens)
    return x[::step][:tokens]


def awq_quantize(model, ids: torch.Tensor, q: dict, device: str = "cpu") -> None:
    """Quantize every decoder linear with torchao's AWQ over frontier's weight-only RTN, layer by layer."""
    from torchao.prototype.awq import AWQConfig
    from torchao.prototype.awq.core import AWQObservedLinear
    from torchao.quantization import quantize_

    from .rtn import WeightOnlyConfig, rtn_codes

    # the grid search quantizes each weight `awq_grid` times: packed codes with a plain fp matmul
    # are fast there; the chosen codes are repacked for the low-bit kernel afterwards
    bits, gsz, sym = q["bits"], q.get("group_size"), bool(q.get("symmetric", False))
    base = WeightOnlyConfig(bits=bits, group_size=gsz, symmetric=sym, algorithm="rtn", kernel=False)
    grid = int(q.get("awq_grid", 20))
    clip = bool(q.get("awq_clip", True))

    def per_layer(i, layer, run):
        quantize_(layer, AWQConfig(base, step="prepare", scale_search_space_size=grid),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
        run()
        observed = {}
        for name, m in _linears(layer):
            if clip and not any(t in name for t in AWQ_NO_CLIP):
                observed[name] = (m.weight.detach().clone(), _calib_tokens(m.act_obs.inputs, m.in_features, 512))
        with torch.no_grad():
            quantize_(layer, AWQConfig(base, step="convert", scale_search_space_size=grid),
                      filter_fn=lambda m, fqn: isinstance(m, AWQObservedLinear))
        for name, m in _linears(layer):
            w = m.weight
            if name in observed:  # clip the scaled weight W·s against the scaled inputs x/s
                w0, x = observed.pop(name)
                pre = w.act_pre_scale.to(torch.float32)
                clipped = awq_clip(w0.to(torch.float32) / pre, x.to(torch.float32) * pre, bits, gsz, sym)
                w, _ = pack(rtn_codes(clipped, bits, gsz, sym), w0.dtype, w0.device.type)
                w.act_pre_scale = m.weight.act_pre_scale
            m.weight = nn.Parameter(repack(w), requires_grad=False)

    layerwise(model, ids, per_layer)
