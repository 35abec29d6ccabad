"""Tests for frontier.attention.featuremaps: shapes, kernel identities, state, gradients, end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from frontier.attention import kernels as K
from frontier.attention.featuremaps import (
    FEATURE_MAP_KEYS,
    FEATURE_MAP_NAMES,
    FeatureMap,
    make_feature_map,
    orthogonal_gaussian,
    validate_feature_map_cfg,
)

B, HQ, HKV, L, D = 2, 4, 2, 11, 8
GROUPS = HQ // HKV
CFGS = {
    "elu": {"feature_map": "elu"},
    "elu_fixed": {"feature_map": "elu", "learned_map": False},
    "relu": {"feature_map": "relu"},
    "hedgehog": {"feature_map": "hedgehog"},
    "hedgehog_f4": {"feature_map": "hedgehog", "feature_dim": 4},
    "hedgehog_f12": {"feature_map": "hedgehog", "feature_dim": 12},
    "taylor": {"feature_map": "taylor", "feature_dim": 6},
    "taylor_fixed": {"feature_map": "taylor", "feature_dim": 8, "learned_map": False},
    "performer": {"feature_map": "performer", "feature_dim": 32},
    "performer_learned": {"feature_map": "performer", "feature_dim": 16, "learned_map": True},
    "cosformer": {"feature_map": "cosformer", "max_len": 64},
    "cosformer_fixed": {"feature_map": "cosformer", "max_len": 64, "learned_map": False},
}
EXPECTED_F = {
    "elu": D, "elu_fixed": D, "relu": D, "hedgehog": 2 * D, "hedgehog_f4": 8, "hedgehog_f12": 24,
    "taylor": 1 + 6 + 21, "taylor_fixed": 1 + 8 + 36, "performer": 32, "performer_learned": 16,
    "cosformer": 2 * D, "cosformer_fixed": 2 * D,
}
LEARNED = {"elu", "relu", "hedgehog", "hedgehog_f4", "hedgehog_f12", "taylor", "performer_learned", "cosformer"}


def _fm(name: str, dtype=torch.float32, **over) -> FeatureMap:
    torch.manual_seed(0)
    return make_feature_map({**CFGS[name], **over}, D, HQ, HKV, dtype=dtype)


def _qk(dtype=torch.float32, seed=1, length=L, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, length, D, generator=g, dtype=dtype) * scale
    k = torch.randn(B, HKV, length, D, generator=g, dtype=dtype) * scale
    v = torch.randn(B, HKV, length, D, generator=g, dtype=dtype)
    return q, k, v


def _perturb(fm: FeatureMap, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _apply(fm: FeatureMap, q, k, positions=None):
    if fm.position_dependent and positions is None:
        positions = torch.arange(q.shape[2])
    return fm.forward_q(q, positions), fm.forward_k(k, positions)


def _pair_scores(fq, fk):
    """phi(q_i).phi(k_j) for every query head against its kv head: [B, Hq, L, L]."""
    fk = fk.repeat_interleave(fq.shape[1] // fk.shape[1], dim=1)
    return fq @ fk.transpose(-1, -2)


# ----------------------------------------------------------------------------------------------
# shapes, flags, non-negativity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CFGS))
def test_shapes_flags_nonnegative(name):
    fm = _fm(name)
    _perturb(fm)
    q, k, _ = _qk()
    fq, fk = _apply(fm, q, k)
    assert fm.feature_dim == EXPECTED_F[name]
    assert fq.shape == (B, HQ, L, fm.feature_dim) and fk.shape == (B, HKV, L, fm.feature_dim)
    assert fq.dtype == fk.dtype == torch.float32
    assert fm.learned == (name in LEARNED) == (len(list(fm.parameters())) > 0)
    assert fm.position_dependent == name.startswith("cosformer")
    assert torch.isfinite(fq).all() and torch.isfinite(fk).all()
    s = _pair_scores(fq, fk)
    if name.startswith("taylor"):
        assert not fm.nonnegative and (fq < 0).any()
        assert s.min() >= 0.5 - 1e-5  # 1 + s + s^2/2 >= 1/2
    else:
        assert fm.nonnegative and fq.min() >= 0 and fk.min() >= 0
        assert s.min() >= 0
        if name.startswith(("elu", "hedgehog", "performer")):
            assert s.min() > 0
    # tuple forward
    fq2, fk2 = fm(q, k, torch.arange(L)) if fm.position_dependent else fm(q, k)
    torch.testing.assert_close(fq2, fq, rtol=0, atol=0)
    torch.testing.assert_close(fk2, fk, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CFGS))
def test_inference_does_not_touch_input_and_matches_grad_path(name):
    fm = _fm(name)
    _perturb(fm)
    q, k, _ = _qk()
    q0, k0 = q.clone(), k.clone()
    with torch.no_grad():
        fq, fk = _apply(fm, q, k)
    torch.testing.assert_close(q, q0, rtol=0, atol=0)
    torch.testing.assert_close(k, k0, rtol=0, atol=0)
    gq, gk = _apply(fm, q.requires_grad_(), k.requires_grad_())
    torch.testing.assert_close(fq, gq.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fk, gk.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["elu", "hedgehog", "taylor", "performer", "cosformer"])
def test_bf16_and_float64_keep_dtype(name):
    for dtype in (torch.bfloat16, torch.float64):
        fm = _fm(name, dtype=dtype)
        q, k, _ = _qk(dtype=dtype)
        fq, fk = _apply(fm, q, k)
        assert fq.dtype == fk.dtype == dtype
        assert torch.isfinite(fq.float()).all() and torch.isfinite(fk.float()).all()


def test_wrong_head_count_raises():
    fm = _fm("hedgehog")
    q, k, _ = _qk()
    with pytest.raises(ValueError, match="feature map input"):
        fm.forward_k(q)
    with pytest.raises(ValueError, match="multiple"):
        make_feature_map({"feature_map": "elu"}, D, 4, 3)


# ----------------------------------------------------------------------------------------------
# kernel identities
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["elu", "relu"])
def test_elementwise_identity_init_and_legacy_checkpoint(kind):
    q, k, _ = _qk()
    fm = _fm(kind)
    fq, fk = _apply(fm, q, k)
    act = (lambda x: F.elu(x) + 1) if kind == "elu" else F.relu
    torch.testing.assert_close(fq, act(q), rtol=0, atol=0)
    torch.testing.assert_close(fk, act(k), rtol=0, atol=0)
    # the former modules.LinearFeatureMap's state dict ({q,k}_weight: [H, D, D]) loads strictly and
    # gives its outputs: act(einsum("bhld,hde->bhle", x, W))
    g = torch.Generator().manual_seed(4)
    old = {"q_weight": torch.eye(D) + 0.1 * torch.randn(HQ, D, D, generator=g),
           "k_weight": torch.eye(D) + 0.1 * torch.randn(HKV, D, D, generator=g)}
    assert {n: tuple(t.shape) for n, t in fm.state_dict().items()} == {n: tuple(t.shape) for n, t in old.items()}
    fm.load_state_dict(old, strict=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(fm.forward_q(q), act(torch.einsum("bhld,hde->bhle", q, old["q_weight"])),
                                       rtol=0, atol=0)
            torch.testing.assert_close(fm.forward_k(k), act(torch.einsum("bhld,hde->bhle", k, old["k_weight"])),
                                       rtol=0, atol=0)
    fixed = _fm(kind, learned_map=False)
    assert len(fixed.state_dict()) == 0
    torch.testing.assert_close(fixed.forward_q(q), act(q), rtol=0, atol=0)


def test_hedgehog_identity_init():
    q, k, _ = _qk()
    fq, fk = _apply(_fm("hedgehog"), q, k)
    torch.testing.assert_close(fq, torch.cat([q.softmax(-1), (-q).softmax(-1)], -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fk, torch.cat([k.softmax(-1), (-k).softmax(-1)], -1), rtol=1e-6, atol=1e-7)
    # f < D: truncated identity (first f coordinates); f > D: zero-padded (extra logits 0)
    f4 = _fm("hedgehog_f4").forward_q(q)
    torch.testing.assert_close(f4, torch.cat([q[..., :4].softmax(-1), (-q[..., :4]).softmax(-1)], -1))
    pad = torch.cat([q, q.new_zeros(*q.shape[:-1], 4)], -1)
    f12 = _fm("hedgehog_f12").forward_q(q)
    torch.testing.assert_close(f12, torch.cat([pad.softmax(-1), (-pad).softmax(-1)], -1))
    assert _fm("hedgehog").q_weight.shape == (HQ, D, D) and _fm("hedgehog_f4").k_weight.shape == (HKV, D, 4)


def test_taylor_inner_product_identity():
    dp = 5
    fm = make_feature_map({"feature_map": "taylor", "feature_dim": dp}, D, HQ, HKV, dtype=torch.float64)
    assert fm.feature_dim == 1 + dp + dp * (dp + 1) // 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, dp, generator=g, dtype=torch.float64) * 2
    y = torch.randn(200, dp, generator=g, dtype=torch.float64) * 2
    t = (x * y).sum(-1)
    got = (fm.features(x) * fm.features(y)).sum(-1)
    expect = 1 + t / math.sqrt(dp) + t**2 / (2 * dp)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    # through the module at init: t/sqrt(d') equals the softmax logit on the kept coordinates
    q, k, _ = _qk(dtype=torch.float64)
    fq, fk = fm.forward_q(q), fm.forward_k(k)
    s = (q[:, :, :, None, :dp] * k.repeat_interleave(GROUPS, 1)[:, :, None, :, :dp]).sum(-1) / math.sqrt(D)
    torch.testing.assert_close(_pair_scores(fq, fk), 1 + s + s**2 / 2, rtol=1e-10, atol=1e-10)
    # d' == D, fixed projection: exactly the Taylor expansion of exp(q.k / sqrt(D))
    full = make_feature_map(
        {"feature_map": "taylor", "feature_dim": D, "learned_map": False}, D, HQ, HKV, dtype=torch.float64
    )
    s = _pair_scores(q, k) / math.sqrt(D)
    torch.testing.assert_close(_pair_scores(full.forward_q(q), full.forward_k(k)), 1 + s + s**2 / 2,
                               rtol=1e-10, atol=1e-10)


def test_performer_unbiased_softmax_kernel():
    m = 16384
    fm = make_feature_map({"feature_map": "performer", "feature_dim": m, "stabilize": False}, D, 1, 1,
                          dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 6, D, generator=g, dtype=torch.float64) * 0.5
    y = torch.randn(1, 1, 6, D, generator=g, dtype=torch.float64) * 0.5
    px, py = fm.forward_q(x)[0, 0], fm.forward_k(y)[0, 0]
    got = px @ py.T
    expect = torch.exp(x[0, 0] @ y[0, 0].T / math.sqrt(D))
    assert (expect.max() / expect.min()) > 1.5  # a non-trivial range of kernel values
    # Monte-Carlo standard error of the mean over the m features (iid bound; orthogonality only helps)
    terms = px[:, None, :] * py[None, :, :] * m  # [6, 6, m], mean = estimate
    stderr = terms.std(-1) / math.sqrt(m)
    z = ((got - expect) / stderr).abs().max().item()
    rel = (got / expect - 1).abs().max().item()
    assert z < 5 and rel < 0.08, (z, rel)
    # the stabilised query side only rescales each query row (cancels in the normalisation)
    st = make_feature_map({"feature_map": "performer", "feature_dim": m}, D, 1, 1, dtype=torch.float64)
    ratio = (st.forward_q(x)[0, 0] @ st.forward_k(y)[0, 0].T) / got
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=0)


def test_orthogonal_features():
    w = orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0))
    assert w.shape == (20, 8)
    for blk in (w[:8], w[8:16]):
        gram = blk @ blk.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10


def test_cosformer_inner_product_identity():
    M = 64
    fm = make_feature_map({"feature_map": "cosformer", "max_len": M, "learned_map": False}, D, HQ, HKV,
                          dtype=torch.float64)
    q, k, _ = _qk(dtype=torch.float64)
    pos = torch.tensor([[3, 10, 20, 25, 30, 40, 41, 50, 55, 60, 63], list(range(5, 16))])
    fq, fk = fm.forward_q(q, pos), fm.forward_k(k, pos)
    rr = _pair_scores(F.relu(q), F.relu(k))
    dpos = (pos[:, :, None] - pos[:, None, :]).to(torch.float64)
    expect = rr * torch.cos(math.pi * dpos / (2 * M))[:, None]
    torch.testing.assert_close(_pair_scores(fq, fk), expect, rtol=1e-12, atol=1e-12)
    # [L] positions broadcast over the batch; learned map at identity init gives the same features
    p1 = torch.arange(L) + 7
    learned = make_feature_map({"feature_map": "cosformer", "max_len": M}, D, HQ, HKV, dtype=torch.float64)
    torch.testing.assert_close(learned.forward_q(q, p1), fm.forward_q(q, p1.expand(B, L)))
    with pytest.raises(ValueError, match="max_len"):
        fm.forward_k(k, torch.arange(L) + M - 5)
    with pytest.raises(ValueError, match="max_len"):
        fm.forward_k(k, torch.arange(L) - 1)
    with pytest.raises(ValueError, match="positions"):
        fm.forward_q(q)
    with pytest.raises(ValueError, match="positions"):
        fm.forward_q(q, torch.arange(L + 1))


# ----------------------------------------------------------------------------------------------
# performer state
# ----------------------------------------------------------------------------------------------


def test_performer_determinism_and_state_dict_round_trip():
    a = make_feature_map({"feature_map": "performer", "seed": 3}, D, HQ, HKV)
    b = make_feature_map({"feature_map": "performer", "seed": 3}, D, HQ, HKV)
    c = make_feature_map({"feature_map": "performer", "seed": 4}, D, HQ, HKV)
    assert a.omega.shape == (64, D)
    torch.testing.assert_close(a.omega, b.omega, rtol=0, atol=0)
    assert not torch.allclose(a.omega, c.omega)
    assert "omega" in a.state_dict()
    q, k, _ = _qk()
    a.redraw()  # the state dict must carry the current features, not the seed
    c.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(c.forward_q(q), a.forward_q(q), rtol=0, atol=0)
    torch.testing.assert_close(c.forward_k(k), a.forward_k(k), rtol=0, atol=0)


def test_performer_redraw():
    fm = make_feature_map({"feature_map": "performer", "redraw_interval": 2}, D, HQ, HKV)
    q, k, _ = _qk()
    k0 = fm.forward_k(k)
    w0 = fm.omega.clone()
    fm.redraw()
    assert not torch.allclose(fm.omega, w0)
    assert not torch.allclose(fm.forward_k(k), k0)
    # an explicit generator is deterministic
    fm.redraw(torch.Generator().manual_seed(11))
    w1 = fm.omega.clone()
    fm.redraw(torch.Generator().manual_seed(11))
    torch.testing.assert_close(fm.omega, w1, rtol=0, atol=0)
    # eval mode: forward_k never redraws
    fm.eval()
    for _ in range(4):
        fm.forward_k(k)
    torch.testing.assert_close(fm.omega, w1, rtol=0, atol=0)
    # training: every 2nd forward_k redraws, after computing its features; backward still works
    fm.train()
    kk = k.clone().requires_grad_()
    out1 = fm.forward_k(kk)
    torch.testing.assert_close(fm.omega, w1, rtol=0, atol=0)
    out2 = fm.forward_k(kk)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    assert not torch.allclose(fm.omega, w1)
    (out1.sum() + out2.sum()).backward()
    assert kk.grad is not None and torch.isfinite(kk.grad).all()
    # auto_redraw off: only step() counts
    fm.auto_redraw = False
    w2 = fm.omega.clone()
    for _ in range(3):
        fm.forward_k(k)
    torch.testing.assert_close(fm.omega, w2, rtol=0, atol=0)
    assert fm.step() is False and fm.step() is True
    assert not torch.allclose(fm.omega, w2)


def test_performer_large_keys_stay_finite():
    fm = make_feature_map({"feature_map": "performer"}, D, HQ, HKV)
    q, k, _ = _qk(scale=40.0)
    fq, fk = _apply(fm, q, k)
    assert torch.isfinite(fq).all() and torch.isfinite(fk).all()


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_gradients_reach_learned_params(name):
    fm = _fm(name)
    q, k, v = _qk()
    fq, fk = _apply(fm, q, k)
    g = torch.Generator().manual_seed(2)
    loss = (fq * torch.randn(fq.shape, generator=g)).sum() + (fk * torch.randn(fk.shape, generator=g)).sum()
    loss.backward()
    for pname, p in fm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# ----------------------------------------------------------------------------------------------
# end to end through the kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CFGS))
def test_linear_attention_end_to_end(name):
    fm = _fm(name)
    _perturb(fm, 0.05)
    length = 19  # several segments, a partial last chunk
    q, k, v = _qk(length=length, scale=0.7)
    fq, fk = _apply(fm, q, k)
    ref = K.linear_attention_reference(fq, fk, v)
    if fm.position_dependent:
        out = K.linear_attention_chunked(fq, fk, v, chunk_size=4, segment_size=8)
    else:
        out = K.linear_attention_chunked(q, k, v, chunk_size=4, segment_size=8, q_map=fm.forward_q,
                                         k_map=fm.forward_k)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # cached decode (prefix prefill + per-token steps with per-call features) equals uncached
    n0 = 13
    pos = torch.arange(length)
    _, state = K.linear_attention_chunked(*(t[:, :, :n0] for t in (fq, fk, v)), chunk_size=4, return_state=True)
    steps = []
    for t in range(n0, length):
        sl = slice(t, t + 1)
        if fm.position_dependent:
            sq, sk = fm.forward_q(q[:, :, sl], pos[sl]), fm.forward_k(k[:, :, sl], pos[sl])
        else:
            sq, sk = fm.forward_q(q[:, :, sl]), fm.forward_k(k[:, :, sl])
        o, state = K.linear_attention_recurrent_step(sq, sk, v[:, :, sl], state)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 2), ref[:, :, n0:], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def test_validate_defaults_and_passthrough():
    assert set(FEATURE_MAP_NAMES) == {"elu", "relu", "hedgehog", "taylor", "performer", "cosformer"}
    out = validate_feature_map_cfg({"kind": "linear", "chunk_size": 64})
    assert out == {"kind": "linear", "chunk_size": 64, "feature_map": "elu", "learned_map": True}
    for name, keys in FEATURE_MAP_KEYS.items():
        out = validate_feature_map_cfg({"feature_map": name, "window": 8})
        assert out == {"feature_map": name, "window": 8, **keys}
    # None values of other maps' keys are tolerated (a schema listing every key)
    out = validate_feature_map_cfg({"feature_map": "elu", "seed": None, "max_len": None})
    assert out["learned_map"] is True
    cfg = {"feature_map": "performer"}
    validate_feature_map_cfg(cfg)
    assert cfg == {"feature_map": "performer"}  # input not modified
    fm = make_feature_map({"feature_map": "hedgehog", "feature_dim": None}, 16, 2, 1)
    assert fm.feature_dim == 32 and fm.learned


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"feature_map": "softmax"}, "feature_map"),
        ({"feature_map": "elu", "feature_dim": 16}, "feature_dim"),
        ({"feature_map": "elu", "learned_map": "yes"}, "learned_map"),
        ({"feature_map": "hedgehog", "learned_map": False}, "learned_map"),
        ({"feature_map": "hedgehog", "feature_dim": 0}, "feature_dim"),
        ({"feature_map": "taylor", "feature_dim": 2.5}, "feature_dim"),
        ({"feature_map": "performer", "seed": -1}, "seed"),
        ({"feature_map": "performer", "redraw_interval": True}, "redraw_interval"),
        ({"feature_map": "performer", "stabilize": 1}, "stabilize"),
        ({"feature_map": "performer", "max_len": 10}, "max_len"),
        ({"feature_map": "cosformer", "max_len": 0}, "max_len"),
        ({"feature_map": "cosformer", "seed": 1}, "seed"),
    ],
)
def test_validate_errors_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=repr(key)):
        validate_feature_map_cfg(cfg)
    with pytest.raises(ValueError, match=repr(key)):
        make_feature_map(cfg, D, HQ, HKV)
