"""The decoder families attention surgery supports, and the seam that keeps it exact on each.

Design. A swapped module (:class:`~frontier.attention.modules.FrontierAttention`) *adopts* the
family's own attention module: it takes over its submodules, parameters and attributes under the
same names (``q_proj/k_proj/v_proj/o_proj`` or Phi-3's fused ``qkv_proj``, ``q_norm/k_norm``,
``scaling``, ``sliding_window``, ...), so the family's state dict loads strictly, and its forward
runs the family's own ``forward``. That code computes everything particular to the family --
projections, q/k norms (per head for Qwen3 and Gemma 3, over the whole projection before the
reshape for OLMo2), the layer's RoPE (Gemma 3's local layers have their own base), the scaling
(``query_pre_attn_scalar``, Granite's ``attention_multiplier``) -- and then calls the transformers
attention function named by ``self.config._attn_implementation``. The adopted module's ``config``
is a view of the model's config (:class:`FamilyConfigView`) that names :data:`IMPLEMENTATION`
there, registered in transformers' ``AttentionInterface`` (:func:`frontier_attention`). So frontier
replaces only the attention computation and its cache: it receives q/k/v after norms and RoPE,
and the ``scaling``, ``softcap`` and per-layer ``sliding_window`` the family passes. The model-wide
implementation (sdpa, eager) is left as it was: masks are the family's own (the swapped module
reads only key validity from them), and layers a hybrid keeps run untouched, so no mask function
needs registering. The cache reaches the function as ``frontier_cache``; the family code gets
``cache=None`` and never writes keys itself.

What each family brings, and what frontier does with it:

* **scaling**: every softmax term uses the ``scaling`` the family passes; the Taylor and
  Performer maps (approximations of ``exp(q.k * scale)``) are built with the module's scaling.
* **logit soft-cap** (Gemma 2 passes ``softcap``): applied as ``cap * tanh(logit / cap)`` to the
  logits of every softmax term -- sliding window, sinks, blocks, top-k, LoLCATs' window part and
  the transfer-mode teacher -- whatever the model-wide implementation (transformers' SDPA path
  drops the cap; eager, Gemma 2's default, applies it). A feature-map kernel ``phi(q).phi(k)`` has
  no capped form. The choice made here: the linear term replaces ``exp(capped logit)`` as it
  replaces ``exp(logit)`` on other families (learned maps are trained against the capped teacher;
  elu/relu/cosformer never claimed to be softmax), but the two maps defined as estimates of the
  *uncapped* softmax kernel (:data:`SOFTMAX_KERNEL_MAPS`: ``taylor``, ``performer``) are refused
  on a soft-capped family, at plan time (:func:`refusal`) and at run time.
* **local layers** (a ``sliding_window`` passed for Gemma 2/3 local layers, Qwen2/Qwen3 sliding
  layers, and every layer of Mistral and Phi-3 when their config sets one): a softmax-based
  variant's pattern is intersected with the layer's own window -- ``sliding_window`` uses
  ``min(window, layer window)``; ``sink_window``, ``block_sparse`` and ``topk`` keep only keys
  with ``i - layer_window < j`` (on a local layer the sinks stay visible only within its window);
  LoLCATs' softmax part uses ``min(window, layer window)``. So a variant whose pattern covers every
  key equals the family's model, local layers included. Linear attention replaces the layer's
  attention as a whole: a linear layer (and LoLCATs' linear term) sees every earlier key, the
  layer's window included (as LoLCATs did on Mistral-7B, whose config sets a 4,096 window).
* **attention dropout** is not applied by the frontier kernels (every listed family defaults to
  0.0); a non-causal attention (Gemma 3 with ``use_bidirectional_attention``) is refused at swap.

Any other attention class is refused at swap time, naming the supported ones.
"""

from __future__ import annotations

from transformers import AttentionInterface

from ..families import FAMILIES, SOFTMAX_KERNEL_MAPS, Family, family_of, refusal, softcap_refusal

__all__ = [
    "FAMILIES",
    "IMPLEMENTATION",
    "SOFTMAX_KERNEL_MAPS",
    "Family",
    "FamilyConfigView",
    "family_of",
    "frontier_attention",
    "refusal",
    "softcap_refusal",
]

IMPLEMENTATION = "frontier"


class FamilyConfigView:
    """The model's config as an adopted attention module sees it: every attribute is the model
    config's (read and written through), except ``_attn_implementation``, which names frontier's
    attention function."""

    _attn_implementation = IMPLEMENTATION

    def __init__(self, config):
        object.__setattr__(self, "_base", config)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)

    def __setattr__(self, name, value):
        if name == "_attn_implementation":
            raise AttributeError("a swapped attention module always uses frontier's attention function")
        setattr(self._base, name, value)

    def __repr__(self):
        return f"FamilyConfigView({type(self._base).__name__}, _attn_implementation={IMPLEMENTATION!r})"


def frontier_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       sliding_window=None, softcap=None, frontier_cache=None, **kwargs):
    """transformers attention function (``AttentionInterface``) of the adopted modules: q/k/v
    ``[B, H, L, D]`` after the family's norms and RoPE, k/v not GQA-expanded; returns
    ``([B, L, Hq, Dv], None)``. The module computes the variant (``module.frontier_attend``)."""
    attend = getattr(module, "frontier_attend", None)
    if attend is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} is only for modules swapped by "
                           f"frontier.attention.swap_attention, not {type(module).__name__}")
    return attend(query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window,
                  softcap=softcap, cache=frontier_cache)


AttentionInterface.register(IMPLEMENTATION, frontier_attention)
