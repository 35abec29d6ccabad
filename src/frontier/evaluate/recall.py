"""Synthetic long-context recall, generated locally: key-value recall and passkey retrieval.

For each context length L, `samples` prompts per task, each filled as close to L tokens as
possible without exceeding it (binary search on the task's size knob with the real
tokenizer), the queried item placed at depths spread evenly over [0.1, 0.9]. Everything is
seeded from `eval.recall.seed`, L, the task and the sample index: the same config gives the
same prompts in every process. The model greedily generates len(answer tokens) + 1 tokens;
a sample is right when the stripped continuation starts with the answer.
"""
from __future__ import annotations

import logging
import random
import sys
from typing import Callable, Optional

log = logging.getLogger(__name__)

PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUERY = "What is the pass key? The pass key is"
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ")
TASKS = ("recall", "passkey")


# ------------------------------------------------------------------ generators
def passkey_example(rng: random.Random, n_filler_tokens_target: int, depth: float = 0.5,
                    count_tokens: Optional[Callable[[str], int]] = None) -> tuple[str, str]:
    """A 5-digit pass key hidden in repeated filler text at `depth`, queried at the end.

    Filler sentences are added while their summed size stays <= `n_filler_tokens_target`,
    measured by `count_tokens` (default: whitespace words; the recall fitter searches over the
    target with the real tokenizer, so the approximation only has to be monotone).
    Returns (prompt, answer).
    """
    count = count_tokens or (lambda s: len(s.split()))
    key = str(rng.randint(10000, 99999))
    sizes = [max(1, count(s)) for s in FILLER]
    sentences, used = [], 0
    while used + sizes[len(sentences) % len(FILLER)] <= n_filler_tokens_target:
        i = len(sentences) % len(FILLER)
        sentences.append(FILLER[i])
        used += sizes[i]
    cut = min(int(round(max(0.0, min(1.0, depth)) * len(sentences))), len(sentences))
    prompt = "".join(sentences[:cut]) + PASSKEY_NEEDLE.format(key=key) + "".join(sentences[cut:]) + PASSKEY_QUERY
    return prompt, key


def recall_example(rng: random.Random, size: int, depth: float) -> tuple[str, str]:
    """Key-value recall with `size` pairs (frontier.data.kv_recall_example)."""
    from frontier.data import kv_recall_example

    return kv_recall_example(rng, max(1, size), depth)


GENERATORS: dict[str, Callable[[random.Random, int, float], tuple[str, str]]] = {
    "recall": recall_example,
    "passkey": passkey_example,
}
# Largest size to try: kv keys are 3 letters (26**3 distinct), passkey filler is unbounded.
SIZE_CAP = {"recall": 26 ** 3, "passkey": 10 ** 9}
SIZE_MIN = {"recall": 1, "passkey": 0}


def depths(samples: int) -> list[float]:
    """`samples` depths spread evenly over [0.1, 0.9] (0.5 for a single sample)."""
    if samples == 1:
        return [0.5]
    return [0.1 + 0.8 * i / (samples - 1) for i in range(samples)]


def n_tokens(tokenizer, text: str) -> int:
    """Prompt length as the model sees it (with the tokenizer's special tokens, e.g. BOS)."""
    return len(tokenizer(text)["input_ids"])


def fit_example(make: Callable[[int], tuple[str, str]], length: Callable[[str], int], max_len: int,
                lo: int = 1, hi: Optional[int] = None) -> tuple[str, str, int]:
    """(prompt, answer, size) for the largest size in [lo, hi] whose prompt is <= max_len
    tokens (binary search; `make(size)` must be deterministic). Raises ValueError if even
    `make(lo)` does not fit."""
    hi = max_len if hi is None else min(hi, max_len)
    hi = max(hi, lo)
    prompt, answer = make(lo)
    if length(prompt) > max_len:
        raise ValueError(f"the smallest prompt ({length(prompt)} tokens) does not fit in {max_len} tokens")
    best = (prompt, answer, lo)
    a, b = lo + 1, hi
    while a <= b:
        mid = (a + b) // 2
        prompt, answer = make(mid)
        if length(prompt) <= max_len:
            best, a = (prompt, answer, mid), mid + 1
        else:
            b = mid - 1
    return best


