"""Grid expansion with Hydra's grammar, prefix sharing, and plan-time validation."""
import copy
import os
import subprocess
import sys

import pytest

from frontier import config as C
from frontier import grid


def test_demo_covers_every_option_with_prefix_sharing():
    p = grid.plan(["sweep=tiny"])
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
    p = grid.plan(["sweep=tiny", "quant=int8", "attention=sliding_window", "attention.window=range(32,97,32)"])
    assert {pt.choices["quant"] for pt in p.points} == {"int8"}
    assert sorted({pt.cfg["attention"]["window"] for pt in p.points}) == [32, 64, 96]
    assert "tiny/int8/sliding_window~window=32/none/default" in [pt.point_id for pt in p.points]
    pt = p.points[0]
    assert pt.ckpt_dir("finetune") == f"work/{pt.components[0]}/int8/{pt.components[2]}/_ckpt"


def test_glob_and_exclude():
    p = grid.plan(["sweep=tiny", "quant=glob(int*)", "finetune=none"])
    assert {pt.choices["quant"] for pt in p.points} == {o for o in C.group_options("quant") if o.startswith("int")}
    assert {"int8", "int4_g32"} <= {pt.choices["quant"] for pt in p.points}
    p = grid.plan(["sweep=tiny"])
    assert not any(pt.choices["attention"] == "softmax" and pt.choices["finetune"] == "lolcats" for pt in p.points)
    assert p.excluded == 3


def test_value_override_applies_only_where_the_option_has_the_key():
    p = grid.plan(["sweep=tiny", "attention.window=32"])
    for pt in p.points:
        if pt.choices["attention"] == "sliding_window":
            assert pt.cfg["attention"]["window"] == 32 and "window=32" in pt.components[2]
        else:
            assert "window" not in pt.cfg["attention"] and "~" not in pt.components[2]


def test_long_override_slugs_are_hashed():
    comp = grid.component("lolcats", {f"finetune.lora.k{i}": i for i in range(20)})
    assert comp.startswith("lolcats~") and len(comp) < 30


