"""Shared batch operations of transformers cache layers that keep their state as several tensors.

Beam search reordering, ``num_return_sequences`` repeats, batch selection and CPU offload /
prefetch all apply one function to every batch-first state tensor of a layer; the layers
(:class:`frontier.kvcache.Int8KVLayer`, :class:`frontier.kivi.KiviLayer`,
:class:`frontier.attention.sparse.GlobalLocalStateLayer`) differ only in which tensors they hold.
"""

from __future__ import annotations

import torch

__all__ = ["DequantWorkspace", "TensorMapLayerMixin", "scratch"]


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


class DequantWorkspace:
    """Scratch shared by the layers of one quantized KV cache (:class:`frontier.kivi.KiviLayer`,
    :class:`frontier.kvcache.Int8KVLayer`): the dense keys/values a decode step attends to and
    the intermediate codes, each one buffer sized for the largest layer and reused by the next
    layer's ``update`` (layers run one after another and attention consumes its keys/values before
    the next layer's update). Fresh multi-megabyte tensors per layer and step cost more in page
    faults than the dequantization itself on CPU. It holds one layer's dense K/V, not a cache: it
    is not counted in ``state_bytes`` and is overwritten every layer."""

    GROWTH = 1.25  # decode grows L by one token per step: reallocate rarely

    def __init__(self):
        self._bufs: dict = {}

    def take(self, role: str, shape, dtype, device) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buf = torch.empty(max(numel, int(numel * self.GROWTH)), dtype=dtype, device=device)
            self._bufs[role] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def scratch(workspace, role: str, shape, dtype, device) -> torch.Tensor:
    """``workspace.take(...)``, or a fresh tensor when there is no workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.take(role, shape, dtype, device)