def build_prompts(tokenizer, task: str, context_len: int, samples: int, seed: int) -> list[dict]:
    """[{"prompt", "answer", "depth", "size", "tokens"}] for one task at one context length."""
    gen = GENERATORS[task]
    length = lambda s: n_tokens(tokenizer, s)  # noqa: E731
    count = (lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])) if task == "passkey" else None
    out = []
    for i, depth in enumerate(depths(samples)):
        sample_seed = f"{seed}:{task}:{context_len}:{i}"

        def make(size: int, _seed=sample_seed, _depth=depth):
            rng = random.Random(_seed)
            if count is not None:
                return passkey_example(rng, size, _depth, count_tokens=count)
            return gen(rng, size, _depth)

        prompt, answer, size = fit_example(make, length, context_len, lo=SIZE_MIN[task], hi=SIZE_CAP[task])
        out.append({"prompt": prompt, "answer": answer, "depth": depth, "size": size, "tokens": length(prompt)})
    return out


# ------------------------------------------------------------------ scoring (pure)
def score_answer(continuation: str, answer: str) -> bool:
    """Exact match: the stripped continuation's first len(answer) characters equal the answer.

    An empty (or whitespace-only) answer is never matched.
    """
    ans = (answer or "").strip()
    if not ans:
        return False
    return (continuation or "").strip()[: len(ans)] == ans


def accuracy(continuations: list[str], answers: list[str]) -> float:
    if len(continuations) != len(answers):
        raise ValueError(f"{len(continuations)} continuations for {len(answers)} answers")
    if not answers:
        raise ValueError("no samples to score")
    return sum(score_answer(c, a) for c, a in zip(continuations, answers)) / len(answers)


# ------------------------------------------------------------------ generation
def generate_continuations(model, tokenizer, prompts: list[str], answers: list[str], *,
                           batch_size: int = 8) -> list[str]:
    """Greedy continuations (len(answer tokens) + 1 new tokens, cached generate) of each prompt,
    left-padded batches."""
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ps, ans = prompts[s:s + batch_size], answers[s:s + batch_size]
        n_new = 1 + max(max(len(tokenizer(a, add_special_tokens=False)["input_ids"]),
                            len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])) for a in ans)
        enc = tokenizer(ps, return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False,
                                 num_beams=1, use_cache=True, pad_token_id=pad_id)
        start = enc["input_ids"].shape[1]
        outs.extend(tokenizer.decode(row[start:], skip_special_tokens=True) for row in gen)
    return outs


def evaluate_recall(model, tokenizer, recall_cfg: dict, *, tasks=TASKS, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """{"recall_acc@L": ..., "passkey_acc@L": ...} for L in eval.recall.context_lens.

    A context length above the model's max_position_embeddings is skipped; a passkey prompt
    that cannot fit at all in L (its fixed text alone is longer) is skipped with a warning.
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    jobs = [(L, t) for L in recall_cfg["context_lens"] for t in tasks]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="recall", file=sys.stderr, mininterval=2.0, leave=False)
        except ImportError:
            bar = None
    out: dict = {}
    for L, task in jobs:
        if max_pos and L > max_pos:
            log.warning("recall: skipping L=%d > max_position_embeddings=%d", L, max_pos)
        else:
            try:
                items = build_prompts(tokenizer, task, L, recall_cfg["samples"], recall_cfg["seed"])
            except ValueError as e:
                if task == "recall":
                    raise
                log.warning("%s: skipping L=%d: %s", task, L, e)
                items = None
            if items:
                conts = generate_continuations(model, tokenizer, [x["prompt"] for x in items],
                                               [x["answer"] for x in items], batch_size=batch_size)
                acc = accuracy(conts, [x["answer"] for x in items])
                out[f"{task}_acc@{L}"] = acc
                log.info("%s@%d: acc %.3f over %d prompts (%d-%d tokens)", task, L, acc, len(items),
                         min(x["tokens"] for x in items), max(x["tokens"] for x in items))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
