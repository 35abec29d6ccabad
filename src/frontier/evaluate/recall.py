"""Synthetic long-context recall, generated locally from a seed: the task registry.

Tasks (`eval.recall.tasks`), each giving `<metric>_acc@L` in metrics.json quality:

* `kv` (metric `recall`): key-value recall, "KV abc:07 ; def:12 ... ? def:" -> "12",
  the context filled with pairs (frontier.data.kv_recall_example);
* `passkey`: a 5-digit pass key hidden in filler text;
* `needle_single`, `needle_multikey`, `needle_multivalue`: RULER-style needle in a haystack
  (`frontier.evaluate.ruler`; `eval.recall.needle.keys` / `.values`);
* `kv_text`: key-value retrieval in natural language, for pretrained LLMs: the context is
  filled with facts "The code of the <word> <word> is <5 digits>." (no filler; every other
  fact is a distractor), then "What is the code of the <key>? The code of the <key> is";
* `mqar`: multi-query associative recall, `eval.recall.mqar.pairs` pairs and `.queries`
  queries per prompt, scored teacher-forced (`frontier.evaluate.mqar`).
* `copy`: copying (Jelassi et al. 2024, "Repeat After Me"): a line of random 3-letter words,
  then the same line again; teacher-forced, a word is right when every one of its tokens in
  the second copy is predicted; the lookback distance is half the context, so a window shorter
  than L/2 or a fixed-size state has to fail where full attention need not.

For each context length L, `samples` prompts per task, each filled as close to L tokens as
possible without exceeding it (binary search on the task's size knob -- pairs or filler
tokens -- with the real tokenizer). Sample i places the queried item (kv, passkey, needles)
at depth `eval.recall.depths[i % len(depths)]` (default: spread evenly over [0.1, 0.9]). Everything
is seeded from `eval.recall.seed`, L, the task and the sample index: the same config gives
the same prompts in every process. Generated tasks: the model greedily generates
len(answer tokens) + 1 tokens; a sample is right when the stripped continuation starts with
the answer (needle_multivalue: the fraction of its values found in the continuation).
"""
from __future__ import annotations

import logging
import random
import sys
from typing import Callable, Optional, Sequence

from . import mqar as _mqar
from . import ruler

log = logging.getLogger(__name__)

PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUERY = "What is the pass key? The pass key is"
FILLER = ruler.FILLER
TASKS = ("kv", "kv_text", "passkey", "needle_single", "needle_multikey", "needle_multivalue", "mqar", "copy")
DEFAULT_TASKS = ("kv", "passkey")  # a recall config without `tasks` (before they were configurable)
METRIC_NAME = {"kv": "recall"}  # kv keeps its historic metric name, recall_acc@L
TEACHER_FORCED = ("mqar", "copy")
NEEDLE_DEFAULTS = {"keys": 4, "values": 4}  # = frontier.config.NeedleCfg
MQAR_DEFAULTS = {"pairs": 16, "queries": 4}  # = frontier.config.MqarCfg


def metric_key(task: str, context_len: int) -> str:
    """The metrics.json quality key of `task` at L: "recall_acc@L" for kv, "<task>_acc@L" else."""
    return f"{METRIC_NAME.get(task, task)}_acc@{int(context_len)}"


# ------------------------------------------------------------------ generators
def passkey_example(rng: random.Random, n_filler_tokens_target: int, depth: float = 0.5,
                    count_tokens: Optional[Callable[[str], int]] = None) -> tuple[str, str]:
    """A 5-digit pass key hidden in repeated filler text at `depth`, queried at the end.

    Filler sentences are added while their summed size stays <= `n_filler_tokens_target`,
    measured by `count_tokens` (default: whitespace words; the recall fitter searches over the
    target with the real tokenizer, so the approximation only has to be monotone).
    Returns (prompt, answer).
    """
    key = str(rng.randint(10000, 99999))
    sentences = ruler.filler_sentences(n_filler_tokens_target, count_tokens)
    prompt = ruler.insert_at_depths(sentences, [(depth, PASSKEY_NEEDLE.format(key=key))]) + PASSKEY_QUERY
    return prompt, key


