import math
import sys

import pytest

from frontier import costmodel
from frontier.costmodel import estimate, state_bytes

# layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, untied
TINY = {"name": "t", "family": "llama", "layers": 2, "hidden": 8, "heads": 2, "kv_heads": 1,
        "head_dim": 4, "intermediate": 16, "vocab": 32, "tie_embeddings": False}
HW = {"name": "unit", "peak_flops": 1000.0, "mem_bw": 1000.0}
NONE = {"name": "none", "method": "none", "bits": 16, "group_size": None}
INT8 = {"name": "int8", "method": "int8_weight_only", "bits": 8, "group_size": None}
INT4_G8 = {"name": "int4_g8", "method": "int4_weight_only", "bits": 4, "group_size": 8}
SOFTMAX = {"name": "softmax", "kind": "softmax"}
LINEAR = {"name": "linear_elu", "kind": "linear", "feature_dim": None}

LLAMA8B = {"name": "llama3_8b", "family": "llama", "layers": 32, "hidden": 4096, "heads": 32,
           "kv_heads": 8, "head_dim": 128, "intermediate": 14336, "vocab": 128256,
           "tie_embeddings": False}


def test_module_import_does_not_import_torch():
    # estimate must stay pure arithmetic; torch only inside measure_cpu
    import subprocess

    code = "import sys, frontier.costmodel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hand_computed_tiny_softmax():
    e = estimate(TINY, NONE, SOFTMAX, HW, context_len=4)
    # linear params per layer: q 8*8=64, k 8*4=32, v 8*4=32, o 8*8=64,
    # gate 8*16=128, up 8*16=128, down 16*8=128  -> 576
    per_layer_params = 64 + 32 + 32 + 64 + 128 + 128 + 128
    assert per_layer_params == 576
    lin_flops = 2 * (2 * 576) + 2 * 8 * 32  # two layers + lm_head = 2304 + 512 = 2816
    assert lin_flops == 2816
    # decode attention per layer: scores + values = 2*L*hd*heads each = 4*2*4*4 = 128
    dec_att = 2 * (4 * 2 * 4 * 4)  # two layers -> 256
    assert e["decode"]["flops"] == lin_flops + dec_att == 3072
    # prefill: decoder linears for 4 tokens (4 * 2304), lm_head for the last position only
    # (512), attention over sum_{i=1..4} i = 10 positions
    pre_att = 2 * (4 * 2 * 4 * 10)  # 640
    assert e["prefill"]["flops"] == 4 * 2304 + 512 + pre_att == 10368
    # training-style forward: logits for all 4 positions
    e_all = estimate(TINY, NONE, SOFTMAX, HW, context_len=4, prefill_logits="all")
    assert e_all["prefill"]["flops"] == 4 * lin_flops + pre_att == 11904
    # weights, 16 bit: linears 2*576*2 = 2304, embedding 32*8*2 = 512, lm_head 512
    assert e["weight_bytes"] == 2304 + 512 + 512 == 3328
    # KV: 2 (k,v) * layers 2 * kv_heads 1 * head_dim 4 * L 4 * 2 bytes = 128
    assert e["state_bytes"] == 2 * 2 * 1 * 4 * 4 * 2 == 128
    # decode bytes: linears + lm_head + one embedding row (8*2) + KV read
    assert e["decode"]["bytes"] == 2304 + 512 + 16 + 128 == 2960
    # prefill bytes: linears + lm_head + 4 embedding rows + KV written
    assert e["prefill"]["bytes"] == 2304 + 512 + 4 * 16 + 128 == 3008
    # roofline at 1000 FLOP/s and 1000 B/s
    assert e["decode"]["seconds"] == pytest.approx(max(3072 / 1000, 2960 / 1000))
    assert e["prefill"]["seconds"] == pytest.approx(10.368)
    assert e["params"] == 2 * 576 + 2 * 256


