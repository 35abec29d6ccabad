"""Grid expansion with Hydra's grammar, prefix sharing, and plan-time validation."""
import os
import subprocess
import sys

import pytest

from frontier import config as C
from frontier import grid


def test_demo_covers_every_option_with_prefix_sharing():
    p = grid.plan(["sweep=demo"])
    assert len(p.points) >= 12
    for stage, opts in (("quant", {"none", "int8", "int4_g32"}), ("attention", {"softmax", "sliding_window", "linear_elu"}),
                        ("finetune", {"none", "lolcats"})):
        assert {pt.choices[stage] for pt in p.points} == opts
    counts = p.job_counts()
    assert counts["base"] == 1                  # one base serves every point
    assert counts["quantize"] == 2              # none is not a job
    assert counts["surgery"] == 6               # 3 quant x 2 non-softmax attention
    assert counts["evaluate"] == len(p.points)
    assert all(pt.point_id.count("/") == 4 for pt in p.points)


def test_cli_override_replaces_axis_and_slugs_paths():
    p = grid.plan(["sweep=demo", "quant=int8", "attention=sliding_window", "attention.window=range(32,97,32)"])
    assert {pt.choices["quant"] for pt in p.points} == {"int8"}
    assert sorted({pt.cfg["attention"]["window"] for pt in p.points}) == [32, 64, 96]
    assert "tiny/int8/sliding_window~window=32/none/default" in [pt.point_id for pt in p.points]
    pt = p.points[0]
    assert pt.ckpt_dir("finetune") == f"work/{pt.components[0]}/int8/{pt.components[2]}/_ckpt"


def test_glob_and_exclude():
    p = grid.plan(["sweep=demo", "quant=glob(int*)", "finetune=none"])
    assert {pt.choices["quant"] for pt in p.points} == {o for o in C.group_options("quant") if o.startswith("int")}
    assert {"int8", "int4_g32"} <= {pt.choices["quant"] for pt in p.points}
    p = grid.plan(["sweep=demo"])
    assert not any(pt.choices["attention"] == "softmax" and pt.choices["finetune"] == "lolcats" for pt in p.points)
    assert p.excluded == 3


def test_value_override_applies_only_where_the_option_has_the_key():
    p = grid.plan(["sweep=demo", "attention.window=32"])
    for pt in p.points:
        if pt.choices["attention"] == "sliding_window":
            assert pt.cfg["attention"]["window"] == 32 and "window=32" in pt.components[2]
        else:
            assert "window" not in pt.cfg["attention"] and "~" not in pt.components[2]


def test_long_override_slugs_are_hashed():
    comp = grid.component("lolcats", {f"finetune.lora.k{i}": i for i in range(20)})
    assert comp.startswith("lolcats~") and len(comp) < 30


def test_thousand_points_plan():
    p = grid.plan(["sweep=demo", "attention=sliding_window", "attention.window=range(1,251)", "quant=none,int8,int4_g32",
                   "finetune=none"])
    assert len(p.points) == 750
    assert p.job_counts()["surgery"] == 750


BAD = [
    (["quant=int9"], "quant"),
    (["attention=dense"], "attention"),
    (["attention.windw=3"], "attention.windw"),
    (["attention=sliding_window", "attention.window=-1"], "attention.window"),
    (["attention=sliding_window", "attention.window=0.5"], "attention.window"),
    (["attention=sliding_window", "attention.window=1000"], "attention.window"),
    (["finetune.lora.stepz=4"], "finetune.lora.stepz"),
    (["finetune=lolcats", "finetune.zero_stage=5"], "finetune.zero_stage"),
    (["finetune=lolcats", "finetune.precision=fp8"], "finetune.precision"),
    (["model.hidden=abc"], "model.hidden"),
    (["model.kv_heads=3"], "model.kv_heads"),
    (["quant=int4_g32", "quant.group_size=48"], "quant.group_size"),
    (["quant.bits=5"], "quant.bits"),
    (["eval.ppl.stride=0"], "eval.ppl.stride"),
    (["eval.cost.context_lens=[]"], "eval.cost.context_lens"),
    (["eval.recall.context_lens=[100000]"], "eval"),
    (["data.heldout_fraction=0.9"], "data.heldout_fraction"),
    (["tracking.mode=loud"], "tracking.mode"),
    (["hardware=tpu"], "hardware"),
    (["sweep=nope"], "sweep"),
    (["nonsense=1"], "nonsense"),
    (["modle=tiny"], "modle"),
    (["quant"], "quant"),
    (["quant=int8,,"], "overrides"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_malformed_overrides_fail_naming_the_key(overrides, key):
    with pytest.raises(C.ConfigError) as e:
        grid.plan(overrides)
    assert e.value.key.startswith(key), (e.value.key, str(e.value))


def test_cli_plan_fails_early_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-m", "frontier", "plan", "attention.windw=3"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "attention.windw" in r.stderr and "window" in r.stderr
    assert list(tmp_path.iterdir()) == []
