"""Shared batch operations of transformers cache layers that keep their state as several tensors.

Beam search reordering, ``num_return_sequences`` repeats, batch selection and CPU offload /
prefetch all apply one function to every batch-first state tensor of a layer; the layers
(:class:`frontier.kvcache.Int8KVLayer`, :class:`frontier.kivi.KiviLayer`,
:class:`frontier.attention.sparse.GlobalLocalStateLayer`) differ only in which tensors they hold.
"""

from __future__ import annotations

import torch

__all__ = ["TensorMapLayerMixin"]


class TensorMapLayerMixin:
    """Beam/batch operations and offload/prefetch of a cache layer, through its ``_map_tensors``.

    The subclass defines ``_map_tensors(fn)``: replace each of its state tensors ``t`` by
    ``fn(t)`` (nothing while it holds none). Put the mixin before the transformers layer class in
    the bases so that these methods override the layer's own (which know only ``keys``/``values``).
    """

    def _map_tensors(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices, ...])

    def offload(self):
        self._map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map_tensors(lambda t: t.to(self.device, non_blocking=True))
