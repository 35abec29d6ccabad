"""Replacement attention modules for HF decoder layers.

A swapped module adopts the family's own attention module (its submodules, parameters and
attributes, under the same names: state dicts load strictly; quantized or LoRA-wrapped Linears are
just called) and runs the family's own ``forward``, which computes projections, q/k norms, RoPE and
scaling and then calls frontier's attention function; see :mod:`frontier.attention.families` for
the seam and for what each family brings (soft-caps, local windows). The call convention stays
transformers'::

    forward(hidden_states, position_embeddings=(cos, sin), attention_mask=None, cache=None, **kw)
        -> (out, None)

Caching: :mod:`frontier.attention.caches` (a module claims ``cache.layers[layer_idx]`` on first use).

Padding: the model's mask (None, 4-D bool with True = attend, or 4-D additive float with 0 =
attend, or a 2-D padding mask) is only used to read which of the NEW keys are valid: the diagonal
of its last ``q`` x ``q`` block (query ``i`` sees key ``i`` iff key ``i`` is not padding). The
diagonal is used rather than the last query row because it stays right when the model builds a
sliding-window mask (a local layer's, or Mistral's ``config.sliding_window``) shorter than the
prompt, and for right padding. Validity of cached keys is kept in the cache layer (window layer: a
bool buffer beside the keys; linear layer: invalid keys never enter the state). Positions are key
indices, so a left-padded row equals the same row run alone (with position ids from the padding
mask, as generate() makes them).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from . import kernels as K
from .softmax import sliding_window_attention, softmax_attention
from .caches import (  # noqa: F401  (re-exported: the variant modules and tests import them from here)
    KeyValidityMixin,
    LinearStateLayer,
    SlidingWindowStateLayer,
    _ensure_cache_layer,
)
from .families import FAMILIES, SOFTMAX_KERNEL_MAPS, FamilyConfigView, family_of, softcap_refusal

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


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------

# nn.Module bookkeeping that the adopted module keeps for itself
_MODULE_STATE = {"training", "config"}


def _float_dtype(module: nn.Module) -> torch.dtype:
    """dtype for new parameters: the layer's output projection's, or float32 if it is quantized."""
    w = module.o_proj.weight
    return w.dtype if torch.is_floating_point(torch.empty((), dtype=w.dtype)) else torch.float32


class FrontierAttention(nn.Module):
    """Common part of the swapped attention modules: adoption of the family's module, masks,
    softcap/window hand-over, attention transfer.

    ``self.adopted``: names of the family's submodules/parameters/buffers taken over (everything
    else with parameters -- feature maps, gates -- is frontier's own, see
    :func:`frontier.attention.attention_parameters`).

    ``transfer_mode = True``: the attention function computes both the variant (student) and the
    family's own softmax attention with the same q/k/v (teacher: causal, the layer's window and
    soft-cap, padding respected); the family's code turns the teacher into the module output, which
    is returned, and ``self.transfer_loss = MSE(student_out, teacher_out.detach())`` over
    non-padding positions of the module outputs (after ``o_proj``; fp32 scalar). The teacher only
    sees the tokens of the current call, so transfer mode requires an empty cache (or none); the
    student still updates its cache.
    """

    kind = "base"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__()
        family = family_of(orig)
        if family is None:
            raise ValueError(
                f"attention surgery does not support {type(orig).__name__}: supported attention classes are "
                + ", ".join(f"{f.attention} ({name})" for name, f in FAMILIES.items())
            )
        if not getattr(orig, "is_causal", True):
            raise ValueError(f"attention surgery needs causal attention; this {type(orig).__name__} is bidirectional")
        adopted = []
        for name, child in orig._modules.items():
            self.add_module(name, child)
            adopted.append(name)
        for name, p in orig._parameters.items():
            self.register_parameter(name, p)
            adopted.append(name)
        for name, b in orig._buffers.items():
            self.register_buffer(name, b, persistent=name not in orig._non_persistent_buffers_set)
            adopted.append(name)
        for name, value in vars(orig).items():
            if not name.startswith("_") and name not in _MODULE_STATE:
                setattr(self, name, value)
        self.adopted = tuple(adopted)
        self.family = family
        self._family_forward = type(orig).forward
        self.model_config = orig.config
        self.config = FamilyConfigView(orig.config)
        self.head_dim = int(orig.head_dim)
        self.num_heads = int(orig.config.num_attention_heads)
        self.num_key_value_groups = int(orig.num_key_value_groups)
        self.num_key_value_heads = self.num_heads // self.num_key_value_groups
        self.scaling = float(orig.scaling)
        self.cfg = dict(cfg)
        self.transfer_mode = False
        self.transfer_loss: torch.Tensor | None = None
        self._student = None
        self._calls = 0

    def extra_repr(self) -> str:
        return f"kind={self.kind}, family={self.family}, layer_idx={self.layer_idx}, cfg={self.cfg}"

    # subclasses: attention over heads -> [B, Hq, L, Dv]
    def _attend(self, q, k, v, valid, cache, *, scale, softcap=None, layer_window=None):  # pragma: no cover
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
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        calls = self._calls
        out, _ = self._family_forward(
            self, hidden_states, position_embeddings, attention_mask, cache=None, frontier_cache=cache, **kwargs
        )
        if self._calls != calls + 1:
            raise RuntimeError(
                f"{type(self).__name__}: the {self.family} attention code did not call its attention function "
                "exactly once; frontier cannot replace its attention"
            )
        if not self.transfer_mode:
            self.transfer_loss = None
            return out, None
        student, valid = self._student
        self._student = None
        B, L, _ = hidden_states.shape
        student = self.o_proj(student.transpose(1, 2).reshape(B, L, -1))
        self.transfer_loss = _masked_mse(student, out.detach(), valid)
        return out, None

    def frontier_attend(self, q, k, v, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
                        cache=None):
        """Called back by the family's code through :func:`frontier.attention.families.frontier_attention`."""
        self._calls += 1
        L = q.shape[2]
        valid = key_validity(attention_mask, L)
        scale = self.scaling if scaling is None else float(scaling)
        window = None if sliding_window is None else int(sliding_window)
        cap = None if softcap is None else float(softcap)
        if self.transfer_mode and self._cache_layer_length(cache) > 0:
            raise RuntimeError(
                "transfer_mode needs an empty cache: the softmax teacher only sees the current call's tokens"
            )
        out = self._attend(q, k, v, valid, cache, scale=scale, softcap=cap, layer_window=window)
        if self.transfer_mode:
            self._student = (out, valid)
            out = softmax_attention(q, k, v, scale=scale, key_valid=valid, softcap=cap, window=window)
        return out.transpose(1, 2).contiguous(), None


