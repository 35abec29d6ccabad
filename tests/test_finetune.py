"""Stage `finetune`: DeepSpeed (2 CPU processes, gloo) — lolcats (block-wise attention transfer +
LoRA), transfer only (with optimizer offload), LoRA only, full fine-tuning; delta reload,
kill-and-resume across transfer blocks, ZeRO-3, int4-quantized frozen base, plan-time
rejections, Slurm launch lines."""
from __future__ import annotations

import copy
import json
import shlex
import time
from pathlib import Path

import pytest

from frontier import checkpoint, config, finetune
from frontier.finetune import engine, launch, lora


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LONG_LORA = {"steps": 40}  # the reference run: long enough for LoRA to move the held-out loss
BLOCKWISE = {"block_size": 1}  # the reference run's transfer: micro's 2 layers one after the other, 6 steps each


SHORT = {"steps": 3}  # the runs of the other methods: a few steps are enough to see them train


def ft_cfg(zero: int = 2, method: str = "lolcats", **over) -> dict:
    ft = config.compose((("finetune", method),))["finetune"]
    ft.update(nproc=2, nodes=1, zero_stage=zero, precision="fp32", seed=0, checkpoint_every=3)
    if "transfer" in ft:
        ft["transfer"].update(steps=6, lr=1e-2, seq_len=64, micro_batch=2, grad_accum=1)
    if "lora" in ft:
        ft["lora"].update(steps=6, lr=1e-2, seq_len=64, micro_batch=2, grad_accum=2, r=4, alpha=8,
                          targets=ALL_LINEARS)
    if "full" in ft:
        ft["full"].update(steps=6, lr=1e-3, seq_len=64, micro_batch=2, grad_accum=1)
    for k, v in over.items():
        if isinstance(v, dict):
            ft[k].update(v)
        else:
            ft[k] = v
    config.validate_section(ft, config.schema_for("finetune", ft), "finetune")
    return ft


def data_cfg() -> dict:
    d = config.compose(())["data"]
    d["max_mb"] = 0.3
    return d


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reload_matches_trained(out: Path, debug: Path, parent: Path) -> None:
    """The chain reloaded from disk gives the trained (in-engine, rank 0) model's logits,
    and those differ from the parent's: the delta is real and fully re-applied."""
    saved = checkpoint.load_tensors(debug / "logits.safetensors")
    ids, trained = saved["input_ids"], saved["logits"]
    lp = checkpoint.load_point(out)
    assert [m["stage"] for m in lp.manifests][-1] == "finetune"
    got = logits_of(lp.model, ids)
    assert (got - trained).abs().max().item() < 1e-4
    before = logits_of(checkpoint.load_point(parent).model, ids)
    assert (before - trained).abs().max().item() > 1e-3


# ------------------------------------------------------------------ fast: config, launch lines
def test_ds_config_offload():
    ft = ft_cfg(zero=2, offload_optimizer=True)
    cpu = engine.ds_config(ft, ft["lora"], world=2, cuda=False)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cpu["zero_force_ds_cpu_optimizer"] is False and not engine.uses_cpu_adam(cpu)  # client torch AdamW
    gpu = engine.ds_config(ft, ft["lora"], world=2, cuda=True)
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "zero_force_ds_cpu_optimizer" not in gpu and engine.uses_cpu_adam(gpu)  # DeepSpeedCPUAdam on CUDA
    plain = engine.ds_config(ft_cfg(zero=2), ft["lora"], world=2, cuda=False)
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    with pytest.raises(ValueError, match="zero_stage"):
        engine.ds_config(dict(ft, zero_stage=0), ft["lora"], world=2, cuda=False)


def test_transfer_blocks_partition_layers():
    from frontier.finetune.worker import transfer_blocks

    assert transfer_blocks([3, 0, 1, 2, 4], 2) == [[0, 1], [2, 3], [4]]
    assert transfer_blocks([0, 1, 2], None) == [[0, 1, 2]]
    assert transfer_blocks([0, 1], 8) == [[0, 1]]
    assert transfer_blocks([], 2) == []


def _point(**groups) -> dict:
    cfg = config.compose(tuple(groups.items()))
    cfg.pop("sweep")
    return cfg


