"""Decoder families attention surgery supports (``model.family``), and the plan-time refusals.

Plain data, no torch: the plan (:func:`frontier.config.validate_point`) reads it for every point.
How surgery stays exact on each family, and the choices made where a family x variant has no
exact meaning, are in :mod:`frontier.attention.families`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILIES", "SOFTMAX_KERNEL_MAPS", "Family", "family_of", "refusal", "softcap_refusal"]

#: feature maps defined as estimates of the uncapped softmax kernel exp(q.k * scale)
SOFTMAX_KERNEL_MAPS = ("taylor", "performer")


@dataclass(frozen=True)
class Family:
    attention: str  # the transformers attention class the family's decoder layers hold
    softcap: bool = False  # passes attn_logit_softcapping to the attention function
    pieces: str = ""  # what the family's own code keeps computing (for messages and docs)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaAttention", pieces="RoPE"),
    "qwen2": Family("Qwen2Attention", pieces="RoPE, q/k/v biases, sliding layers from layer_types"),
    "mistral": Family("MistralAttention", pieces="RoPE, config.sliding_window on every layer"),
    "qwen3": Family("Qwen3Attention", pieces="per-head q/k RMSNorm before RoPE, sliding layers"),
    "gemma2": Family("Gemma2Attention", softcap=True, pieces="query_pre_attn_scalar, attention logit "
                     "soft-cap, alternating local/global layers"),
    "gemma3": Family("Gemma3Attention", pieces="per-head q/k RMSNorm, query_pre_attn_scalar, local layers "
                     "with their own RoPE base"),
    "olmo2": Family("Olmo2Attention", pieces="q/k RMSNorm over the whole projection before the reshape"),
    "granite": Family("GraniteAttention", pieces="attention_multiplier as the logit scaling"),
    "phi3": Family("Phi3Attention", pieces="fused qkv_proj, config.sliding_window"),
}
_BY_CLASS = {f.attention: name for name, f in FAMILIES.items()}


def family_of(attn) -> str | None:
    """The family name of a transformers attention module (by its exact class), or None."""
    return _BY_CLASS.get(type(attn).__name__)


def _map_of(attention_cfg: dict) -> str | None:
    kind = attention_cfg.get("kind")
    if kind == "linear":
        return attention_cfg.get("feature_map") or "elu"
    if kind == "lolcats":
        return attention_cfg.get("feature_map") or "hedgehog"
    return None


def softcap_refusal(family: str, feature_map: str | None) -> str | None:
    """Why ``feature_map`` cannot replace a soft-capped family's softmax, or None."""
    if feature_map not in SOFTMAX_KERNEL_MAPS:
        return None
    return (f"model family {family!r} soft-caps its attention logits (attn_logit_softcapping: softmax over "
            f"cap*tanh(logit/cap)), and feature map {feature_map!r} estimates the uncapped softmax kernel "
            "exp(q.k*scale): a capped form of that map, which this combination needs, does not exist. Use "
            "hedgehog, elu, relu or cosformer (maps that make no such claim; see frontier.attention.families), "
            "or a softmax-based variant (sliding_window, sink_window, block_sparse, topk), which applies the cap")


def refusal(family: str, attention_cfg: dict) -> tuple[str, str] | None:
    """Plan-time check of one model family x attention option: ``(config key, message)`` naming
    the family and the missing piece, or None when the surgery is exact or defined there."""
    if family not in FAMILIES:
        return ("model.family", f"attention surgery does not support model family {family!r}: no frontier "
                f"route through its attention module; supported: {', '.join(FAMILIES)}")
    if attention_cfg.get("kind", "softmax") == "softmax":
        return None
    if FAMILIES[family].softcap:
        why = softcap_refusal(family, _map_of(attention_cfg))
        if why:
            return ("attention.feature_map", why)
    return None
