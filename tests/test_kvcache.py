"""KIVI 2/4-bit KV cache (frontier.kivi, frontier.kvcache): packing, bytes, grouping against a
reference written from the paper, prefill/decode equivalence, hybrids, config and cost model."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from attention_models import rand_ids, tiny_model
from frontier import config as C
from frontier import costmodel, cpu_kernels, grid, kivi, kvcache
from frontier.cache_layer import DequantWorkspace
from frontier.attention import LinearStateLayer, cache_state_bytes, swap_attention


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pack_round_trip_and_bit_layout(bits, dim):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (8, 16, 24), generator=g, dtype=torch.uint8)
    packed = kivi.pack_codes(codes, bits, dim)
    per = 8 // bits
    assert packed.dtype == torch.uint8 and packed.numel() * per == codes.numel()  # 8/bits codes per byte
    assert torch.equal(kivi.unpack_codes(packed, bits, dim), codes)
    # independent reference: numpy's bit unpacking, least significant bit first; plane k of byte i
    # holds the code at i + k * n / per along `dim`
    d = dim % codes.dim()
    n = codes.shape[d]
    bits_np = np.unpackbits(np.moveaxis(packed.numpy(), d, -1)[..., None], axis=-1, bitorder="little")
    planes = (bits_np.reshape(*bits_np.shape[:-1], per, bits) * (1 << np.arange(bits))).sum(-1)  # [..., n/per, per]
    ref = np.moveaxis(planes, -1, -2).reshape(*planes.shape[:-2], n)  # plane-major: k * n/per + i
    assert np.array_equal(ref, np.moveaxis(codes.numpy(), d, -1))


# ------------------------------------------------------------------ KIVI reference (from the paper)
def fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max asymmetric quantize-dequantize of a 1-D group; scale and zero point kept in fp16
    (KIVI stores both in half precision)."""
    x = x.double()
    mn, mx = x.min(), x.max()
    scale = torch.tensor(float((mx - mn) / (2 ** bits - 1))).half().double()
    zero = mn.half().double()
    if scale == 0:
        return zero.expand_as(x).clone()
    q = torch.clamp(torch.round((x - zero) / scale), 0, 2 ** bits - 1)
    return q * scale + zero