def recall_example(rng: random.Random, size: int, depth: float) -> tuple[str, str]:
    """Key-value recall with `size` pairs (frontier.data.kv_recall_example)."""
    from frontier.data import kv_recall_example

    return kv_recall_example(rng, max(1, size), depth)


COPY_HEADER = "COPY:"


def copy_example(rng: random.Random, n_words: int) -> tuple[str, list[str], list[tuple[int, int]]]:
    """(prompt, words, char_spans): "COPY: w1 .. wn\nCOPY: w1 .. wn" with random 3-letter words;
    the spans are the words of the second line except its first (no earlier context predicts
    where the copy starts: the header before it does, and then every next word)."""
    from frontier.data import KV_ALPHABET

    words = ["".join(rng.choice(KV_ALPHABET) for _ in range(3)) for _ in range(max(2, n_words))]
    line = COPY_HEADER + "".join(" " + w for w in words)
    prompt, spans = line + "\n" + COPY_HEADER, []
    for i, w in enumerate(words):
        prompt += " "
        if i:
            spans.append((len(prompt), len(prompt) + len(w)))
        prompt += w
    return prompt, words[1:], spans


def sample_depths(samples: int, depths_cfg: Optional[Sequence[float]] = None) -> list[float]:
    """The depth of each sample: `depths_cfg` cycled, or spread evenly over [0.1, 0.9]."""
    if depths_cfg:
        return [float(depths_cfg[i % len(depths_cfg)]) for i in range(samples)]
    return depths(samples)


def depths(samples: int) -> list[float]:
    """`samples` depths spread evenly over [0.1, 0.9] (0.5 for a single sample)."""
    if samples == 1:
        return [0.5]
    return [0.1 + 0.8 * i / (samples - 1) for i in range(samples)]


def n_tokens(tokenizer, text: str) -> int:
    """Prompt length as the model sees it (with the tokenizer's special tokens, e.g. BOS)."""
    return len(tokenizer(text)["input_ids"])


def fit_example(make: Callable[[int], tuple], length: Callable[[str], int], max_len: int,
                lo: int = 1, hi: Optional[int] = None) -> tuple:
    """(*make(size), size) for the largest size in [lo, hi] whose prompt (make(size)[0]) is
    <= max_len tokens (binary search; `make(size)` must be deterministic). Raises ValueError
    if even `make(lo)` does not fit. The size is searched up to 4 x max_len, not max_len: a
    filler knob counted sentence by sentence overestimates the joined text's tokens (a
    trailing space is a token alone, not once joined), and capping it at max_len left prompts
    at ~84% of L."""
    hi = 4 * max_len if hi is None else min(hi, 4 * max_len)
    hi = max(hi, lo)
    ex = make(lo)
    if length(ex[0]) > max_len:
        raise ValueError(f"the smallest prompt ({length(ex[0])} tokens) does not fit in {max_len} tokens")
    best = (*ex, lo)
    a, b = lo + 1, hi
    while a <= b:
        mid = (a + b) // 2
        ex = make(mid)
        if length(ex[0]) <= max_len:
            best, a = (*ex, mid), mid + 1
        else:
            b = mid - 1
    return best


def _task_maker(task: str, tokenizer, opts: dict) -> tuple[Callable, int, int]:
    """(make(rng, size, depth) -> (prompt, answers[, char_spans]), smallest size, largest size)
    of one task; `size` is the knob the fitter searches (pairs, or filler tokens)."""
    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    if task == "kv":
        def make(rng, size, depth):
            prompt, answer = recall_example(rng, size, depth)
            return prompt, [answer]
        return make, 1, 26 ** 3  # distinct 3-letter keys
    if task == "kv_text":
        return (lambda rng, size, depth: ruler.kv_text_example(rng, size, depth)), 1, 4000
    if task == "passkey":
        def make(rng, size, depth):
            prompt, answer = passkey_example(rng, size, depth, count)
            return prompt, [answer]
        return make, 0, 10 ** 9
    if task in ruler.VARIANTS:
        nd = {**NEEDLE_DEFAULTS, **(opts.get("needle") or {})}

        def make(rng, size, depth):
            return ruler.needle_example(rng, task, size, depth, keys=int(nd["keys"]), values=int(nd["values"]),
                                        count_tokens=count)
        return make, 0, 10 ** 9
    if task == "mqar":  # the depth is not used: the queried keys are drawn from all pairs
        mq = {**MQAR_DEFAULTS, **(opts.get("mqar") or {})}
        queries = int(mq["queries"])
        if mq["pairs"] is None:  # fill the context with pairs, no gap
            return (lambda rng, size, depth: _mqar.mqar_example(rng, size, queries)), queries, 26 ** 3
        pairs = int(mq["pairs"])
        return (lambda rng, size, depth: _mqar.mqar_example(rng, pairs, queries, size, count)), 0, 10 ** 9
    if task == "copy":  # the depth is not used: every word of the second copy is scored
        return (lambda rng, size, depth: copy_example(rng, size)), 2, 10 ** 6
    raise ValueError(f"unknown recall task {task!r}; allowed: {', '.join(TASKS)}")