def test_hand_computed_tiny_quantized_window_linear_hybrid():
    # int8 per-channel: in*out bytes + 2 bytes scale per output row
    # q 64+16, k 32+8, v 32+8, o 64+16, gate 128+32, up 128+32, down 128+16 = 704 per layer
    assert costmodel.weight_bytes(TINY, INT8)["linears"] == 2 * 704
    # int4 g8: in*out/2 + ceil(in/8)*out*4 bytes (bf16 scale + zero per group)
    # q 32+1*8*4=64, k 16+16=32, v 32, o 64, gate 64+64=128, up 128, down 64+2*8*4=128 = 576
    assert costmodel.weight_bytes(TINY, INT4_G8)["linears"] == 2 * 576
    assert costmodel.effective_bits(INT4_G8) == 4 + 32 / 8

    # sliding window W=2 at L=4: decode sees 2 positions, prefill sum min(i,2) = 1+2+2+2 = 7
    sw = {"name": "sliding_window", "kind": "sliding_window", "window": 2}
    e = estimate(TINY, NONE, sw, HW, 4)
    assert e["decode"]["flops"] == 2816 + 2 * (4 * 2 * 4 * 2)
    assert e["prefill"]["flops"] == 4 * 2304 + 512 + 2 * (4 * 2 * 4 * 7)
    assert e["state_bytes"] == 2 * 2 * 1 * 4 * 2 * 2  # 64

    # linear, F = head_dim = 4, Dv = 4: per token per layer
    # update 2*kv*F*Dv = 32, readout 2*heads*F*Dv = 64, normaliser 2*1*4 + 2*2*4 = 24 -> 120
    e = estimate(TINY, NONE, LINEAR, HW, 4)
    assert e["decode"]["flops"] == 2816 + 2 * 120
    assert e["prefill"]["flops"] == 4 * 2304 + 512 + 4 * 2 * 120
    # state: layers * kv_heads * (F*Dv + F) * 4 bytes = 2 * 1 * 20 * 4
    assert e["state_bytes"] == 160

    # hybrid: layer 0 stays softmax (KV 64 bytes at L=4), layer 1 linear (80 bytes)
    hyb = {**LINEAR, "keep_softmax": [0]}
    e = estimate(TINY, NONE, hyb, HW, 4)
    assert e["state_bytes"] == 64 + 80
    assert e["decode"]["flops"] == 2816 + 128 + 120

    # batch multiplies token-wise terms, not weights
    e1, e2 = estimate(TINY, NONE, SOFTMAX, HW, 4), estimate(TINY, NONE, SOFTMAX, HW, 4, batch=2)
    assert e2["state_bytes"] == 2 * e1["state_bytes"]
    assert e2["decode"]["bytes"] == e1["decode"]["bytes"] + 16 + 128
    # kv_bits
    assert estimate(TINY, NONE, SOFTMAX, HW, 4, kv_bits=8)["state_bytes"] == 64 + 64  # + fp32 scale per token


def test_kv_scaling_with_L():
    h100 = costmodel.PRESETS["h100"]
    Ls = [1024, 2048, 4096, 8192]
    soft = [state_bytes(LLAMA8B, SOFTMAX, L) for L in Ls]
    # linear in L: 2*32*8*128*L*2 bytes
    assert soft == [2 * 32 * 8 * 128 * L * 2 for L in Ls]
    lin = [estimate(LLAMA8B, NONE, LINEAR, h100, L)["state_bytes"] for L in Ls]
    assert len(set(lin)) == 1 and lin[0] == 32 * 8 * (128 * 128 + 128) * 4
    sw = {"kind": "sliding_window", "window": 2048}
    win = [state_bytes(LLAMA8B, sw, L) for L in Ls]
    assert win[0] < win[1] == win[2] == win[3]
    # prefill of softmax grows super-linearly, linear attention linearly
    p = [estimate(LLAMA8B, NONE, SOFTMAX, h100, L)["prefill"]["flops"] for L in (4096, 8192)]
    q = [estimate(LLAMA8B, NONE, LINEAR, h100, L)["prefill"]["flops"] for L in (4096, 8192)]
    assert p[1] / p[0] > 2.0
    assert q[1] / q[0] == pytest.approx(2.0, rel=1e-3)  # linear in L (+ one lm_head row)


