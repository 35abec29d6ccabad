"""MQAR: multi-query associative recall (Arora et al., 2023, "Zoology"), generated locally.

A prompt lists `pairs` key:value pairs in the key-value format the embedded model trains on
(`frontier.data.kv_text`: "KV abc:07 ; def:12 ; ..."), then — after a gap of filler
sentences that stretches the prompt to the context length — asks `queries` distinct keys,
each followed by its value: "... ? def:12 ? abc:07". Scored teacher-forced, as in Zoology:
one forward pass over the whole prompt, and a query is right when the model's argmax
prediction is the true token at every token of its value (exactly the tokens greedy decoding
would have to produce). Accuracy is over all queries of all prompts.

`pairs: null` drops the gap and fills the context with pairs instead (as many as fit).
The generator and the scorers are pure functions; `evaluate_mqar` runs the model.
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

from .ruler import filler_sentences


def mqar_example(rng: random.Random, n_pairs: int, n_queries: int, gap_tokens: int = 0,
                 count_tokens: Optional[Callable[[str], int]] = None) -> tuple[str, list[str], list[tuple[int, int]]]:
    """(prompt, answers, char_spans): `n_pairs` pairs, `gap_tokens` of filler, then
    min(n_queries, n_pairs) queries of distinct keys, each with its value; `char_spans[i]` is
    the [start, end) character range of answer i inside the prompt."""
    from frontier.data import kv_pairs, kv_text

    pairs = kv_pairs(rng, max(1, n_pairs))
    asked = rng.sample(range(len(pairs)), min(max(1, n_queries), len(pairs)))
    gap = "".join(filler_sentences(gap_tokens, count_tokens)) if gap_tokens > 0 else ""
    prompt = kv_text(pairs) + (" " + gap.rstrip() if gap else "")
    answers, spans = [], []
    for i in asked:
        k, v = pairs[i]
        prompt += f" ? {k}:"
        spans.append((len(prompt), len(prompt) + len(v)))
        prompt += v
        answers.append(v)
    return prompt, answers, spans


# ------------------------------------------------------------------ scoring (pure)
def token_spans(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[t0, t1) token ranges covering each [a, b) character span: every token whose
    character range overlaps it (a token merging the answer with the character before it
    counts as an answer token). Zero-width tokens (special tokens) are never included.
    Raises ValueError for a span no token covers."""
    out = []
    for a, b in char_spans:
        hit = [t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if not hit:
            raise ValueError(f"no token covers characters [{a}, {b})")
        out.append((hit[0], hit[-1] + 1))
    return out


def query_hits(pred_next: Sequence[int], ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Teacher-forced correctness of each answer token span: `pred_next[t]` is the model's
    argmax prediction for position t + 1, so span [t0, t1) is right iff
    pred_next[t - 1] == ids[t] for every t in it. A span starting at token 0 (nothing to
    predict it from) is never right."""
    out = []
    for t0, t1 in spans:
        if t0 < 1 or t1 <= t0 or t1 > len(ids):
            out.append(False)
            continue
        out.append(all(int(pred_next[t - 1]) == int(ids[t]) for t in range(t0, t1)))
    return out


# ------------------------------------------------------------------ model
def _argmax_at(model, x, pos: list[int], kv_chunk: int):
    """Argmax next-token predictions [B, len(pos)] of the model at positions `pos` of `x`."""
    import torch

    from frontier import kvcache

    if kvcache.streams(model):  # quantized KV cache: stream the prompt through it
        arg = torch.empty(x.shape[0], len(pos), dtype=torch.long)
        for s, e, lg in kvcache.chunked_forward(model, x, kvcache.model_cache(model), kv_chunk):
            sel = [j for j, p in enumerate(pos) if s <= p < e]
            if sel:
                arg[:, sel] = lg[:, [pos[j] - s for j in sel]].argmax(-1).cpu()
        return arg
    keep = torch.tensor(pos, dtype=torch.long, device=x.device)
    try:
        logits = model(input_ids=x, use_cache=False, logits_to_keep=keep).logits
        if logits.shape[1] != len(pos):
            raise TypeError("logits_to_keep ignored")
    except TypeError:
        logits = model(input_ids=x, use_cache=False).logits[:, keep]
    return logits.argmax(-1).cpu()


def teacher_forced_hits(model, tokenizer, items: list[dict], *, batch_size: int = 8,
                        kv_chunk: int = 32) -> list[list[bool]]:
    """Per item (`{"prompt", "spans"}` with character spans), the teacher-forced hit of each
    answer. Batches are right-padded with no attention mask: with causal attention (softmax,
    windowed or recurrent) a position never sees the padding after it, so real positions are
    exact. Only the logits of the predicting positions are computed (`logits_to_keep`). Under a
    quantized KV cache (`model.frontier_kv`, kv_bits < 16) the prompt streams through the cache
    `kv_chunk` tokens at a time (`frontier.kvcache.chunked_forward`)."""
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encs = []
    for it in items:
        enc = tokenizer(it["prompt"], return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        encs.append((ids, token_spans(enc["offset_mapping"], it["spans"])))
    out: list[list[bool]] = []
    with torch.inference_mode():
        for s in range(0, len(encs), batch_size):
            chunk = encs[s:s + batch_size]
            T = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            pos = sorted({t - 1 for _, spans in chunk for t0, t1 in spans for t in range(max(t0, 1), t1)})
            arg = _argmax_at(model, x.to(device), pos, kv_chunk)  # [B, len(pos)]
            col = {p: j for j, p in enumerate(pos)}
            for r, (ids, spans) in enumerate(chunk):
                pred = [0] * len(ids)
                for p, j in col.items():
                    if p < len(ids):
                        pred[p] = int(arg[r, j])
                out.append(query_hits(pred, ids, spans))
    return out
