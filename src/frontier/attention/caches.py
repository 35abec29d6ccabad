"""Transformers cache layers of the swapped attention modules, and how a module claims its layer.

On first use with a transformers ``Cache`` a module replaces ``cache.layers[layer_idx]`` by the
layer class it needs (``SlidingWindowStateLayer`` -- a ``DynamicSlidingWindowLayer`` that also
keeps key validity --, ``LinearStateLayer``, or a sparse/LoLCATs layer), unless it already is one.
generate() with the default ``DynamicCache`` therefore works without touching
``model.config.layer_types``.

Mask sizes. transformers builds one mask per layer type (full, sliding) against the first cache
layer of that type. A swapped module reads only the validity of its new keys from its mask, but a
layer the surgery kept (a hybrid's softmax layers, whatever family) needs a mask sized for its own
keys. So a frontier layer reports the mask sizes and ``is_sliding`` of the layer it replaced
(:class:`FamilyMaskSizes`): a mask built against it has the sizes the family's layer would have
asked for, whichever layer comes first.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

__all__ = [
    "FamilyMaskSizes",
    "KeyValidityMixin",
    "LinearStateLayer",
    "SlidingWindowStateLayer",
    "ensure_cache_layer",
]


class FamilyMaskSizes:
    """Mask sizes as reported by the cache layer this one replaced: a full layer (``mask_window``
    None: ``(tokens + q, 0)``) or a sliding one of window ``mask_window`` (transformers'
    ``DynamicSlidingWindowLayer`` arithmetic). Needs ``cumulative_length`` (tokens seen)."""

    mask_window: int | None = None

    @property
    def is_sliding(self) -> bool:  # type: ignore[override]
        return self.mask_window is not None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen, w = int(self.cumulative_length), self.mask_window
        if w is None or seen < w:
            return seen + query_length, 0
        return w - 1 + query_length, seen - w + 1

# ----------------------------------------------------------------------------------------------
# cache layers
# ----------------------------------------------------------------------------------------------


class LinearStateLayer(FamilyMaskSizes, CacheLayerMixin):
    """Fixed-size recurrent state of a causal linear-attention layer, as a transformers cache layer.

    Holds ``S: [B, Hkv, F, Dv]`` and ``z: [B, Hkv, F]`` (float32, or float64 for float64 inputs) and
    ``cumulative_length`` (tokens seen, padding included) so that ``Cache.get_seq_length()`` and
    hence generate()'s position ids work. Mask sizes: those of the layer it replaced
    (:class:`FamilyMaskSizes`); this layer reads only the validity of its new keys from its mask.
    """

    _layer_type = "frontier_linear"
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.S: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.cumulative_length = 0
        self.device = None

    def __repr__(self):
        return f"{self.__class__.__name__}(tokens={self.cumulative_length})"

    # --- abstract API of CacheLayerMixin -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "LinearStateLayer holds a linear-attention state, not keys/values: a softmax attention "
            "module wrote into a layer owned by a linear-attention module"
        )

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    # --- state -------------------------------------------------------------------------------
    def get_state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.S is None:
            return None
        return self.S, self.z

    def update_state(self, state: tuple[torch.Tensor, torch.Tensor], num_new_tokens: int) -> None:
        self.S, self.z = state
        self.device = self.S.device
        self.cumulative_length += int(num_new_tokens)
        self.is_initialized = True

    def state_bytes(self) -> int:
        if self.S is None:
            return 0
        return self.S.numel() * self.S.element_size() + self.z.numel() * self.z.element_size()

    # --- housekeeping ------------------------------------------------------------------------
    def reset(self) -> None:
        self.S = self.z = None
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):
        if self.S is not None:
            self.S = self.S.to("cpu", non_blocking=True)
            self.z = self.z.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.S is not None and self.S.device != self.device:
            self.S = self.S.to(self.device, non_blocking=True)
            self.z = self.z.to(self.device, non_blocking=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.S is not None:
            self.S = self.S.index_select(0, beam_idx.to(self.S.device))
            self.z = self.z.index_select(0, beam_idx.to(self.z.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.S is not None:
            self.S = self.S.repeat_interleave(repeats, dim=0)
            self.z = self.z.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.S is not None:
            self.S = self.S[indices, ...]
            self.z = self.z[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise RuntimeError("a linear-attention state cannot be cropped (no per-token history is kept)")


class KeyValidityMixin:
    """Keeps a ``[B, n]`` bool ``key_valid`` buffer beside a transformers KV cache layer's keys:
    the layer starts empty, ``_append_with_validity`` gives the cached keys followed by new ones,
    ``update`` goes through the subclass's ``update_with_validity`` and the batch operations of
    beam search / multiple sequences apply to the buffer too."""

    key_valid: torch.Tensor | None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.key_valid = torch.ones(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)

    def _append_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached keys, values and validity followed by the new ones (``key_valid`` None: all
        valid), initializing the layer on first use; stores nothing."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        if key_valid is None:
            key_valid = torch.ones(B, q, dtype=torch.bool, device=key_states.device)
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        full_valid = torch.cat([self.key_valid, key_valid.to(torch.bool)], dim=-1)
        return full_k, full_v, full_valid

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values, _ = self.update_with_validity(key_states, value_states, kwargs.get("key_valid"))
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.key_valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_valid is not None and self.key_valid.numel() > 0:
            self.key_valid = self.key_valid.index_select(0, beam_idx.to(self.key_valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[indices, ...]


class SlidingWindowStateLayer(FamilyMaskSizes, KeyValidityMixin, DynamicSlidingWindowLayer):
    """``DynamicSlidingWindowLayer`` that also keeps a ``[B, n]`` bool validity buffer for its keys.

    Stores the last ``window - 1`` keys/values (bounded); ``update_with_validity`` returns the cached
    keys followed by the new ones, with their validity. Mask sizes: those of the layer it replaced.
    """

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.key_valid: torch.Tensor | None = None

    def update_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        full_k, full_v, full_valid = self._append_with_validity(key_states, value_states, key_valid)
        self.cumulative_length += key_states.shape[-2]
        keep = self.sliding_window - 1
        start = max(full_k.shape[-2] - keep, 0)
        self.keys = full_k[:, :, start:]
        self.values = full_v[:, :, start:]
        self.key_valid = full_valid[:, start:]
        return full_k, full_v, full_valid

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise RuntimeError("SlidingWindowStateLayer does not support crop (assisted decoding)")

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return False


def ensure_cache_layer(cache, layer_idx: int, cls, **kwargs):
    """Return ``cache.layers[layer_idx]`` as an instance of ``cls``, replacing an empty layer if needed
    (the new layer reports the replaced layer's mask sizes: :class:`FamilyMaskSizes`)."""
    if not hasattr(cache, "layers"):
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a transformers Cache with .layers")
    layers = cache.layers
    while len(layers) <= layer_idx:
        rep = getattr(cache, "layer_class_to_replicate", None)
        layers.append(rep() if rep is not None else DynamicLayer())
    layer = layers[layer_idx]
    window = kwargs.get("sliding_window")
    if isinstance(layer, cls) and (window is None or getattr(layer, "sliding_window", None) == window):
        return layer
    seen = 0
    if isinstance(layer, CacheLayerMixin):
        try:
            seen = layer.get_seq_length()
        except Exception:
            seen = 0
    elif isinstance(layer, LinearAttentionCacheLayerMixin):
        seen = int(any(layer.has_previous_state.values()))
    if seen:
        raise RuntimeError(
            f"cache layer {layer_idx} is a {type(layer).__name__} that already holds tokens; a "
            f"{cls.__name__} is needed for this attention module (was the cache filled by another model?)"
        )
    new = cls(**kwargs)
    if isinstance(new, FamilyMaskSizes):
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        new.mask_window = None if window is None else int(window)
    layers[layer_idx] = new
    return new


_ensure_cache_layer = ensure_cache_layer  # the name the variant modules import

