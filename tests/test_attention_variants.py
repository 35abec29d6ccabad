"""LoLCATs attention (window + linear + gate) and hybrid layer choice (keep_softmax, auto diagnostics)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from frontier.attention import (
    OPTION_DEFAULTS,
    attention_parameters,
    choose_softmax_layers,
    layer_diagnostics,
    resolve_keep_softmax,
    set_transfer_mode,
    swap_attention,
    transfer_losses,
)
from frontier.attention.lolcats import LolcatsStateLayer, lolcats_attention, lolcats_reference


def tiny(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def ids(*shape, seed=1):
    return torch.randint(1, 97, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- lolcats


@pytest.mark.parametrize("L,W", [(1, 4), (9, 4), (37, 5), (64, 16)])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_lolcats_kernel_matches_reference(L, W, heads):
    hq, hkv = heads
    g = torch.Generator().manual_seed(L * W)
    q, k, v = (torch.randn(2, h, L, 8, generator=g) for h in (hq, hkv, hkv))
    fq, fk = torch.rand(2, hq, L, 6, generator=g), torch.rand(2, hkv, L, 6, generator=g)
    gate = torch.randn(hq, generator=g)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, : L // 3] = False
    for kv in (None, valid):
        ref = lolcats_reference(q, k, v, fq, fk, gate, W, 0.35, kv)
        for block, chunk in ((4, 4), (128, 64)):
            out = lolcats_attention(q, k, v, fq, fk, gate, W, 0.35, kv, None, block_size=block, chunk_size=chunk)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the gate interpolates between pure window softmax (g -> 1) and window + linear
    only_window = lolcats_attention(q, k, v, fq, fk, torch.full((hq,), 50.0), W, 0.35)
    fk0 = torch.zeros_like(fk)
    torch.testing.assert_close(only_window, lolcats_reference(q, k, v, fq, fk0, torch.zeros(hq), W, 0.35), atol=1e-5, rtol=0)


def _lolcats_cfg(window=6):
    cfg = OPTION_DEFAULTS["lolcats"]
    cfg.update(window=window, chunk_size=8, block_size=4)
    return cfg


@torch.no_grad()
def test_lolcats_module_cache_is_bounded_and_exact():
    model = swap_attention(tiny(), _lolcats_cfg())
    for p in attention_parameters(model).values():  # move away from the init so every term matters
        p.add_(0.1 * torch.randn_like(p))
    x = ids(2, 40)
    full = model(x).logits
    cache = DynamicCache(config=model.config)
    steps = [model(x[:, :17], cache=cache, use_cache=True).logits]
    sizes = []
    for t in range(17, 40):
        steps.append(model(x[:, t:t + 1], cache=cache, use_cache=True).logits)
        sizes.append(cache.layers[0].state_bytes())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert all(type(layer) is LolcatsStateLayer for layer in cache.layers)
    assert len(set(sizes)) == 1  # window keys + fixed linear state, whatever the length
    assert cache.layers[0].keys.shape[-2] == 5  # window - 1


def test_lolcats_transfer_trains_gate_and_feature_map():
    model = swap_attention(tiny(), _lolcats_cfg())
    params = attention_parameters(model)
    assert any(n.endswith(".gate") for n in params) and any("feature_map" in n for n in params)
    set_transfer_mode(model, True)
    model.train()
    model(ids(2, 30))
    loss = sum(transfer_losses(model))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


# ---------------------------------------------------------------------------------------------- hybrid


def test_choose_softmax_layers_by_each_score():
    diag = {"entropy": [0.9, 0.2, 0.5, 0.8], "sink_mass": [0.1, 0.3, 0.9, 0.0], "massive": [1.0, 2.0, 3.0, 50.0]}
    assert choose_softmax_layers(diag, 1, "entropy")[0] == [1]
    assert choose_softmax_layers(diag, 1, "sink")[0] == [2]
    assert choose_softmax_layers(diag, 1, "massive")[0] == [3]
    keep, score = choose_softmax_layers(diag, 2, "combined")
    # need ranks: entropy (1 - e) [0,3,2,1], sink [1,2,3,0], massive [0,1,2,3] -> layer 2 first, then 1
    assert keep == [1, 2] and len(score) == 4 and max(score) == score[2]
    with pytest.raises(ValueError, match="n_softmax"):
        choose_softmax_layers(diag, 4)
    with pytest.raises(ValueError, match="keep_by"):
        choose_softmax_layers(diag, 1, "loudness")


@torch.no_grad()
def test_layer_diagnostics_on_a_model():
    model = tiny(layers=3)
    d = layer_diagnostics(model, ids(3, 32), sink_tokens=2)
    assert set(d) == {"entropy", "sink_mass", "massive"}
    assert all(len(v) == 3 for v in d.values())
    assert all(0.0 <= e <= 1.0 + 1e-9 for e in d["entropy"])
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in d["sink_mass"])
    assert all(m >= 1.0 for m in d["massive"])
    assert model.config._attn_implementation == "sdpa"  # restored
    # a layer whose attention is forced onto the first token shows low entropy and high sink mass
    attn = model.model.layers[1].self_attn
    attn.k_proj.weight.zero_()
    attn.k_proj.bias = None
    d2 = layer_diagnostics(model, ids(3, 32), sink_tokens=2)
    assert d2["entropy"][1] > 0.99  # zero keys: uniform attention = maximal entropy
    keep, _ = choose_softmax_layers(d2, 1, "entropy")
    assert keep != [1]


@torch.no_grad()
def test_hybrid_keep_list_and_auto():
    cfg = {**OPTION_DEFAULTS["linear_elu"], "keep_softmax": [0, 2]}
    model = swap_attention(tiny(), cfg)
    kinds = [getattr(layer.self_attn, "kind", "softmax") for layer in model.model.layers]
    assert kinds == ["softmax", "linear", "softmax"]
    x = ids(1, 20)
    g = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(g, model.generate(x, max_new_tokens=5, do_sample=False, use_cache=False))

    auto = {**OPTION_DEFAULTS["hybrid"], "n_softmax": 2}
    base = tiny()
    spec, diag = resolve_keep_softmax(base, auto, ids(4, 24))
    assert spec["keep_softmax"] == diag["keep_softmax"] and len(spec["keep_softmax"]) == 2
    assert set(diag) >= {"entropy", "sink_mass", "massive", "score", "keep_by"}
    swap_attention(base, spec)
    assert sum(getattr(layer.self_attn, "kind", "softmax") == "softmax" for layer in base.model.layers) == 2
    with pytest.raises(ValueError, match="calibration"):
        resolve_keep_softmax(tiny(), auto, None)
    plain, none = resolve_keep_softmax(tiny(), cfg, None)
    assert plain == cfg and none is None
