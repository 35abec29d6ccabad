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

Kernels, references, layout and position conventions, cost: :mod:`.sparse_kernels`
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from ..cache_layer import TensorMapLayerMixin
from .caches import FamilyMaskSizes
from .modules import FrontierAttention, KeyValidityMixin, _ensure_cache_layer
from .sparse_kernels import (
    _SINK_QUERY_BLOCK,
    _gather_seq,
    block_sparse_attention,
    block_sparse_reference,
    first_valid_offsets,
    sink_window_attention,
    sink_window_reference,
    topk_attention,
    topk_reference,
)

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


class GlobalLocalStateLayer(FamilyMaskSizes, TensorMapLayerMixin, CacheLayerMixin):
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

    def _map_tensors(self, fn) -> None:  # for TensorMapLayerMixin
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, fn(getattr(self, name)))

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

    def update_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.keys, self.values, self.key_valid = self._append_with_validity(key_states, value_states, key_valid)
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
