"""Tiny random decoder models of each supported family, shared by the attention tests."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(family: str = "llama", seed: int = 0, impl: str = "sdpa", **overrides):
    """2 layers, hidden 64, 4 query heads over 2 kv heads (GQA), vocab 97, eval mode."""
    cfg_cls, model_cls = FAMILIES[family]
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=impl,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).eval()


def rand_ids(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, shape, generator=g)


# ----------------------------------------------------------------------------------------------
# every decoder family attention surgery supports (tests/test_families.py)
# ----------------------------------------------------------------------------------------------

_S, _F = "sliding_attention", "full_attention"
# per family: (config class, model class, config overrides that make its particular pieces matter)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 20}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    # soft-capped logits (a cap the scaled-up logits reach), query_pre_attn_scalar != head_dim,
    # alternating local (window 16 < the 48-token input) and global layers
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 30.0, "sliding_window": 16, "layer_types": [_S, _F, _S, _F],
        "hidden_activation": "gelu_pytorch_tanh"}),
    # q/k norms, query_pre_attn_scalar, local layers with their own RoPE base
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 64, "sliding_window": 16, "layer_types": [_S, _F, _S, _F],
        "rope_parameters": {_S: {"rope_type": "default", "rope_theta": 10.0},
                            _F: {"rope_type": "default", "rope_theta": 10000.0}}}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {
        "attention_multiplier": 0.11, "residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 2.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


@torch.no_grad()
def family_model(family: str, seed: int = 0, impl: str = "eager", layers: int = 4, qk_scale: float = 4.0, **overrides):
    """A tiny random model of ``family`` built from transformers' own classes: hidden 64, 4 query
    heads over 2 kv heads of 16 dims, ``layers`` layers, vocab 97, eval mode. q/k projections are
    multiplied by ``qk_scale`` and q/k norm weights randomised, so that norms and logit caps change
    the result when dropped. ``impl="eager"`` by default: transformers' SDPA path ignores Gemma 2's
    logit soft-cap, the eager path is the family's reference implementation."""
    import transformers

    cfg_name, model_name, extra = FAMILY_CONFIGS[family]
    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, attn_implementation=impl,
    )
    kw.update(extra)
    if "layer_types" in kw:
        kw["layer_types"] = (kw["layer_types"] * layers)[:layers]
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "qkv_proj"):
            lin = getattr(attn, name, None)
            if lin is not None:
                lin.weight.mul_(qk_scale)
        for name in ("q_norm", "k_norm"):
            norm = getattr(attn, name, None)
            if norm is not None:
                one = 0.0 if "Gemma" in type(norm).__name__ else 1.0  # Gemma's RMSNorm scales by (1 + weight)
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5 + one)
    return model
