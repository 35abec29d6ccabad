"""Benchmark one attention layer: softmax (SDPA) vs every attention option of conf/attention/.

    python bench/attention.py [--out bench/results/attention.json] [--quick]

One Llama attention layer (hidden 512 = 8 heads x 64 dims, 8 kv heads), batch 1, fp32, all CPU
threads. Every option's config comes from conf/attention/, with windows set to 512 tokens and
block_sparse blocks to 256 tokens (sized for the 1k-16k ladder); `hybrid` is a per-model mix of
layers (its swapped layers are linear_elu layers), so it has no single-layer number. Prefill: wall ms of one forward at each context length (median of a few repeats after a
warm-up). Decode: ms per token with the cache / state already holding the context. Ratios in one
run are what to compare; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from frontier.attention import OPTION_DEFAULTS, softmax_attention, swap_attention

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 8, 64
WINDOW = 512
BLOCK = 256


def _sized(cfg: dict) -> dict:
    if "window" in cfg:
        cfg["window"] = WINDOW
    if cfg["kind"] == "block_sparse":
        cfg["block_size"] = BLOCK
    if cfg.get("feature_map") == "cosformer":  # its M must exceed every position of the ladder
        cfg["max_len"] = 65536
    return cfg


# the project's option configs (conf/attention/), with windows/blocks sized for the 1k-16k ladder
OPTIONS = {name: _sized(OPTION_DEFAULTS[name]) for name in OPTION_DEFAULTS
           if OPTION_DEFAULTS[name].get("keep_softmax") is None}
TARGETS = {"speedup_vs_softmax_16k_min": 12.0, "exponent_max": 1.1, "decode_16k_over_1k_max": 1.2}


def build_layer(option: str, max_len: int):
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=128,
        max_position_embeddings=max_len + 1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    swap_attention(model, OPTIONS[option])
    return model, model.model.layers[0].self_attn, model.model.rotary_emb


def pos_emb(rotary, start: int, length: int):
    x = torch.empty(1, length, HIDDEN)
    pos = torch.arange(start, start + length)[None]
    return rotary(x, pos)


def run_interleaved(fns: dict[str, callable], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, in rounds that visit every fn once, so that background load
    on a shared machine hits all variants alike. Returns wall ms per call, per fn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append((time.perf_counter() - t0) * 1000.0)
    return ts


@torch.inference_mode()
def bench_prefill(layers: dict, lengths: list[int], repeats: dict[int, int]) -> dict[str, dict]:
    """Per length: the whole layer (projections + RoPE + attention + o_proj) and the attention op
    alone ("core": q/k/v already projected and rotated: SDPA causal for softmax, blockwise banded
    SDPA for the window, feature maps + chunked kernel for linear)."""
    layer_ts = {opt: {} for opt in layers}
    core_ts = {opt: {} for opt in layers}
    for L in lengths:
        torch.manual_seed(L)
        h = torch.randn(1, L, HIDDEN)
        q, k, v = (torch.randn(1, L, HEADS, HEAD_DIM).transpose(1, 2) for _ in range(3))
        fns = {}
        for opt, (_, attn, rotary) in layers.items():
            pe = pos_emb(rotary, 0, L)
            fns[("layer", opt)] = lambda a=attn, p=pe: a(h, position_embeddings=p, attention_mask=None)
            if opt == "softmax":
                fns[("core", opt)] = lambda: softmax_attention(q, k, v, scale=HEAD_DIM**-0.5)
            else:
                fns[("core", opt)] = lambda a=attn: a._attend(q, k, v, None, None)
        res = run_interleaved(fns, repeats[L])
        for (what, opt), ts in res.items():
            (layer_ts if what == "layer" else core_ts)[opt][str(L)] = ts
        print(f"L={L}: " + ", ".join(f"{w}/{o} {statistics.median(t):.1f}" for (w, o), t in res.items()), flush=True)
    return {"layer": layer_ts, "core": core_ts}


@torch.inference_mode()
def bench_decode(option: str, layer, contexts: list[int], steps: int) -> dict[str, float]:
    model, attn, rotary = layer
    out = {}
    for ctx in contexts:
        cache = DynamicCache(config=model.config)
        torch.manual_seed(ctx)
        if option == "softmax":
            # fill the KV cache directly (a 16k SDPA prefill would only cost time here)
            kv = torch.randn(1, KV_HEADS, ctx, HEAD_DIM)
            cache.update(kv, kv.clone(), 0)
        else:
            attn(torch.randn(1, ctx, HIDDEN), position_embeddings=pos_emb(rotary, 0, ctx), cache=cache)
        assert cache.get_seq_length() == ctx
        tokens = [torch.randn(1, 1, HIDDEN) for _ in range(steps + 3)]
        pes = [pos_emb(rotary, ctx + i, 1) for i in range(steps + 3)]
        ts = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            attn(tokens[i], position_embeddings=pes[i], cache=cache)
            ts.append((time.perf_counter() - t0) * 1000.0)
        out[str(ctx)] = statistics.median(ts[3:])  # first 3 steps are warm-up
    return out


@torch.inference_mode()
def bench_projections(layer, L: int, repeats: int) -> float:
    """The fixed part of any variant's layer: the q/k/v/o projections at length L."""
    _, attn, _ = layer
    h = torch.randn(1, L, HIDDEN)
    fn = lambda: [p(h) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]  # noqa: E731
    return statistics.median(run_interleaved({"proj": fn}, repeats)["proj"])


