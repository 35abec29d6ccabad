"""Attention surgery on every supported decoder family: exact where the variant's pattern covers
every key, cached decoding equal to the uncached forward, and refusal at plan time where a family
x variant combination has no defined meaning.

The reference is always the family's own transformers implementation (eager attention, the path
that applies Gemma 2's logit soft-cap), on tiny random models whose q/k projections are scaled up
and q/k norm weights randomised (``attention_models.family_model``), so that dropping a norm, a
cap, a scaling or a local window changes the logits by far more than the tolerances here.
"""

from __future__ import annotations

import pytest
import torch
from attention_models import FAMILY_CONFIGS, family_model, rand_ids
from transformers import DynamicCache

from frontier import config as C
from frontier import grid
from frontier.attention import (
    OPTION_DEFAULTS,
    FrontierAttention,
    attention_parameters,
    set_transfer_mode,
    swap_attention,
    transfer_losses,
)
from frontier.families import FAMILIES, SOFTMAX_KERNEL_MAPS

FAMS = list(FAMILY_CONFIGS)
L = 48
# patterns that cover every key of an L-token input: the swapped model must equal the family's own
COVER = {
    "sliding_window": {"kind": "sliding_window", "window": 64, "block_size": 16},
    "sink_window": {"kind": "sink_window", "window": 64, "sinks": 4, "block_size": 16},
    "block_sparse": {"kind": "block_sparse", "block_size": 16, "local_blocks": 4, "global_blocks": 1},
    "topk": {"kind": "topk", "k": 64, "block_size": 16},
    # a hybrid: family layers kept softmax beside swapped ones (mixed cache layer types)
    "hybrid": {"kind": "sliding_window", "window": 64, "block_size": 16, "keep_softmax": [1, 2]},
}
LINEAR = {
    "linear_elu": {**OPTION_DEFAULTS["linear_elu"], "chunk_size": 8},
    "lolcats": {**OPTION_DEFAULTS["lolcats"], "window": 8, "chunk_size": 8, "block_size": 8},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if not a.requires_grad else rel(a.detach(), b)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# (a) a pattern covering every key equals the family's model; padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(COVER))
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_covering_pattern_equals_the_family(family, variant):
    ids = rand_ids(2, L)
    ref = family_model(family)(ids).logits
    model = swap_attention(family_model(family), COVER[variant])
    keep = set(COVER[variant].get("keep_softmax") or ())
    assert all(isinstance(layer.self_attn, FrontierAttention) == (i not in keep)
               for i, layer in enumerate(model.model.layers))
    assert rel(model(ids).logits, ref) < 1e-5
    # the same through the cache: a prefill, a chunk, single tokens
    cache = DynamicCache(config=model.config)
    parts = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 30), (30, 31), (31, 40), (40, L))]
    assert rel(torch.cat(parts, 1), ref) < 1e-5


@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_a_short_window_changes_the_output(family):
    """The swap is live: a window shorter than the input (and than Gemma's local window) moves the logits."""
    ids = rand_ids(2, L)
    ref = family_model(family)(ids).logits
    model = swap_attention(family_model(family), {"kind": "sliding_window", "window": 6})
    assert rel(model(ids).logits, ref) > 1e-2


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral"])
@torch.no_grad()
def test_local_layers_keep_their_own_window(family):
    """A frontier window longer than a local layer's own window changes nothing on that layer: with
    only the local layers swapped, any window >= the layer's equals the family's model, even with
    the input longer than the layer's window; a shorter one does not."""
    model = family_model(family)
    layers = range(len(model.model.layers))
    # Mistral: config.sliding_window on every layer; Gemma: the local layers of layer_types
    if family == "mistral":
        local = list(layers)
    else:
        local = [i for i in layers if model.config.layer_types[i] == "sliding_attention"]
    own = FAMILY_CONFIGS[family][2]["sliding_window"]
    assert local and own < L
    ids = rand_ids(2, L)
    ref = model(ids).logits
    keep = [i for i in layers if i not in local] or None
    for window, equal in ((own, True), (own + 7, True), (own - 3, False)):
        cfg = {"kind": "sliding_window", "window": window, "keep_softmax": keep}
        swapped = swap_attention(family_model(family), cfg)
        assert (rel(swapped(ids).logits, ref) < 1e-5) == equal, window


