"""Measured cost at a ladder of context lengths, and the weight statistics of a model.

For each L in `eval.cost.context_lens` (batch `eval.cost.batch` of random token prompts):

* `prefill_ms`: one forward over the L-token prompt with `use_cache=True` (logits of the last
  position only, as an inference server does), wall time, median of `repeats` runs after
  `warmup` untimed runs, under `torch.inference_mode` (CUDA synchronised around it).
* `decode_tok_s`: `decode_tokens` greedy steps continuing from that prefill's cache, one
  token per forward call; generated tokens (batch x steps) per second, median over repeats.
* `state_bytes`: bytes held by the cache right after the prefill at L (KV tensors, or the
  fixed-size state of linear attention; a quantized cache counts its real storage: codes,
  scales/zero points and the full-precision residual), for the whole batch.
* `peak_mem_bytes`: peak memory of one extra, untimed prefill. On CUDA:
  `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (everything the process
  holds on the device, so weights included). On CPU: `model_weight_bytes(model)` plus the
  peak of live bytes allocated *during* the prefill, read from `torch.profiler`'s allocation
  events (`profile_memory=True`: every allocation and free with its size, in time order; the
  running sum's maximum). Activations, the cache and the input are counted; allocator
  fragmentation and non-torch memory are not.

L above the model's `max_position_embeddings` is skipped (logged).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Iterator, Optional

log = logging.getLogger(__name__)
METRICS = ("prefill_ms", "decode_tok_s", "peak_mem_bytes", "state_bytes")


# ------------------------------------------------------------------ weights
def _logical_numel(t) -> int:
    qs = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: packed codes; the logical shape is here
    if type(t).__name__ == "Params4bit" and getattr(qs, "shape", None) is not None:
        return int(math.prod(qs.shape))
    return int(math.prod(t.shape))


def weight_stats(model) -> dict:
    """weight_bytes (all parameters + buffers, as stored), params (logical weights, quantized
    ones by their logical shape, tied ones once) and effective_bits (8 x stored bytes of the
    decoder's Linear weights, scales/zero points included, per logical Linear weight; the
    embeddings and lm_head are excluded). effective_bits is None if there are no such layers."""
    from torch import nn

    from frontier.checkpoint import model_weight_bytes, tensor_bytes

    params = sum(_logical_numel(p) for p in model.parameters())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lin_bytes = lin_numel = 0
    seen = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is out_emb or name.split(".")[-1] == "lm_head":
            continue
        w = mod.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        lin_bytes += tensor_bytes(w)  # bitsandbytes NF4: its quant state included
        lin_numel += _logical_numel(w)
    return {"weight_bytes": int(model_weight_bytes(model)), "params": int(params),
            "effective_bits": (8.0 * lin_bytes / lin_numel) if lin_numel else None}


# ------------------------------------------------------------------ cache / memory
def _fallback_state_bytes(obj, _seen=None) -> int:
    """Sum the bytes of every tensor reachable from a cache object (attributes, lists, dicts)."""
    import torch

    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_fallback_state_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_fallback_state_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(_fallback_state_bytes(x, seen) for x in vars(obj).values())
    return 0


def state_bytes(cache) -> int:
    """Bytes held by a cache: frontier.attention.cache_state_bytes when available (knows the
    swapped-attention state layers), else every tensor reachable from the cache."""
    if cache is None:
        return 0
    try:
        from frontier.attention import cache_state_bytes
    except Exception:  # noqa: BLE001 - the attention package is optional here
        cache_state_bytes = None
    if cache_state_bytes is not None:
        try:
            return int(cache_state_bytes(cache))
        except Exception as e:  # noqa: BLE001
            log.warning("cache_state_bytes failed (%s); summing cache tensors", e)
    return int(_fallback_state_bytes(getattr(cache, "layers", cache)))


@contextlib.contextmanager
def _silence_fd(fd: int) -> Iterator[None]:
    """Point file descriptor `fd` at /dev/null for the block (kineto prints
    "profiler_start/stop" lines straight to stderr from C++)."""
    try:
        sys.stdout.flush()
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak_bytes(fn) -> int:
    """Run `fn()` under torch.profiler(profile_memory=True); the peak of live bytes it allocated."""
    from torch.profiler import ProfilerActivity, profile

    with _silence_fd(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="frontier-prof-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    events = [e for e in trace.get("traceEvents", []) if e.get("name") == "[memory]"
              and e.get("args", {}).get("Device Type", 0) == 0]
    events.sort(key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for e in events:
        live += int(e["args"].get("Bytes", 0))
        peak = max(peak, live)
    return peak


def _cache_of(out):
    """The cache a forward returned (`cache` in transformers 5, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the ladder
def measure_costs(model, cost_cfg: dict, *, seed: int = 0, progress: bool = True,
                  weight_bytes: Optional[int] = None, kv: Optional[dict] = None) -> list[dict]:
    """[{"context_len", "metric", "value"}] for every L in cost_cfg["context_lens"] and every
    metric in METRICS (see the module docstring for what each one measures). `kv`: the KV cache
    (`frontier.kvcache.kv_spec`: bits 16 | 8 | 4 | 2, group, residual)."""
    import torch

    from frontier.checkpoint import model_weight_bytes

    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    vocab = int(getattr(config, "vocab_size", None) or model.get_input_embeddings().num_embeddings)
    batch, n_dec = int(cost_cfg.get("batch", 1)), int(cost_cfg["decode_tokens"])
    warmup, repeats = int(cost_cfg.get("warmup", 1)), int(cost_cfg.get("repeats", 1))
    if weight_bytes is None:
        weight_bytes = model_weight_bytes(model)
    gen = torch.Generator().manual_seed(seed)
    lens = list(cost_cfg["context_lens"])
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(lens), desc="cost", file=sys.stderr, mininterval=2.0, leave=False)
        except ImportError:
            bar = None

    from frontier import kvcache

    kv = kv or {}
    kv_args = (int(kv.get("bits", 16)), int(kv.get("group", 32)), int(kv.get("residual", 128)))

    def prefill(ids):  # kv bits < 16: a quantized KV cache (softmax layers; swapped layers keep their own state)
        return model(input_ids=ids, cache=kvcache.make_cache(model, *kv_args), use_cache=True, logits_to_keep=1)

    def decode(out) -> None:
        cache = _cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_dec):
            o = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            cache = _cache_of(o)
            tok = o.logits[:, -1].argmax(-1, keepdim=True)

    rows: list[dict] = []
    with torch.inference_mode():
        for L in lens:
            if max_pos and L > max_pos:
                log.warning("cost: skipping L=%d > max_position_embeddings=%d", L, max_pos)
                if bar is not None:
                    bar.update(1)
                continue
            ids = torch.randint(0, vocab, (batch, L), generator=gen).to(device)
            for _ in range(warmup):
                decode(prefill(ids))
            pre_ms, dec_tps, sbytes = [], [], None
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                out = prefill(ids)
                _sync(device)
                pre_ms.append((time.perf_counter() - t0) * 1e3)
                if sbytes is None:
                    sbytes = state_bytes(_cache_of(out))
                _sync(device)
                t0 = time.perf_counter()
                decode(out)
                _sync(device)
                dec_tps.append(batch * n_dec / max(time.perf_counter() - t0, 1e-9))
                del out
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                out = prefill(ids)
                torch.cuda.synchronize(device)
                peak = int(torch.cuda.max_memory_allocated(device))
                del out
            else:
                holder = []
                peak = int(weight_bytes) + _cpu_peak_bytes(lambda: holder.append(prefill(ids)))
                holder.clear()
            vals = {"prefill_ms": statistics.median(pre_ms), "decode_tok_s": statistics.median(dec_tps),
                    "peak_mem_bytes": peak, "state_bytes": int(sbytes)}
            rows.extend({"context_len": int(L), "metric": k, "value": float(vals[k]) if k in
                         ("prefill_ms", "decode_tok_s") else int(vals[k])} for k in METRICS)
            log.info("cost@%d: prefill %.1f ms, decode %.1f tok/s, peak %.2f MB, state %.1f KB", L,
                     vals["prefill_ms"], vals["decode_tok_s"], peak / 1e6, sbytes / 1e3)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def device_name(model=None) -> str:
    """"cpu" or the CUDA device's name."""
    import torch

    dev = None
    if model is not None:
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            dev = None
    if dev is not None and dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev is None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu" if dev is None or dev.type == "cpu" else str(dev)