def fit_exponent(times: dict[str, float]) -> float:
    xs = [math.log(float(k)) for k in times]
    ys = [math.log(v) for v in times.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    ap.add_argument("--quick", action="store_true", help="short lengths, few repeats (smoke run)")
    args = ap.parse_args(argv)

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if args.quick:
        lengths, decode_ctx, steps = [256, 512, 1024], [256, 1024], 10
        repeats = {L: 2 for L in lengths}
    else:
        lengths, decode_ctx, steps = [1024, 4096, 16384], [1024, 16384], 40
        repeats = {1024: 5, 4096: 5, 16384: 3}
    big = str(lengths[-1])

    t_start = time.perf_counter()
    result = {
        "machine": machine_info(threads),
        "config": {
            "hidden": HIDDEN,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "batch": 1,
            "dtype": "float32",
            "window": WINDOW,
            "block_sparse_block": BLOCK,
            "options": {name: cfg for name, cfg in OPTIONS.items()},
            "chunk_size": OPTIONS["linear_elu"]["chunk_size"],
            "lengths": lengths,
            "quick": args.quick,
        },
        "prefill_ms": {},
        "exponent": {},
        "speedup_vs_softmax_16k": {},
        "decode_ms": {},
        "prefill_core_ms": {},
        "exponent_core": {},
        "speedup_core_vs_softmax_16k": {},
    }
    layers = {opt: build_layer(opt, max(max(lengths), max(decode_ctx)) + steps + 8) for opt in OPTIONS}
    pre = bench_prefill(layers, lengths, repeats)
    med = lambda d: {L: round(statistics.median(ts), 3) for L, ts in d.items()}  # noqa: E731
    low = lambda d: {L: round(min(ts), 3) for L, ts in d.items()}  # noqa: E731
    result["prefill_min_ms"], result["prefill_core_min_ms"] = {}, {}
    for option in OPTIONS:
        result["prefill_ms"][option] = med(pre["layer"][option])
        result["prefill_min_ms"][option] = low(pre["layer"][option])
        result["prefill_core_ms"][option] = med(pre["core"][option])
        result["prefill_core_min_ms"][option] = low(pre["core"][option])
        result["exponent"][option] = round(fit_exponent(result["prefill_ms"][option]), 3)
        result["exponent_core"][option] = round(fit_exponent(result["prefill_core_ms"][option]), 3)
        result["decode_ms"][option] = bench_decode(option, layers[option], decode_ctx, steps)
    print("decode_ms", result["decode_ms"], flush=True)
    soft = result["prefill_ms"]["softmax"][big]
    soft_core = result["prefill_core_ms"]["softmax"][big]
    for option in OPTIONS:
        result["speedup_vs_softmax_16k"][option] = round(soft / result["prefill_ms"][option][big], 2)
        result["speedup_core_vs_softmax_16k"][option] = round(soft_core / result["prefill_core_ms"][option][big], 2)
    spreads = [
        statistics.median(ts) / min(ts)
        for part in ("layer", "core")
        for per_opt in pre[part].values()
        for ts in per_opt.values()
    ]
    result["timing_spread_max"] = round(max(spreads), 3)  # median / min; ~1.0 on a quiet machine
    proj = bench_projections(layers["softmax"], lengths[-1], repeats[lengths[-1]])
    result["projections_ms"] = {big: round(proj, 3)}
    # the part of a layer that every variant shares: layer time minus attention-op time (softmax)
    fixed = result["prefill_ms"]["softmax"][big] - result["prefill_core_ms"]["softmax"][big]
    result["layer_fixed_ms"] = {big: round(fixed, 3)}
    result["layer_speedup_bound_16k"] = round(soft / max(fixed, 1e-9), 2)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    lin = "linear_elu"
    d = result["decode_ms"][lin]
    decode_ratio = d[str(decode_ctx[-1])] / d[str(decode_ctx[0])]
    checks = {
        "speedup_vs_softmax_16k": (result["speedup_vs_softmax_16k"][lin], TARGETS["speedup_vs_softmax_16k_min"], ">="),
        "speedup_core_vs_softmax_16k": (
            result["speedup_core_vs_softmax_16k"][lin],
            TARGETS["speedup_vs_softmax_16k_min"],
            ">=",
        ),
        "exponent": (result["exponent"][lin], TARGETS["exponent_max"], "<="),
        "decode_16k_over_1k": (round(decode_ratio, 3), TARGETS["decode_16k_over_1k_max"], "<="),
    }
    targets = {"option": lin}
    notes = []
    for name, (value, bound, op) in checks.items():
        met = value >= bound if op == ">=" else value <= bound
        targets[name] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
        if not met:
            notes.append(f"{name}: {value} misses {op} {bound}")
            if name == "speedup_vs_softmax_16k":
                notes.append(
                    f"the whole-layer time includes work every variant shares (q/k/v/o projections {proj:.0f} ms, "
                    f"RoPE, reshapes: ~{fixed:.0f} ms in all at L={big}, estimated as softmax layer minus "
                    f"softmax attention op), so no attention variant can beat softmax by much more than "
                    f"{result['layer_speedup_bound_16k']}x per layer on this CPU; the attention op alone is "
                    "compared in speedup_core_vs_softmax_16k"
                )
    targets["all_met"] = all(v["met"] for k, v in targets.items() if isinstance(v, dict))
    result["targets"] = targets
    if result["timing_spread_max"] > 1.3:
        notes.append(
            f"noisy run: some prefill median is {result['timing_spread_max']}x its min (shared machine? see "
            "machine.loadavg_*); prefill_min_ms / prefill_core_min_ms are the least disturbed repeats"
        )
    if args.quick:
        notes.append("--quick run: lengths are not 1k/4k/16k, so targets are indicative only")
    if notes:
        result["notes"] = notes
    result["wall_s"] = round(time.perf_counter() - t_start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out} in {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()
