"""Stage `evaluate`: recall generators and scorer, strided perplexity, cost ladder, run()."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from frontier.evaluate import measure, mqar, perplexity, recall, ruler

METRIC_KEYS = {"point_id", "sweep", "status", "reason", "choices", "overrides", "config", "quality",
               "weight_bytes", "params", "effective_bits", "costs", "versions", "device", "wall_s", "warnings",
               "attention_layers", "quality_weights", "wandb"}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    from frontier import data

    rng = random.Random(0)
    texts = [data.kv_training_text(rng, 12, 4) for _ in range(60)]
    texts += ["The grass is green. The sky is blue. The pass key is 12345. Remember it. What is the pass key?"] * 20
    texts += [Path(random.__file__).read_text()]
    return data.train_tokenizer(texts, 320)


def tiny_llama(tok, max_pos: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=max_pos,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def point_cfg(data_cfg: dict) -> dict:
    from frontier import config

    cfg = config.compose((("model", "micro"), ("eval", "quick")))
    cfg = {k: cfg[k] for k in ("model", "quant", "attention", "finetune", "eval", "hardware", "data")}
    cfg["data"] = dict(data_cfg)
    cfg["eval"]["ppl"]["max_tokens"] = 512
    cfg["eval"]["recall"]["samples"] = 3
    cfg["eval"]["cost"]["context_lens"] = [64, 128]
    return cfg


def strict_json(path: Path) -> dict:
    def bad(c):
        raise ValueError(f"non-finite number {c} in {path}")

    return json.loads(path.read_text(), parse_constant=bad)


# ---------------------------------------------------------------- recall
SMALL = {"needle": {"keys": 2, "values": 2}, "mqar": {"pairs": 4, "queries": 2}}


def test_task_registry_matches_config():
    from frontier import config

    assert recall.TASKS == config.RECALL_TASKS
    assert recall.NEEDLE_DEFAULTS == {f.name: f.default for f in dataclasses.fields(config.NeedleCfg)}
    assert recall.MQAR_DEFAULTS == {f.name: f.default for f in dataclasses.fields(config.MqarCfg)}
    assert [recall.metric_key(t, 128) for t in recall.TASKS] == [
        "recall_acc@128", "kv_text_acc@128", "passkey_acc@128", "needle_single_acc@128", "needle_multikey_acc@128",
        "needle_multivalue_acc@128", "mqar_acc@128", "copy_acc@128"]


def test_generators_are_deterministic_and_fit(tok):
    for task in recall.TASKS:
        a = recall.build_prompts(tok, task, 256, 4, seed=7, options=SMALL)
        b = recall.build_prompts(tok, task, 256, 4, seed=7, options=SMALL)
        c = recall.build_prompts(tok, task, 256, 4, seed=8, options=SMALL)
        assert a == b, task
        assert [x["answers"] for x in a] != [x["answers"] for x in c], task
        assert [x["depth"] for x in a] == pytest.approx([0.1, 0.1 + 0.8 / 3, 0.1 + 1.6 / 3, 0.9])
        for x in a:
            assert x["tokens"] == recall.n_tokens(tok, x["prompt"]) <= 256
            assert x["tokens"] >= 256 - 40, (task, x["tokens"])  # filled close to L
            assert all(ans in x["prompt"] for ans in x["answers"])
            assert x["answer"] == ", ".join(x["answers"])
            if task != "copy":  # copy: every word of the second line
                assert len(x["answers"]) == {"needle_multivalue": 2, "mqar": 2}.get(task, 1)
        if task == "kv":  # as close to L as possible: one more pair would not fit
            for i, x in enumerate(a):
                bigger, _ = recall.recall_example(random.Random(f"7:recall:256:{i}"), x["size"] + 1, x["depth"])
                assert recall.n_tokens(tok, bigger) > 256
    p1 = recall.passkey_example(random.Random(3), 50, 0.5)
    assert p1 == recall.passkey_example(random.Random(3), 50, 0.5)
    prompt, key = p1
    assert len(key) == 5 and key.isdigit()
    assert f"The pass key is {key}. Remember it." in prompt and prompt.endswith(recall.PASSKEY_QUERY)
    assert recall.passkey_example(random.Random(3), 200, 0.5)[0].count("grass") > prompt.count("grass")
    shallow, _ = recall.passkey_example(random.Random(3), 200, 0.1)
    deep, _ = recall.passkey_example(random.Random(3), 200, 0.9)
    assert shallow.index("pass key is") < deep.index("pass key is")


def test_depths_are_configurable(tok):
    assert recall.sample_depths(5, [0.0, 1.0]) == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert recall.sample_depths(3, None) == recall.depths(3) == pytest.approx([0.1, 0.5, 0.9])
    for task in ("passkey", "needle_single"):
        first, last = recall.build_prompts(tok, task, 128, 2, seed=1, depths_cfg=[0.0, 1.0], options=SMALL)
        assert (first["depth"], last["depth"]) == (0.0, 1.0)
        needle = "The pass key is" if task == "passkey" else "The magic number for"
        assert first["prompt"].startswith(needle)  # depth 0: before the first filler sentence
        tail = last["prompt"][last["prompt"].index(needle):]  # depth 1: after the last filler sentence
        assert last["prompt"].index(needle) > 0 and not any(f.strip() in tail for f in ruler.FILLER)


def test_needle_variants():
    count = lambda s: len(s.split())  # noqa: E731
    needles = lambda p: re.findall(r"The magic number for (\w+) is (\d+)\. ", p)  # noqa: E731
    prompt, ans = ruler.needle_example(random.Random(1), "needle_single", 60, 0.5, count_tokens=count)
    ((key, value),) = needles(prompt)
    assert ans == [value] and len(value) == 5 and prompt.endswith(ruler.QUERY.format(key=key))
    # multikey: 5 needles, distinct keys, the queried one is the answer; same needles at every size
    p5, a5 = ruler.needle_example(random.Random(2), "needle_multikey", 80, 0.3, keys=5, count_tokens=count)
    big, a5b = ruler.needle_example(random.Random(2), "needle_multikey", 400, 0.3, keys=5, count_tokens=count)
    found = dict(needles(p5))
    assert len(found) == 5 and a5 == a5b and len(big) > len(p5) and dict(needles(big)) == found
    asked = p5.rsplit("What is the magic number for ", 1)[1].split("?")[0]
    assert a5 == [found[asked]] and len(set(found.values())) == 5
    # multivalue: one key, 3 distinct values, all asked for
    pv, av = ruler.needle_example(random.Random(3), "needle_multivalue", 80, 0.5, values=3, count_tokens=count)
    nv = needles(pv)
    assert len({k for k, _ in nv}) == 1 and sorted(v for _, v in nv) == sorted(av) and len(set(av)) == 3
    assert pv.endswith(ruler.QUERY_ALL.format(key=nv[0][0]))
    with pytest.raises(ValueError, match="unknown needle variant"):
        ruler.needle_example(random.Random(0), "needle_other", 10)
    # the haystack: whole filler sentences within the budget, needles at sentence boundaries
    assert ruler.filler_sentences(10) == ["The grass is green. ", "The sky is blue. "]  # 4 + 4 words, +4 > 10
    assert ruler.insert_at_depths(["a. ", "b. "], [(0.5, "N1 "), (0.5, "N2 "), (1.0, "Z ")]) == "a. N1 N2 b. Z "


def test_mqar_generator():
    prompt, ans, spans = mqar.mqar_example(random.Random(4), 6, 3)
    assert prompt.startswith("KV ") and len(ans) == 3 and "grass" not in prompt
    assert [prompt[a:b] for a, b in spans] == ans
    keys = [prompt[:a].rsplit("? ", 1)[1].rstrip(":") for a, _ in spans]
    assert len(set(keys)) == 3 and all(f"{k}:{v} ;" in prompt or prompt.split(" ?")[0].endswith(f"{k}:{v}")
                                       for k, v in zip(keys, ans))
    gap, ans_g, spans_g = mqar.mqar_example(random.Random(4), 6, 3, gap_tokens=30)
    assert ans_g == ans and "The grass is green." in gap and [gap[a:b] for a, b in spans_g] == ans
    assert gap.index("grass") < spans_g[0][0]  # the gap separates the pairs from the queries
    assert len(mqar.mqar_example(random.Random(4), 2, 5)[1]) == 2  # no more queries than pairs


def test_copy_generator_and_teacher_forced_scoring(tok):
    prompt, words, spans = recall.copy_example(random.Random(4), 6)
    first, second = prompt.split("\n")
    assert first == second and first.startswith(recall.COPY_HEADER) and len(first.split()) == 7
    assert [prompt[a:b] for a, b in spans] == words == first.split()[2:]  # the second line, first word excluded
    assert all(a > len(first) for a, _ in spans)
    items = recall.build_prompts(tok, "copy", 128, 3, seed=3)
    assert all(100 < it["tokens"] <= 128 for it in items) and len({it["prompt"] for it in items}) == 3
    assert recall.evaluate_task(_Oracle(len(tok), 1), tok, "copy", items, batch_size=2) == 1.0
    assert recall.evaluate_task(_Oracle(len(tok), 0), tok, "copy", items, batch_size=2) == 0.0


def test_scorers_on_hand_made_answers():
    s = recall.score_answer
    assert s("07", "07") and s("07 ; abc:12", "07") and s("  07\n", "07") and s(" 12345.", "12345")
    assert not s("08", "07") and not s("0", "07") and not s("x07", "07")
    assert not s("", "07") and not s("   ", "07") and not s("07", "") and not s(None, "07")
    assert recall.accuracy(["07", " 12", "", "99 x"], ["07", "12", "5", "98"]) == 0.5
    with pytest.raises(ValueError):
        recall.accuracy(["a"], ["a", "b"])
    # RULER string_match_all: any order, whole numbers only
    assert ruler.score_all(" 12345, 67890 and 11111.", ["67890", "12345", "11111"]) == 1.0
    assert ruler.score_all(" 12345 and 6789", ["12345", "67890"]) == 0.5
    assert ruler.score_all("123456", ["12345"]) == 0.0 and ruler.score_all("x12345", ["12345"]) == 0.0
    assert ruler.score_all("", ["1"]) == 0.0 and ruler.score_all("1", []) == 0.0
    assert recall.score_sample("needle_multivalue", " 1, 3", ["1", "2", "3", "4"]) == 0.5
    assert recall.score_sample("needle_multikey", " 55555.", ["55555"]) == 1.0
    assert recall.task_accuracy("needle_single", [" 1", "2", "x"], [["1"], ["3"], ["x"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall.score_sample("passkey", "1", ["1", "2"])
    assert recall.query_accuracy([[True, False], [True, True, True]]) == 0.8
    # teacher-forced MQAR scoring: token spans from character offsets, then argmax == next token
    offsets = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]  # a BOS, then "KV" " " "ab" ":" "07"
    assert mqar.token_spans(offsets, [(6, 8), (4, 7)]) == [(5, 6), (3, 6)]
    with pytest.raises(ValueError):
        mqar.token_spans(offsets, [(9, 10)])
    ids = [1, 10, 11, 12, 13, 14]
    pred = [10, 11, 12, 13, 14, 0]  # pred[t] predicts ids[t + 1]: a perfect model
    assert mqar.query_hits(pred, ids, [(5, 6), (3, 6), (0, 1)]) == [True, True, False]
    pred[3] = 99  # wrong at position 4
    assert mqar.query_hits(pred, ids, [(5, 6), (3, 6), (4, 5)]) == [True, False, False]


class _Oracle(torch.nn.Module):
    """Cheats: sees the whole row and predicts each position's true next token (shift=1), or
    repeats the current token (shift=0). Honours logits_to_keep as a tensor of positions."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, logits_to_keep=None, **kw):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return SimpleNamespace(logits=logits if logits_to_keep is None else logits[:, logits_to_keep])


