"""Strided sliding-window perplexity on the held-out split.

HF's standard recipe: windows of `seq_len` tokens every `stride` tokens; in each window only
the tokens not scored by an earlier window are scored, so every token after the first is
scored exactly once, with up to `seq_len - stride` tokens of context before it. Losses are
summed in float64 per token (not averaged per window), so the result is exact:
ppl = exp(sum NLL / number of scored tokens).

Under a quantized KV cache (`quant.kv_bits < 16`) each window streams through the cache in
chunks of `eval.kv_chunk` tokens, so tokens are scored against the quantized cache the earlier
chunks wrote (KIVI's cache quantizes as tokens stream in; a single forward would attend in full
precision to every token of the window, as a prefill does).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from typing import Optional

log = logging.getLogger(__name__)

_HELDOUT_CACHE: dict = {}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            return hashlib.sha1(backend.to_str().encode()).hexdigest()
        except Exception:  # noqa: BLE001 - fall back to identity
            pass
    return f"id:{id(tokenizer)}"


def heldout_ids(tokenizer, data_cfg: dict, max_tokens: Optional[int] = None):
    """The held-out split as one flat LongTensor (documents joined by EOS), first `max_tokens`.

    Same tokens as `frontier.data.token_splits(tokenizer, data_cfg)[1]`, but only the held-out
    documents are tokenized. Cached per process (keyed on the tokenizer's content and the data
    config), so several points evaluated in one process tokenize once.
    """
    from frontier import data

    key = (_tokenizer_fingerprint(tokenizer), json.dumps(data_cfg, sort_keys=True, default=str))
    ids = _HELDOUT_CACHE.get(key)
    if ids is None:
        _, held = data.split_documents(data.documents(data_cfg), data_cfg["heldout_fraction"], data_cfg["seed"])
        ids = data.encode_documents(tokenizer, held)
        _HELDOUT_CACHE[key] = ids
    return ids if max_tokens is None else ids[:max_tokens]


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """[(begin, end, first_scored)]: absolute token range of each window and the first absolute
    position scored in it (tokens before it were scored by an earlier window, or are token 0)."""
    if seq_len < 2 or stride < 1 or stride > seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)  # a token needs at least one token of context
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _token_nll(logits, x):
    """NLL (float64) of x[:, j+1] under logits[:, j], for the positions that have a target."""
    import torch

    n = x.shape[1] - 1
    logp = torch.log_softmax(logits[:, :n].float(), dim=-1)
    return -logp.gather(-1, x[:, 1:n + 1].unsqueeze(-1)).squeeze(-1).double()


def strided_nll(model, ids, seq_len: int, stride: int, *, batch_size: int = 4,
                progress: bool = True, desc: str = "ppl", kv_cache=None, kv_chunk: int = 32) -> tuple[float, int]:
    """(sum of token NLLs in nats, number of scored tokens) of the flat token tensor `ids`.

    Windows of equal length are run `batch_size` at a time; no padding is ever used.
    `model(input_ids=...)` must return an object with `.logits` [B, T, V]. With `kv_cache` (a
    function returning a fresh quantized cache) each window streams through the cache in chunks
    of `kv_chunk` tokens (`frontier.kvcache.chunked_forward`): the logits of a chunk come from
    attention over the cache the earlier chunks wrote.
    """
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = int(ids.numel())
    if n < 2:
        raise ValueError(f"need at least 2 tokens for perplexity, got {n}")
    wins = windows(n, seq_len, stride)
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:  # consecutive windows of the same length share a batch
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(wins), desc=desc, file=sys.stderr, mininterval=2.0, leave=False)
        except ImportError:
            bar = None
    total, count = 0.0, 0
    with torch.inference_mode():
        for gi, group in enumerate(groups):
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            if kv_cache is None:
                out = model(input_ids=x, use_cache=False)
                nll = _token_nll(out.logits if hasattr(out, "logits") else out[0], x)
            else:  # stream the window through a fresh quantized cache, kv_chunk tokens per forward
                from frontier import kvcache

                parts = [_token_nll(lg, x[:, s:min(e + 1, x.shape[1])])
                         for s, e, lg in kvcache.chunked_forward(model, x, kv_cache(), kv_chunk)]
                nll = torch.cat(parts, dim=1)  # [B, T-1]; nll[j] scores pos j+1
            for row, (b, e, first) in enumerate(group):
                scored = nll[row, first - b - 1:]
                total += float(scored.sum())
                count += int(scored.numel())
            if bar is not None:
                bar.update(len(group))
            if gi == 0 or (gi + 1) % max(1, len(groups) // 4) == 0:
                log.info("%s: %d/%d windows, running ppl %.3f", desc, sum(len(g) for g in groups[:gi + 1]),
                         len(wins), math.exp(total / max(count, 1)) if math.isfinite(total) else float("nan"))
    if bar is not None:
        bar.close()
    return total, count


def perplexity(model, ids, seq_len: int, stride: int, *, batch_size: int = 4, progress: bool = True,
               kv_cache=None, kv_chunk: int = 32) -> float:
    """exp(mean token NLL) over `ids` with strided windows; raises ValueError if not finite."""
    total, count = strided_nll(model, ids, seq_len, stride, batch_size=batch_size, progress=progress,
                               kv_cache=kv_cache, kv_chunk=kv_chunk)
    mean = total / count
    if not math.isfinite(mean):
        raise ValueError(f"perplexity is not finite (mean NLL {mean}) over {count} tokens")
    ppl = math.exp(mean) if mean < 700 else float("inf")
    if not math.isfinite(ppl):
        raise ValueError(f"perplexity overflows (mean NLL {mean:.1f}) over {count} tokens")
    return ppl


def evaluate_perplexity(model, tokenizer, eval_cfg: dict, data_cfg: dict, *, progress: bool = True) -> dict:
    """{"ppl": ...} of the point on the held-out split, per `eval.ppl`."""
    p = eval_cfg["ppl"]
    ids = heldout_ids(tokenizer, data_cfg, p["max_tokens"])
    seq_len = p["seq_len"]
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise ValueError(f"eval.ppl.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    from frontier import kvcache

    stream = kvcache.streams(model)  # quant.kv_bits < 16: through the quantized cache, eval.kv_chunk at a time
    chunk = int(eval_cfg.get("kv_chunk", 32))
    log.info("perplexity: %d held-out tokens, seq_len %d, stride %d%s", ids.numel(), seq_len, p["stride"],
             f", streamed through a {model.frontier_kv['bits']}-bit KV cache {chunk} tokens at a time" if stream else "")
    return {"ppl": perplexity(model, ids, seq_len, p["stride"], progress=progress,
                              kv_cache=(lambda: kvcache.model_cache(model)) if stream else None, kv_chunk=chunk)}