def kivi_reference(K, V, bits, group, residual):
    """KIVI's cache after L tokens (Liu et al. 2024, Algorithm 1): keys quantized per channel over
    groups of `group` tokens, in blocks of `residual` tokens (the last L mod residual stay exact);
    values quantized per token over groups of `group` channels, except the `residual` most recent."""
    B, H, L, D = K.shape
    Kh, Vh = K.double().clone(), V.double().clone()
    block = residual or group
    nk, nv = (L // block) * block, max(L - residual, 0)
    for b in range(B):
        for h in range(H):
            for t0 in range(0, nk, group):
                for d in range(D):
                    Kh[b, h, t0:t0 + group, d] = fake_quant(K[b, h, t0:t0 + group, d], bits)
            for t in range(nv):
                for c0 in range(0, D, group):
                    Vh[b, h, t, c0:c0 + group] = fake_quant(V[b, h, t, c0:c0 + group], bits)
    return Kh, Vh


@pytest.mark.parametrize("bits,group,residual,L", [(2, 8, 16, 53), (4, 8, 16, 40), (2, 4, 0, 18), (2, 16, 32, 20)])
def test_kivi_grouping_matches_the_paper_reference(bits, group, residual, L):
    g = torch.Generator().manual_seed(L)
    K = torch.randn(2, 3, L, 16, generator=g) * torch.linspace(0.2, 4, 16)  # per-channel key outliers
    V = torch.randn(2, 3, L, 16, generator=g)
    layer = kivi.KiviLayer(bits, group, residual)
    layer.update(K[:, :, :L - 3], V[:, :, :L - 3])
    for t in range(L - 3, L):  # a few decode steps: the returned tensors are the state before the flush
        ret_k, ret_v = layer.update(K[:, :, t:t + 1], V[:, :, t:t + 1])
    got_k, got_v = layer.dequantized()
    ref_k, ref_v = kivi_reference(K, V, bits, group, residual)
    assert torch.allclose(got_k.double(), ref_k, atol=1e-5) and torch.allclose(got_v.double(), ref_v, atol=1e-5)
    assert layer.get_seq_length() == L
    nk, nv = layer.quantized_lengths()
    assert nk == (L // (residual or group)) * (residual or group) and nv == max(L - residual, 0)
    # what the last decode step attended to: packed past + exact residual and new token
    pre_k, pre_v = kivi_reference(K[:, :, :L - 1], V[:, :, :L - 1], bits, group, residual)
    assert torch.allclose(ret_k[:, :, :L - 1].double(), pre_k, atol=1e-5)
    assert torch.allclose(ret_v[:, :, :L - 1].double(), pre_v, atol=1e-5)
    assert torch.equal(ret_k[:, :, -1], K[:, :, -1]) and torch.equal(ret_v[:, :, -1], V[:, :, -1])
    if nk or nv:  # quantization actually changed something
        assert not torch.allclose(got_k, K) or not torch.allclose(got_v, V)


# ------------------------------------------------------------------ bytes
@pytest.mark.parametrize("bits", [2, 4])
def test_bytes_are_the_packed_storage_and_match_the_cost_model(bits):
    B, H, L, D, G, R = 1, 2, 300, 64, 32, 64
    layer = kivi.KiviLayer(bits, G, R)
    layer.update(torch.randn(B, H, L, D), torch.randn(B, H, L, D))
    nk, nv = 256, 236  # 64 * floor(300 / 64) keys, 300 - 64 values
    assert layer.key_codes.dtype == torch.uint8 and layer.key_codes.numel() == B * H * nk * D * bits // 8
    assert layer.value_codes.dtype == torch.uint8 and layer.value_codes.numel() == B * H * nv * D * bits // 8
    assert layer.key_scale.dtype == torch.float16 and layer.key_scale.numel() == B * H * (nk // G) * D
    assert layer.value_zero.dtype == torch.float16 and layer.value_zero.numel() == B * H * nv * (D // G)
    by_hand = (B * H * (nk + nv) * D * bits // 8            # codes
               + 2 * 2 * B * H * ((nk // G) * D + nv * (D // G))  # fp16 scale + zero per group
               + 4 * B * H * ((L - nk) + (L - nv)) * D)    # fp32 residual keys + values
    assert layer.state_bytes() == by_hand
    model_cfg = {"layers": 1, "hidden": H * D, "heads": H, "kv_heads": H, "head_dim": D, "intermediate": 64,
                 "vocab": 64, "dtype": "float32"}
    modelled = costmodel.state_bytes(model_cfg, None, L, quant_cfg={"kv_bits": bits, "kv_group": G, "kv_residual": R})
    assert modelled == by_hand
    # below 16-bit: int8 codes + fp32 scale per token; 2-bit at L >> R is ~5x below fp16 at D = 64
    q8 = costmodel.state_bytes(model_cfg, None, L, kv_bits=8)
    assert q8 == 2 * H * L * (D + 4)
    big = {"kv_bits": bits, "kv_group": G, "kv_residual": R}
    fp16 = costmodel.state_bytes(model_cfg, None, 65536, kv_bits=16)
    assert fp16 / costmodel.state_bytes(model_cfg, None, 65536, quant_cfg=big) == pytest.approx(
        16 / (bits + 2 * 16 * 2 / G / 2), rel=0.01)


@pytest.mark.parametrize("bits", [2, 4])
def test_part_filled_value_rows_count_whole_bytes_in_cache_and_cost_model(bits):
    B, H, D, G, R = 1, 2, 32, 16, 16
    L = R + 4 * (8 // bits) + 1  # values past the window: not a multiple of 8 / bits
    layer = kivi.KiviLayer(bits, G, R)
    for t in range(L):
        layer.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    nv = L - R
    per = 8 // bits
    assert layer.quantized_lengths()[1] == nv and layer.value_codes.shape[2] == -(-nv // per)
    model_cfg = {"layers": 1, "hidden": H * D, "heads": H, "kv_heads": H, "head_dim": D, "intermediate": 64,
                 "vocab": 64, "dtype": "float32"}
    modelled = costmodel.state_bytes(model_cfg, None, L, quant_cfg={"kv_bits": bits, "kv_group": G, "kv_residual": R})
    assert layer.state_bytes() == modelled


@pytest.mark.parametrize("kind", ["kivi2", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_workspace_returns_what_fresh_tensors_hold_and_stays_one_layer_big(kind, dtype):
    """The quantized caches' layers dequantize into one shared scratch: every step returns the
    same keys and values as a layer with fresh tensors, and the scratch holds about one layer's
    dense K/V."""
    g = torch.Generator().manual_seed(3)
    B, H, D, L, layers = 2, 3, 32, 300, 3
    ws = DequantWorkspace()

    def make(**kw):
        return kivi.KiviLayer(2, 16, 32, **kw) if kind == "kivi2" else kvcache.Int8KVLayer(**kw)

    shared = [make(workspace=ws) for _ in range(layers)]
    fresh = [make() for _ in range(layers)]
    cuts = [200] + [1] * 100
    t = 0
    for n in cuts:
        for i in range(layers):
            K = torch.randn(B, H, n, D, generator=g).to(dtype)
            V = torch.randn(B, H, n, D, generator=g).to(dtype)
            ks, vs = shared[i].update(K, V)
            kf, vf = fresh[i].update(K, V)
            assert torch.equal(ks, kf) and torch.equal(vs, vf)
            assert ks.is_contiguous() and vs.is_contiguous()
        t += n
    dense_layer = 2 * B * H * L * D * ks.element_size()
    el = ks.element_size()  # + uint8 codes, + a float32 buffer where the eager passes compute half dtypes
    assert dense_layer <= ws.nbytes() <= DequantWorkspace.GROWTH * B * H * L * D * (2 * el + 1 + 4 * (el < 4))
    cache = kvcache.make_cache(tiny_model(), 2 if kind == "kivi2" else 8, 16, 32)
    quantized = [la for la in cache.layers if isinstance(la, (kivi.KiviLayer, kvcache.Int8KVLayer))]
    assert quantized and all(la.workspace is cache.workspace for la in quantized)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dequantization_equals_the_eager_passes(dtype, monkeypatch):
    """The compiled one-pass key dequantization and value unpacking (used above COMPILE_MIN_CODES
    packed bytes) return exactly what the eager passes return, at every step of a growing cache."""
    g = torch.Generator().manual_seed(5)
    B, H, D = 2, 2, 32
    monkeypatch.setenv(kivi.COMPILE_ENV, "1")
    monkeypatch.setenv(cpu_kernels.ENV, "0")  # the C pass (tested below) would take both layers' place
    cpu_kernels.library.cache_clear()
    layers = {True: kivi.KiviLayer(2, 16, 32), False: kivi.KiviLayer(2, 16, 32)}
    kivi._FAILED.clear()
    kivi._compiled.cache_clear()
    for t, n in enumerate([150] + [1] * 40):
        K = torch.randn(B, H, n, D, generator=g).to(dtype)
        V = torch.randn(B, H, n, D, generator=g).to(dtype)
        got = {}
        for fused, layer in layers.items():
            monkeypatch.setattr(kivi, "COMPILE_MIN_CODES", 0 if fused else 1 << 40)
            got[fused] = [x.clone() for x in layer.update(K, V)]
        assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1]), t
    assert kivi._FAILED == set(), "a fused pass failed to compile and fell back to eager"
    assert kivi._compiled.cache_info().currsize == 2  # both fused passes ran
    cpu_kernels.library.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kv_c_dequantization_equals_the_eager_passes(dtype, monkeypatch):
    """The int8 KV cache's one-pass C dequantization (through the shared workspace) returns
    exactly what the eager passes and the plain formula return, at every step."""
    g = torch.Generator().manual_seed(8)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels.library.cache_clear()
    calls, real = [], cpu_kernels.int8_rows

    def spy(*a):
        ok = real(*a)
        calls.append(ok)
        return ok

    monkeypatch.setattr(cpu_kernels, "int8_rows", spy)
    layers = {path: kvcache.Int8KVLayer(workspace=DequantWorkspace()) for path in ("c", "eager")}
    plain = kvcache.Int8KVLayer()
    for t, n in enumerate([37, 1, 1, 5]):
        K = torch.randn(2, 3, n, 16, generator=g).to(dtype)
        V = torch.randn(2, 3, n, 16, generator=g).to(dtype)
        got = {}
        for path, layer in layers.items():
            if path == "eager":
                monkeypatch.setenv(cpu_kernels.ENV, "0")
            cpu_kernels.library.cache_clear()
            got[path] = [x.clone() for x in layer.update(K, V)]
            monkeypatch.delenv(cpu_kernels.ENV, raising=False)
        ref = plain.update(K, V)
        for i in (0, 1):
            assert torch.equal(got["c"][i], got["eager"][i]) and torch.equal(got["c"][i], ref[i]), (t, i)
    cpu_kernels.library.cache_clear()
    assert True in calls and False in calls  # both paths ran


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_dequantization_equals_the_compiled_and_eager_passes(bits, dtype, monkeypatch):
    """csrc/kv_dequant.c (the decode path wherever a C compiler is) returns exactly what the
    compiled and the eager passes return, at every step of a growing cache: part-filled value rows,
    several groups, batch > 1, and the workspace's strided outputs."""
    g = torch.Generator().manual_seed(6)
    B, H, D = 2, 3, 32
    monkeypatch.setattr(kivi, "COMPILE_MIN_CODES", 0)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None, "a C compiler is here but the kernels did not build"
    ws = DequantWorkspace()
    layers = {path: kivi.KiviLayer(bits, 16, 32, workspace=ws if path == "c" else None)
              for path in ("c", "compiled", "eager")}
    calls = []
    real = cpu_kernels.kivi_keys, cpu_kernels.kivi_values
    monkeypatch.setattr(cpu_kernels, "kivi_keys", lambda *a: calls.append("k") or real[0](*a))
    monkeypatch.setattr(cpu_kernels, "kivi_values", lambda *a: calls.append("v") or real[1](*a))
    for t, n in enumerate([150] + [1] * 21 + [7]):
        K = torch.randn(B, H, n, D, generator=g).to(dtype)
        V = torch.randn(B, H, n, D, generator=g).to(dtype)
        got = {}
        for path, layer in layers.items():
            if path != "c":
                monkeypatch.setenv(cpu_kernels.ENV, "0")
                monkeypatch.setenv(kivi.COMPILE_ENV, "1" if path == "compiled" else "0")
            cpu_kernels.library.cache_clear()
            got[path] = [x.clone() for x in layer.update(K, V)]
            monkeypatch.delenv(cpu_kernels.ENV, raising=False)
            monkeypatch.delenv(kivi.COMPILE_ENV, raising=False)
        for path in ("compiled", "eager"):
            assert torch.equal(got["c"][0], got[path][0]) and torch.equal(got["c"][1], got[path][1]), (t, path)
    cpu_kernels.library.cache_clear()
    assert "k" in calls and "v" in calls and kivi._FAILED == set()


# ------------------------------------------------------------------ prefill == step-by-step
def _layer_state(layer):
    return [t.clone() for t in layer._tensors()]


@pytest.mark.parametrize("bits", [2, 4])
def test_cache_contents_do_not_depend_on_how_the_stream_is_cut(bits):
    g = torch.Generator().manual_seed(7)
    K, V = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    states = []
    for cuts in ([70], [1] * 70, [5, 17, 1, 1, 30, 16], [33, 37]):
        layer, t = kivi.KiviLayer(bits, 8, 16), 0
        for n in cuts:
            layer.update(K[:, :, t:t + n], V[:, :, t:t + n])
            t += n
        states.append(_layer_state(layer))
    for s in states[1:]:
        assert all(torch.equal(a, b) for a, b in zip(states[0], s))


def test_generate_prefill_then_decode_equals_token_by_token():
    """Prompt shorter than the residual (nothing flushed by the prefill), decode long enough to
    flush keys and values several times: both paths cross the same flush boundaries, so every
    layer's cache and every logit agree."""
    model = tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
    ids = rand_ids(2, 6)
    n_new = 30
    kw = dict(bits=2, group=4, residual=8)
    with torch.inference_mode():
        c1 = kvcache.make_cache(model, **{"kv_bits": 2, "group": 4, "residual": 8})
        gen = model.generate(ids, max_new_tokens=n_new, do_sample=False, cache=c1, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        c2 = kvcache.KiviCache(config=model.config, **kw)
        tok, logits = ids[:, :1], []
        seq = ids
        for t in range(ids.shape[1] + n_new - 1):
            out = model(input_ids=seq[:, t:t + 1], cache=c2, use_cache=True)
            if t >= ids.shape[1] - 1:
                logits.append(out.logits[:, -1])
                if seq.shape[1] == t + 1:
                    seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen.sequences, seq)
    for a, b in zip(gen.logits, logits):
        assert torch.allclose(a, b, atol=1e-4)
    for l1, l2 in zip(c1.layers, c2.layers):
        assert isinstance(l1, kivi.KiviLayer) and l1.quantized_lengths()[0] >= 24
        for a, b in zip(_layer_state(l1), _layer_state(l2)):
            assert a.shape == b.shape and (a.dtype == torch.uint8 and (a != b).float().mean() < 0.01
                                           or torch.allclose(a.float(), b.float(), atol=1e-3))


def test_quantized_cache_decodes_close_to_the_full_cache():
    model = tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    ids = rand_ids(1, 90)
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits[:, -20:]
        err = {}
        for bits in (4, 2):
            cache = kvcache.make_cache(model, bits, group=8, residual=16)
            got = torch.cat([lg for _, _, lg in kvcache.chunked_forward(model, ids, cache, 1)], dim=1)[:, -20:]
            err[bits] = (got - ref).abs().mean().item()
    assert 0 < err[4] < err[2] < 0.1 * ref.abs().mean().item()


# ------------------------------------------------------------------ hybrids
def test_hybrid_keeps_kivi_only_in_softmax_layers():
    model = tiny_model(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    swap_attention(model, {"kind": "linear", "feature_map": "elu", "learned_map": False, "chunk_size": 8,
                           "eps": 1e-6, "keep_softmax": [1]})
    ids = rand_ids(2, 40)
    with torch.inference_mode():
        cache = kvcache.make_cache(model, 2, group=8, residual=16)
        out = model(input_ids=ids, cache=cache, use_cache=True)
        for t in range(3):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        ref = tiny_model(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             cache=kvcache.make_cache(model, 2, group=8, residual=16))
    assert gen.shape == (2, 44) and ref is not None
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [LinearStateLayer, kivi.KiviLayer, LinearStateLayer]
    assert cache.layers[1].get_seq_length() == 43 and cache.layers[1].quantized_lengths() == (32, 27)
    assert cache_state_bytes(cache) == sum(layer.state_bytes() for layer in cache.layers)
    model_cfg = {"layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128,
                 "vocab": 97, "dtype": "float32"}
    att = {"kind": "linear", "feature_map": "elu", "keep_softmax": [1]}
    modelled = costmodel.state_bytes(model_cfg, att, 43, batch=2,
                                     quant_cfg={"kv_bits": 2, "kv_group": 8, "kv_residual": 16})
    assert modelled == cache_state_bytes(cache)


# ------------------------------------------------------------------ perplexity through the cache
def test_streamed_perplexity_equals_one_forward_with_a_full_cache_and_differs_when_quantized():
    from transformers import DynamicCache

    from frontier.evaluate.perplexity import strided_nll

    model = tiny_model()
    ids = rand_ids(1, 200).flatten()
    plain = strided_nll(model, ids, 64, 32, progress=False)
    streamed = strided_nll(model, ids, 64, 32, progress=False, kv_cache=DynamicCache, kv_chunk=16)
    assert streamed[1] == plain[1] and streamed[0] == pytest.approx(plain[0], rel=1e-5)
    model.frontier_kv = {"bits": 2, "group": 8, "residual": 16}
    q2 = strided_nll(model, ids, 64, 32, progress=False, kv_cache=lambda: kvcache.model_cache(model), kv_chunk=16)
    assert q2[1] == plain[1] and q2[0] != pytest.approx(plain[0], rel=1e-4)


# ------------------------------------------------------------------ config, plan, cost CLI
def _point(**quant):
    cfg = C.compose((("model", "micro"), ("eval", "quick")))
    cfg.pop("sweep", None)
    cfg["quant"].update(quant)
    return cfg


@pytest.mark.parametrize("over,key,needle", [
    ({"kv_bits": 3}, "quant.kv_bits", "allowed values: 16, 8, 4, 2"),
    ({"kv_bits": 2, "kv_group": 12}, "quant.kv_group", "must divide model.head_dim=32"),
    ({"kv_bits": 2, "kv_group": 2}, "quant.kv_group", "multiple of 4"),
    ({"kv_bits": 4, "kv_group": 16, "kv_residual": 40}, "quant.kv_residual", "multiple of quant.kv_group=16"),
    ({"kv_bits": 2, "kv_residual": -1}, "quant.kv_residual", ">= 0"),
])
def test_bad_kv_configs_fail_at_plan_time(over, key, needle):
    with pytest.raises(C.ConfigError) as e:
        C.validate_point(_point(**over), cuda_available=False)
    assert e.value.key == key and needle in str(e.value)


def test_kv_overrides_share_every_job_before_evaluate():
    p = grid.plan(["sweep=ci", "model=micro", "quant=none,int8", "attention=softmax,linear_elu", "finetune=none",
                   "quant.kv_bits=16,2"])
    assert len(p.points) == 8
    jobs = p.job_counts()
    assert jobs["quantize"] == 1 and jobs["surgery"] == 2 and jobs["evaluate"] == 8
    two = [pt for pt in p.points if pt.cfg["quant"]["kv_bits"] == 2]
    assert all(pt.components[-1].endswith("~kv_bits=2") for pt in two)
    assert all("kv_bits" not in c for pt in two for c in pt.components[:-1])
    assert "kv_bits" not in grid.stage_config(two[0], "quant")["quant"]


def test_cost_cli_takes_kv_overrides(capsys):
    from frontier import cli

    out = {}
    for extra in ([], ["quant.kv_bits=2"], ["kv_bits=4", "quant.kv_residual=0"]):
        assert cli.main(["cost", "model=llama3_8b", "hardware=h100", "context_len=131072", *extra]) == 0
        out[" ".join(extra)] = __import__("json").loads(capsys.readouterr().out)
    full, two = out[""]["state_bytes"], out["quant.kv_bits=2"]["state_bytes"]
    assert full == 2 * 32 * 8 * 128 * 131072 * 2 and 5.2 < full / two < 5.4  # 2 bits + 1 bit of fp16 scales/zeros
    assert out["quant.kv_bits=2"]["decode"]["bytes"] < out[""]["decode"]["bytes"]
    assert cli.main(["cost", "model=llama3_8b", "hardware=h100", "quant.kv_bits=3"]) == 2
    assert "allowed values: 16, 8, 4, 2" in capsys.readouterr().err


# ------------------------------------------------------------------ results: the kv_quant family
def test_kv_quant_family_and_its_crossover_with_linear_attention():
    from frontier.results.crossover import compute_crossover
    from frontier.results.families import QUESTION_PAIRS, family_of
    from frontier.results.runs import modelled_cost_rows

    soft, lin = {"kind": "softmax"}, {"kind": "linear", "feature_map": "elu", "keep_softmax": None}
    hyb = {**lin, "keep_softmax": [0]}
    none, int8 = {"method": "none", "bits": 16}, {"method": "rtn", "bits": 8, "group_size": None}
    fam = lambda q, a: family_of({}, {"quant": q, "attention": a})  # noqa: E731
    assert fam({**none, "kv_bits": 16}, soft) == "baseline"
    assert fam({**none, "kv_bits": 2}, soft) == fam({**none, "kv_bits": 8}, soft) == "kv_quant"
    assert fam({**none, "kv_bits": 2}, lin) == "attention"  # no softmax layer left: no KV cache to quantize
    assert fam({**none, "kv_bits": 2}, hyb) == fam({**int8, "kv_bits": 4}, soft) == "combined"
    assert fam({**int8, "kv_bits": 16}, soft) == "quantization"
    assert ("attention", "kv_quant") in QUESTION_PAIRS
    # modelled costs follow quant.kv_bits: the 2-bit cache's state grows ~5x slower than fp16's
    model = {"layers": 2, "hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "intermediate": 256,
             "vocab": 128, "dtype": "bfloat16"}
    rows = lambda q, a: {(r["metric"], r["context_len"]): r["value"] for r in modelled_cost_rows(  # noqa: E731
        "p", {"model": model, "quant": q, "attention": a, "eval": {"cost": {"batch": 1}}}, ["h100"], [1024, 131072])}
    kv2, fp = rows({**none, "kv_bits": 2}, soft), rows({**none, "kv_bits": 16}, soft)
    assert 5.0 < fp[("state_bytes", 131072)] / kv2[("state_bytes", 131072)] < 5.4
    # L*: a linear point (fixed state) overtakes the 2-bit softmax cache where its state line crosses
    runs = [{"point_id": "kv2", "status": "ok", "family": "kv_quant", "ppl": 10.0},
            {"point_id": "lin", "status": "ok", "family": "attention", "ppl": 10.5}]
    lin_state = 100_000.0
    costs = [{"point_id": "kv2", "context_len": L, "metric": "state_bytes", "value": 50.0 * L, "source": "modelled",
              "hardware": "h100"} for L in (1024, 2048, 4096)] + [
             {"point_id": "lin", "context_len": L, "metric": "state_bytes", "value": lin_state, "source": "modelled",
              "hardware": "h100"} for L in (1024, 2048, 4096)]
    fam_rows = [r for r in compute_crossover(runs, costs) if r["level"] == "family"]
    assert len(fam_rows) == 1
    r = fam_rows[0]
    assert (r["family_a"], r["family_b"]) == ("attention", "kv_quant") and r["matched"]
    assert r["l_star"] == pytest.approx(2000.0, rel=1e-6)  # 50 * L = 100,000


# ------------------------------------------------------------------ recall through the cache
def test_streamed_recall_equals_plain_generate_when_nothing_is_quantized():
    """With a residual window longer than every prompt the KIVI cache quantizes nothing, so the
    streamed prefill (left-padded batch, chunks of 8, generate's position ids) must reproduce
    plain generate and the one-forward MQAR scoring exactly; a 2-bit cache with a short window
    goes through the same code and still answers."""
    import random
    from pathlib import Path

    from test_evaluate import tiny_llama

    from frontier import data
    from frontier.evaluate import mqar, recall

    rng = random.Random(0)
    texts = [data.kv_training_text(rng, 12, 4) for _ in range(60)] + [Path(random.__file__).read_text()]
    tk = data.train_tokenizer(texts, 320)
    model = tiny_llama(tk)
    items = recall.build_prompts(tk, "kv", 64, 2, 1234) + recall.build_prompts(tk, "kv", 96, 2, 1234)  # padded
    prompts, answers = [x["prompt"] for x in items], [x["answer"] for x in items]
    model.frontier_kv = None
    plain = recall.generate_continuations(model, tk, prompts, answers, batch_size=4)
    model.frontier_kv = {"bits": 2, "group": 4, "residual": 512}
    streamed = recall.generate_continuations(model, tk, prompts, answers, batch_size=4, kv_chunk=8)
    assert streamed == plain
    mitems = recall.build_prompts(tk, "mqar", 128, 3, 1234, options=recall.task_options({"mqar": {"pairs": 4}}))
    model.frontier_kv = None
    hits = mqar.teacher_forced_hits(model, tk, mitems)
    model.frontier_kv = {"bits": 2, "group": 4, "residual": 512}
    assert mqar.teacher_forced_hits(model, tk, mitems, kv_chunk=8) == hits
    model.frontier_kv = {"bits": 2, "group": 4, "residual": 8}
    assert len(recall.generate_continuations(model, tk, prompts, answers, batch_size=4, kv_chunk=8)) == 4


def test_chunked_forward_of_a_left_padded_batch_equals_one_forward():
    from transformers import DynamicCache

    model = tiny_model()
    ids = rand_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :13] = 0  # left padding of row 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = torch.cat([lg for _, _, lg in kvcache.chunked_forward(model, ids, DynamicCache(), 7,
                                                                     attention_mask=mask)], dim=1)
    assert torch.allclose(got[mask.bool()], ref[mask.bool()], atol=1e-4)
