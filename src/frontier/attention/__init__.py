"""Attention surgery: swap HF decoder attention for sparse, linear, LoLCATs or hybrid variants.

Options are the files of ``conf/attention/`` (``OPTIONS``; ``OPTION_DEFAULTS[name]`` reads one);
a config is a plain dict whose ``kind`` picks the module:

* ``softmax`` -- model untouched.
* ``sliding_window`` (:mod:`.modules`), ``sink_window`` / ``block_sparse`` / ``topk``
  (:mod:`.sparse`) -- softmax over a sparse pattern; bounded caches where the pattern allows.
* ``linear`` -- normalised causal linear attention with a feature map from :mod:`.featuremaps`
  (``elu``, ``relu``, ``hedgehog``, ``taylor``, ``performer``, ``cosformer``); chunked O(L)
  prefill, fixed-size recurrent state for decode.
* ``lolcats`` (:mod:`.lolcats`) -- window softmax + linear attention mixed by a learned per-head
  gate g = sigmoid(gate), numerators and denominators of both terms summed before one division.
  ``mix: published`` (default) weights the window term g and the linear term 1, g starting at
  0.1 -- the released LoLCATs configs (``affine_attention_factors: false``,
  ``init_window_factor: -2.197``), the paper's numbers; ``mix: affine`` weights them (g, 1 - g),
  g starting at 0.5 -- frontier's convention before ``mix`` existed (manifests without ``mix``
  reload with it).
* any non-softmax kind with ``keep_softmax`` (a list, or ``"auto"`` resolved by
  :func:`resolve_keep_softmax` from calibration diagnostics, :mod:`.hybrid`) is a hybrid.

Every family in :data:`frontier.families.FAMILIES` (Llama, Qwen2/3, Mistral, Gemma 2/3, OLMo2,
Granite, Phi-3) keeps its own projections, q/k norms, RoPE, scaling and logit cap: the swapped
module runs the family's attention code and replaces only the attention function and its cache
(:mod:`.families`). See :mod:`.modules` for how masks and padding are handled, :mod:`.caches` for
the cache layers.
"""

from .kernels import (
    FEATURE_MAPS,
    HAS_FLA,
    apply_feature_map,
    linear_attention_chunked,
    linear_attention_prefill,
    linear_attention_recurrent,
    linear_attention_recurrent_step,
    linear_attention_reference,
)
from .softmax import sliding_window_attention, sliding_window_reference, softmax_attention
from .modules import (
    FrontierAttention,
    LinearAttention,
    LinearStateLayer,
    SlidingWindowAttention,
    SlidingWindowStateLayer,
    key_validity,
)
from .hybrid import KEEP_BY, choose_softmax_layers, layer_diagnostics, resolve_keep_softmax
from .swap import (
    KINDS,
    LINEAR_KINDS,
    SPARSE_KINDS,
    OPTION_DEFAULTS,
    OPTIONS,
    AlreadySwappedError,
    attention_parameters,
    cache_state_bytes,
    normalize_config,
    set_transfer_mode,
    swap_attention,
    swapped_modules,
    transfer_losses,
)

__all__ = [
    "KEEP_BY",
    "LINEAR_KINDS",
    "SPARSE_KINDS",
    "choose_softmax_layers",
    "layer_diagnostics",
    "resolve_keep_softmax",
    "FEATURE_MAPS",
    "HAS_FLA",
    "KINDS",
    "OPTIONS",
    "OPTION_DEFAULTS",
    "AlreadySwappedError",
    "FrontierAttention",
    "LinearAttention",
    "LinearStateLayer",
    "SlidingWindowAttention",
    "SlidingWindowStateLayer",
    "apply_feature_map",
    "attention_parameters",
    "cache_state_bytes",
    "key_validity",
    "linear_attention_chunked",
    "linear_attention_prefill",
    "linear_attention_recurrent",
    "linear_attention_recurrent_step",
    "linear_attention_reference",
    "normalize_config",
    "set_transfer_mode",
    "sliding_window_attention",
    "sliding_window_reference",
    "softmax_attention",
    "swap_attention",
    "swapped_modules",
    "transfer_losses",
]
