"""The embedded model trains; quantized checkpoints are smaller and reload bit-identically."""
import subprocess
import sys

import torch

from frontier import checkpoint as ck


def test_micro_base_trains_and_loads(micro_base):
    m = ck.read_manifest(micro_base)
    assert m["stage"] == "base" and m["parent"] is None
    assert m["train"]["final_loss"] < m["train"]["first_loss"]
    assert "model.safetensors" in m["files"] and "tokenizer.json" in m["files"]
    lp = ck.load_point(micro_base)
    assert type(lp.model).__name__ == "LlamaForCausalLM"
    ids = lp.tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert lp.tokenizer.decode(ids[0]) == "def f(x):\n    return x"
    assert torch.isfinite(lp.model(ids).logits).all()


def _logits(ckpt):
    lp = ck.load_point(ckpt)
    ids = torch.arange(3, 67).unsqueeze(0)
    with torch.no_grad():
        return lp.model(ids).logits, lp


def test_quantized_weights_shrink_in_order(micro_chain, micro_base):
    ref, lp_none = _logits(micro_base)
    sizes = {"none": ck.model_weight_bytes(lp_none.model)}
    for q in ("int8", "int4_g32"):
        d = micro_chain(q)
        m = ck.read_manifest(d)
        assert m["quant"]["bits"] == int(q[3])
        out, lp = _logits(d)
        sizes[q] = ck.model_weight_bytes(lp.model)
        assert (out - ref).abs().max() < (0.05 if q == "int8" else 0.5)
        w = lp.model.model.layers[0].mlp.up_proj.weight
        assert type(w).__name__ != "Parameter" or w.dtype != torch.float32  # a torchao tensor
    assert sizes["int4_g32"] < sizes["int8"] < sizes["none"]
    eff8 = ck.read_manifest(micro_chain("int8"))["quant"]["effective_bits_per_weight"]
    eff4 = ck.read_manifest(micro_chain("int4_g32"))["quant"]["effective_bits_per_weight"]
    assert 8 <= eff8 < 9.5 and 4 <= eff4 < 6.5, (eff8, eff4)


def test_quantized_checkpoint_reloads_identically_in_fresh_process(micro_chain):
    d = micro_chain("int4_g32")
    ref, _ = _logits(d)
    code = ("import torch,sys; from frontier import checkpoint as ck; lp=ck.load_point(sys.argv[1]);"
            "ids=torch.arange(3,67).unsqueeze(0);\nwith torch.no_grad(): torch.save(lp.model(ids).logits, sys.argv[2])")
    out = d.parent / "fresh_logits.pt"
    subprocess.run([sys.executable, "-c", code, str(d), str(out)], check=True)
    assert torch.equal(torch.load(out, weights_only=True), ref)


def test_training_rows_mix_corpus_recall_and_repeat_rows(micro_base):
    """data.batches: recall_fraction rows are key-value recall text, repeat_fraction rows repeat
    one corpus window (periodic), the rest are corpus windows; seeded, so the stream repeats."""
    from frontier import data

    lp = ck.load_point(micro_base)
    ids = torch.arange(10_000) % 997  # a corpus without any period shorter than 997
    kv_start = lp.tokenizer("KV", add_special_tokens=False)["input_ids"]

    def kinds(rows):
        out = []
        for r in rows.tolist():
            period = next((p for p in range(8, 129) if r[p:] == r[:-p]), None)
            out.append("kv" if r[:len(kv_start)] == kv_start else "repeat" if period else "corpus")
        return out

    it = data.batches(ids, 256, 400, seed=3, tokenizer=lp.tokenizer, recall_fraction=0.25, repeat_fraction=0.25)
    rows = next(it)
    k = kinds(rows)
    assert rows.shape == (400, 256)
    assert 60 < k.count("kv") < 140 and 60 < k.count("repeat") < 140 and k.count("corpus") > 140
    again = next(data.batches(ids, 256, 400, seed=3, tokenizer=lp.tokenizer, recall_fraction=0.25,
                              repeat_fraction=0.25))
    assert torch.equal(rows, again)
    assert kinds(next(data.batches(ids, 256, 50, seed=3))) == ["corpus"] * 50
    # without a tokenizer there are no recall rows, and their share stays corpus rows
    k = kinds(next(data.batches(ids, 256, 400, seed=3, recall_fraction=0.25, repeat_fraction=0.25)))
    assert k.count("kv") == 0 and 60 < k.count("repeat") < 140 and k.count("corpus") > 240