def build_prompts(tokenizer, task: str, context_len: int, samples: int, seed: int, *,
                  depths_cfg: Optional[Sequence[float]] = None, options: Optional[dict] = None) -> list[dict]:
    """[{"prompt", "answer", "answers", "depth", "size", "tokens"} (+ "spans": character spans
    of the answers, for teacher-forced tasks)] for one task at one context length.
    `answer` is the answers joined by ", " (what a perfect continuation would say).
    `options` carries the task knobs: {"needle": {"keys", "values"}, "mqar": {"pairs", "queries"}}."""
    make_task, lo, hi = _task_maker(task, tokenizer, options or {})
    length = lambda s: n_tokens(tokenizer, s)  # noqa: E731
    out = []
    for i, depth in enumerate(sample_depths(samples, depths_cfg)):
        sample_seed = f"{seed}:{METRIC_NAME.get(task, task)}:{context_len}:{i}"

        def make(size: int, _seed=sample_seed, _depth=depth):
            return make_task(random.Random(_seed), size, _depth)

        prompt, answers, *rest = fit_example(make, length, context_len, lo=lo, hi=hi)
        item = {"prompt": prompt, "answer": ", ".join(answers), "answers": list(answers), "depth": depth,
                "size": rest[-1], "tokens": length(prompt)}
        if len(rest) == 2:
            item["spans"] = [tuple(s) for s in rest[0]]
        out.append(item)
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


def score_sample(task: str, continuation: str, answers: list[str]) -> float:
    """One generated sample's score in [0, 1]: needle_multivalue scores the fraction of its
    values found in the continuation (ruler.score_all); every other generated task is right
    (1.0) when the continuation starts with its single answer (score_answer)."""
    if task == "needle_multivalue":
        return ruler.score_all(continuation, answers)
    if len(answers) != 1:
        raise ValueError(f"{task}: expected one answer, got {len(answers)}")
    return float(score_answer(continuation, answers[0]))


def task_accuracy(task: str, continuations: list[str], answers: list[list[str]]) -> float:
    """Mean of score_sample over the samples of one task at one context length."""
    if len(continuations) != len(answers):
        raise ValueError(f"{len(continuations)} continuations for {len(answers)} samples")
    if not answers:
        raise ValueError("no samples to score")
    return sum(score_sample(task, c, a) for c, a in zip(continuations, answers)) / len(answers)


def query_accuracy(hits: list[list[bool]]) -> float:
    """MQAR accuracy: right queries over all queries of all prompts."""
    n = sum(len(h) for h in hits)
    if not n:
        raise ValueError("no queries to score")
    return sum(sum(map(bool, h)) for h in hits) / n


