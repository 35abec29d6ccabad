"""Replacement attention modules for HF decoder layers, and the cache layers they keep state in.

Both modules keep the original ``q_proj/k_proj/v_proj/o_proj`` module objects under the same
names (state dicts load strictly; quantized or LoRA-wrapped Linears are just called), apply the
model's own RoPE to q/k, and follow transformers' attention-module call convention::

    forward(hidden_states, position_embeddings=(cos, sin), attention_mask=None, cache=None, **kw)
        -> (out, None)

Caching: on first use with a transformers ``Cache`` a module replaces ``cache.layers[layer_idx]``
by the layer class it needs (``SlidingWindowStateLayer`` -- a ``DynamicSlidingWindowLayer`` that
also keeps key validity -- or ``LinearStateLayer``), unless it already is one. generate() with the
default ``DynamicCache`` therefore works without touching ``model.config.layer_types``.

Padding: the model's mask (None, 4-D bool with True = attend, or 4-D additive float with 0 =
attend, or a 2-D padding mask) is only used to read which of the NEW keys are valid: the diagonal
of its last ``q`` x ``q`` block (query ``i`` sees key ``i`` iff key ``i`` is not padding). The
diagonal is used rather than the last query row because it stays right when the model builds a
sliding-window mask (Mistral's ``config.sliding_window``) shorter than the prompt, and for right
padding. Validity of cached keys is kept in the cache layer (window layer: a bool buffer beside
the keys; linear layer: invalid keys never enter the state). Positions are key indices, so a
left-padded row equals the same row run alone (with position ids from the padding mask, as
generate() makes them).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

from . import kernels as K

__all__ = [
    "FrontierAttention",
    "KeyValidityMixin",
    "LinearAttention",
    "LinearStateLayer",
    "SlidingWindowAttention",
    "SlidingWindowStateLayer",
    "key_validity",
]


# ----------------------------------------------------------------------------------------------
# cache layers
# ----------------------------------------------------------------------------------------------


class LinearStateLayer(CacheLayerMixin):
    """Fixed-size recurrent state of a causal linear-attention layer, as a transformers cache layer.

    Holds ``S: [B, Hkv, F, Dv]`` and ``z: [B, Hkv, F]`` (float32, or float64 for float64 inputs) and
    ``cumulative_length`` (tokens seen, padding included) so that ``Cache.get_seq_length()`` and
    hence generate()'s position ids work. ``get_mask_sizes(q) == (q, cumulative_length)``: masks
    built against this layer cover only the new tokens, which is all this layer reads from them
    (``is_sliding = True`` keeps a hybrid's masks sized for its softmax layers).
    """

    _layer_type = "frontier_linear"
    # "sliding" for transformers' mask creation: in a hybrid, the causal mask is then built against
    # the first softmax (non-sliding) layer, whose keys it must cover; this layer only reads the
    # validity of the new keys, which any mask that covers them provides.
    is_sliding = True
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

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.cumulative_length

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
    ``update`` goes through the subclass's ``update_with_validity`` and the batch operations of
    beam search / multiple sequences apply to the buffer too."""

    key_valid: torch.Tensor | None

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


class SlidingWindowStateLayer(KeyValidityMixin, DynamicSlidingWindowLayer):
    """``DynamicSlidingWindowLayer`` that also keeps a ``[B, n]`` bool validity buffer for its keys.

    Stores the last ``window - 1`` keys/values (bounded); ``update_with_validity`` returns the cached
    keys followed by the new ones, with their validity.
    """

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.key_valid: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.key_valid = torch.ones(key_states.shape[0], 0, dtype=torch.bool, device=key_states.device)

    def update_with_validity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        if key_valid is None:
            key_valid = torch.ones(B, q, dtype=torch.bool, device=key_states.device)
        self.cumulative_length += q
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        full_valid = torch.cat([self.key_valid, key_valid.to(torch.bool)], dim=-1)
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


def _ensure_cache_layer(cache, layer_idx: int, cls, **kwargs):
    """Return ``cache.layers[layer_idx]`` as an instance of ``cls``, replacing an empty layer if needed."""
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
    layers[layer_idx] = new
    return new


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------


def key_validity(attention_mask, q_len: int) -> torch.Tensor | None:
    """``[B, q_len]`` bool validity of the new keys read from the model's mask, or None (all valid).

    Accepts None, a 2-D padding mask ``[B, kv]`` (1 = token), or a 4-D ``[B, 1|H, q, kv]`` mask,
    bool (True = attend) or additive float (0 = attend). For a 4-D mask the diagonal of the last
    ``q`` x ``q`` block is read; a mask with a single query row uses its last ``q`` columns.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"unsupported attention mask type {type(attention_mask).__name__} (flex BlockMask?); "
            "use attn_implementation='sdpa' or 'eager'"
        )
    m = attention_mask
    if m.dim() == 2:
        valid = m[:, -q_len:].to(torch.bool)
    elif m.dim() == 4:
        m = m[:, 0]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        Q, KV = allowed.shape[-2], allowed.shape[-1]
        if KV < q_len:
            raise ValueError(f"attention mask covers {KV} keys, fewer than the {q_len} new tokens")
        if Q == q_len:
            idx = torch.arange(q_len, device=m.device)
            valid = allowed[:, idx, KV - q_len + idx]
        else:
            valid = allowed[:, -1, KV - q_len :]
    else:
        raise ValueError(f"attention mask must be 2-D or 4-D, got shape {tuple(m.shape)}")
    if bool(valid.all()):
        return None
    return valid


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    d = (student.float() - teacher.float()).pow(2)
    if valid is None:
        return d.mean()
    m = valid[..., None].to(torch.bool)
    n = m.sum() * d.shape[-1]
    return torch.where(m, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum() / n.clamp(min=1)


def _rope_function(orig: nn.Module):
    mod = sys.modules.get(type(orig).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------


class FrontierAttention(nn.Module):
    """Common part of the swapped attention modules (projections, RoPE, masks, attention transfer).

    ``transfer_mode = True``: forward computes both the variant (student) and standard causal
    softmax attention with the same projections (teacher, SDPA, padding respected), sets
    ``self.transfer_loss = MSE(student_out, teacher_out.detach())`` over non-padding positions of
    the module outputs (after ``o_proj``; fp32 scalar) and returns the teacher's output. The
    teacher only sees the tokens of the current call, so transfer mode requires an empty cache
    (or none); the student still updates its cache.
    """

    kind = "base"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__()
        config = orig.config
        self.config = config
        self.layer_idx = orig.layer_idx
        self.head_dim = int(orig.head_dim)
        self.num_key_value_groups = int(orig.num_key_value_groups)
        self.num_heads = int(getattr(config, "num_attention_heads"))
        self.num_key_value_heads = self.num_heads // self.num_key_value_groups
        self.scaling = float(orig.scaling)
        self.attention_dropout = float(getattr(orig, "attention_dropout", 0.0) or 0.0)
        self.is_causal = True
        self.q_proj = orig.q_proj
        self.k_proj = orig.k_proj
        self.v_proj = orig.v_proj
        self.o_proj = orig.o_proj
        self.cfg = dict(cfg)
        self.transfer_mode = False
        self.transfer_loss: torch.Tensor | None = None
        self._rope = _rope_function(orig)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer_idx={self.layer_idx}, cfg={self.cfg}"

    # subclasses: attention over heads -> [B, Hq, L, Dv]
    def _attend(self, q, k, v, valid, cache):  # pragma: no cover - abstract
        raise NotImplementedError

    def _cache_layer_length(self, cache) -> int:
        if cache is None or not hasattr(cache, "layers") or len(cache.layers) <= self.layer_idx:
            return 0
        layer = cache.layers[self.layer_idx]
        return layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else 0

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if cache is None:
            cache = kwargs.get("past_key_values")
        B, L, _ = hidden_states.shape
        hidden_shape = (B, L, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = self._rope(q, k, cos, sin)
        valid = key_validity(attention_mask, L)

        if self.transfer_mode and self._cache_layer_length(cache) > 0:
            raise RuntimeError(
                "transfer_mode needs an empty cache: the softmax teacher only sees the current call's tokens"
            )
        out = self._attend(q, k, v, valid, cache)
        student = self.o_proj(out.transpose(1, 2).reshape(B, L, -1))
        if not self.transfer_mode:
            self.transfer_loss = None
            return student, None
        t = K.softmax_attention(q, k, v, scale=self.scaling, key_valid=valid)
        teacher = self.o_proj(t.transpose(1, 2).reshape(B, L, -1))
        self.transfer_loss = _masked_mse(student, teacher.detach(), valid)
        return teacher, None


class SlidingWindowAttention(FrontierAttention):
    """Softmax over the last ``window`` keys (query included): key j visible to query i iff
    ``i - window < j <= i``. Prefill: SDPA blockwise over query blocks (banded masks, never an
    ``L x L`` mask). Decode: ``SlidingWindowStateLayer`` keeps the last ``window - 1`` keys."""

    kind = "sliding_window"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__(orig, cfg)
        self.window = int(cfg["window"])
        self.block_size = int(cfg.get("block_size", 128))

    def _attend(self, q, k, v, valid, cache):
        if cache is None:
            return K.sliding_window_attention(
                q, k, v, self.window, scale=self.scaling, key_valid=valid, block_size=self.block_size
            )
        layer = _ensure_cache_layer(cache, self.layer_idx, SlidingWindowStateLayer, sliding_window=self.window)
        full_k, full_v, full_valid = layer.update_with_validity(k, v, valid)
        kv_valid = None if bool(full_valid.all()) else full_valid
        return K.sliding_window_attention(
            q, full_k, full_v, self.window, scale=self.scaling, key_valid=kv_valid, block_size=self.block_size
        )


class LinearAttention(FrontierAttention):
    """Normalised causal linear attention ``phi(q_i) S_i / (phi(q_i) z_i + eps)`` on RoPE'd q/k.

    Prefill: chunked form (fla's kernel on CUDA when importable); decode (one new token with a
    state): recurrent step. The state lives in a ``LinearStateLayer`` per kv head (GQA groups
    share it; K/V are never expanded in the PyTorch path).
    """

    kind = "linear"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__(orig, cfg)
        self.chunk_size = int(cfg.get("chunk_size", 64))
        self.eps = float(cfg.get("eps", 1e-6))
        self.segment_size = int(cfg.get("segment_size", 512))
        w = orig.q_proj.weight
        dtype = w.dtype if torch.is_floating_point(torch.empty((), dtype=w.dtype)) else torch.float32
        from .featuremaps import make_feature_map

        self.feature_map = make_feature_map(
            cfg, self.head_dim, self.num_heads, self.num_key_value_heads, dtype=dtype, device=w.device
        )

    def _attend(self, q, k, v, valid, cache):
        fm = self.feature_map
        state = None
        layer = None
        start = 0
        if cache is not None:
            layer = _ensure_cache_layer(cache, self.layer_idx, LinearStateLayer)
            state = layer.get_state()
            start = layer.cumulative_length
        L = q.shape[2]
        # cosFormer needs absolute positions, and a redrawing Performer must map all keys of a call
        # with the same features: map up front instead of segment by segment inside the kernel
        if fm.position_dependent or getattr(fm, "redraw_interval", 0):
            pos = torch.arange(start, start + L, device=q.device)
            fq, fk = fm.forward_q(q, pos), fm.forward_k(k, pos)
            out, new_state = K.linear_attention_prefill(
                fq, fk, v, chunk_size=self.chunk_size, eps=self.eps, initial_state=state, key_valid=valid,
                segment_size=self.segment_size,
            )
        elif state is not None and L == 1:
            out, new_state = K.linear_attention_recurrent_step(
                fm.forward_q(q), fm.forward_k(k), v, state, eps=self.eps, key_valid=valid
            )
        else:  # the feature maps run inside the kernel, segment by segment
            out, new_state = K.linear_attention_prefill(
                q,
                k,
                v,
                chunk_size=self.chunk_size,
                eps=self.eps,
                initial_state=state,
                key_valid=valid,
                segment_size=self.segment_size,
                q_map=fm.forward_q,
                k_map=fm.forward_k,
            )
        if layer is not None:
            layer.update_state(new_state, q.shape[2])
        return out
