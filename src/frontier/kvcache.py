"""KV-cache quantization for softmax attention (`quant.kv_bits`: 16 | 8 | 4 | 2).

* 16: the model's own cache (transformers `DynamicCache`, the model dtype).
* 8: `Int8KVLayer` below (per token and head, symmetric absmax, no residual).
* 4 and 2: `frontier.kivi.KiviLayer`, the KIVI recipe (keys per channel in groups of
  `quant.kv_group` tokens, values per token in groups of `kv_group` channels, the
  `quant.kv_residual` most recent tokens in full precision; real packed codes).

`Int8KVLayer` is a `transformers.cache_utils.CacheLayerMixin` (a `DynamicLayer` subclass)
that stores keys and values as int8 with one float32 scale per (batch, head, token) —
symmetric, absmax over head_dim — and dequantizes the whole cache to the model dtype on
read (each `update` returns dequantized keys/values, as transformers' own quantized
layers do; one pass, the C kernel of `frontier.cpu_kernels`, into the cache's shared workspace).
Bytes held per token and head: head_dim + 4, against 2·head_dim (fp16/bf16) or
4·head_dim (fp32): about half, or a quarter.

Use them through `make_cache`:

    cache = kvcache.make_cache(model, kv_bits, group=32, residual=128)   # None when kv_bits == 16
    out = model(input_ids=ids, cache=cache, use_cache=True)
    model.generate(ids, past_key_values=cache, ...)  # or cache=cache

Layers that attention surgery replaced (sliding window, linear) swap their own state layer
in on first use, as they do with a plain `DynamicCache`; only softmax layers keep quantized KV.

Quality under a quantized cache (`chunked_forward`): a forward over L tokens attends in full
precision to the tokens it brings (as KIVI's prefill does), so the evaluation streams its inputs
through the cache in chunks of `eval.kv_chunk` tokens: each chunk attends to the quantized cache
written by the earlier chunks (plus the residual window and its own tokens). Perplexity, MQAR and
the prompts of the generated recall tasks go through it when `quant.kv_bits < 16`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import cpu_kernels
from .cache_layer import DequantWorkspace, TensorMapLayerMixin

KV_BITS = (16, 8, 4, 2)
KV_KEYS = ("kv_bits", "kv_group", "kv_residual")  # quant.* keys read at evaluation only


def quantize_int8(x: torch.Tensor):
    """Symmetric int8 per (…, token) row over the last dim: (codes int8, scale float32 [..., 1])."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32) / 127.0).clamp(min=1e-8)
    q = torch.clamp(torch.round(x.to(torch.float32) / scale), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype, workspace=None, role: str = "x") -> torch.Tensor:
    """codes x scale computed in float32, in ``dtype``; with a ``workspace`` (see
    :class:`frontier.cache_layer.DequantWorkspace`) into its buffers (``role``: which one), the
    same values without allocating."""
    if workspace is None:
        return (q.to(torch.float32) * scale).to(dtype)
    out = workspace.take(role, q.shape, dtype, q.device)
    if cpu_kernels.int8_rows(out, q, scale):  # one pass (the C kernel), the same values
        return out
    f = workspace.take(role if dtype == torch.float32 else "float32", q.shape, torch.float32, q.device)
    f.copy_(q)
    f.mul_(scale)
    if dtype == torch.float32:
        return f
    out.copy_(f)
    return out


