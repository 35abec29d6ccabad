"""Tests for frontier.attention.sparse: sink_window, block_sparse and top-k attention
(kernels vs naive references, cache layers, swapped modules in tiny Llama/Qwen2/Mistral models)."""

from __future__ import annotations

import pytest
import torch
from attention_models import FAMILIES, rand_ids, tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from frontier.attention import cache_state_bytes, sliding_window_reference, softmax_attention
from frontier.attention.modules import FrontierAttention
from frontier.attention.sparse import (
    SPARSE_DEFAULTS,
    SPARSE_MODULES,
    BlockSparseAttention,
    BlockSparseStateLayer,
    SinkWindowAttention,
    SinkWindowStateLayer,
    TopKAttention,
    TopKStateLayer,
    normalize_sparse_config,
)
from frontier.attention.sparse_kernels import (
    block_sparse_attention,
    block_sparse_reference,
    sink_window_attention,
    sink_window_reference,
    topk_attention,
    topk_reference,
)

KINDS = ("sink_window", "block_sparse", "topk")
# small patterns so that 20-40 token prompts go well past them
CFGS = {
    "sink_window": {"name": "sink_window", "kind": "sink_window", "window": 6, "sinks": 2, "block_size": 8},
    "block_sparse": {"name": "block_sparse", "kind": "block_sparse", "block_size": 4, "local_blocks": 2,
                     "global_blocks": 1},
    "topk": {"name": "topk", "kind": "topk", "k": 5, "block_size": 8},
}
LAYERS = {"sink_window": SinkWindowStateLayer, "block_sparse": BlockSparseStateLayer, "topk": TopKStateLayer}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def swap_sparse(model, cfg: dict):
    """Local stand-in for swap_attention: every layer's self_attn -> the sparse module of cfg."""
    cls = SPARSE_MODULES[cfg["kind"]]
    for layer in model.model.layers:
        layer.self_attn = cls(layer.self_attn, cfg)
    model.config.frontier_attention = dict(cfg)
    return model


