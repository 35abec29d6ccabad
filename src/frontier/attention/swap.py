"""swap_attention: replace every decoder layer's ``self_attn`` by the configured attention variant."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from collections.abc import Mapping

from ..config import option_config, option_names
from .families import FAMILIES, family_of
from .modules import FrontierAttention, LinearAttention, LinearStateLayer, SlidingWindowAttention

__all__ = [
    "KINDS",
    "LINEAR_KINDS",
    "SPARSE_KINDS",
    "OPTIONS",
    "OPTION_DEFAULTS",
    "AlreadySwappedError",
    "attention_parameters",
    "cache_state_bytes",
    "normalize_config",
    "swap_attention",
    "set_transfer_mode",
    "swapped_modules",
    "transfer_losses",
]

KINDS = ("softmax", "sliding_window", "sink_window", "block_sparse", "topk", "linear", "lolcats")
SPARSE_KINDS = ("sink_window", "block_sparse", "topk")
LINEAR_KINDS = ("linear", "lolcats")
# The options are the files in conf/attention/ (one source of truth for names and defaults).
OPTIONS = tuple(option_names("attention"))


class _OptionDefaults(Mapping):
    """``OPTION_DEFAULTS[name]`` = the contents of ``conf/attention/<name>.yaml`` (read lazily)."""

    def __getitem__(self, name: str) -> dict:
        if name not in OPTIONS:
            raise KeyError(name)
        return option_config("attention", name)

    def __iter__(self):
        return iter(OPTIONS)

    def __len__(self) -> int:
        return len(OPTIONS)


OPTION_DEFAULTS: Mapping[str, dict] = _OptionDefaults()


class AlreadySwappedError(ValueError):
    """swap_attention was called on a model whose attention modules were already swapped."""


def _pos_int(out: dict, key: str, default=None, minimum: int = 1) -> None:
    v = out.setdefault(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"attention cfg {key!r} must be an int >= {minimum}, got {v!r}")


def normalize_config(cfg: dict) -> dict:
    """Validate an attention config dict and fill defaults. Raises ValueError naming the bad key.

    (Plan-time validation of a whole point is :func:`frontier.config.validate_point`; this is the
    library-level check for direct callers of :func:`swap_attention`.)"""
    if not isinstance(cfg, dict):
        raise ValueError(f"attention cfg must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"attention cfg 'kind' must be one of {KINDS}, got {kind!r}")
    out = dict(cfg)
    out.setdefault("name", kind)
    if kind == "sliding_window":
        _pos_int(out, "window", 64)
    elif kind in SPARSE_KINDS:
        from .sparse import normalize_sparse_config

        out = normalize_sparse_config(out)
    elif kind in LINEAR_KINDS:
        from .featuremaps import validate_feature_map_cfg

        out.setdefault("feature_map", "elu" if kind == "linear" else "hedgehog")
        out = validate_feature_map_cfg(out)
        _pos_int(out, "chunk_size", 64)
        eps = float(out.setdefault("eps", 1e-6))
        if not eps > 0:
            raise ValueError(f"attention cfg 'eps' must be > 0, got {eps!r}")
        out["eps"] = eps
        if kind == "lolcats":
            from .lolcats import GATE_INIT, MIX

            _pos_int(out, "window", 64)
            out.setdefault("mix", "published")
            if out["mix"] not in MIX:
                raise ValueError(f"attention cfg 'mix' must be one of {MIX}, got {out['mix']!r}")
            init = out.get("gate_init")
            out["gate_init"] = GATE_INIT[out["mix"]] if init is None else float(init)
    keep = out.get("keep_softmax")
    if keep is not None and keep != "auto":
        if kind == "softmax":
            raise ValueError("attention cfg 'keep_softmax' needs a non-softmax kind")
        if not isinstance(keep, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
            raise ValueError(f"attention cfg 'keep_softmax' must be null, 'auto' or a list of layer indices, got {keep!r}")
        out["keep_softmax"] = sorted(set(int(i) for i in keep))
    return out


def _module_class(kind: str):
    if kind == "sliding_window":
        return SlidingWindowAttention
    if kind == "linear":
        return LinearAttention
    if kind == "lolcats":
        from .lolcats import LolcatsAttention

        return LolcatsAttention
    from .sparse import SPARSE_MODULES

    return SPARSE_MODULES[kind]


def _decoder_layers(model: nn.Module, check_family: bool = True):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or len(layers) == 0:
        raise ValueError(
            f"swap_attention does not support {type(model).__name__}: expected model.model.layers[i].self_attn "
            "(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, ...)"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"swap_attention does not support {type(model).__name__}: layer {i} has no self_attn")
        if check_family and not isinstance(attn, FrontierAttention) and family_of(attn) is None:
            raise ValueError(
                f"swap_attention does not support {type(model).__name__}: layer {i} self_attn is a "
                f"{type(attn).__name__}; supported attention classes (family): "
                + ", ".join(f"{f.attention} ({name})" for name, f in FAMILIES.items())
            )
    return layers


def swap_attention(model: nn.Module, cfg: dict) -> nn.Module:
    """Swap every ``model.model.layers[i].self_attn`` for the variant in ``cfg`` (in place; returns model).

    ``softmax`` leaves the modules untouched. The q/k/v/o projection modules are reused, so call
    this after loading weights (and again after every ``from_pretrained``). Records the config on
    ``model.config.frontier_attention``. Raises ``AlreadySwappedError`` (a ValueError) if the
    attention modules were already swapped; ValueError for an unsupported model or a bad cfg.
    """
    cfg = normalize_config(cfg)
    layers = _decoder_layers(model, check_family=cfg["kind"] != "softmax")
    if any(isinstance(layer.self_attn, FrontierAttention) for layer in layers):
        raise AlreadySwappedError(
            f"{type(model).__name__} already has swapped attention "
            f"({getattr(model.config, 'frontier_attention', None)}); build or load a fresh model"
        )
    kind = cfg["kind"]
    keep = cfg.get("keep_softmax")
    if keep == "auto":
        raise ValueError(
            "attention keep_softmax: auto must be resolved from calibration text before swapping "
            "(frontier.attention.resolve_keep_softmax, done by the surgery stage)"
        )
    keep = set(keep or ())
    bad = sorted(i for i in keep if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"attention keep_softmax lists layers {bad} outside 0..{len(layers) - 1}")
    if kind != "softmax":
        cls = _module_class(kind)
        for i, layer in enumerate(layers):
            if i not in keep:
                layer.self_attn = cls(layer.self_attn, cfg)
    model.config.frontier_attention = dict(cfg)
    return model


def swapped_modules(model: nn.Module) -> list[FrontierAttention]:
    return [m for m in model.modules() if isinstance(m, FrontierAttention)]


def attention_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The swapped modules' own parameters (feature maps, gates; not what they adopted from the
    family's module: projections, q/k norms), keyed like ``model.named_parameters()``."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, FrontierAttention):
            continue
        for pname, p in mod.named_parameters():
            if pname.split(".", 1)[0] in mod.adopted:
                continue
            out[f"{name}.{pname}" if name else pname] = p
    return out


def set_transfer_mode(model: nn.Module, on: bool) -> list[FrontierAttention]:
    """Switch attention-transfer mode on/off for every swapped module; returns those modules."""
    mods = swapped_modules(model)
    for m in mods:
        m.transfer_mode = bool(on)
        m.transfer_loss = None
    return mods


def transfer_losses(model: nn.Module) -> list[torch.Tensor]:
    """Per-layer MSE(student, teacher) losses from the last forward in transfer mode."""
    return [m.transfer_loss for m in swapped_modules(model) if m.transfer_loss is not None]


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def cache_state_bytes(cache) -> int:
    """Bytes held by a transformers Cache: keys/values of KV layers plus linear-attention states.

    A layer with a ``state_bytes()`` method (``LinearStateLayer``, ``frontier.kvcache.Int8KVLayer``)
    reports its own size; transformers' linear-attention layers count their conv/recurrent states;
    quantized KV layers their quantized tensors; every other layer its ``keys``/``values``.
    """
    if cache is None:
        return 0
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        return cache_state_bytes(cache.self_attention_cache) + cache_state_bytes(
            getattr(cache, "cross_attention_cache", None)
        )
    total = 0
    for layer in getattr(cache, "layers", []):
        if callable(getattr(layer, "state_bytes", None)):
            total += int(layer.state_bytes())
            continue
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for d in (layer.conv_states, layer.recurrent_states):
                total += sum(_nbytes(t) for t in d.values())
        total += _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        total += _nbytes(getattr(layer, "_quantized_keys", None)) + _nbytes(getattr(layer, "_quantized_values", None))
    return total