@pytest.mark.parametrize("method,attention,quant", [
    ("transfer", "linear_elu", "none"), ("transfer", "linear_elu", "int8"), ("lolcats", "softmax", "int8"),
    ("lolcats", "linear_elu", "int4_g32"), ("lora", "sliding_window", "int8"), ("lora", "linear_elu", "none"),
    ("full", "linear_elu", "none"), ("full", "softmax", "none")])
def test_every_method_validates_where_it_can_train(method, attention, quant):
    cfg = _point(finetune=method, attention=attention, quant=quant)
    config.validate_point(cfg, cuda_available=False)
    assert config.FINETUNE_PHASES[method] and all(p in cfg["finetune"] for p in config.FINETUNE_PHASES[method])


@pytest.mark.parametrize("groups,edit,key,needle", [
    # attention transfer on an attention without new parameters would train nothing
    ({"finetune": "transfer", "attention": "softmax"}, {}, "finetune.method", "would train nothing"),
    ({"finetune": "transfer", "attention": "sliding_window"}, {}, "finetune.method", "sliding_window"),
    ({"finetune": "transfer", "attention": "linear_elu"}, {"attention.learned_map": False}, "finetune.method",
     "has none"),
    # full fine-tuning of frozen quantized tensors
    ({"finetune": "full", "quant": "int8"}, {}, "finetune.method", "quantized"),
    ({"finetune": "full", "quant": "int4_g32", "attention": "linear_elu"}, {}, "finetune.method",
     "full with quant=none"),
    ({"finetune": "lora", "attention": "linear_elu"}, {"finetune.lora.steps": 0}, "finetune.lora.steps",
     "train nothing"),
    ({"finetune": "lolcats", "attention": "sliding_window"}, {"finetune.lora.steps": 0}, "finetune.lora.steps",
     "train nothing"),
    ({"finetune": "lolcats", "attention": "linear_elu"}, {"finetune.lora.steps": 0, "finetune.transfer.steps": 0},
     "finetune.lora.steps", "every phase"),
    ({"finetune": "lora", "attention": "linear_elu"}, {"finetune.offload_optimizer": True, "finetune.zero_stage": 0},
     "finetune.offload_optimizer", "zero_stage"),
    ({"finetune": "transfer", "attention": "linear_elu"}, {"finetune.transfer.block_size": 0},
     "finetune.transfer.block_size", ">= 1"),
    ({"finetune": "lora", "attention": "linear_elu"}, {"finetune.method": "qlora"}, "finetune.method", "full"),
    ({"finetune": "lora", "attention": "linear_elu"}, {"finetune.offload": True}, "finetune.offload",
     "offload_optimizer"),
    ({"finetune": "full"}, {"finetune.lora": {"steps": 1}}, "finetune.lora", "unknown key"),
])
def test_plan_time_rejections_name_the_key(groups, edit, key, needle):
    cfg = _point(**groups)
    for dotted, v in edit.items():
        sec = cfg
        *path, last = dotted.split(".")
        for part in path:
            sec = sec[part]
        sec[last] = v
    with pytest.raises(config.ConfigError) as e:
        config.validate_point(cfg, cuda_available=False)
    assert e.value.key == key and needle in str(e.value), str(e.value)


def test_ds_config_from_finetune_cfg():
    ft = ft_cfg(zero=2, precision="bf16", grad_clip=0.5)
    c = engine.ds_config(ft, ft["lora"], world=4)
    assert c["train_micro_batch_size_per_gpu"] == 2 and c["gradient_accumulation_steps"] == 2
    assert c["train_batch_size"] == 2 * 2 * 4
    assert c["zero_optimization"]["stage"] == 2 and c["bf16"]["enabled"] is True
    assert c["gradient_clipping"] == 0.5
    c3 = engine.ds_config(ft_cfg(zero=3), ft["transfer"], world=2, cuda=True,
                          overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert c3["zero_optimization"] == {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
                                       "reduce_scatter": True, "stage3_param_persistence_threshold": 0}
    # gloo (CPU) has no reduce-scatter: one all-reduce of the gradient bucket instead
    assert engine.ds_config(ft, ft["lora"], world=2, cuda=False)["zero_optimization"]["reduce_scatter"] is False
    f = engine.lr_lambda(20)  # 2 warmup steps, cosine down to 10%
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0) and f(19) > 0.1 and f(30) == pytest.approx(0.1)


