"""Tests for frontier.attention: kernels, swapped modules, caches, padding, families, transfer mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attention_models import FAMILIES, rand_ids, tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from frontier.attention import (
    KINDS,
    OPTION_DEFAULTS,
    OPTIONS,
    FrontierAttention,
    AlreadySwappedError,
    LinearStateLayer,
    SlidingWindowStateLayer,
    attention_parameters,
    cache_state_bytes,
    key_validity,
    linear_attention_chunked,
    linear_attention_recurrent_step,
    linear_attention_reference,
    set_transfer_mode,
    sliding_window_attention,
    sliding_window_reference,
    softmax_attention,
    swap_attention,
    transfer_losses,
)

WINDOW = 8
# Every option of conf/attention/, at the tiny test dimensions (2 layers, head_dim 16).
_SMALL = {"window": WINDOW, "chunk_size": 8, "block_size": 4, "k": 6, "sinks": 2}


def _small(name: str) -> dict:
    cfg = OPTION_DEFAULTS[name]
    cfg.update({k: v for k, v in _SMALL.items() if k in cfg})
    if cfg.get("keep_softmax") == "auto":  # the auto choice needs calibration text: tested in test_hybrid
        cfg["keep_softmax"] = [1]
    return cfg


OPTION_CFGS = {name: _small(name) for name in OPTIONS}
SWAPPED = [o for o in OPTIONS if o != "softmax"]
BOUNDED = ["sliding_window", "sink_window", "block_sparse", "lolcats"]  # decode state bounded by a window


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def swapped(option: str, family: str = "llama", **kw):
    return swap_attention(tiny_model(family, **kw), OPTION_CFGS[option])


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def _feats(B, H, L, D):
    return F.elu(torch.randn(B, H, L, D)) + 1


@pytest.mark.parametrize("L", [1, 7, 16, 50, 129])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_linear_chunked_matches_reference(L, heads):
    hq, hkv = heads
    q, k, v = _feats(2, hq, L, 8), _feats(2, hkv, L, 8), torch.randn(2, hkv, L, 6)
    ref = linear_attention_reference(q, k, v, eps=1e-6)
    for chunk, segment in ((4, 512), (4, 8), (16, 16), (16, 48), (64, 512)):
        out = linear_attention_chunked(q, k, v, chunk_size=chunk, eps=1e-6, segment_size=segment)
        assert out.shape == (2, hq, L, 6)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # recurrent steps, one token at a time, reproduce it
    state, outs = None, []
    for t in range(L):
        o, state = linear_attention_recurrent_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-5, rtol=0)
    # the chunked final state equals the recurrent one; it is kept per kv head
    _, (S, z) = linear_attention_chunked(q, k, v, chunk_size=16, return_state=True, segment_size=32)
    assert S.shape == (2, hkv, 8, 6) and z.shape == (2, hkv, 8)
    torch.testing.assert_close(S, state[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z, state[1], atol=1e-4, rtol=1e-5)


def test_linear_chunked_initial_state_and_padding():
    q, k, v = _feats(2, 4, 37, 8), _feats(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    full = linear_attention_chunked(q, k, v, chunk_size=8)
    a, st = linear_attention_chunked(q[:, :, :20], k[:, :, :20], v[:, :, :20], chunk_size=8, return_state=True)
    b = linear_attention_chunked(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], chunk_size=8, initial_state=st)
    torch.testing.assert_close(torch.cat([a, b], 2), full, atol=1e-5, rtol=0)
    # the caller's state is not updated in place; the autograd path gives the same numbers
    st_copy = (st[0].clone(), st[1].clone())
    linear_attention_chunked(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], chunk_size=8, initial_state=st)
    assert torch.equal(st[0], st_copy[0]) and torch.equal(st[1], st_copy[1])
    qg = q.clone().requires_grad_()
    torch.testing.assert_close(linear_attention_chunked(qg, k, v, chunk_size=8), full, atol=1e-6, rtol=0)
    # invalid keys contribute nothing, even if they hold NaN
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[1, :5] = False
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :5] = float("nan")
    v2[1, :, :5] = float("nan")
    out = linear_attention_chunked(q, k2, v2, chunk_size=8, key_valid=valid)
    ref = linear_attention_reference(q[1:, :, 5:], k[1:, :, 5:], v[1:, :, 5:])
    torch.testing.assert_close(out[1:, :, 5:], ref, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_linear_chunked_gradcheck():
    q = torch.randn(1, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 11, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 11, 2, dtype=torch.float64, requires_grad=True)
    phi = lambda x: F.elu(x) + 1  # noqa: E731  (maps applied inside the kernel, per segment)

    def fn(a, b, c):
        return linear_attention_chunked(a, b, c, chunk_size=2, segment_size=4, q_map=phi, k_map=phi)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    torch.testing.assert_close(fn(q, k, v), linear_attention_reference(phi(q), phi(k), v), atol=1e-10, rtol=0)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
@pytest.mark.parametrize("lq_lk", [(1, 1), (23, 23), (5, 12), (40, 47)])
def test_sliding_window_kernel_matches_reference(window, lq_lk):
    lq, lk = lq_lk
    q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, 2, lk, 8), torch.randn(2, 2, lk, 8)
    valid = torch.ones(2, lk, dtype=torch.bool)
    valid[1, :3] = False
    for kv in (None, valid):
        ref = sliding_window_reference(q, k, v, window, key_valid=kv)
        for bs in (4, 256):
            out = sliding_window_attention(q, k, v, window, key_valid=kv, block_size=bs)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sliding_window_reference_is_masked_softmax():
    q, k, v = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    i = torch.arange(10)[:, None]
    j = torch.arange(10)[None, :]
    mask = (j <= i) & (j > i - 3)
    s = (q @ k.transpose(-1, -2)) / 2.0
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(sliding_window_reference(q, k, v, 3), ref, atol=1e-6, rtol=0)
    # window >= L is plain causal softmax
    torch.testing.assert_close(sliding_window_reference(q, k, v, 10), softmax_attention(q, k, v), atol=1e-5, rtol=0)


def test_key_validity_reads_masks():
    assert key_validity(None, 4) is None
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    m4 = causal[None, None] & pad[:, None, None, :]
    expected = pad.clone()
    assert torch.equal(key_validity(m4, 5), expected)
    add = torch.where(m4, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(add, 5), expected)
    assert torch.equal(key_validity(pad.long(), 5), expected)
    # last queries of a 5-key mask (cached prefill / decode)
    assert torch.equal(key_validity(m4[:, :, -4:], 4), expected[:, -4:])
    assert key_validity(m4[:, :, -2:], 2) is None
    assert key_validity(m4[:, :, -1:], 1) is None
    # a sliding-window mask narrower than the prompt still gives the right validity
    band = causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)
    assert torch.equal(key_validity(band[None, None] & pad[:, None, None, :], 5), expected)
    assert key_validity(causal[None, None].expand(2, 1, 5, 5), 5) is None


# ----------------------------------------------------------------------------------------------
# module level
# ----------------------------------------------------------------------------------------------


def _module_inputs(model, L=21, B=2):
    h = torch.randn(B, L, 64)
    pos = torch.arange(L)[None].expand(B, L)
    return h, model.model.rotary_emb(h, pos)


def _qkv(attn, h, pe):
    B, L, _ = h.shape
    shape = (B, L, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    return (*apply_rotary_pos_emb(q, k, *pe), v)


@torch.no_grad()
def test_module_softmax_teacher_matches_hf_attention():
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    h, pe = _module_inputs(model)
    out, _ = attn(h, position_embeddings=pe, attention_mask=None)
    q, k, v = _qkv(attn, h, pe)
    ref = attn.o_proj(softmax_attention(q, k, v, scale=attn.scaling).transpose(1, 2).reshape(2, 21, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_module_sliding_window_matches_reference():
    model = swapped("sliding_window")
    attn = model.model.layers[0].self_attn
    h, pe = _module_inputs(model)
    out, _ = attn(h, position_embeddings=pe, attention_mask=None)
    q, k, v = _qkv(attn, h, pe)
    ref = sliding_window_reference(q, k, v, WINDOW, scale=attn.scaling)
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(2, 21, -1)), atol=1e-5, rtol=0)


@torch.no_grad()
def test_module_linear_matches_reference_and_identity_init():
    model = swapped("linear_elu")
    attn = model.model.layers[0].self_attn
    h, pe = _module_inputs(model)
    out, _ = attn(h, position_embeddings=pe, attention_mask=None)
    q, k, v = _qkv(attn, h, pe)
    ref = linear_attention_reference(F.elu(q) + 1, F.elu(k) + 1, v, eps=1e-6)
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(2, 21, -1)), atol=1e-5, rtol=0)
    # a non-identity map is applied per head before elu+1
    fm = attn.feature_map
    fm.q_weight.normal_()
    fm.k_weight.normal_()
    out2, _ = attn(h, position_embeddings=pe, attention_mask=None)
    qm = torch.einsum("bhld,hde->bhle", q, fm.q_weight)
    km = torch.einsum("bhld,hde->bhle", k, fm.k_weight)
    ref2 = attn.o_proj(linear_attention_reference(F.elu(qm) + 1, F.elu(km) + 1, v).transpose(1, 2).reshape(2, 21, -1))
    torch.testing.assert_close(out2, ref2, atol=1e-4, rtol=1e-4)
    # several segments (feature maps fused per segment) give the same result
    attn.segment_size = 8
    torch.testing.assert_close(attn(h, position_embeddings=pe)[0], ref2, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# cache, generate, padding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@torch.no_grad()
def test_cached_generate_equals_uncached(option):
    model = swapped(option)
    prompt = rand_ids(1, 20)  # longer than the window
    g_cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    g_plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert g_cached.shape == (1, 28)
    assert torch.equal(g_cached, g_plain)

    full = model(g_cached).logits
    cache = DynamicCache(config=model.config)
    steps = [model(g_cached[:, :20], cache=cache, use_cache=True).logits]
    for t in range(20, 28):
        steps.append(model(g_cached[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 28
    kind = OPTION_CFGS[option]["kind"]
    expected = {"sliding_window": SlidingWindowStateLayer, "linear": LinearStateLayer}.get(kind)
    keep = set(OPTION_CFGS[option].get("keep_softmax") or ())
    if expected is not None:
        assert all(type(layer) is expected for i, layer in enumerate(cache.layers) if i not in keep)


@pytest.mark.parametrize("option", SWAPPED)
@torch.no_grad()
def test_chunked_prefill_with_cache(option):
    """Prefill in two chunks (second chunk > 1 token, cache non-empty) equals one forward."""
    model = swapped(option)
    ids = rand_ids(2, 30)
    full = model(ids).logits
    cache = DynamicCache()  # lazily-grown cache without config
    a = model(ids[:, :13], cache=cache, use_cache=True).logits
    b = model(ids[:, 13:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("option", OPTIONS)
@torch.no_grad()
def test_left_padded_batch_equals_single_rows(option, impl):
    model = swapped(option, impl=impl)
    a, b, pad = rand_ids(1, 20, seed=2), rand_ids(1, 13, seed=3), 7
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[0], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, pad:], model(b).logits[0], atol=1e-5, rtol=0)
    # generate on the padded batch = each row alone (cached, bounded caches)
    g = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(g[0, 20:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 20:])
    assert torch.equal(g[1, 20:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 13:])


@pytest.mark.parametrize("option", ["sliding_window", "linear_elu", "lolcats", "sink_window", "block_sparse"])
@torch.no_grad()
def test_beam_search_and_multiple_sequences(option):
    """Exercises reorder_cache / batch_repeat_interleave of the custom cache layers."""
    model = swapped(option)
    prompt = rand_ids(1, 12)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("option", OPTIONS)
@torch.no_grad()
def test_families_swap_and_generate(family, option):
    model = swap_attention(tiny_model(family), OPTION_CFGS[option])
    keep = set(OPTION_CFGS[option].get("keep_softmax") or ())
    for i, layer in enumerate(model.model.layers):
        swapped_layer = option != "softmax" and i not in keep
        assert isinstance(layer.self_attn, FrontierAttention) == swapped_layer
        if swapped_layer:
            assert layer.self_attn.kind == OPTION_CFGS[option]["kind"]
        else:
            assert type(layer.self_attn).__name__.startswith(type(model).__name__[:4])
    assert model.config.frontier_attention["name"] == option
    assert "frontier_attention" in model.config.to_json_string()
    prompt = rand_ids(2, 11)
    g = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert g.shape == (2, 17)
    assert torch.equal(g, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


@torch.no_grad()
def test_cache_state_bytes_scaling():
    def nbytes(option, L):
        model = swapped(option)
        cache = DynamicCache(config=model.config)
        model(rand_ids(1, L), cache=cache, use_cache=True)
        return cache_state_bytes(cache)

    assert cache_state_bytes(None) == 0

    class OwnSize:  # e.g. frontier.kvcache.Int8KVLayer: layers that know their size report it
        def state_bytes(self):
            return 123

    custom = DynamicCache()
    custom.layers.append(OwnSize())
    assert cache_state_bytes(custom) == 123
    soft = [nbytes("softmax", L) for L in (10, 20, 40)]
    assert soft[0] < soft[1] < soft[2] and soft[2] == 4 * soft[0]
    sw = [nbytes("sliding_window", L) for L in (WINDOW + 2, 20, 40)]
    assert sw[0] == sw[1] == sw[2] > 0
    # 2 layers x 2 kv heads x (window - 1) keys x 16 dims x fp32, keys + values
    assert sw[0] == 2 * 2 * 2 * (WINDOW - 1) * 16 * 4
    lin = [nbytes("linear_elu", L) for L in (5, 20, 40)]
    assert lin[0] == lin[1] == lin[2] == 2 * (2 * 16 * 16 + 2 * 16) * 4
    for option in SWAPPED:  # every bounded / linear variant: constant once past its pattern; topk grows
        long = [nbytes(option, L) for L in (40, 60, 80)]
        if option == "topk" or option.startswith("hybrid"):  # full KV cache (topk), softmax layer kept (hybrids)
            assert long[0] < long[1] < long[2], option
        else:
            assert long[0] == long[1] == long[2] > 0, option


# ----------------------------------------------------------------------------------------------
# parameters, transfer mode, swapping rules
# ----------------------------------------------------------------------------------------------


def test_attention_parameters_and_state_dict():
    model = swapped("linear_elu")
    params = attention_parameters(model)
    assert params and all("feature_map" in n for n in params)
    named = dict(model.named_parameters())
    assert all(named[n] is p for n, p in params.items())
    assert not any(n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in params)
    assert params["model.layers.0.self_attn.feature_map.q_weight"].shape == (4, 16, 16)
    assert params["model.layers.0.self_attn.feature_map.k_weight"].shape == (2, 16, 16)
    # original keys unchanged: a base checkpoint loads into the swapped model, only feature maps extra
    base_sd = tiny_model().state_dict()
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and set(missing) == set(params)
    # and a swapped checkpoint loads strictly
    other = swapped("linear_elu", seed=5)
    other.load_state_dict(model.state_dict(), strict=True)

    assert attention_parameters(swapped("sliding_window")) == {}
    assert attention_parameters(swapped("softmax")) == {}
    no_map = swap_attention(tiny_model(), {**OPTION_CFGS["linear_elu"], "learned_map": False})
    assert attention_parameters(no_map) == {}
    # identity init: learned map at init == fixed elu+1
    ids = rand_ids(2, 15)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, no_map(ids).logits, atol=1e-6, rtol=0)


def test_gradients_flow_to_projections_and_feature_maps():
    model = swapped("linear_elu")
    ids = rand_ids(2, 17)
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_parameters(model).values())


def test_transfer_mode_linear():
    ids = rand_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    teacher_model = tiny_model()
    with torch.no_grad():
        expected = teacher_model(ids, attention_mask=mask, position_ids=pos).logits
    model = swapped("linear_elu")
    mods = set_transfer_mode(model, True)
    assert len(mods) == 2 and all(m.transfer_mode for m in mods)
    model.train()
    out = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 5:], expected[1, 5:], atol=1e-5, rtol=0)
    losses = transfer_losses(model)
    assert len(losses) == 2
    for loss in losses:
        assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    sum(losses).backward()
    params = attention_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    set_transfer_mode(model, False)
    assert transfer_losses(model) == []
    model.eval()
    with torch.no_grad():
        student = model(ids).logits
    assert not torch.allclose(student, expected[:1].expand_as(student), atol=1e-3)


@torch.no_grad()
def test_transfer_mode_sliding_window():
    model = swapped("sliding_window")
    set_transfer_mode(model, True)
    short = rand_ids(1, WINDOW)  # window covers everything: student == teacher
    model(short)
    assert all(loss.item() < 1e-10 for loss in transfer_losses(model))
    model(rand_ids(1, 30))
    assert all(loss.item() > 0 for loss in transfer_losses(model))
    assert set_transfer_mode(swapped("softmax"), True) == []


def test_swap_errors():
    with pytest.raises(ValueError, match="kind"):
        swap_attention(tiny_model(), {"kind": "nope"})
    with pytest.raises(ValueError, match="window"):
        swap_attention(tiny_model(), {"kind": "sliding_window", "window": 0})
    with pytest.raises(ValueError, match="feature_map"):
        swap_attention(tiny_model(), {"kind": "linear", "feature_map": "taylor2"})

    class Strange(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Strange"):
        swap_attention(Strange(), OPTION_CFGS["linear_elu"])
    model = swapped("linear_elu")
    with pytest.raises(AlreadySwappedError):
        swap_attention(model, OPTION_CFGS["sliding_window"])
    assert KINDS == ("softmax", "sliding_window", "sink_window", "block_sparse", "topk", "linear", "lolcats")
    with pytest.raises(ValueError, match="auto"):
        swap_attention(tiny_model(), {**OPTION_CFGS["linear_elu"], "keep_softmax": "auto"})
    with pytest.raises(ValueError, match="outside"):
        swap_attention(tiny_model(), {**OPTION_CFGS["linear_elu"], "keep_softmax": [5]})
    # swap is in place and keeps the very same projection modules
    base = tiny_model()
    q = base.model.layers[1].self_attn.q_proj
    assert swap_attention(base, OPTION_CFGS["sliding_window"]) is base
    assert base.model.layers[1].self_attn.q_proj is q
    # a deep copy of a swapped model still works
    with torch.no_grad():
        ids = rand_ids(1, 9)
        torch.testing.assert_close(copy.deepcopy(base)(ids).logits, base(ids).logits)


@pytest.mark.parametrize("option", SWAPPED)
@torch.no_grad()
def test_mistral_config_sliding_mask_with_padding(option):
    """Mistral builds a sliding-window mask from config.sliding_window (here shorter than the
    prompt); the swapped modules only read key validity from it, and padding still works."""
    model = swap_attention(tiny_model("mistral", sliding_window=5), OPTION_CFGS[option])
    a, b, pad = rand_ids(1, 16, seed=4), rand_ids(1, 10, seed=5), 6
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(batch[0], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, pad:], model(b).logits[0], atol=1e-5, rtol=0)
    g = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(g[1, 16:], model.generate(b, max_new_tokens=5, do_sample=False)[0, 10:])


@pytest.mark.parametrize("option", SWAPPED)
@torch.no_grad()
def test_bfloat16_model_runs(option):
    model = swapped(option).to(torch.bfloat16)
    ids = rand_ids(2, 20)
    assert torch.isfinite(model(ids).logits.float()).all()
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    if option == "linear_elu":  # the recurrent state is accumulated in float32
        assert cache.layers[0].S.dtype == torch.float32
    g = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert g.shape == (2, 24)
