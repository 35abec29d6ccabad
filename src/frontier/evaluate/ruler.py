"""RULER-style needle in a haystack, generated locally from a seed (no downloads).

Three variants of RULER's NIAH family (Hsieh et al., 2024, "RULER: What's the real context
size of your long-context language models?"), on its "noise" haystack (the repeated filler
sentences of the passkey task):

* `needle_single`: one needle "The magic number for <key> is <value>." at the sample's
  depth; the query asks for that key's number.
* `needle_multikey`: `keys` needles with distinct keys (one queried, at the sample's depth;
  the distractors at seeded random depths); the model must pick the queried key's number.
* `needle_multivalue`: one key with `values` distinct numbers (the first at the sample's
  depth, the rest at seeded random depths); the query asks for all of them. Scored as
  RULER's `string_match_all`: the fraction of the values present in the continuation.

Keys are common English words, values 5-digit numbers, all drawn from the rng before the
haystack is sized, so every size of a sample (the recall fitter's binary search) holds the
same needles. The generators and scorers here are pure functions (no tokenizer, no torch).
"""
from __future__ import annotations

import random
import re
from typing import Callable, Optional

NEEDLE = "The magic number for {key} is {value}. "
QUERY = "What is the magic number for {key}? The magic number for {key} is"
QUERY_ALL = "What are all the magic numbers for {key}? The magic numbers for {key} are"
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ")
KEY_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "candle", "garden",
    "silver", "rocket", "forest", "bridge", "castle", "dragon", "falcon", "harbor", "island", "jungle",
    "lemon", "meadow", "needle", "orange", "pepper", "rabbit", "saddle", "tunnel", "violet", "window",
    "yellow", "zebra", "anchor", "basket", "cactus", "desert", "engine", "feather", "glacier", "hammer",
    "insect", "jacket", "kettle", "ladder", "mirror", "napkin", "oyster", "pillow", "quartz", "ribbon",
    "shadow", "turtle", "valley", "walnut", "winter", "summer", "planet", "copper", "marble", "thunder",
    "comet", "pebble", "lantern", "compass",
)
VARIANTS = ("needle_single", "needle_multikey", "needle_multivalue")


# ------------------------------------------------------------------ haystack
def filler_sentences(n_tokens_target: int, count_tokens: Optional[Callable[[str], int]] = None,
                     sentences: tuple = FILLER) -> list[str]:
    """Filler sentences, cycling through `sentences`, while their summed size (by
    `count_tokens`, default whitespace words) stays <= `n_tokens_target`."""
    count = count_tokens or (lambda s: len(s.split()))
    sizes = [max(1, count(s)) for s in sentences]
    out, used = [], 0
    while used + sizes[len(out) % len(sentences)] <= n_tokens_target:
        i = len(out) % len(sentences)
        out.append(sentences[i])
        used += sizes[i]
    return out


def insert_at_depths(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Join `sentences` with each (depth, text) needle inserted at the sentence boundary
    nearest to depth x len(sentences) (depth clipped to [0, 1]); needles at the same
    boundary keep their given order."""
    n = len(sentences)
    cuts: dict[int, list[str]] = {}
    for depth, text in needles:
        cut = min(int(round(max(0.0, min(1.0, float(depth))) * n)), n)
        cuts.setdefault(cut, []).append(text)
    parts = []
    for i in range(n + 1):
        parts.extend(cuts.get(i, ()))
        if i < n:
            parts.append(sentences[i])
    return "".join(parts)


# ------------------------------------------------------------------ generators
def _keys(rng: random.Random, n: int) -> list[str]:
    if n > len(KEY_WORDS):
        raise ValueError(f"at most {len(KEY_WORDS)} distinct needle keys, asked for {n}")
    return rng.sample(KEY_WORDS, n)


def _values(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(10000, 100000), n)]


def needle_example(rng: random.Random, variant: str, n_filler_tokens: int, depth: float = 0.5, *,
                   keys: int = 4, values: int = 4,
                   count_tokens: Optional[Callable[[str], int]] = None) -> tuple[str, list[str]]:
    """(prompt, answers) of one needle-in-a-haystack sample.

    `variant` is one of VARIANTS; `keys` is the number of needles (distinct keys) of
    needle_multikey, `values` the number of values of needle_multivalue. The answers are the
    queried value (one, for single/multikey) or all the key's values (multivalue).
    """
    if variant == "needle_single":
        (key,), (value,) = _keys(rng, 1), _values(rng, 1)
        needles, answers, query = [(depth, NEEDLE.format(key=key, value=value))], [value], QUERY.format(key=key)
    elif variant == "needle_multikey":
        if keys < 2:
            raise ValueError(f"needle_multikey needs at least 2 keys, got {keys}")
        ks, vs = _keys(rng, keys), _values(rng, keys)
        others = [rng.random() for _ in range(keys - 1)]
        needles = [(depth, NEEDLE.format(key=ks[0], value=vs[0]))]
        needles += [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(others, ks[1:], vs[1:])]
        answers, query = [vs[0]], QUERY.format(key=ks[0])
    elif variant == "needle_multivalue":
        if values < 2:
            raise ValueError(f"needle_multivalue needs at least 2 values, got {values}")
        (key,), vs = _keys(rng, 1), _values(rng, values)
        ds = [depth] + [rng.random() for _ in range(values - 1)]
        needles = [(d, NEEDLE.format(key=key, value=v)) for d, v in zip(ds, vs)]
        answers, query = vs, QUERY_ALL.format(key=key)
    else:
        raise ValueError(f"unknown needle variant {variant!r}; known: {', '.join(VARIANTS)}")
    prompt = insert_at_depths(filler_sentences(n_filler_tokens, count_tokens), needles) + query
    return prompt, answers


KV_FACT = "The code of the {key} is {value}. "
KV_QUERY = "What is the code of the {key}? The code of the {key} is"


def kv_text_example(rng: random.Random, n_pairs: int, depth: float = 0.5) -> tuple[str, list[str]]:
    """(prompt, [answer]) of natural-language key-value retrieval: `n_pairs` facts "The code of
    the <word> <word> is <5 digits>." with distinct two-word keys and no filler (every fact is a
    distractor, as in Lost in the Middle's key-value task), then a query for the fact at `depth`."""
    n = max(1, int(n_pairs))
    if n > len(KEY_WORDS) * (len(KEY_WORDS) - 1):
        raise ValueError(f"at most {len(KEY_WORDS) * (len(KEY_WORDS) - 1)} distinct keys, asked for {n}")
    keys: list[str] = []
    seen: set = set()
    while len(keys) < n:
        a, b = rng.sample(KEY_WORDS, 2)
        if (a, b) not in seen:
            seen.add((a, b))
            keys.append(f"{a} {b}")
    values = [str(rng.randrange(10000, 100000)) for _ in range(n)]
    i = min(int(max(0.0, min(1.0, float(depth))) * n), n - 1)
    prompt = "".join(KV_FACT.format(key=k, value=v) for k, v in zip(keys, values)) + KV_QUERY.format(key=keys[i])
    return prompt, [values[i]]


# ------------------------------------------------------------------ scoring (pure)
def found(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as a whole word (not inside a longer number or word)."""
    ans = (answer or "").strip()
    if not ans or not text:
        return False
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(ans)}(?![0-9A-Za-z])", text) is not None


def score_all(continuation: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample: the fraction of `answers` found (whole word,
    any order) in the continuation. Empty answers score 0."""
    if not answers:
        return 0.0
    return sum(found(continuation or "", a) for a in answers) / len(answers)