@pytest.mark.parametrize("variant", ["sliding_window", "sink_window", "lolcats"])
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_padded_batch_equals_single_rows(family, variant):
    cfg = {"sliding_window": {"kind": "sliding_window", "window": 12},
           "sink_window": {"kind": "sink_window", "window": 12, "sinks": 2}, "lolcats": LINEAR["lolcats"]}[variant]
    impl = "eager" if family == "gemma2" else "sdpa"  # transformers runs Gemma 2 in eager only
    model = swap_attention(family_model(family, impl=impl), cfg)
    a, b, pad = rand_ids(1, 30, seed=2), rand_ids(1, 21, seed=3), 9
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=pos).logits
    assert rel(batch[0], model(a).logits[0]) < 1e-5
    assert rel(batch[1, pad:], model(b).logits[0]) < 1e-5
    g = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(g[0, 30:], model.generate(a, max_new_tokens=4, do_sample=False)[0, 30:])
    assert torch.equal(g[1, 30:], model.generate(b, max_new_tokens=4, do_sample=False)[0, 21:])


# ----------------------------------------------------------------------------------------------
# (b) linear variants: cached generate equals the uncached forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(LINEAR))
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_linear_cached_generate_equals_uncached_forward(family, variant):
    model = swap_attention(family_model(family), LINEAR[variant])
    prompt = rand_ids(1, 20)
    g = model.generate(prompt, max_new_tokens=6, do_sample=False)  # cached (recurrent state, window cache)
    assert g.shape == (1, 26)
    full = model(g).logits  # one uncached forward over the whole sequence
    assert torch.equal(g[0, 20:], full[0, 19:-1].argmax(-1))
    cache = DynamicCache(config=model.config)
    steps = [model(g[:, :20], cache=cache, use_cache=True).logits]
    steps += [model(g[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(20, 26)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMS)
def test_transfer_teacher_is_the_family_attention(family):
    """In transfer mode the module output is the family's own attention (cap, local windows,
    padding included), and the loss reaches the new parameters."""
    ids = rand_ids(2, L)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = family_model(family)(ids, attention_mask=mask, position_ids=pos).logits
    model = swap_attention(family_model(family), LINEAR["lolcats"])
    set_transfer_mode(model, True)
    out = model(ids, attention_mask=mask, position_ids=pos).logits
    assert rel(out[0], ref[0]) < 1e-5 and rel(out[1, 5:], ref[1, 5:]) < 1e-5
    losses = transfer_losses(model)
    assert len(losses) == 4 and all(loss.item() > 0 for loss in losses)
    sum(losses).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_parameters(model).values())


@pytest.mark.parametrize("family", FAMS)
def test_state_dict_names_are_the_family_names(family):
    """Every weight of the family's module keeps its name (q/k norms, Phi-3's fused qkv_proj);
    only the new parameters are added, and only they count as attention parameters."""
    base = family_model(family)
    model = swap_attention(family_model(family, seed=3), LINEAR["lolcats"])
    new = set(attention_parameters(model))
    assert new and all(n.split(".")[-2] == "feature_map" or n.endswith(".gate") for n in new)
    assert set(model.state_dict()) == set(base.state_dict()) | new
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) == new