def test_quant_ordering_and_roofline_regime():
    h100 = costmodel.PRESETS["h100"]
    int4 = {"name": "int4_g32", "method": "int4_weight_only", "bits": 4, "group_size": 32}
    wb = {q["name"]: estimate(LLAMA8B, q, SOFTMAX, h100, 2048)["weight_bytes"] for q in (int4, INT8, NONE)}
    assert wb["int4_g32"] < wb["int8"] < wb["none"]
    # 16-bit llama3-8b ≈ 16 GB of weights
    assert 15e9 < wb["none"] < 17e9
    assert costmodel.param_count(LLAMA8B) == pytest.approx(8.03e9, rel=0.01)
    e = estimate(LLAMA8B, NONE, SOFTMAX, h100, 2048)
    # decode is memory-bound, prefill compute-bound
    assert e["decode"]["seconds"] == pytest.approx(e["decode"]["bytes"] / h100["mem_bw"])
    assert e["prefill"]["seconds"] == pytest.approx(e["prefill"]["flops"] / h100["peak_flops"])
    # quantization speeds up memory-bound decode
    assert estimate(LLAMA8B, int4, SOFTMAX, h100, 2048)["decode"]["seconds"] < e["decode"]["seconds"]


def test_errors_and_presets():
    with pytest.raises(ValueError, match="unknown attention kind"):
        estimate(TINY, NONE, {"kind": "nope"}, HW, 4)
    with pytest.raises(ValueError, match="window"):
        estimate(TINY, NONE, {"kind": "sliding_window"}, HW, 4)
    e = estimate(TINY, NONE, SOFTMAX, "a100_80g", 4)
    assert e["decode"]["seconds"] > 0
    assert costmodel.resolve_hardware({"name": "h200"})["mem_bw"] == 4.8e12
    assert costmodel.eval_seconds(TINY, NONE, SOFTMAX, HW, [2, 4], decode_tokens=1) == pytest.approx(
        sum(estimate(TINY, NONE, SOFTMAX, HW, L)["prefill"]["seconds"]
            + estimate(TINY, NONE, SOFTMAX, HW, L)["decode"]["seconds"] for L in (2, 4)))


def test_estimate_is_fast():
    import time

    h100 = costmodel.PRESETS["h100"]
    t0 = time.perf_counter()
    for L in range(1000):
        estimate(LLAMA8B, NONE, {**LINEAR, "keep_softmax": [0, 5]}, h100, 128 + L)
    assert time.perf_counter() - t0 < 1.0


def test_measure_cpu():
    hw = costmodel.measure_cpu()
    assert hw["name"] == "cpu"
    assert hw["peak_flops"] > 1e8 and math.isfinite(hw["peak_flops"])
    assert hw["mem_bw"] > 1e8 and math.isfinite(hw["mem_bw"])
    assert costmodel.resolve_hardware({"name": "cpu", "peak_flops": None})["peak_flops"] > 0