def swapped(kind: str, family: str = "llama", **kw):
    return swap_sparse(tiny_model(family, **kw), CFGS[kind])


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def test_normalize_sparse_config():
    assert set(SPARSE_MODULES) == set(SPARSE_DEFAULTS) == set(KINDS)
    for kind, default in SPARSE_DEFAULTS.items():
        assert normalize_sparse_config(default) == default
        assert normalize_sparse_config({"kind": kind}) == default  # defaults filled, name = kind
        assert SPARSE_MODULES[kind].kind == kind
    assert normalize_sparse_config({"kind": "topk", "k": 3, "name": "t3"}) == {
        "name": "t3", "kind": "topk", "k": 3, "block_size": 256}
    bad = [
        ({"kind": "sink_window", "window": 0}, "'window' must be an int >= 1"),
        ({"kind": "sink_window", "sinks": -1}, "'sinks' must be an int >= 0"),
        ({"kind": "sink_window", "window": 4.0}, "'window'"),
        ({"kind": "sink_window", "window": True}, "'window'"),
        ({"kind": "block_sparse", "block_size": 0}, "'block_size' must be an int >= 1"),
        ({"kind": "block_sparse", "local_blocks": 0}, "'local_blocks'"),
        ({"kind": "block_sparse", "global_blocks": "1"}, "'global_blocks'"),
        ({"kind": "topk", "k": 0}, "'k' must be an int >= 1"),
        ({"kind": "topk", "block_size": None}, "'block_size'"),
        ({"kind": "dense"}, "'kind'"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            normalize_sparse_config(cfg)
    with pytest.raises(ValueError, match="kind"):
        SinkWindowAttention(tiny_model().model.layers[0].self_attn, CFGS["topk"])


# ----------------------------------------------------------------------------------------------
# kernels vs naive references
# ----------------------------------------------------------------------------------------------

SINK_PARAMS = [(1, 0), (3, 2), (6, 4), (100, 1)]  # (window, sinks)
BLOCK_PARAMS = [(4, 2, 1), (5, 1, 0), (3, 3, 2), (1, 1, 1)]  # (block_size, local_blocks, global_blocks)
TOPK_PARAMS = [1, 3, 8, 100]


def _validity(B: int, L: int) -> torch.Tensor:
    """Row 0: one invalid key in the middle; row 1: left padding; row 2: no valid key at all."""
    valid = torch.ones(B, L, dtype=torch.bool)
    if L > 8:
        valid[0, 7] = False
    valid[1, : min(5, L - 1)] = False
    valid[2] = False
    return valid


@pytest.mark.parametrize("lq_lk", [(1, 1), (23, 23), (5, 37), (1, 30), (50, 50)])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_kernels_match_reference(lq_lk, heads):
    lq, lk = lq_lk
    hq, hkv = heads
    q, k, v = torch.randn(3, hq, lq, 8), torch.randn(3, hkv, lk, 8), torch.randn(3, hkv, lk, 6)
    for kv in (None, _validity(3, lk)):
        for window, sinks in SINK_PARAMS:
            ref = sink_window_reference(q, k, v, window, sinks, key_valid=kv)
            for bs in (4, 7, 256):
                out = sink_window_attention(q, k, v, window, sinks, key_valid=kv, block_size=bs)
                assert out.shape == (3, hq, lq, 6)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        for bs, lb, gb in BLOCK_PARAMS:
            ref = block_sparse_reference(q, k, v, bs, lb, gb, key_valid=kv)
            for qb in (None, 3, 64):
                out = block_sparse_attention(q, k, v, bs, lb, gb, key_valid=kv, query_block=qb)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        for kt in TOPK_PARAMS:
            ref = topk_reference(q, k, v, kt, key_valid=kv)
            for bs in (4, 256):
                torch.testing.assert_close(topk_attention(q, k, v, kt, key_valid=kv, block_size=bs), ref,
                                           atol=1e-5, rtol=0)
        if kv is not None:  # a row without a valid key outputs zeros
            assert torch.equal(ref[2], torch.zeros_like(ref[2]))


def test_references_are_the_intended_patterns():
    q, k, v = torch.randn(2, 4, 19, 8), torch.randn(2, 2, 19, 8), torch.randn(2, 2, 19, 8)
    causal = softmax_attention(q, k, v)
    # degenerate settings reduce to causal softmax / sliding window
    torch.testing.assert_close(sink_window_reference(q, k, v, 19, 0), causal, atol=1e-5, rtol=0)
    torch.testing.assert_close(sink_window_reference(q, k, v, 5, 0), sliding_window_reference(q, k, v, 5),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(block_sparse_reference(q, k, v, 4, 5, 0), causal, atol=1e-5, rtol=0)
    torch.testing.assert_close(block_sparse_reference(q, k, v, 1, 1, 19), causal, atol=1e-5, rtol=0)
    torch.testing.assert_close(topk_reference(q, k, v, 19), causal, atol=1e-5, rtol=0)
    # explicit masks
    i, j = torch.arange(19)[:, None], torch.arange(19)[None, :]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8**-0.5
    vv = v.repeat_interleave(2, 1)

    def masked(mask):
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv

    sink = (j <= i) & ((j < 3) | (j > i - 4))
    torch.testing.assert_close(sink_window_reference(q, k, v, 4, 3), masked(sink), atol=1e-6, rtol=0)
    block = (j <= i) & ((j // 4 >= i // 4 - 1) | (j < 4))  # own + previous block, first block global
    torch.testing.assert_close(block_sparse_reference(q, k, v, 4, 2, 1), masked(block), atol=1e-6, rtol=0)
    s = scores.masked_fill(j > i, float("-inf"))
    top = s >= s.topk(3, dim=-1).values[..., -1:]  # continuous random scores: no ties
    torch.testing.assert_close(topk_reference(q, k, v, 3), masked(top & (j <= i)), atol=1e-6, rtol=0)
    # left padding: the padded row equals the row alone (sinks/blocks counted from its first token)
    pad = 6
    valid = torch.ones(2, 19, dtype=torch.bool)
    valid[1, :pad] = False
    for fn in (lambda *a, **kw: sink_window_reference(*a, 4, 3, **kw),
               lambda *a, **kw: block_sparse_reference(*a, 4, 2, 1, **kw),
               lambda *a, **kw: topk_reference(*a, 3, **kw)):
        padded = fn(q, k, v, key_valid=valid)
        alone = fn(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:])
        torch.testing.assert_close(padded[1:, :, pad:], alone, atol=1e-6, rtol=0)


def test_topk_ties_are_deterministic():
    # integer-valued q/k: scores are exact, and duplicated keys tie exactly
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (1, 2, 6, 4), generator=g).float()
    k = torch.cat([base, base, base[:, :, :3]], 2)  # keys j and j + 6 identical
    q = torch.randint(-2, 3, (1, 4, 15, 4), generator=g).float()
    v = torch.randn(1, 2, 15, 5)
    for kt in (1, 2, 4, 7):
        ref = topk_reference(q, k, v, kt, scale=1.0)
        for bs in (1, 4, 64):
            torch.testing.assert_close(topk_attention(q, k, v, kt, scale=1.0, block_size=bs), ref, atol=1e-5, rtol=0)
    # k = 1 with two equal best keys picks the earlier one
    q1 = torch.ones(1, 1, 1, 2)
    k1 = torch.tensor([[[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]]])
    v1 = torch.arange(4.0).view(1, 1, 4, 1)
    assert topk_attention(q1, k1, v1, 1).item() == 1.0
    assert topk_reference(q1, k1, v1, 1).item() == 1.0


# (kind, pattern params): the last two of each kind have no global keys / a window of one key
CACHE_CASES = [
    ("sink_window", (5, 3)),
    ("sink_window", (4, 0)),
    ("sink_window", (1, 0)),
    ("block_sparse", (4, 2, 2)),
    ("block_sparse", (3, 2, 0)),
    ("block_sparse", (1, 1, 0)),
    ("topk", (4,)),
]


def _kernel_reference_layer(kind: str, params: tuple):
    """(kernel fn(q, k, v, key_valid, **cache_view), reference fn(q, k, v, key_valid), layer, bound)."""
    if kind == "sink_window":
        w, s = params
        return (lambda q, k, v, kv, **view: sink_window_attention(q, k, v, w, s, None, kv, block_size=4, **view),
                lambda q, k, v, kv: sink_window_reference(q, k, v, w, s, key_valid=kv),
                SinkWindowStateLayer(sinks=s, window=w), s + w - 1)
    if kind == "block_sparse":
        bs, lb, gb = params
        return (lambda q, k, v, kv, **view: block_sparse_attention(q, k, v, bs, lb, gb, None, kv, **view),
                lambda q, k, v, kv: block_sparse_reference(q, k, v, bs, lb, gb, key_valid=kv),
                BlockSparseStateLayer(block_size=bs, local_blocks=lb, global_blocks=gb), gb * bs + lb * bs - 1)
    (kt,) = params
    return (lambda q, k, v, kv: topk_attention(q, k, v, kt, None, kv, block_size=4),
            lambda q, k, v, kv: topk_reference(q, k, v, kt, key_valid=kv), TopKStateLayer(), None)


@pytest.mark.parametrize("kind,params", CACHE_CASES)
def test_cached_continuation_matches_one_shot(kind, params):
    """Prefill in chunks (13, then 5 tokens), then decode token by token through the cache layer:
    the outputs equal one call over the whole sequence, and the bounded layers stay bounded."""
    B, L = 4, 45
    q, k, v = torch.randn(B, 4, L, 8), torch.randn(B, 2, L, 8), torch.randn(B, 2, L, 6)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    valid[2, :30] = False  # no valid key during the prefill chunks
    valid[3, 9] = False  # a hole
    fn, ref_fn, layer, bound = _kernel_reference_layer(kind, params)
    full = fn(q, k, v, valid)
    torch.testing.assert_close(full, ref_fn(q, k, v, valid), atol=1e-5, rtol=0)
    bounds = [0, 13, 18, *range(19, L + 1)]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sl = slice(a, b)
        if kind == "topk":
            kk, vv, kval = layer.update_with_validity(k[:, :, sl], v[:, :, sl], valid[:, sl])
            outs.append(fn(q[:, :, sl], kk, vv, kval))
        else:
            view = layer.update_with_validity(k[:, :, sl], v[:, :, sl], valid[:, sl])
            outs.append(fn(q[:, :, sl], view.keys, view.values, view.key_valid, k_start=view.k_start,
                           offsets=view.offsets, prefix=view.prefix))
            assert layer.keys.shape[2] + layer.global_keys.shape[2] <= bound
        assert layer.get_seq_length() == b
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=0)
    if kind == "topk":
        assert layer.keys.shape[2] == L  # full KV cache
    else:
        assert layer.keys.shape[2] + layer.global_keys.shape[2] == bound
        assert layer.offsets.tolist() == [0, 7, 30, 0]


# ----------------------------------------------------------------------------------------------
# modules in tiny models
# ----------------------------------------------------------------------------------------------


def _qkv(attn, h, pe):
    B, L, _ = h.shape
    shape = (B, L, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    return (*apply_rotary_pos_emb(q, k, *pe), v)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_module_matches_reference(kind):
    model = swapped(kind)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, FrontierAttention) and attn.kind == kind
    assert isinstance(attn, {"sink_window": SinkWindowAttention, "block_sparse": BlockSparseAttention,
                             "topk": TopKAttention}[kind])
    h = torch.randn(2, 21, 64)
    pe = model.model.rotary_emb(h, torch.arange(21)[None].expand(2, 21))
    out, _ = attn(h, position_embeddings=pe, attention_mask=None)
    q, k, v = _qkv(attn, h, pe)
    c = CFGS[kind]
    ref = {
        "sink_window": lambda: sink_window_reference(q, k, v, c["window"], c["sinks"], scale=attn.scaling),
        "block_sparse": lambda: block_sparse_reference(q, k, v, c["block_size"], c["local_blocks"],
                                                       c["global_blocks"], scale=attn.scaling),
        "topk": lambda: topk_reference(q, k, v, c["k"], scale=attn.scaling),
    }[kind]()
    torch.testing.assert_close(out, attn.o_proj(ref.transpose(1, 2).reshape(2, 21, -1)), atol=1e-5, rtol=0)
    # the old state dict loads strictly (projection names kept, no extra parameters)
    model.load_state_dict(tiny_model().state_dict(), strict=True)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_cached_generate_equals_uncached(kind, family):
    model = swapped(kind, family)
    prompt = rand_ids(1, 20)  # longer than every pattern
    g_cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    g_plain = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert g_cached.shape == (1, 32)
    assert torch.equal(g_cached, g_plain)
    # step by step through a cache == one forward
    full = model(g_cached).logits
    cache = DynamicCache(config=model.config)
    steps = [model(g_cached[:, :20], cache=cache, use_cache=True).logits]
    for t in range(20, 32):
        steps.append(model(g_cached[:, t: t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 32
    assert all(type(layer) is LAYERS[kind] for layer in cache.layers)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_hybrid_with_softmax_layer(kind, first):
    """One layer swapped, the other kept softmax (either order): the mask transformers builds
    must cover the softmax layer's keys, the sparse layer only reads new-key validity."""
    model = tiny_model()
    i = 0 if first else 1
    model.model.layers[i].self_attn = SPARSE_MODULES[kind](model.model.layers[i].self_attn, CFGS[kind])
    a, b, pad = rand_ids(1, 20, seed=2), rand_ids(1, 13, seed=3), 7
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    g = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(g, model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                         use_cache=False))
    assert torch.equal(g[1, 20:], model.generate(b, max_new_tokens=8, do_sample=False)[0, 13:])


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_chunked_prefill_with_cache(kind):
    model = swapped(kind)
    ids = rand_ids(2, 30)
    full = model(ids).logits
    cache = DynamicCache()  # lazily-grown cache without config
    a = model(ids[:, :13], cache=cache, use_cache=True).logits
    b = model(ids[:, 13:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_left_padded_batch_equals_single_rows(kind, impl):
    model = swapped(kind, impl=impl)
    a, b, pad = rand_ids(1, 20, seed=2), rand_ids(1, 13, seed=3), 7  # pad: not a multiple of any block
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[0], model(a).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, pad:], model(b).logits[0], atol=1e-5, rtol=0)
    # generate on the padded batch (cached) = each row alone
    g = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(g[0, 20:], model.generate(a, max_new_tokens=8, do_sample=False)[0, 20:])
    assert torch.equal(g[1, 20:], model.generate(b, max_new_tokens=8, do_sample=False)[0, 13:])
    assert torch.equal(g, model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                         use_cache=False))


@pytest.mark.parametrize("kind", ["sink_window", "block_sparse"])
@torch.no_grad()
def test_mistral_config_sliding_mask_with_padding(kind):
    """Mistral builds a sliding-window mask shorter than the prompt; only key validity is read."""
    model = swap_sparse(tiny_model("mistral", sliding_window=5), CFGS[kind])
    a, b, pad = rand_ids(1, 16, seed=4), rand_ids(1, 10, seed=5), 6
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(batch[1, pad:], model(b).logits[0], atol=1e-5, rtol=0)
    g = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(g[1, 16:], model.generate(b, max_new_tokens=5, do_sample=False)[0, 10:])


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_beam_search_and_multiple_sequences(kind):
    """Exercises reorder_cache / batch_repeat_interleave of the cache layers."""
    model = swapped(kind)
    prompt = rand_ids(1, 12)
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@torch.no_grad()
def test_cache_stays_bounded():
    """State bytes after 200 tokens == after 100 for sink_window/block_sparse (and the exact
    pattern size); top-k keeps every key. The long cached run still equals one forward."""
    ids = rand_ids(1, 200, seed=7)
    sizes = {}
    for kind in KINDS:
        model = swapped(kind)
        cache = DynamicCache(config=model.config)
        model(ids[:, :100], cache=cache, use_cache=True)
        n100 = cache_state_bytes(cache)
        for s in range(100, 190, 30):  # multi-token chunks
            model(ids[:, s: s + 30], cache=cache, use_cache=True)
        for t in range(190, 199):  # single tokens
            model(ids[:, t: t + 1], cache=cache, use_cache=True)
        last = model(ids[:, 199:], cache=cache, use_cache=True).logits
        assert cache.get_seq_length() == 200
        torch.testing.assert_close(last, model(ids).logits[:, -1:], atol=1e-4, rtol=0)
        sizes[kind] = (n100, cache_state_bytes(cache))
    per_key = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x fp32
    sw, bsp = CFGS["sink_window"], CFGS["block_sparse"]
    assert sizes["sink_window"] == (per_key * (sw["sinks"] + sw["window"] - 1),) * 2
    n_block = (bsp["global_blocks"] + bsp["local_blocks"]) * bsp["block_size"] - 1
    assert sizes["block_sparse"] == (per_key * n_block,) * 2
    assert sizes["topk"] == (per_key * 100, per_key * 200)


def test_gradients_with_padding_are_finite():
    """Backward through the kernels with padded rows (queries without visible keys)."""
    ids = rand_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for kind in KINDS:
        model = swapped(kind)
        model(ids, attention_mask=mask, position_ids=pos, labels=ids).loss.backward()
        attn = model.model.layers[0].self_attn
        for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@torch.no_grad()
def test_transfer_mode():
    """FrontierAttention's transfer mode: student == teacher while the pattern covers every key."""
    for kind in KINDS:
        model = swapped(kind)
        mods = [m for m in model.modules() if isinstance(m, FrontierAttention)]
        for m in mods:
            m.transfer_mode = True
        model(rand_ids(1, 5))  # within window+sinks, the first local blocks, and k keys
        assert all(m.transfer_loss.item() < 1e-10 for m in mods)
        model(rand_ids(1, 30))
        assert all(m.transfer_loss.item() > 0 for m in mods)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_bfloat16_model_runs(kind):
    model = swapped(kind).to(torch.bfloat16)
    ids = rand_ids(2, 20)
    assert torch.isfinite(model(ids).logits.float()).all()
    g = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert g.shape == (2, 24)
