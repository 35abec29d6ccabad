"""Attention surgery: swap HF decoder attention for sliding-window or causal linear attention.

Options (``cfg`` is a plain dict):

* ``{"name": "softmax", "kind": "softmax"}`` -- model untouched.
* ``{"name": "sliding_window", "kind": "sliding_window", "window": 64}`` -- softmax over the last
  ``window`` keys (query included).
* ``{"name": "linear_elu", "kind": "linear", "feature_map": "elu", "learned_map": True,
  "chunk_size": 64, "eps": 1e-6}`` -- normalised causal linear attention with
  phi(x) = elu(x W_h) + 1, W_h learnable per head (per query head for q, per kv head for k),
  identity at init.

See :mod:`frontier.attention.modules` for how masks, padding and the cache are handled.
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
    sliding_window_attention,
    sliding_window_reference,
    softmax_attention,
)
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