def test_slurm_lines_one_node_eight_gpus():
    header, cmd = launch.slurm_lines(1, 8, 64, "400G", "04:00:00", "gpu", "proj42", ["--spec", "/w/spec.json"])
    assert header == ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --cpus-per-task=64", "#SBATCH --mem=400G", "#SBATCH --time=04:00:00",
                      "#SBATCH --partition=gpu", "#SBATCH --account=proj42"]
    argv = shlex.split(cmd.split("&&", 1)[1])
    assert argv[0] == "srun" and "--nodes=1" in argv and "--ntasks-per-node=1" in argv
    t = argv.index("torchrun")
    assert argv[t:t + 6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "8"]
    assert argv[-4:] == ["-m", "frontier.finetune.worker", "--spec", "/w/spec.json"]
    assert "PYTHONHASHSEED=0" in cmd


def test_slurm_lines_four_nodes_eight_gpus():
    header, cmd = launch.slurm_lines(4, 8, 32, "200G", "1-00:00:00", None, None, "--spec /w/spec.json")
    assert "#SBATCH --nodes=4" in header and "#SBATCH --ntasks-per-node=1" in header
    assert "#SBATCH --gpus-per-node=8" in header and not any("partition" in h or "account" in h for h in header)
    prefix, srun = cmd.split("&&", 1)
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in prefix
    argv = shlex.split(srun)
    assert argv[0] == "srun" and "--nodes=4" in argv and "--ntasks-per-node=1" in argv  # one torchrun per node
    t = argv.index("torchrun")
    tr = argv[t:]
    assert "--standalone" not in tr
    assert tr[tr.index("--nnodes") + 1] == "4" and tr[tr.index("--nproc_per_node") + 1] == "8"
    assert tr[tr.index("--rdzv_backend") + 1] == "c10d"
    assert tr[tr.index("--rdzv_endpoint") + 1] == "$MASTER_ADDR:29500"  # expanded by the batch shell
    assert tr[tr.index("--rdzv_id") + 1] == "$SLURM_JOB_ID"
    assert tr[-4:] == ["-m", "frontier.finetune.worker", "--spec", "/w/spec.json"]


