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
    # affine: the gate interpolates between pure window softmax (g -> 1) and window + linear
    only_window = lolcats_attention(q, k, v, fq, fk, torch.full((hq,), 50.0), W, 0.35, mix="affine")
    fk0 = torch.zeros_like(fk)
    torch.testing.assert_close(only_window, lolcats_reference(q, k, v, fq, fk0, torch.zeros(hq), W, 0.35), atol=1e-5, rtol=0)


def released_lolcats(q, k, v, f_q, f_k, window_factor, linear_factor, window_size, scale):
    """The released LoLCATs combination, written from HazyResearch/lolcats
    src/model/linear_attention/linear_window_attention_sw.py (`get_masks`,
    `hybrid_attention_quadratic`): kv heads repeated for GQA, the softmax term over the sliding
    window scaled by `window_factor` after subtracting its row max, the linear term over the
    older keys scaled by `linear_factor`, numerators and denominators of both summed, one division."""
    rep = q.shape[1] // k.shape[1]
    k, v, f_k = (t.repeat_interleave(rep, dim=1) for t in (k, v, f_k))
    q_len, k_len = q.shape[-2], k.shape[-2]
    causal_mask = torch.ones(q_len, k_len, dtype=torch.int).tril(k_len - q_len)
    linear_mask = torch.ones(q_len, k_len, dtype=torch.int).tril(k_len - q_len - window_size)
    window_mask = (causal_mask - linear_mask)[None, None]
    a_sm = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * scale
    a_sm = a_sm.masked_fill(~window_mask.bool(), -1e8)
    a_sm = window_factor * torch.exp(a_sm - a_sm.amax(dim=-1, keepdim=True))
    sum_sm = a_sm.sum(dim=-1, keepdim=True)
    a_ln = torch.einsum("bhmd,bhnd->bhmn", f_q.double(), f_k.double())
    a_ln = linear_factor * a_ln.masked_fill(~linear_mask[None, None].bool(), 0)
    sum_ln = a_ln.sum(dim=-1, keepdim=True)
    y = torch.einsum("bhmn,bhnd->bhmd", a_sm + a_ln, v.double())
    return (y / (sum_sm + sum_ln)).float()


@pytest.mark.parametrize("L,Lk,W", [(9, 9, 4), (37, 37, 5), (64, 64, 16), (5, 40, 8)])
@pytest.mark.parametrize("mix", ["published", "affine"])
def test_lolcats_mix_matches_the_released_combination(L, Lk, W, mix):
    """published: window g = sigmoid(w), linear 1 (affine_attention_factors: false); affine:
    linear 1 - g (true). Against the released layer's formula, queries aligned to the last keys."""
    g = torch.Generator().manual_seed(L + Lk + W)
    q = torch.randn(2, 4, L, 8, generator=g)
    k, v = torch.randn(2, 2, Lk, 8, generator=g), torch.randn(2, 2, Lk, 8, generator=g)
    fq, fk = torch.rand(2, 4, L, 6, generator=g), torch.rand(2, 2, Lk, 6, generator=g)
    gate = torch.randn(4, generator=g)
    wf = torch.sigmoid(gate).view(1, 4, 1, 1).double()
    ref = released_lolcats(q, k, v, fq, fk, wf, 1 - wf if mix == "affine" else 1, W, 8 ** -0.5)
    for block, chunk in ((4, 4), (128, 64)):
        out = lolcats_attention(q, k, v, fq, fk, gate, W, 8 ** -0.5, block_size=block, chunk_size=chunk, mix=mix)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lolcats_reference(q, k, v, fq, fk, gate, W, 8 ** -0.5, mix=mix), ref,
                               atol=1e-5, rtol=1e-5)
    other = "affine" if mix == "published" else "published"   # the two conventions are different functions
    assert (lolcats_attention(q, k, v, fq, fk, gate, W, 8 ** -0.5, mix=other) - ref).abs().max() > 1e-3


def test_lolcats_convention_and_gate_init_defaults():
    for over, mix, init in (({}, "published", -2.1972245773362196), ({"mix": "affine"}, "affine", 0.0),
                            ({"mix": "affine", "gate_init": 1.5}, "affine", 1.5)):
        model = swap_attention(tiny(layers=1), {**_lolcats_cfg(), **over})
        attn = model.model.layers[0].self_attn
        assert attn.mix == mix and torch.all(attn.gate == init)
    assert torch.sigmoid(torch.tensor(-2.1972245773362196)).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'mix' must be one of"):
        swap_attention(tiny(layers=1), {**_lolcats_cfg(), "mix": "convex"})


def test_lolcats_mix_is_checked_at_plan_time():
    from frontier import config as C
    from frontier import grid

    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=recovery", "attention=lolcats", "attention.mix=convex"])
    assert e.value.key == "attention.mix" and "published" in str(e.value) and "affine" in str(e.value)
    p = grid.plan(["sweep=recovery", "attention=lolcats", "attention.mix=published,affine"])
    assert {pt.cfg["attention"]["mix"] for pt in p.points} == {"published", "affine"}


def test_lolcats_checkpoints_record_the_convention_and_older_ones_load_affine(micro_base, tmp_path):
    """A surgery manifest states mix and gate_init; one written before `mix` existed (no key)
    reloads as the (g, 1 - g) convention it was trained with, the stored gate intact."""
    import json

    from frontier import checkpoint as ck
    from frontier import config as C
    from frontier import surgery

    a = {**C.compose((("attention", "lolcats"),))["attention"], "window": 8}
    d = tmp_path / "lolcats" / "_ckpt"
    surgery.run({"attention": a}, micro_base, d)
    spec = ck.read_manifest(d)["attention"]["spec"]
    assert spec["mix"] == "published" and spec["gate_init"] == pytest.approx(-2.1972245773362196)
    mods = [m for m in ck.load_point(d).model.modules() if hasattr(m, "mix")]
    assert mods and all(m.mix == "published" for m in mods)
    gates = [m.gate.detach().clone() for m in mods]
    path = d / "manifest.json"
    man = json.loads(path.read_text())
    for sec in (man["attention"]["spec"], man["config"]["attention"]):
        sec.pop("mix"), sec.pop("gate_init")
    path.write_text(json.dumps(man))
    old = [m for m in ck.load_point(d).model.modules() if hasattr(m, "mix")]
    assert all(m.mix == "affine" for m in old)
    assert all(torch.equal(m.gate, g0) for m, g0 in zip(old, gates))


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