def test_mqar_teacher_forced_plumbing(tok, model):
    items = recall.build_prompts(tok, "mqar", 96, 5, seed=3, options=SMALL)
    assert recall.evaluate_task(_Oracle(len(tok), 1), tok, "mqar", items, batch_size=2) == 1.0
    assert recall.evaluate_task(_Oracle(len(tok), 0), tok, "mqar", items, batch_size=2) == 0.0
    # right padding never changes a real position: batched == one at a time
    hits = mqar.teacher_forced_hits(model, tok, items, batch_size=5)
    assert hits == [h for it in items for h in mqar.teacher_forced_hits(model, tok, [it], batch_size=1)]
    # and equals a full-logits forward, row by row
    for it, h in zip(items, hits):
        enc = tok(it["prompt"], return_offsets_mapping=True)
        with torch.no_grad():
            pred = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].argmax(-1).tolist()
        assert h == mqar.query_hits(pred, enc["input_ids"], mqar.token_spans(enc["offset_mapping"], it["spans"]))


def test_fit_example_binary_search():
    make = lambda n: ("x" * (3 * n), "a")  # noqa: E731
    prompt, _, n = recall.fit_example(make, len, 100, lo=1, hi=1000)
    assert n == 33 and len(prompt) == 99
    with pytest.raises(ValueError):
        recall.fit_example(lambda n: ("x" * 50, "a"), len, 10)
    # a size knob that overestimates the prompt's length (2 units per token) still fills to L
    prompt, _, n = recall.fit_example(lambda n: ("x" * (n // 2), "a"), len, 100, lo=0, hi=10 ** 9)
    assert len(prompt) == 100 and n == 201



def test_recall_accuracy_runs_and_skips_long_contexts(tok, model):
    warns: list = []
    cfg = {"context_lens": [64, 128, 1024], "samples": 2, "seed": 0, "tasks": list(recall.TASKS), **SMALL}
    out = recall.evaluate_recall(model, tok, cfg, progress=False, warnings=warns)
    # 1024 > max_position_embeddings=512; the needles need more than 64 tokens with this vocabulary
    assert set(out) == {recall.metric_key(t, 128) for t in recall.TASKS} | {
        "recall_acc@64", "passkey_acc@64", "mqar_acc@64", "copy_acc@64"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert sorted(w.split(":")[0] for w in warns) == ["kv_text", "needle_multikey", "needle_multivalue",
                                                      "needle_single", "recall"]
    assert any("L=1024 > max_position_embeddings" in w for w in warns)
    # a config without `tasks` runs the historic pair
    out = recall.evaluate_recall(model, tok, {"context_lens": [64], "samples": 1, "seed": 0}, progress=False)
    assert set(out) == {"recall_acc@64", "passkey_acc@64"}
    with pytest.raises(ValueError, match="allowed: kv, kv_text, passkey"):
        recall.evaluate_recall(model, tok, {**cfg, "tasks": ["needle"]}, progress=False)
    # task_max_len: passkey on the whole ladder, kv only up to 64
    out = recall.evaluate_recall(model, tok, {"context_lens": [64, 128], "samples": 1, "seed": 0,
                                              "tasks": ["kv", "passkey"], "task_max_len": {"kv": 64}}, progress=False)
    assert set(out) == {"recall_acc@64", "passkey_acc@64", "passkey_acc@128"}
    # an L beyond the model is still named once when task_max_len leaves the first task out of it
    warns = []
    recall.evaluate_recall(model, tok, {"context_lens": [64, 1024], "samples": 1, "seed": 0, "tasks": ["kv", "passkey"],
                                        "task_max_len": {"kv": 64}}, progress=False, warnings=warns)
    assert warns == ["recall: skipping L=1024 > max_position_embeddings=512"]


def test_eval_config_validation():
    from frontier import config

    base = config.compose((("model", "tiny"), ("eval", "default")))
    config.validate_point(base, cuda_available=False)

    def bad(path: str, value, match: str):
        cfg = copy.deepcopy(base)
        node = cfg
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
        with pytest.raises(config.ConfigError, match=match):
            config.validate_point(cfg, cuda_available=False)

    bad("eval.recall.tasks", ["kv", "ruler"], r"eval.recall.tasks\[1\]'.*unknown task 'ruler'; allowed: kv, kv_text, passkey, "
        r"needle_single, needle_multikey, needle_multivalue, mqar")
    bad("eval.recall.tasks", ["kv", "kv"], "twice")
    bad("eval.recall.depths", [0.5, 1.5], r"eval.recall.depths.*\[0, 1\]")
    bad("eval.recall.depths", [], r"eval.recall.depths")
    bad("eval.recall.needle", {"keys": 1}, r"eval.recall.needle.keys.*>= 2")
    bad("eval.recall.mqar", {"pairs": 0}, r"eval.recall.mqar.pairs.*>= 1")
    bad("eval.recall.mqar", {"queries": 2, "pairz": 3}, r"eval.recall.mqar.pairz.*unknown key")
    bad("eval.recall.task_max_len", {"kv_text": 64}, r"eval.recall.task_max_len.kv_text.*not in eval.recall.tasks; allowed: kv, passkey, needle_single")
    bad("eval.recall.task_max_len", {"passkey": 8}, r"eval.recall.task_max_len.passkey.*>= the smallest context length")
    bad("eval.harness.tasks", ["arc_easy", 3], r"eval.harness.tasks")
    bad("eval.harness.on_error", "ignore", r"eval.harness.on_error.*fail, warn")
    bad("eval.harness.limit", 2.5, r"eval.harness.limit")
    ok = copy.deepcopy(base)
    ok["eval"]["recall"].update(tasks=[], depths=[0, 1], mqar={"pairs": None, "queries": 8})
    del ok["eval"]["harness"], ok["eval"]["recall"]["needle"]  # optional sections
    config.validate_point(ok, cuda_available=False)


# ---------------------------------------------------------------- perplexity
def test_windows_score_every_token_once():
    for n, seq, stride in [(1000, 128, 64), (100, 128, 32), (130, 128, 1), (129, 64, 63)]:
        scored = [p for b, e, f in perplexity.windows(n, seq, stride) for p in range(f, e)]
        assert scored == list(range(1, n)), (n, seq, stride)
        assert all(e - b <= seq for b, e, _ in perplexity.windows(n, seq, stride))
    # stride == seq_len (HF's recipe): disjoint windows, a window's first token has no context
    wins = perplexity.windows(257, 64, 64)
    assert [(b, e) for b, e, _ in wins] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 257)][:4]
    assert [p for b, e, f in wins for p in range(f, e)] == [p for p in range(1, 256) if p % 64]


def test_strided_ppl_equals_full_sequence_nll(tok, model):
    ids = torch.randint(0, len(tok), (60,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    full = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean")
    assert perplexity.perplexity(model, ids, 64, 64, progress=False) == pytest.approx(math.exp(full.item()), rel=1e-5)
    total, count = perplexity.strided_nll(model, ids, 64, 64, progress=False)
    assert count == 59
    # with overlapping windows still one score per token (context differs, so the value may too)
    assert perplexity.strided_nll(model, ids, 16, 5, batch_size=3, progress=False)[1] == 59


class _Uniform(torch.nn.Module):
    def __init__(self, vocab: int, value: float = 0.0):
        super().__init__()
        self.vocab, self.value = vocab, value
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), self.value))


def test_uniform_logits_ppl_is_vocab_size_and_nan_fails():
    ids = torch.randint(0, 97, (300,))
    assert perplexity.perplexity(_Uniform(97), ids, 64, 32, progress=False) == pytest.approx(97.0, rel=1e-6)  # float32 log_softmax
    with pytest.raises(ValueError, match="not finite"):
        perplexity.perplexity(_Uniform(97, float("nan")), ids, 64, 32, progress=False)


def test_perplexity_on_local_text_corpus(tok, model, tmp_path):
    """data.corpus = a local text file (one document, so it is the held-out split) or a folder
    (one document per file, held out by a hash of the file name)."""
    from frontier import data

    text = Path(random.__file__).read_text()[:5000]
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    ev = {"ppl": {"seq_len": 64, "stride": 32, "max_tokens": 600}}
    data_cfg = {"corpus": str(f), "max_mb": 1.0, "recall_fraction": 0.0, "heldout_fraction": 0.05, "seed": 0}
    got = perplexity.evaluate_perplexity(model, tok, ev, data_cfg, progress=False)["ppl"]
    ids = data.encode_documents(tok, [text])[:600]
    assert got == pytest.approx(perplexity.perplexity(model, ids, 64, 32, progress=False), rel=1e-9)
    folder = tmp_path / "docs"
    folder.mkdir()
    parts = [text[i:i + 1000] for i in range(0, 5000, 1000)]
    for i, part in enumerate(parts):
        (folder / f"doc{i}.txt").write_text(part)
    data_cfg = {**data_cfg, "corpus": str(folder), "heldout_fraction": 0.4}
    train, held = data.split_documents(data.documents(data_cfg), 0.4, 0)
    assert held and train and set(held) | set(train) == set(parts)
    got = perplexity.evaluate_perplexity(model, tok, ev, data_cfg, progress=False)["ppl"]
    ids = data.encode_documents(tok, held)[:600]
    assert got == pytest.approx(perplexity.perplexity(model, ids, 64, 32, progress=False), rel=1e-9)


# ---------------------------------------------------------------- cost
def test_cost_ladder_and_weight_stats(tok, model):
    cost = {"context_lens": [32, 64, 128, 4096], "decode_tokens": 3, "warmup": 1, "repeats": 2, "batch": 1}
    rows = measure.measure_costs(model, cost, progress=False)
    got = {(r["context_len"], r["metric"]): r["value"] for r in rows}
    assert set(got) == {(L, m) for L in (32, 64, 128) for m in measure.METRICS}  # 4096 > max_pos: skipped
    assert all(v > 0 and math.isfinite(v) for v in got.values())
    sb = [got[(L, "state_bytes")] for L in (32, 64, 128)]
    assert sb[0] < sb[1] < sb[2] and sb[1] == 2 * sb[0]  # softmax KV cache grows linearly with L
    # KV bytes: layers x (k + v) x kv_heads x L x head_dim x 4 bytes
    assert sb[0] == 2 * 2 * 1 * 32 * 16 * 4
    ws = measure.weight_stats(model)
    assert ws["params"] == sum(p.numel() for p in model.parameters())
    assert ws["effective_bits"] == 32.0
    assert got[(128, "peak_mem_bytes")] > got[(32, "peak_mem_bytes")] > ws["weight_bytes"]


def test_state_bytes_fallback_sums_cache_tensors(tok, model):
    with torch.no_grad():
        out = model(input_ids=torch.zeros(2, 10, dtype=torch.long), use_cache=True)
    assert measure._fallback_state_bytes(out.cache.layers) == measure.state_bytes(out.cache) == 2 * 2 * 2 * 10 * 16 * 4


# ---------------------------------------------------------------- run() end to end
def _run(ckpt, cfg, tmp_path, name="p"):
    from frontier import evaluate

    out = tmp_path / name / "metrics.json"
    rec = evaluate.run(ckpt, cfg, point_id=name, sweep="test", choices={"quant": "none"},
                       overrides={"eval.recall.samples": 3}, out_path=out, tracking=None, progress=False)
    return rec, strict_json(out)


@pytest.fixture(scope="module")
def base_manifest(micro_base):
    return json.loads((micro_base / "manifest.json").read_text())


def test_run_end_to_end(micro_base, base_manifest, tmp_path):
    cfg = point_cfg(base_manifest["config"]["data"])
    rec, disk = _run(micro_base, cfg, tmp_path)
    assert rec == disk
    assert set(disk) == METRIC_KEYS
    assert disk["status"] == "ok" and disk["reason"] is None, disk["reason"]
    assert disk["config"] == cfg and disk["choices"] == {"quant": "none"} and disk["sweep"] == "test"
    q = disk["quality"]
    # eval=quick runs every recall task but kv_text (for real LLMs); with the micro vocabulary the
    # needles need > 64 tokens
    assert set(q) == {"ppl", "recall_acc@64", "passkey_acc@64", "mqar_acc@64", "copy_acc@64"} | {
        recall.metric_key(t, 128) for t in recall.TASKS if t != "kv_text"}
    assert all(0.0 <= v <= 1.0 for k, v in q.items() if k != "ppl")
    assert sorted(w.split(":")[0] for w in disk["warnings"]) == ["needle_multikey", "needle_multivalue", "needle_single"]
    assert all("skipping L=64" in w for w in disk["warnings"])
    assert 1.0 < q["ppl"] < len_vocab(base_manifest) * 2
    assert {(c["context_len"], c["metric"]) for c in disk["costs"]} == {(L, m) for L in (64, 128) for m in measure.METRICS}
    assert disk["effective_bits"] == 32.0 and disk["params"] > 0 and disk["weight_bytes"] >= 4 * disk["params"] * 0.9
    assert disk["device"] == "cpu" and disk["versions"]["torch"] and disk["wall_s"] > 0
    assert disk["quality_weights"] is None  # nothing quantized


def len_vocab(manifest) -> int:
    return manifest["config"]["model"]["vocab"]


def test_run_quantized_and_linear_points(micro_chain, base_manifest, tmp_path):
    cfg = point_cfg(base_manifest["config"]["data"])
    cfg["eval"]["recall"].update(context_lens=[64], tasks=["kv"])
    _, q8 = _run(micro_chain("int8", "softmax"), cfg, tmp_path, "int8")
    assert q8["status"] == "ok", q8["reason"]
    assert 8.0 <= q8["effective_bits"] < 10.0
    # quality and cost run the same quantized layers; the deprecated eval.quality_weights is ignored
    assert q8["quality_weights"] == "kernel"
    _, k8 = _run(micro_chain("int8", "softmax"), {**cfg, "eval": {**cfg["eval"], "quality_weights": "dequantized"}},
                 tmp_path, "int8k")
    assert k8["status"] == "ok" and k8["quality_weights"] == "kernel"
    assert k8["quality"]["ppl"] == pytest.approx(q8["quality"]["ppl"], rel=1e-6)
    assert k8["quality"]["recall_acc@64"] == q8["quality"]["recall_acc@64"]
    assert k8["weight_bytes"] == q8["weight_bytes"]
    _, lin = _run(micro_chain("none", "linear_elu"), cfg, tmp_path, "lin")
    assert lin["status"] == "ok", lin["reason"]
    sb = {c["context_len"]: c["value"] for c in lin["costs"] if c["metric"] == "state_bytes"}
    assert sb[64] == sb[128] > 0  # a fixed-size recurrent state


def test_run_tampered_checkpoint_fails_cleanly(micro_base, base_manifest, tmp_path):
    ckpt = tmp_path / "copy" / "_ckpt"
    shutil.copytree(micro_base, ckpt)
    name = max(base_manifest["files"], key=lambda f: base_manifest["files"][f]["bytes"])
    with open(ckpt / name, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    rec, disk = _run(ckpt, point_cfg(base_manifest["config"]["data"]), tmp_path)
    assert set(disk) == METRIC_KEYS
    assert disk["status"] == "failed" and disk["reason"].startswith("IntegrityError: ")
    assert "sha256" in disk["reason"] and "\n" not in disk["reason"]
    assert disk["quality"] == {} and disk["costs"] == []

    rec, disk = _run(tmp_path / "nowhere" / "_ckpt", point_cfg(base_manifest["config"]["data"]), tmp_path, "missing")
    assert disk["status"] == "failed" and disk["reason"].startswith("IntegrityError: ")


def test_run_failed_parent_propagates_without_loading(micro_base, base_manifest, tmp_path, monkeypatch):
    from frontier import checkpoint

    ckpt = tmp_path / "q" / "_ckpt"
    ckpt.mkdir(parents=True)
    checkpoint.atomic_write_json(ckpt / "manifest.json", {
        "stage": "quantize", "status": "failed", "reason": "RuntimeError: no kernel for int4",
        "parent": os.path.relpath(micro_base, ckpt), "files": {}})
    monkeypatch.setattr(checkpoint, "load_point", lambda *a, **k: pytest.fail("must not load a failed chain"))
    _, disk = _run(ckpt, point_cfg(base_manifest["config"]["data"]), tmp_path)
    assert disk["status"] == "failed"
    assert disk["reason"] == "quantize stage failed: RuntimeError: no kernel for int4"
    # a failed stage need not have a loadable parent: its reason still comes through
    checkpoint.atomic_write_json(ckpt / "manifest.json", {"stage": "surgery", "status": "failed",
                                                          "reason": "ValueError: bad", "parent": "../nowhere/_ckpt"})
    _, disk = _run(ckpt, point_cfg(base_manifest["config"]["data"]), tmp_path)
    assert disk["reason"] == "surgery stage failed: ValueError: bad"


def test_kv_text_facts_are_distinct_and_the_query_names_the_fact_at_depth():
    import random

    from frontier.evaluate import ruler

    for depth in (0.0, 0.5, 1.0):
        prompt, (answer,) = ruler.kv_text_example(random.Random(3), 40, depth)
        facts = [f for f in prompt.split(". ")[:-1]]
        assert len(facts) == 40 and len({f.rsplit(" is ", 1)[0] for f in facts}) == 40
        queried = prompt.rsplit("What is the code of the ", 1)[1].split("?")[0]
        index = [f.rsplit(" is ", 1)[0] for f in facts].index(f"The code of the {queried}")
        assert index == min(int(depth * 40), 39)
        assert facts[index].endswith(f" is {answer}")