# ----------------------------------------------------------------------------------------------
# scaling reaches the maps that approximate softmax
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["granite", "gemma3"])
@torch.no_grad()
def test_taylor_and_performer_use_the_family_scaling(family):
    """Taylor (d' = head_dim) at init: phi(q).phi(k) = 1 + s + s^2/2 with s = scaling * q.k, the
    family's scaling (Granite's attention_multiplier, Gemma's query_pre_attn_scalar), not
    1/sqrt(head_dim); Performer: the mean over many random features approaches exp(s)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    s_of = lambda attn: torch.einsum("bhld,bhmd->bhlm", q, k.repeat_interleave(2, 1)) * attn.scaling  # noqa: E731
    taylor = swap_attention(family_model(family), {"kind": "linear", "feature_map": "taylor", "feature_dim": 16})
    attn = taylor.model.layers[0].self_attn
    assert abs(attn.scaling - 16**-0.5) > 0.1
    fq, fk = attn.feature_map.forward_q(q), attn.feature_map.forward_k(k)
    s = s_of(attn)
    torch.testing.assert_close(fq @ fk.repeat_interleave(2, 1).transpose(-1, -2), 1 + s + s * s / 2,
                               atol=1e-4, rtol=1e-4)
    perf = swap_attention(family_model(family), {"kind": "linear", "feature_map": "performer",
                                                 "feature_dim": 8192, "stabilize": False})
    fm = perf.model.layers[0].self_attn.feature_map
    small_q, small_k = q * 0.5, k * 0.5
    est = fm.forward_q(small_q) @ fm.forward_k(small_k).repeat_interleave(2, 1).transpose(-1, -2)
    exact = (s_of(attn) * 0.25).exp()
    assert rel(est, exact) < 0.05
    wrong = (s_of(attn) * 0.25 / attn.scaling * 16**-0.5).exp()  # what 1/sqrt(head_dim) would estimate
    assert rel(est, wrong) > 3 * rel(est, exact)


# ----------------------------------------------------------------------------------------------
# (c) refusals: at plan time, naming the family and the missing piece; and in the library
# ----------------------------------------------------------------------------------------------


def test_family_table_matches_the_config_schema():
    field = next(f for f in C.dataclasses.fields(C.ModelCfg) if f.name == "family")
    assert set(field.metadata["choices"]) == set(FAMILIES) == set(FAMILY_CONFIGS)
    assert [f for f in FAMILIES if FAMILIES[f].softcap] == ["gemma2"]


@pytest.mark.parametrize("overrides", [
    ["attention=performer"],
    ["attention=taylor"],
    ["attention=lolcats", "attention.feature_map=taylor"],
])
def test_softcap_family_with_a_softmax_kernel_map_is_refused_at_plan_time(overrides):
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["model=gemma2_2b", *overrides])
    assert e.value.key == "attention.feature_map"
    msg = str(e.value)
    assert "'gemma2'" in msg and "soft-caps" in msg and "capped form" in msg
    assert any(f"'{m}'" in msg for m in SOFTMAX_KERNEL_MAPS)


def test_softcap_family_plans_every_other_variant():
    others = ["sliding_window", "sink_window", "block_sparse", "topk", "linear_elu", "hedgehog", "cosformer",
              "lolcats", "hybrid"]
    p = grid.plan(["model=gemma2_2b", f"attention={','.join(others)}", "quant=none", "finetune=none"])
    assert {pt.cfg["attention"]["name"] for pt in p.points} == set(others)


def test_embedded_model_only_builds_its_families():
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["model=tiny", "model.family=gemma2"])
    assert e.value.key == "model.family" and "'gemma2'" in str(e.value) and "source: hf" in str(e.value)


@torch.no_grad()
def test_library_refusals_name_the_family_and_the_piece():
    for fm in SOFTMAX_KERNEL_MAPS:
        with pytest.raises(ValueError, match=r"'gemma2' soft-caps .* capped form"):
            swap_attention(family_model("gemma2"), {"kind": "linear", "feature_map": fm})
    # the same map on a family without a cap is defined
    swap_attention(family_model("gemma3"), {"kind": "linear", "feature_map": "performer"})
    # an attention class no family entry covers is refused, naming it and the supported ones
    import transformers

    cfg = transformers.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=97, use_qk_norm=True)
    cohere = transformers.CohereForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"CohereAttention.*supported attention classes.*Gemma2Attention \(gemma2\)"):
        swap_attention(cohere, COVER["sliding_window"])
    assert not any(isinstance(m, FrontierAttention) for m in cohere.modules())  # nothing half-swapped
    swap_attention(cohere, {"kind": "softmax"})  # softmax leaves any model untouched