def test_thousand_points_plan():
    p = grid.plan(["sweep=tiny", "attention=sliding_window", "attention.window=range(1,251)", "quant=none,int8,int4_g32",
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
        grid.plan(["sweep=tiny", *overrides])
    assert e.value.key.startswith(key), (e.value.key, str(e.value))


def test_cli_plan_fails_early_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-m", "frontier", "plan", "attention.windw=3"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "attention.windw" in r.stderr and "window" in r.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ quant.when: pre | post
def test_quant_when_pre_and_post_in_one_sweep_share_prefixes():
    p = grid.plan(["sweep=tiny", "quant=int8,int4_g32", "quant.when=pre,post", "attention=softmax,linear_elu",
                   "finetune=none,lolcats"])
    by = {(pt.choices["quant"], pt.cfg["quant"]["when"], pt.choices["attention"], pt.choices["finetune"]): pt
          for pt in p.points}
    assert len(by) == len(p.points) == 12            # 2 quant x 2 orders x 3 (attention, finetune); softmax+lolcats excluded
    pre, post = by[("int8", "pre", "linear_elu", "lolcats")], by[("int8", "post", "linear_elu", "lolcats")]
    ft = pre.components[3]
    # pre: base → quantize → surgery → finetune → evaluate (today's layout)
    assert pre.stages == grid.STAGES and pre.point_id == f"tiny/int8/linear_elu/{ft}/default"
    assert pre.ckpt_dir("finetune") == f"work/tiny/int8/linear_elu/{ft}/_ckpt"
    # post: base → surgery → finetune → quantize → evaluate; the quant slot is `none` and the
    # post-quantize dir follows the finetune dir
    assert post.stages == grid.POST_STAGES and post.trivial("quant") and not post.trivial("post_quant")
    assert post.point_id == f"tiny/none/linear_elu/{ft}/int8~when=post/default"
    assert post.ckpt_dir("attention") == "work/tiny/none/linear_elu/_ckpt"
    assert post.ckpt_dir("finetune") == f"work/tiny/none/linear_elu/{ft}/_ckpt"          # parent of the quantize job
    assert post.ckpt_dir("post_quant") == f"work/tiny/none/linear_elu/{ft}/int8~when=post/_ckpt"  # parent of evaluate
    assert post.metrics_path() == f"work/tiny/none/linear_elu/{ft}/int8~when=post/default/metrics.json"
    soft = by[("int4_g32", "post", "softmax", "none")]     # nothing to fine-tune: the post-quantize parent is the base
    assert soft.ckpt_dir("finetune") == "work/tiny/_ckpt" and soft.point_id == "tiny/none/softmax/none/int4_g32~when=post/default"
    jobs = p.jobs()
    # shared prefix: the int8 and int4_g32 post points fine-tune once, on the unquantized base
    assert by[("int4_g32", "post", "linear_elu", "lolcats")].stage_dir("finetune") == post.stage_dir("finetune")
    assert sorted(jobs["finetune"]) == sorted([f"work/tiny/{q}/linear_elu/{ft}" for q in ("int8", "int4_g32", "none")])
    assert sorted(jobs["surgery"]) == [f"work/tiny/{q}/linear_elu" for q in ("int4_g32", "int8", "none")]
    # quantize: 2 pre (of the base) + 2 quant x 3 post parents (base, surgery, finetune)
    assert len(jobs["quantize"]) == 8 and {"work/tiny/int8", "work/tiny/int4_g32"} <= set(jobs["quantize"])
    assert p.job_counts() == {"base": 1, "quantize": 8, "surgery": 3, "finetune": 3, "evaluate": 12}
    for pt in p.points:
        assert grid.stage_config(pt, "post_quant" if pt.cfg["quant"]["when"] == "post" else "quant")["quant"]["when"] \
            == pt.cfg["quant"]["when"]


def test_post_points_share_surgery_and_finetune_with_unquantized_points():
    p = grid.plan(["sweep=tiny", "quant=int8", "quant.when=post", "attention=linear_elu", "finetune=lolcats"])
    q = grid.plan(["sweep=tiny", "quant=none", "attention=linear_elu", "finetune=lolcats"])
    assert set(p.jobs()["finetune"]) == set(q.jobs()["finetune"])
    assert set(p.jobs()["surgery"]) == set(q.jobs()["surgery"])
    # the explicit default `quant.when=pre` is not part of any path
    r = grid.plan(["sweep=tiny", "quant=int8", "quant.when=pre", "finetune=none"])
    assert all(pt.components[1] == "int8" for pt in r.points)


def test_post_with_quant_none_fails_naming_quant_when_and_an_exclude_rule_drops_it(monkeypatch):
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny", "quant=none,int8", "quant.when=pre,post"])
    assert e.value.key == "quant.when" and "exclude" in str(e.value)
    real = grid._base_config

    def base_config(name):
        cfg = copy.deepcopy(real(name))
        cfg["sweep"]["exclude"] = [*cfg["sweep"]["exclude"], {"quant": "none", "quant.when": "post"}]
        return cfg

    monkeypatch.setattr(grid, "_base_config", base_config)
    p = grid.plan(["sweep=tiny", "quant=none,int8", "quant.when=pre,post", "attention=softmax", "finetune=none"])
    assert sorted(pt.point_id for pt in p.points) == ["tiny/int8/softmax/none/default", "tiny/none/softmax/none/default",
                                                      "tiny/none/softmax/none/int8~when=post/default"]


def test_post_lifts_the_quantized_base_restrictions_of_finetuning():
    # full fine-tuning trains every weight: impossible over a frozen quantized base (pre), fine before post quantization
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny", "quant=int8", "attention=linear_elu", "finetune=full"])
    assert e.value.key == "finetune.method"
    p = grid.plan(["sweep=tiny", "quant=int8", "quant.when=post", "attention=linear_elu", "finetune=full",
                   "finetune.zero_stage=3"])
    assert [pt.point_id for pt in p.points] == ["tiny/none/linear_elu/full~zero_stage=3/int8~when=post/default"]
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny", "quant.when=later"])
    assert e.value.key == "quant.when" and "pre, post" in str(e.value)


def test_quant_sweep_covers_every_option_but_fp8_on_cpu():
    p = grid.plan(["sweep=quant"], cuda_available=False)
    assert {pt.choices["quant"] for pt in p.points} == set(C.group_options("quant")) - {"fp8"}
    assert {(pt.choices["model"], pt.choices["attention"], pt.choices["finetune"]) for pt in p.points} == {
        ("tiny", "softmax", "none")}
    assert p.job_counts()["quantize"] == len(p.points) - 1   # none is not a job
    with pytest.raises(C.ConfigError) as e:                 # fp8 on the command line, without CUDA: rejected, why
        grid.plan(["sweep=quant", "quant=glob(*)"], cuda_available=False)
    assert e.value.key == "quant.method" and "fp8" in str(e.value) and "CUDA" in str(e.value)
    assert "fp8" in {pt.choices["quant"] for pt in grid.plan(["sweep=quant", "quant=glob(*)"], cuda_available=True).points}


# ------------------------------------------------------------------ the sweep's own `set:` under command-line axes
def test_composing_groups_one_by_one_equals_composing_the_combination():
    """plan() composes each group option once and puts the sections together: the same config
    as Hydra composing the whole combination (every option of every group is covered)."""
    options = {g: C.option_names(g) for g in C.GROUPS}
    for i in range(max(len(v) for v in options.values())):
        choices = tuple((g, opts[i % len(opts)]) for g, opts in options.items())
        assert grid.compose_point("ci", choices) == C.compose((("sweep", "ci"),) + choices), choices


def test_cli_axis_that_leaves_no_point_with_a_set_entry_skips_it():
    p = grid.plan(["sweep=tiny", "attention=softmax"])   # tiny's finetune.* set: entries; softmax points are finetune none only
    assert p.points and {pt.choices["finetune"] for pt in p.points} == {"none"}
    assert {pt.choices["finetune"] for pt in grid.plan(["sweep=ci", "finetune=none"]).points} == {"none"}
    p = grid.plan(["sweep=tiny", "attention=linear_elu"])   # and they still apply where a point has the key
    assert {pt.cfg["finetune"]["lora"]["seq_len"] for pt in p.points if pt.choices["finetune"] == "lolcats"} == {128}


def _sweep_set(monkeypatch, **extra):
    real = grid._base_config

    def patched(name):
        cfg = copy.deepcopy(real(name))
        cfg["sweep"]["set"].update(extra)
        return cfg

    monkeypatch.setattr(grid, "_base_config", patched)


@pytest.mark.parametrize("cli", [[], ["attention=softmax"], ["quant=int8"]])
def test_typo_in_the_sweeps_set_fails_naming_the_sweep_file(monkeypatch, cli):
    _sweep_set(monkeypatch, **{"finetune.lora.seqlen": 64})
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny", *cli])
    assert e.value.key == "finetune.lora.seqlen" and "conf/sweep/tiny.yaml" in str(e.value), str(e.value)


def test_bad_value_in_the_sweeps_set_names_the_sweep_file(monkeypatch):
    _sweep_set(monkeypatch, **{"finetune.lora.seq_len": 100000})
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny"])
    msg = str(e.value)
    assert e.value.key == "finetune.lora.seq_len" and "max_position" in msg and "conf/sweep/tiny.yaml" in msg, msg
    assert grid.plan(["sweep=tiny", "finetune.lora.seq_len=64"]).points   # the command line's value replaces it


def test_a_command_line_typo_is_not_blamed_on_the_sweep_file():
    with pytest.raises(C.ConfigError) as e:
        grid.plan(["sweep=tiny", "attention=softmax", "finetune.lora.seqlen=3"])
    assert e.value.key == "finetune.lora.seqlen" and "conf/sweep" not in str(e.value)


OPTIONS = [(g, o) for g in C.GROUPS for o in C.option_names(g)]


@pytest.mark.parametrize("sweep", C.option_names("sweep"))
@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_single_option_override_plans_on_every_shipped_sweep(sweep, group, option):
    """`frontier plan sweep=<s> <group>=<option>` for every shipped sweep and option. The only
    refusals allowed are about the option itself and name it (fp8 without CUDA, a group of 128
    on the 64-wide micro model, fine-tuning that would train nothing or a frozen quantized
    weight, cosformer's max_len under eval=long), never a `set:` entry of the sweep file."""
    try:
        p = grid.plan([f"sweep={sweep}", f"{group}={option}"], cuda_available=False)
    except C.ConfigError as e:
        msg = str(e)
        assert f"'{option}'" in msg and "sweep file" not in msg, msg
        pytest.skip(f"refused, naming the option: {msg}")
    assert p.points and {pt.cfg[group]["name"] for pt in p.points} == {option}