def test_local_command_and_env():
    cmd = launch.local_command(2, ["--spec", "s.json"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
                   "-m", "frontier.finetune.worker", "--spec", "s.json"]
    env = launch.worker_env({"PATH": "/bin"}, cuda=False, nproc=2)
    assert env["DS_ACCELERATOR"] == "cpu" and env["PYTHONHASHSEED"] == "0"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    # Snakemake gives the launcher MKL_NUM_THREADS = the job's threads; torch would run that many
    # threads in each worker process: every BLAS pool gets the per-process share instead
    smk = launch.worker_env({"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, cuda=False, nproc=2)
    assert all(smk[v] == smk["OMP_NUM_THREADS"] == env["OMP_NUM_THREADS"] for v in launch.THREAD_VARS)
    gpu = launch.worker_env({"DS_ACCELERATOR": "cpu"}, cuda=True)
    assert "DS_ACCELERATOR" not in gpu and gpu["OMP_NUM_THREADS"] == "1"
    with pytest.raises(RuntimeError, match="Slurm allocation"):
        launch.command({"nodes": 2, "nproc": 8}, "s.json", cuda=False, env={})


def test_run_rejects_method_none(micro_base, tmp_path):
    with pytest.raises(ValueError, match="does not train.*transfer, lolcats, lora, full"):
        finetune.run({"finetune": {"name": "none", "method": "none"}, "data": data_cfg()}, micro_base,
                     tmp_path / "_ckpt")


# ------------------------------------------------------------------ fast: LoRA over int4, apply_delta
def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_lora_trains_through_packed_int4_linears():
    """torchao's CPU packed int4 kernel has no autograd formula; `quantize.fastpath` gives the
    frozen linear the exact input gradient (that of the dense weight the kernel uses), so no
    patch is needed and the forward is unchanged."""
    import torch
    import torch.nn.functional as F
    from torchao.quantization import quantize_
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    import frontier.quantize.tensors  # noqa: F401 - as loading a quantized checkpoint does: routes torchao int4 through fastpath

    model = _tiny_llama()
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32),
              filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    x = torch.randint(0, 128, (2, 16))
    ref = logits_of(model, x)
    for p in model.parameters():
        p.requires_grad_(False)
    patched = lora.make_frozen_linears_differentiable(model)
    assert patched == []  # every linear already differentiates (fastpath)
    assert torch.equal(logits_of(model, x), ref)
    lin = model.model.layers[0].self_attn.o_proj
    h = torch.randn(3, 64, requires_grad=True)
    lin(h).pow(2).sum().backward()
    w = lin.weight  # [out, in] as torch's int4 kernel computes it (the kernel itself, on the identity)
    dense = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64), w.qdata, w.block_size[1], w.scale_and_zero).t()
    h2 = h.detach().clone().requires_grad_(True)
    F.linear(h2, dense).pow(2).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-4)

    grads = {}
    for generic in (False, True):  # peft's torchao LoRA layer, and the plain one used for CUDA Int4Tensor
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        lora.wrap(m, lora.lora_config_dict({"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}),
                  generic_quant_linear=generic)
        assert type(m.model.layers[0].self_attn.q_proj).__name__ == ("Linear" if generic else "TorchaoLoraLinear")
        params = lora.lora_parameters(m)
        assert params and all(p.requires_grad for p in params.values())
        assert {n for n, p in m.named_parameters() if p.requires_grad} == set(params)
        torch.manual_seed(1)
        for n, p in params.items():  # B starts at zero; make the A gradients non-trivial too
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        m(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
        grads[generic] = {n: p.grad for n, p in params.items()}
    assert grads[False].keys() == grads[True].keys()
    assert all(torch.allclose(grads[False][n], grads[True][n], atol=1e-6) for n in grads[False])


def test_frozen_quantized_linears_train_without_dense_copies():
    """The worker trains through the quantized linears themselves: the same logits as the int4
    kernel (float rounding), an input gradient from the weight dequantized on the fly, and no
    dense tensor left on any module afterwards."""
    import torch
    from torchao.quantization import quantize_
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    import frontier.quantize.tensors  # noqa: F401 - as loading a quantized checkpoint does: routes torchao int4 through fastpath
    from frontier import dequant

    model = _tiny_llama()
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32),
              filter_fn=lambda m, n: isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randint(0, 128, (2, 16))
    emb = model.model.embed_tokens.weight
    emb.requires_grad_(True)  # a gradient must flow back through every quantized linear
    out = model(input_ids=x).logits
    out.pow(2).mean().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert dequant.dense_attributes(model) == []
    lin = model.model.layers[0].mlp.down_proj
    w = lin.weight
    kernel_w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(128), w.qdata, 32, w.scale_and_zero).t()
    h = torch.randn(20, 128)  # 20 rows: the dequantize + dense matmul path
    with torch.no_grad():
        torch.testing.assert_close(lin(h), h @ kernel_w.T, atol=1e-5, rtol=1e-5)


def test_token_cache_is_token_splits(micro_base, tmp_path, monkeypatch):
    """data.cached_token_splits: the same ids as token_splits; the second fine-tune reads the file."""
    import torch

    from frontier import data

    tok = checkpoint.load_point(micro_base).tokenizer
    d = data_cfg()
    train, held = data.token_splits(tok, d)
    a = data.cached_token_splits(tok, d, tmp_path / "cache")
    assert torch.equal(a[0], train) and torch.equal(a[1], held)
    assert len(list((tmp_path / "cache").glob("tokens-*.safetensors"))) == 1
    monkeypatch.setattr(data, "token_splits", lambda *a, **k: pytest.fail("tokenized again"))
    b = data.cached_token_splits(tok, d, tmp_path / "cache")
    assert torch.equal(b[0], train) and torch.equal(b[1], held)
    other = data.token_cache_key(tok, {**d, "max_mb": 0.2})
    assert other != data.token_cache_key(tok, d) == data.token_cache_key(tok, {**d, "recall_fraction": 0.9})


def test_apply_delta_is_strict(tmp_path):
    import torch

    from frontier import attention

    cfg = lora.lora_config_dict({"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["q_proj", "o_proj"]})
    trained = attention.swap_attention(_tiny_llama(), {"name": "linear_elu", "kind": "linear"})
    lora.wrap(trained, cfg)
    torch.manual_seed(1)
    delta = {n: torch.randn_like(p) * 0.05 for n, p in {**lora.lora_parameters(trained),
                                                        **attention.attention_parameters(trained)}.items()}
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n in delta:
                p.copy_(delta[n])
    good = tmp_path / "good"
    good.mkdir()
    lora.write_delta(good, delta, cfg)
    fresh = attention.swap_attention(_tiny_llama(), {"name": "linear_elu", "kind": "linear"})
    model = finetune.apply_delta(fresh, good, {})
    x = torch.randint(0, 128, (2, 12))
    assert torch.allclose(logits_of(model, x), logits_of(trained.eval(), x), atol=1e-6)
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"

    bad = tmp_path / "bad"
    bad.mkdir()
    lora.write_delta(bad, {**delta, "model.layers.9.self_attn.feature_map.q_weight": torch.zeros(1)}, cfg)
    with pytest.raises(checkpoint.IntegrityError, match="no parameter in the model"):
        finetune.apply_delta(attention.swap_attention(_tiny_llama(), {"name": "linear_elu", "kind": "linear"}),
                             bad, {})
    partial = tmp_path / "partial"
    partial.mkdir()
    lora.write_delta(partial, {k: v for k, v in delta.items() if "o_proj" not in k}, cfg)
    with pytest.raises(checkpoint.IntegrityError, match="missing from the delta"):
        finetune.apply_delta(attention.swap_attention(_tiny_llama(), {"name": "linear_elu", "kind": "linear"}),
                             partial, {})


# ------------------------------------------------------------------ slow: real 2-process DeepSpeed runs
@pytest.fixture(scope="module")
def int4_run(micro_chain, tmp_path_factory):
    """ZeRO-2, 2 CPU processes, linear_elu over a packed-int4 frozen base, block-wise transfer
    then LoRA: the reference run."""
    parent = micro_chain("int4_g32", "linear_elu")
    root = tmp_path_factory.mktemp("ft_int4")
    out, debug = root / "lolcats" / "_ckpt", root / "debug"
    t0 = time.time()
    manifest = finetune.run({"finetune": ft_cfg(zero=2, lora=LONG_LORA, transfer=BLOCKWISE), "data": data_cfg()},
                            parent, out, debug_dir=debug)
    ft = manifest["finetune"]
    print(f"\n[finetune int4 ZeRO-2 x2] wall {time.time() - t0:.1f}s tok/s {ft['tok_s']} "
          f"transfer MSE {ft['transfer_mse']['first']} -> {ft['transfer_mse']['last']} "
          f"held-out LM loss {ft['lm_loss_probe']['first']:.4f} -> {ft['lm_loss_probe']['last']:.4f}")
    return {"manifest": manifest, "out": out, "debug": debug, "parent": parent}


@pytest.mark.slow
def test_zero2_int4_run_writes_delta_and_transfer_mse_falls(int4_run):
    out, m = int4_run["out"], int4_run["manifest"]
    ft = m["finetune"]
    assert m["stage"] == "finetune" and m["parent"]
    assert {"delta.safetensors", "lora.json", "train_log.jsonl"} <= set(m["files"])
    assert not finetune.resume_dir(out).exists()  # the .work resume dir is gone after success
    assert ft["phases_run"] == ["transfer", "lora"] and ft["world_size"] == 2 and ft["zero_stage"] == 2
    assert ft["backend"] == "gloo" and ft["grad_patched_linears"] == 0  # fastpath: int4 differentiates
    assert "dense_frozen_linears" not in ft  # no dense copies (issue 15)
    delta = checkpoint.load_tensors(out / "delta.safetensors")
    assert any(".feature_map." in k for k in delta) and any(".lora_A." in k for k in delta)
    assert json.loads((out / "lora.json").read_text())["r"] == 4
    mse = ft["transfer_mse"]
    assert len(mse["first"]) == len(mse["last"]) == 2  # one per layer
    assert all(b < a for a, b in zip(mse["first"], mse["last"])), mse  # fixed held-out batch
    # block-wise: layer 0 for 6 steps, then layer 1 for 6 steps, each block's MSE recorded
    tb = ft["transfer_blocks"]
    assert tb["block_size"] == 1 and tb["steps_per_block"] == 6 and ft["steps"]["transfer"] == 12
    assert [b["layers"] for b in tb["blocks"]] == [[0], [1]] and all(b["steps"] == 6 for b in tb["blocks"])
    for i, b in enumerate(tb["blocks"]):
        # block 1 starts from layer 1's untouched MSE: training block 0 left it exactly as it was
        # (its parameters frozen, and in transfer mode its input is the teacher's output)
        assert b["probe_mse_first"] == [mse["first"][i]] and b["probe_mse_last"] == [mse["last"][i]]
        assert b["probe_mse_last"][0] < b["probe_mse_first"][0] and b["trainable_params"] > 0
    assert sum(b["trainable_params"] for b in tb["blocks"]) == ft["trainable_params"]["transfer"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log] == list(range(1, 53))
    assert [r.get("block") for r in log[:12]] == [0] * 6 + [1] * 6 and "block" not in log[12]
    assert all(r["tok_s"] > 0 and r["lr"] > 0 for r in log) and "mse" in log[0]
    assert ft["tok_s"]["transfer"] > 0 and ft["tok_s"]["lora"] > 0


@pytest.mark.slow
def test_loss_falls_on_int4_quantized_frozen_base(int4_run):
    ft = int4_run["manifest"]["finetune"]
    # next-token loss on a fixed held-out batch (8 x 64 tokens), before and after 40 LoRA steps;
    # single training batches are far too noisy (+-0.3) to compare first against last
    probe = ft["lm_loss_probe"]
    assert probe["last"] < probe["first"], probe
    assert ft["grad_patched_linears"] == 0 and ft["trainable_params"]["lora"] > 0


@pytest.mark.slow
def test_reloaded_int4_chain_reproduces_trained_logits(int4_run):
    reload_matches_trained(int4_run["out"], int4_run["debug"], int4_run["parent"])


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_run(int4_run, tmp_path, monkeypatch):
    """Stopped after step 3 of transfer block 1 (global 9: block 0 finished, block 1 mid-way),
    then after LoRA step 3 (global 15), then run to the end: the same losses, probe metrics,
    per-block MSEs and delta bytes as the uninterrupted run."""
    out = tmp_path / "lolcats" / "_ckpt"
    cfg = {"finetune": ft_cfg(zero=2, lora=LONG_LORA, transfer=BLOCKWISE), "data": data_cfg()}
    for stop, where in ((9, ("transfer", 1, 3)), (15, ("lora", 0, 3))):
        monkeypatch.setenv("FRONTIER_FT_STOP_AFTER", str(stop))
        with pytest.raises(finetune.FinetuneInterrupted):
            finetune.run(cfg, int4_run["parent"], out)
        state = json.loads((finetune.resume_dir(out) / "state.json").read_text())
        assert (state["phase"], state["block"], state["step"]) == where and not out.exists()
    monkeypatch.delenv("FRONTIER_FT_STOP_AFTER")
    m = finetune.run(cfg, int4_run["parent"], out)
    ref = int4_run["manifest"]["finetune"]
    assert m["finetune"]["resumes"] == 2
    for key in ("final_loss", "first_loss", "transfer_mse", "lm_loss_probe"):
        assert m["finetune"][key] == ref[key], key
    drop_speed = lambda tb: [{k: v for k, v in b.items() if k != "tok_s"} for b in tb["blocks"]]  # noqa: E731
    assert drop_speed(m["finetune"]["transfer_blocks"]) == drop_speed(ref["transfer_blocks"])
    assert (out / "delta.safetensors").read_bytes() == (int4_run["out"] / "delta.safetensors").read_bytes()
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("step_s", "tok_s")}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(out / "train_log.jsonl") == strip(int4_run["out"] / "train_log.jsonl")


@pytest.mark.slow
def test_zero3_two_processes(micro_chain, tmp_path):
    parent = micro_chain("none", "linear_elu")
    out, debug = tmp_path / "_ckpt", tmp_path / "debug"
    m = finetune.run({"finetune": ft_cfg(zero=3), "data": data_cfg()}, parent, out, debug_dir=debug,
                     ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    ft = m["finetune"]
    assert ft["zero_stage"] == 3 and ft["phases_run"] == ["transfer", "lora"]
    blocks = ft["transfer_blocks"]  # block_size null: every layer at once, one block
    assert blocks["block_size"] is None and [b["layers"] for b in blocks["blocks"]] == [[0, 1]]
    assert ft["zero3_partitioned_params"]["transfer"] > 0 and ft["zero3_partitioned_params"]["lora"] > 0
    assert ft["grad_patched_linears"] == 0
    assert all(b < a for a, b in zip(ft["transfer_mse"]["first"], ft["transfer_mse"]["last"]))
    reload_matches_trained(out, debug, parent)  # ZeRO-3 partitions were gathered for the export


@pytest.mark.slow
def test_worker_failure_surfaces_its_error(micro_chain, tmp_path):
    parent = micro_chain("none", "sliding_window")
    cfg = {"finetune": ft_cfg(zero=0, lora={"targets": ["no_such_proj"]}), "data": data_cfg()}
    with pytest.raises(finetune.FinetuneError, match="no_such_proj") as e:
        finetune.run(cfg, parent, tmp_path / "_ckpt", echo=False)
    assert not isinstance(e.value, finetune.FinetuneInterrupted)
    assert not (tmp_path / "_ckpt").exists()


def _delta(out: Path) -> dict:
    return checkpoint.load_tensors(out / "delta.safetensors")


@pytest.mark.slow
def test_transfer_only_with_optimizer_offload(micro_chain, tmp_path):
    """method transfer, ZeRO-2 with the optimizer offloaded (client torch AdamW on CPU): only the
    feature maps train; their MSE falls; the delta reloads to the trained model."""
    parent = micro_chain("none", "linear_elu")
    out, debug = tmp_path / "transfer" / "_ckpt", tmp_path / "debug"
    m = finetune.run({"finetune": ft_cfg(zero=2, method="transfer", offload_optimizer=True, transfer=SHORT),
                      "data": data_cfg()}, parent, out, debug_dir=debug)
    ft = m["finetune"]
    assert ft["method"] == "transfer" and ft["phases_run"] == ["transfer"] and ft["steps"] == {"transfer": 3}
    assert ft["offload_optimizer"] is True and ft["offload_active"] == {"transfer": True}
    ds = ft["ds_config"]["transfer"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert all(b < a for a, b in zip(ft["transfer_mse"]["first"], ft["transfer_mse"]["last"])), ft["transfer_mse"]
    delta = _delta(out)
    assert delta and all(".feature_map." in k for k in delta) and not (out / "lora.json").exists()
    assert ft["lm_loss_probe"] is None
    reload_matches_trained(out, debug, parent)


@pytest.mark.slow
def test_lora_only_on_int4_base(int4_run, tmp_path):
    """method lora over the packed-int4 base: adapters only (the feature maps keep their surgery values)."""
    parent = int4_run["parent"]
    out, debug = tmp_path / "lora" / "_ckpt", tmp_path / "debug"
    m = finetune.run({"finetune": ft_cfg(zero=2, method="lora", lora=SHORT), "data": data_cfg()}, parent, out,
                     debug_dir=debug)
    ft = m["finetune"]
    assert ft["phases_run"] == ["lora"] and ft["transfer_mse"] is None and ft["transfer_blocks"] is None
    assert ft["grad_patched_linears"] == 0 and ft["offload_active"] == {"lora": False}
    delta = _delta(out)
    assert delta and all(".lora_A." in k or ".lora_B." in k for k in delta)
    assert json.loads((out / "lora.json").read_text())["r"] == 4
    assert ft["lm_loss_probe"]["first"] > 0
    reload_matches_trained(out, debug, parent)


@pytest.mark.slow
def test_full_finetune_trains_every_weight(micro_chain, tmp_path):
    """method full: every parameter (embeddings, projections, norms, feature maps) is in the delta."""
    parent = micro_chain("none", "linear_elu")
    out, debug = tmp_path / "full" / "_ckpt", tmp_path / "debug"
    # no repeat rows: the 20-step micro model cannot copy yet, and three steps on copy rows move
    # its probe loss by noise either way; on corpus and key-value rows the loss must fall
    data = {**data_cfg(), "repeat_fraction": 0.0}
    m = finetune.run({"finetune": ft_cfg(zero=2, method="full", full=SHORT), "data": data}, parent, out,
                     debug_dir=debug)
    ft = m["finetune"]
    assert ft["phases_run"] == ["full"] and ft["steps"] == {"full": 3}
    names = dict(checkpoint.load_point(parent).model.named_parameters())
    delta = _delta(out)
    assert set(delta) == set(names) and ft["trainable_params"]["full"] == sum(p.numel() for p in names.values())
    assert all(delta[k].dtype == names[k].dtype for k in delta) and not (out / "lora.json").exists()
    assert ft["lm_loss_probe"]["last"] < ft["lm_loss_probe"]["first"], ft["lm_loss_probe"]
    reload_matches_trained(out, debug, parent)