def test_model_dtype_learned_map_and_measure_flag():
    fp32 = {**TINY, "dtype": "float32"}
    # float32 model: unquantized linears, embeddings and lm_head at 4 bytes; KV at 32 bit
    e = estimate(fp32, NONE, SOFTMAX, HW, 4)
    assert e["weight_bytes"] == 2 * 576 * 4 + 2 * (32 * 8 * 4) == 6656
    assert e["state_bytes"] == 2 * 2 * 1 * 4 * 4 * 4  # 256
    assert estimate(fp32, NONE, SOFTMAX, HW, 4, kv_bits=16)["state_bytes"] == 128
    # quantized weights keep their bits; scales/zeros follow the model dtype
    assert costmodel.effective_bits(INT4_G8, fp32) == 4 + 64 / 8
    assert costmodel.effective_bits(NONE, fp32) == 32
    # a learned feature map (F = head_dim) adds the q/k projection 2*hd*F*(heads+kv_heads) = 96
    learned = {**LINEAR, "learned_map": True}
    assert estimate(TINY, NONE, learned, HW, 4)["decode"]["flops"] == 2816 + 2 * (120 + 96)
    # feature_dim != head_dim: F=8 -> update 2*1*8*4=64, readout 2*2*8*4=128,
    # normaliser 2*1*8 + 2*2*8 = 48, projection 2*4*8*3 = 192 -> 432 per layer; state 1*(32+8)*4
    e = estimate(TINY, NONE, {**LINEAR, "feature_dim": 8}, HW, 4)
    assert e["decode"]["flops"] == 2816 + 2 * 432
    assert e["state_bytes"] == 2 * 160
    # estimate never measures a config that has numbers (conf/hardware/cpu.yaml: measure: true)
    cpu = {"name": "cpu", "peak_flops": 1e11, "mem_bw": 1e10, "measure": True}
    assert costmodel.resolve_hardware(cpu) is cpu
    measured = costmodel.resolve_hardware(cpu, measure=True)
    assert measured["measured"] is True and measured["peak_flops"] != 1e11


def test_every_attention_variant_state_and_features():
    """State bytes per variant vs L (hand computed for TINY: 2 layers, kv_heads 1, head_dim 4, 16-bit KV)."""
    kv_per_token = 2 * 1 * 4 * 2  # keys + values, one kv head, 4 dims, 2 bytes
    sink = {"kind": "sink_window", "window": 8, "sinks": 2}
    block = {"kind": "block_sparse", "block_size": 4, "local_blocks": 2, "global_blocks": 1}
    topk = {"kind": "topk", "k": 3}
    lol = {"kind": "lolcats", "window": 8, "feature_map": "hedgehog", "feature_dim": None}
    for L in (64, 256):
        assert state_bytes(TINY, sink, L) == 2 * (8 + 2) * kv_per_token
        assert state_bytes(TINY, block, L) == 2 * 12 * kv_per_token
        assert state_bytes(TINY, topk, L) == 2 * L * kv_per_token  # exact top-k keeps every key
        # window KV + fp32 linear state of 2*4 hedgehog features x 4 dims (+ normaliser)
        assert state_bytes(TINY, lol, L) == 2 * (8 * kv_per_token + (8 * 4 + 8) * 4)
    # top-k decode reads every score but only k values: cheaper than softmax, more than a window
    hw = {"name": "u", "peak_flops": 1.0, "mem_bw": 1e30}
    soft = estimate(TINY, NONE, SOFTMAX, hw, context_len=512)["decode"]["flops"]
    assert estimate(TINY, NONE, sink, hw, context_len=512)["decode"]["flops"] < estimate(TINY, NONE, topk, hw, context_len=512)["decode"]["flops"] < soft
    # feature dims per map
    assert costmodel.feature_dim({"feature_map": "taylor", "feature_dim": 16}, 4) == 1 + 16 + 136
    assert costmodel.feature_dim({"feature_map": "hedgehog"}, 4) == 8
    assert costmodel.feature_dim({"feature_map": "performer"}, 4) == 64
    assert costmodel.feature_dim({"feature_map": "cosformer"}, 4) == 8
    # hybrids: auto keeps n_softmax layers (counted as the first ones), a list keeps those
    assert costmodel.layer_kinds(TINY, {**LINEAR, "keep_softmax": "auto", "n_softmax": 1}) == ["softmax", "linear"]
    assert costmodel.layer_kinds(TINY, {**LINEAR, "keep_softmax": [1]}) == ["linear", "softmax"]
