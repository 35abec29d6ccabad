"""Stage `evaluate`: recall generators and scorer, strided perplexity, cost ladder, run()."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from frontier.evaluate import measure, perplexity, recall

METRIC_KEYS = {"point_id", "sweep", "status", "reason", "choices", "overrides", "config", "quality",
               "weight_bytes", "params", "effective_bits", "costs", "versions", "device", "wall_s"}


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
def test_generators_are_deterministic_and_fit(tok):
    for task in recall.TASKS:
        a = recall.build_prompts(tok, task, 128, 4, seed=7)
        b = recall.build_prompts(tok, task, 128, 4, seed=7)
        c = recall.build_prompts(tok, task, 128, 4, seed=8)
        assert a == b
        assert [x["answer"] for x in a] != [x["answer"] for x in c]
        assert [x["depth"] for x in a] == pytest.approx([0.1, 0.1 + 0.8 / 3, 0.1 + 1.6 / 3, 0.9])
        for x in a:
            assert x["tokens"] == recall.n_tokens(tok, x["prompt"]) <= 128
            assert x["answer"] in x["prompt"]
        if task == "recall":  # as close to L as possible: one more pair would not fit
            for x in a:
                bigger, _ = recall.recall_example(random.Random(f"7:recall:128:{a.index(x)}"), x["size"] + 1, x["depth"])
                assert recall.n_tokens(tok, bigger) > 128
                assert x["tokens"] >= 128 - 12
    p1 = recall.passkey_example(random.Random(3), 50, 0.5)
    assert p1 == recall.passkey_example(random.Random(3), 50, 0.5)
    prompt, key = p1
    assert len(key) == 5 and key.isdigit()
    assert f"The pass key is {key}. Remember it." in prompt and prompt.endswith(recall.PASSKEY_QUERY)
    assert recall.passkey_example(random.Random(3), 200, 0.5)[0].count("grass") > prompt.count("grass")
    shallow, _ = recall.passkey_example(random.Random(3), 200, 0.1)
    deep, _ = recall.passkey_example(random.Random(3), 200, 0.9)
    assert shallow.index("pass key is") < deep.index("pass key is")


def test_scorer_on_hand_made_answers():
    s = recall.score_answer
    assert s("07", "07") and s("07 ; abc:12", "07") and s("  07\n", "07") and s(" 12345.", "12345")
    assert not s("08", "07") and not s("0", "07") and not s("x07", "07")
    assert not s("", "07") and not s("   ", "07") and not s("07", "") and not s(None, "07")
    assert recall.accuracy(["07", " 12", "", "99 x"], ["07", "12", "5", "98"]) == 0.5
    with pytest.raises(ValueError):
        recall.accuracy(["a"], ["a", "b"])


def test_fit_example_binary_search():
    make = lambda n: ("x" * (3 * n), "a")  # noqa: E731
    prompt, _, n = recall.fit_example(make, len, 100, lo=1, hi=1000)
    assert n == 33 and len(prompt) == 99
    with pytest.raises(ValueError):
        recall.fit_example(lambda n: ("x" * 50, "a"), len, 10)


def test_recall_accuracy_runs_and_skips_long_contexts(tok, model):
    out = recall.evaluate_recall(model, tok, {"context_lens": [64, 1024], "samples": 2, "seed": 0}, progress=False)
    assert set(out) == {"recall_acc@64", "passkey_acc@64"}  # 1024 > max_position_embeddings=512
    assert all(0.0 <= v <= 1.0 for v in out.values())


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
    assert set(q) == {"ppl", "recall_acc@64", "recall_acc@128", "passkey_acc@64", "passkey_acc@128"}
    assert 1.0 < q["ppl"] < len_vocab(base_manifest) * 2
    assert {(c["context_len"], c["metric"]) for c in disk["costs"]} == {(L, m) for L in (64, 128) for m in measure.METRICS}
    assert disk["effective_bits"] == 32.0 and disk["params"] > 0 and disk["weight_bytes"] >= 4 * disk["params"] * 0.9
    assert disk["device"] == "cpu" and disk["versions"]["torch"] and disk["wall_s"] > 0


def len_vocab(manifest) -> int:
    return manifest["config"]["model"]["vocab"]


def test_run_quantized_and_linear_points(micro_chain, base_manifest, tmp_path):
    cfg = point_cfg(base_manifest["config"]["data"])
    cfg["eval"]["recall"]["context_lens"] = [64]
    _, q8 = _run(micro_chain("int8", "softmax"), cfg, tmp_path, "int8")
    assert q8["status"] == "ok", q8["reason"]
    assert 8.0 <= q8["effective_bits"] < 10.0
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