# ------------------------------------------------------------------ generation
def generate_continuations(model, tokenizer, prompts: list[str], answers: list[str], *,
                           batch_size: int = 8, kv_chunk: int = 32) -> list[str]:
    """Greedy continuations (len(answer tokens) + 1 new tokens, cached generate) of each prompt,
    left-padded batches. Under a quantized KV cache (`model.frontier_kv`, kv_bits < 16) the prompt
    but its last token first streams through the cache `kv_chunk` tokens at a time, so the answer
    is read from the quantized cache (a one-shot prefill would attend in full precision)."""
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
            from frontier import kvcache

            extra = {}
            kv_cache = kvcache.model_cache(model)
            if kv_cache is not None:  # quant.kv_bits < 16: generate on the quantized KV cache, the prompt
                extra["cache"] = kv_cache  # but its last token streamed in first, eval.kv_chunk tokens at a time
                for _ in kvcache.chunked_forward(model, enc["input_ids"], kv_cache, kv_chunk,
                                                 attention_mask=enc["attention_mask"], upto=enc["input_ids"].shape[1] - 1):
                    pass
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False,
                                 num_beams=1, use_cache=True, pad_token_id=pad_id, **extra)
        start = enc["input_ids"].shape[1]
        outs.extend(tokenizer.decode(row[start:], skip_special_tokens=True) for row in gen)
    return outs


def task_options(recall_cfg: dict) -> dict:
    """The task knobs of an `eval.recall` config, defaults filled in."""
    return {"needle": {**NEEDLE_DEFAULTS, **(recall_cfg.get("needle") or {})},
            "mqar": {**MQAR_DEFAULTS, **(recall_cfg.get("mqar") or {})}}


def evaluate_task(model, tokenizer, task: str, items: list[dict], *, batch_size: int = 8, kv_chunk: int = 32) -> float:
    """Accuracy of the model on one task's prompts (from build_prompts)."""
    if task in TEACHER_FORCED:
        return query_accuracy(_mqar.teacher_forced_hits(model, tokenizer, items, batch_size=batch_size,
                                                        kv_chunk=kv_chunk))
    conts = generate_continuations(model, tokenizer, [x["prompt"] for x in items],
                                   [x["answer"] for x in items], batch_size=batch_size, kv_chunk=kv_chunk)
    return task_accuracy(task, conts, [x["answers"] for x in items])


def evaluate_recall(model, tokenizer, recall_cfg: dict, *, tasks: Optional[Sequence[str]] = None,
                    batch_size: int = 8, progress: bool = True, warnings: Optional[list] = None) -> dict:
    """{metric_key(task, L): accuracy} for L in eval.recall.context_lens and each task of
    `tasks` (default: eval.recall.tasks, or kv + passkey when the config has none).

    A context length above the model's max_position_embeddings is skipped; a prompt that
    cannot fit at all in L (its fixed text alone is longer, e.g. MQAR's pairs) is skipped with
    a warning, also appended to `warnings` when given. `eval.recall.task_max_len` {task: L}
    limits a task to the context lengths <= L.
    """
    tasks = tuple(recall_cfg.get("tasks", DEFAULT_TASKS) if tasks is None else tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown recall task {t!r}; allowed: {', '.join(TASKS)}")
    opts = task_options(recall_cfg)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_len = recall_cfg.get("task_max_len") or {}
    jobs = [(L, t) for L in recall_cfg["context_lens"] for t in tasks if L <= max_len.get(t, L)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="recall", file=sys.stderr, mininterval=2.0, leave=False)
        except ImportError:
            bar = None

    def warn(msg: str) -> None:
        log.warning("%s", msg)
        if warnings is not None:
            warnings.append(msg)

    out: dict = {}
    too_long: set = set()  # one warning per L (task_max_len may leave tasks[0] out of an L)
    for L, task in jobs:
        if max_pos and L > max_pos:
            if L not in too_long:
                too_long.add(L)
                warn(f"recall: skipping L={L} > max_position_embeddings={max_pos}")
        else:
            try:
                items = build_prompts(tokenizer, task, L, recall_cfg["samples"], recall_cfg["seed"],
                                      depths_cfg=recall_cfg.get("depths"), options=opts)
            except ValueError as e:
                warn(f"{task}: skipping L={L}: {e}")
                items = None
            if items:
                acc = evaluate_task(model, tokenizer, task, items, batch_size=batch_size,
                                    kv_chunk=int(recall_cfg.get("kv_chunk", 32)))
                out[metric_key(task, L)] = acc
                log.info("%s@%d: acc %.3f over %d prompts (%d-%d tokens)", task, L, acc, len(items),
                         min(x["tokens"] for x in items), max(x["tokens"] for x in items))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