class SlidingWindowAttention(FrontierAttention):
    """Softmax over the last ``window`` keys (query included): key j visible to query i iff
    ``i - window < j <= i`` (on a local layer: ``min(window, layer window)``). Prefill: SDPA
    blockwise over query blocks (banded masks, never an ``L x L`` mask; explicit logits when the
    family soft-caps them). Decode: ``SlidingWindowStateLayer`` keeps the last ``window - 1`` keys."""

    kind = "sliding_window"

    def __init__(self, orig: nn.Module, cfg: dict):
        super().__init__(orig, cfg)
        self.window = int(cfg["window"])
        self.block_size = int(cfg.get("block_size", 128))

    def _attend(self, q, k, v, valid, cache, *, scale, softcap=None, layer_window=None):
        w = self.window if layer_window is None else min(self.window, layer_window)
        kw = dict(scale=scale, block_size=self.block_size, softcap=softcap)
        if cache is None:
            return sliding_window_attention(q, k, v, w, key_valid=valid, **kw)
        layer = _ensure_cache_layer(cache, self.layer_idx, SlidingWindowStateLayer, sliding_window=w)
        full_k, full_v, full_valid = layer.update_with_validity(k, v, valid)
        kv_valid = None if bool(full_valid.all()) else full_valid
        return sliding_window_attention(q, full_k, full_v, w, key_valid=kv_valid, **kw)


def make_module_feature_map(module: FrontierAttention, cfg: dict, default: str):
    """The feature map of a linear-kind module (``cfg["feature_map"]``, else ``default``), built for
    the module's heads and scaling; refuses a softmax-kernel map on a soft-capped family."""
    from .featuremaps import make_feature_map

    name = cfg.get("feature_map") or default
    if getattr(module, "attn_logit_softcapping", None) is not None and FAMILIES[module.family].softcap:
        why = softcap_refusal(module.family, name)
        if why:
            raise ValueError(why)
    return make_feature_map(
        {**cfg, "feature_map": name}, module.head_dim, module.num_heads, module.num_key_value_heads,
        dtype=_float_dtype(module), device=module.o_proj.weight.device, scale=module.scaling,
    )


def check_softcap(module: FrontierAttention, softcap) -> None:
    """Run-time twin of the plan-time refusal: the family passed a soft-cap to a softmax-kernel map."""
    if softcap is not None and module.feature_map.kind in SOFTMAX_KERNEL_MAPS:
        raise ValueError(softcap_refusal(module.family, module.feature_map.kind))


class LinearAttention(FrontierAttention):
    """Normalised causal linear attention ``phi(q_i) S_i / (phi(q_i) z_i + eps)`` on the family's
    q/k (after its norms and RoPE); over every earlier key, a local layer's window included.

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
        self.feature_map = make_module_feature_map(self, cfg, "elu")

    def _attend(self, q, k, v, valid, cache, *, scale, softcap=None, layer_window=None):
        check_softcap(self, softcap)
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
