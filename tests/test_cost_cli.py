"""`frontier cost` on Llama-3-8B / H100, checked against the roofline accounting done by hand."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# meta-llama/Meta-Llama-3-8B (conf/model/llama3_8b.yaml), bf16; H100 SXM (conf/hardware/h100.yaml)
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
BYTES = 2  # bfloat16 weights and KV cache
PEAK_FLOPS, MEM_BW = 9.89e14, 3.35e12
L = 4096


def hand_roofline() -> dict:
    # (in, out) of every linear in a decoder layer: q, k, v, o, gate, up, down
    linears = [(HIDDEN, HEADS * HEAD_DIM), (HIDDEN, KV_HEADS * HEAD_DIM), (HIDDEN, KV_HEADS * HEAD_DIM),
               (HEADS * HEAD_DIM, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]
    layer_weights = sum(i * o for i, o in linears)                    # 218,103,808
    body_flops = LAYERS * 2 * layer_weights                           # 2·in·out per token
    head_flops = 2 * HIDDEN * VOCAB                                   # lm_head (untied)
    embedding = VOCAB * HIDDEN * BYTES
    weight_bytes = LAYERS * layer_weights * BYTES + 2 * embedding     # linears + embedding + lm_head
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * L * BYTES           # K and V, every layer, L positions
    # a decode token at context L: scores (q·k) and values (p·v), 2·L·head_dim·heads FLOPs each
    attn_decode = LAYERS * 2 * (2 * L * HEAD_DIM * HEADS)
    # prefill (causal): position i attends to i positions; logits of the last position only
    attn_prefill = LAYERS * 2 * (2 * HEAD_DIM * HEADS) * (L * (L + 1) // 2)
    streamed = LAYERS * layer_weights * BYTES + embedding             # linears + lm_head read once
    decode = {"flops": body_flops + head_flops + attn_decode,
              "bytes": streamed + HIDDEN * BYTES + kv_bytes}          # + one embedding row, + read the cache
    prefill = {"flops": L * body_flops + head_flops + attn_prefill,
               "bytes": streamed + L * HIDDEN * BYTES + kv_bytes}     # + L embedding rows, + write the cache
    for p in (decode, prefill):
        p["seconds"] = max(p["flops"] / PEAK_FLOPS, p["bytes"] / MEM_BW)
    return {"prefill": prefill, "decode": decode, "weight_bytes": weight_bytes, "state_bytes": kv_bytes,
            "params": LAYERS * layer_weights + 2 * VOCAB * HIDDEN}


def test_cost_cli_matches_hand_roofline():
    r = subprocess.run([sys.executable, "-m", "frontier", "cost", "model=llama3_8b", "hardware=h100",
                        f"context_len={L}", "batch=1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    want = hand_roofline()
    assert set(got) == set(want)
    for phase in ("prefill", "decode"):
        for k in ("flops", "bytes", "seconds"):
            assert got[phase][k] == pytest.approx(want[phase][k], rel=1e-12), (phase, k)
    for k in ("weight_bytes", "state_bytes", "params"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    # sanity against the published model: 8.03 B parameters (norms aside), a 0.5 GiB KV cache at
    # 4096 tokens, ~16 GB of bf16 weights; decode is bandwidth-bound, a 4k prefill compute-bound
    assert 8.02e9 < got["params"] < 8.04e9 and got["state_bytes"] == 2 ** 29
    assert 16.0e9 < got["weight_bytes"] < 16.1e9
    assert got["decode"]["seconds"] == pytest.approx(got["decode"]["bytes"] / MEM_BW)
    assert got["prefill"]["seconds"] == pytest.approx(got["prefill"]["flops"] / PEAK_FLOPS)