class Int8KVLayer(TensorMapLayerMixin, DynamicLayer):
    """A dynamic (growing) KV layer kept as int8 codes + per-token/per-head scales.

    `keys` / `values` hold the int8 codes ([B, H_kv, T, D]); `key_scale` / `value_scale`
    the float32 scales ([B, H_kv, T, 1]).
    """

    is_croppable = True

    def __init__(self, workspace=None, **kwargs):
        super().__init__()
        self.workspace = workspace  # shared by the cache's layers (Int8KVCache); None: fresh tensors
        self.key_scale: Optional[torch.Tensor] = None
        self.value_scale: Optional[torch.Tensor] = None
        self.dtype = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = torch.empty(b, h, 0, d, dtype=torch.int8, device=self.device)
        self.values = torch.empty(b, h, 0, value_states.shape[-1], dtype=torch.int8, device=self.device)
        self.key_scale = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.value_scale = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, ks = quantize_int8(key_states)
        vq, vs = quantize_int8(value_states)
        self.keys = torch.cat([self.keys, kq], dim=-2)
        self.values = torch.cat([self.values, vq], dim=-2)
        self.key_scale = torch.cat([self.key_scale, ks], dim=-2)
        self.value_scale = torch.cat([self.value_scale, vs], dim=-2)
        dtype = key_states.dtype
        grad = torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)
        ws = None if grad else self.workspace
        return (dequantize_int8(self.keys, self.key_scale, dtype, ws, "keys"),
                dequantize_int8(self.values, self.value_scale, dtype, ws, "values"))

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2]

    def state_bytes(self) -> int:
        """Bytes held: int8 codes plus float32 scales."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.key_scale, self.value_scale))

    def reset(self) -> None:
        self.key_scale = self.value_scale = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = abs(tokens_to_remove)
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.key_scale, self.value_scale = self.key_scale[..., :-n, :], self.value_scale[..., :-n, :]

    def _map_tensors(self, fn) -> None:  # for TensorMapLayerMixin
        if self.get_seq_length() > 0:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.key_scale, self.value_scale = fn(self.key_scale), fn(self.value_scale)


class Int8KVCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `Int8KVLayer`s (sliding-window layers of
    the model config stay as transformers builds them)."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.workspace = DequantWorkspace()  # one layer's dense K/V scratch, shared by every layer
        make = functools.partial(Int8KVLayer, workspace=self.workspace)
        if config is None:
            self.layer_class_to_replicate = make
        else:
            self.layers = [make() if type(layer) is DynamicLayer else layer for layer in self.layers]


class KiviCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `frontier.kivi.KiviLayer`s."""

    def __init__(self, config=None, *, bits: int = 2, group: int = 32, residual: int = 128, **kwargs):
        from frontier.kivi import KiviLayer

        super().__init__(config=config, **kwargs)
        self.workspace = DequantWorkspace()  # one layer's dense K/V scratch, shared by every layer
        make = functools.partial(KiviLayer, bits=bits, group=group, residual=residual, workspace=self.workspace)
        if config is None:
            self.layer_class_to_replicate = make
        else:
            self.layers = [make() if type(layer) is DynamicLayer else layer for layer in self.layers]


def kv_spec(quant_cfg: Optional[dict]) -> dict:
    """{"bits", "group", "residual"} of a quant config (defaults: 16, 32, 128)."""
    q = quant_cfg or {}
    return {"bits": int(q.get("kv_bits", 16)), "group": int(q.get("kv_group", 32)),
            "residual": int(q.get("kv_residual", 128))}


def make_cache(model, kv_bits: int, group: int = 32, residual: int = 128):
    """The cache for evaluating `model` at `kv_bits`: None (the model's default DynamicCache) for
    16, an `Int8KVCache` for 8, a `KiviCache` for 4 and 2. Pass it as `cache=` to forward, or to
    `generate`."""
    config = getattr(model, "config", None)
    if kv_bits == 16:
        return None
    if kv_bits == 8:
        return Int8KVCache(config=config)
    if kv_bits in (4, 2):
        return KiviCache(config=config, bits=kv_bits, group=group, residual=residual)
    raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")


def model_cache(model):
    """`make_cache` for the spec evaluate attached to the model (`model.frontier_kv`), or None."""
    spec = getattr(model, "frontier_kv", None) or {}
    return make_cache(model, int(spec.get("bits", 16)), int(spec.get("group", 32)), int(spec.get("residual", 128)))


def streams(model) -> bool:
    """Whether quality metrics of `model` must stream through a quantized cache (kv_bits < 16)."""
    return int((getattr(model, "frontier_kv", None) or {}).get("bits", 16)) < 16


def chunked_forward(model, input_ids, cache, chunk: int, attention_mask=None, upto: Optional[int] = None):
    """Stream `input_ids` [B, T] (or its first `upto` tokens) through `model` in chunks of `chunk`
    tokens on `cache`; yields `(start, end, logits [B, end - start, V])` per chunk. With a
    (left-)padding `attention_mask`, position ids follow `generate`'s rule (cumsum of the mask - 1)."""
    T = int(input_ids.shape[1] if upto is None else upto)
    pos = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    for s in range(0, T, int(chunk)):
        e = min(s + int(chunk), T)
        kw = {} if pos is None else {"attention_mask": attention_mask[:, :e], "position_ids": pos[:, s:e]}
        out = model(input_ids=input_ids[:, s:e], cache=cache, use_cache=True, **kw)
        yield s, e, out.logits


def cache_bytes(cache) -> int:
    """Bytes of a cache's KV state (Int8KVLayer: codes + scales; KiviLayer: packed codes + scales/zeros
    + residual; other layers: keys + values)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "state_bytes"):
            total += int(layer.state_bytes())
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
