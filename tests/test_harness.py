"""lm-evaluation-harness in-process on the loaded model: a task defined on local files."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from frontier.evaluate import harness

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _docs(n: int = 10) -> list[dict]:
    rng = random.Random(0)
    docs = []
    for i in range(n):
        k = "".join(rng.choice("abcdefghij") for _ in range(3))
        v = rng.randrange(100)
        choices = [f"{v:02d}", f"{(v + 17) % 100:02d}", f"{(v + 41) % 100:02d}"]
        label = rng.randrange(3)
        choices[0], choices[label] = choices[label], choices[0]
        docs.append({"question": f"KV {k}:{v:02d} ; xyz:55 ? {k}:", "choices": choices, "label": label})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 10-example multiple-choice task (`local_mc`) and a broken one (`local_missing`)."""
    root = tmp_path_factory.mktemp("harness")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "hf-cache"
    (tasks / "local_mc.yaml").write_text(TASK_YAML.format(name="local_mc", data=data, cache=cache))
    (tasks / "local_missing.yaml").write_text(TASK_YAML.format(name="local_missing", data=root / "nowhere.jsonl",
                                                               cache=cache))
    return tasks


@pytest.fixture(scope="module")
def tok():
    from frontier import data

    rng = random.Random(0)
    return data.train_tokenizer([data.kv_training_text(rng, 12, 4) for _ in range(80)], 300)


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval does: the whole string, split at
    the context's token count."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


# ------------------------------------------------------------------ pure helpers
def test_metric_names_and_flattening():
    assert harness.metric_name("arc", "acc,none") == "harness.arc.acc"
    assert harness.metric_name("gsm8k", "exact_match,strict-match") == "harness.gsm8k.exact_match_strict-match"
    assert harness.metric_name("arc", "acc_stderr,none") is None
    assert harness.metric_name("arc", "alias") is None and harness.metric_name("arc", "sample_len") is None
    out = {"results": {"grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
                       "sub_a": {"acc,none": 0.25, "acc_norm,none": 0.3}, "sub_b": {"acc,none": 0.75},
                       "solo": {"word_perplexity,none": 12.5, "bits_per_byte,none": float("nan"), "flag": True}},
           "group_subtasks": {"grp": ["sub_a", "sub_b"], "solo": []}}
    assert harness.top_level(out["results"], out["group_subtasks"]) == ["grp", "solo"]
    assert harness.flatten_results(out) == {"harness.grp.acc": 0.5, "harness.solo.word_perplexity": 12.5}
    assert harness.evaluate_harness(None, None, {"tasks": []}) == {}
    assert harness.evaluate_harness(None, None, None) == {}


# ------------------------------------------------------------------ in-process run
def test_local_multiple_choice_task_matches_hand_computed_accuracy(model, tok, task_dir):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"tasks": ["local_mc"], "include_path": str(task_dir), "batch_size": 4}
    got = harness.evaluate_harness(model, tok, cfg, seed=0)
    assert set(got) == {"harness.local_mc.acc"}
    # lm-eval's acc: the choice with the highest log-likelihood (after the " " target delimiter)
    docs = _docs()
    right = 0
    for d in docs:
        scores = [_loglik(model, tok, d["question"], " " + c) for c in d["choices"]]
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert got["harness.local_mc.acc"] == pytest.approx(right / len(docs))
    # the harness scored the model as it is, and left it so
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "tie_weights" not in vars(model)
    # limit: only the first examples
    got2 = harness.evaluate_harness(model, tok, {**cfg, "limit": 4}, seed=0)
    assert math.isclose(got2["harness.local_mc.acc"] * 4, round(got2["harness.local_mc.acc"] * 4))


def test_run_records_harness_metrics_and_errors(micro_base, task_dir, tmp_path):
    from frontier import config, evaluate

    manifest = json.loads((micro_base / "manifest.json").read_text())
    cfg = config.compose((("model", "micro"), ("eval", "quick")))
    cfg = {k: cfg[k] for k in ("model", "quant", "attention", "finetune", "eval", "hardware", "data")}
    cfg["data"] = manifest["config"]["data"]
    ev = cfg["eval"]
    ev["ppl"]["max_tokens"] = 256
    ev["recall"].update(context_lens=[64], samples=1, tasks=["kv"])
    ev["cost"].update(context_lens=[64])
    ev["harness"] = {"tasks": ["local_mc"], "include_path": str(task_dir), "batch_size": 8}
    config.validate_point({**config.compose((("model", "micro"),)), **cfg}, cuda_available=False)

    def run(name: str) -> dict:
        out = tmp_path / name / "metrics.json"
        evaluate.run(micro_base, cfg, point_id=name, sweep="t", choices={}, overrides={}, out_path=out,
                     tracking=None, progress=False)
        return json.loads(out.read_text())

    ok = run("ok")
    assert ok["status"] == "ok", ok["reason"]
    assert 0.0 <= ok["quality"]["harness.local_mc.acc"] <= 1.0 and "recall_acc@64" in ok["quality"]
    assert ok["versions"]["lm_eval"] == harness.version() and ok["warnings"] == []
    # data unreachable: on_error=fail fails the point, on_error=warn keeps the other metrics
    ev["harness"]["tasks"] = ["local_missing"]
    failed = run("failed")
    assert failed["status"] == "failed" and failed["reason"]
    ev["harness"]["on_error"] = "warn"
    warned = run("warned")
    assert warned["status"] == "ok" and "ppl" in warned["quality"]
    assert not any(k.startswith("harness.") for k in warned["quality"])
    assert len(warned["warnings"]) == 1 and warned["warnings"][0].startswith("harness failed: ")
