"""Benchmark the quantization options: weight bytes and decode speed against the memory roofline.

    python bench/quant.py --out bench/results/quant.json [--quick] [--methods int8,int4_g128]

A random Llama (hidden 2048, 4 layers, 16 heads of 128, MLP 5632, vocab 512), bf16, batch 1,
all CPU threads: big enough (~206M linear weights, 411 MB in bf16) that decoding one token
streams the weights from DRAM, so decode is memory-bound.

Per option (conf/quant/*.yaml, quantized by frontier.quantize.quantize_model):

* bytes_ratio_vs_bf16 = bytes of the quantized linear layers (codes + scales + zero points +
  AWQ pre-scales) / bytes of the same layers in bf16;
* decode_tok_s: greedy decode with the KV cache after a 32-token prompt (best of repeats);
* roofline_fraction = decode_tok_s / (B / bytes_per_token), with B the read bandwidth measured
  here (a 512 MiB tensor reduction, same threads). The 2 cores are shared with other work, so
  bandwidth and decode timings alternate a few times per option and the best of each is kept
  (the least-disturbed moments); load_avg_1m in "machine" says how busy the machine was; and
  bytes_per_token what one decode step must read: quantized linears + lm_head + norms + the
  KV cache.

Targets: int4_g128 bytes ratio <= 0.30, int8 <= 0.53, roofline fraction >= 0.6 for every
method whose storage is a real low-bit kernel; misses are explained in "notes".
GPTQ/AWQ calibrate on random tokens here (the bench measures cost, not quality).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from frontier import config as C  # noqa: E402
from frontier import quantize as Q  # noqa: E402

METHODS = ["none", "int8", "int4_g32", "int4_g128", "gptq4_g128", "awq4_g128", "hqq4_g64", "nf4", "w8a8", "fp8",
           "int3_g64"]
TARGETS = {"bytes_ratio_max": {"int4_g128": 0.30, "int8": 0.53}, "roofline_fraction_min_kernel": 0.6}


def build(hidden=2048, layers=4, heads=16, inter=5632, vocab=512, dtype=torch.bfloat16):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                      vocab_size=vocab, max_position_embeddings=4096, attn_implementation="sdpa",
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # trained-like scale: N(0, 0.02)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a streaming read (sum of a large tensor), best of repeats."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def option(name: str, quick: bool) -> dict:
    q = C.compose((("quant", "int4_g32" if name == "int3_g64" else name),))["quant"]
    if name == "int3_g64":
        q.update(name="int3_g64", bits=3, group_size=64)
    if q["method"] in Q.CALIBRATED:
        q.update(calib_samples=4 if quick else 8, calib_seq_len=64, awq_grid=5)
    return q


@torch.no_grad()
def decode_tok_s(model, prompt: int = 32, new: int = 16, repeats: int = 3) -> tuple[float, float]:
    """(tokens/s, mean context) of greedy decoding after a `prompt`-token prefill."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    best = float("inf")
    for _ in range(repeats):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        best = min(best, (time.perf_counter() - t) / new)
    return 1.0 / best, prompt + new / 2


def bytes_per_token(model, linear_bytes: int, context: float) -> float:
    cfg = model.config
    head = model.lm_head.weight
    other = head.numel() * head.element_size()
    other += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * head.element_size()
    return linear_bytes + other + kv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quant.json")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and calibration samples")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    bw = read_bandwidth(0.5 if args.quick else 1.0)
    base = build()
    bf16_linear = Q.linear_stats(base)["linear_bytes"]
    calib = torch.randint(0, base.config.vocab_size, (8, 64))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": sys.version.split()[0], "read_bandwidth_GBps": round(bw / 1e9, 2), "cuda": cuda,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    model_info = {"hidden": 2048, "layers": 4, "heads": 16, "head_dim": 128, "intermediate": 5632, "vocab": 512,
                  "dtype": "bfloat16", "batch": 1, "linear_weights": Q.linear_stats(base)["linear_weights"],
                  "bf16_linear_bytes": bf16_linear}
    results, notes = {}, {}
    for name in [m for m in args.methods.split(",") if m]:
        q = option(name, args.quick)
        if q["method"] in Q.CUDA_ONLY and not cuda:
            notes[name] = f"skipped: {C.CUDA_ONLY_QUANT[q['method']]} (no CUDA here; see bench/gpu_check.sh)"
            print(f"{name:11s} skipped (CUDA only)", flush=True)
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        facts = Q.quantize_model(model, q, "cpu", calib_ids=calib if q["method"] in Q.CALIBRATED else None)
        qs = time.perf_counter() - t0
        st = Q.linear_stats(model)
        # the cores are shared: alternate bandwidth and decode timings, keep the best of each
        bw_here, tok_s = 0.0, 0.0
        fast = facts.get("storage") == "kernel"  # dequant paths (and bf16 itself) are slow here: time them less
        for _ in range((2 if args.quick else 4) if fast else 1):
            bw_here = max(bw_here, read_bandwidth(0.5, repeats=3))
            t, ctx = decode_tok_s(model, new=8 if fast else 4, repeats=2 if fast else 1)
            tok_s = max(tok_s, t)
        bpt = bytes_per_token(model, st["linear_bytes"], ctx)
        roof = tok_s / (bw_here / bpt)
        results[name] = {"bytes_ratio_vs_bf16": round(st["linear_bytes"] / bf16_linear, 4),
                         "decode_tok_s": round(tok_s, 2), "roofline_fraction": round(roof, 3),
                         "effective_bits_per_weight": st["effective_bits_per_weight"],
                         "bytes_per_token": int(bpt), "read_bandwidth_GBps": round(bw_here / 1e9, 2),
                         "storage": facts.get("storage"),
                         "tensor_types": facts.get("tensor_types"), "quantize_s": round(qs, 1)}
        print(f"{name:11s} bytes {results[name]['bytes_ratio_vs_bf16']:.3f}  {tok_s:7.2f} tok/s  roofline {roof:.2f}"
              f"  [{facts.get('storage')}]  quantize {qs:.1f}s", flush=True)
        del model
    checks = {}
    for name, limit in TARGETS["bytes_ratio_max"].items():
        if name in results:
            checks[f"{name}.bytes_ratio_vs_bf16<={limit}"] = results[name]["bytes_ratio_vs_bf16"] <= limit
    for name, r in results.items():
        if r["storage"] == "kernel":
            ok = r["roofline_fraction"] >= TARGETS["roofline_fraction_min_kernel"]
            checks[f"{name}.roofline_fraction>=0.6"] = ok
            if not ok:
                notes.setdefault(name, _miss_note(name, r, results))
        elif name != "none":
            notes.setdefault(name, f"{r['storage']} storage: no low-bit kernel reads these bytes on this device, so "
                                   "the roofline target does not apply (the weight is dequantized per forward)")
    out = {"machine": machine, "model": model_info, "targets": TARGETS, "methods": results, "checks": checks,
           "notes": notes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(checks, indent=1))
    return 0


def _miss_note(name: str, r: dict, results: dict) -> str:
    base = results.get("none", {}).get("roofline_fraction")
    return (f"roofline fraction {r['roofline_fraction']} < 0.6: the kernel's time per token is not set by the "
            f"{r['bytes_per_token'] / 1e6:.0f} MB it reads"
            + (f" (the bf16 model itself reaches {base})" if base is not None else "")
            + "; fixed per-token costs (Python/HF dispatch of 4 layers, activation quantization, the CPU "
              "kernel's unpacking) weigh more as the bytes shrink, and the 2 cores are shared")


if __name__ == "__main__":
    sys.exit(main())
