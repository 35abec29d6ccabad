"""Every config composes and validates; bad values fail naming the key and the allowed values."""
import copy

import pytest

from frontier import config as C

ALL_OPTIONS = [(g, o) for g in C.GROUPS for o in C.group_options(g)]


# options that only make sense beside another choice
NEEDS = {("finetune", "transfer"): (("attention", "linear_elu"),)}


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = C.compose(((group, option), *NEEDS.get((group, option), ())))
    cfg.pop("sweep")
    assert cfg[group]["name"] == option
    C.validate_point(cfg, cuda_available=True)
    if group == "quant" and cfg["quant"]["method"] in C.CUDA_ONLY_QUANT:
        with pytest.raises(C.ConfigError, match="quant"):
            C.validate_point(cfg, cuda_available=False)   # rejected at plan time on a CPU machine
    else:
        C.validate_point(cfg, cuda_available=False)


def test_required_groups_and_models_exist():
    for g in ("model", "quant", "attention", "finetune", "eval", "hardware", "tracking", "sweep"):
        assert C.group_options(g), g
    assert {"tiny", "llama3_2_1b", "llama2_7b", "llama3_8b", "qwen2_5_0_5b", "mistral_7b"} <= set(C.group_options("model"))
    assert {"h100", "a100_80g", "h200", "cpu"} <= set(C.group_options("hardware"))


def test_model_configs_carry_architecture():
    for name in C.group_options("model"):
        m = C.compose((("model", name),))["model"]
        assert m["heads"] % m["kv_heads"] == 0
        assert all(m[k] > 0 for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "head_dim"))


def _base():
    cfg = C.compose(())
    cfg.pop("sweep")
    return cfg


@pytest.mark.parametrize("path,value,needle", [
    ("model.layers", "four", "expected int"),
    ("model.family", "gpt2", "allowed values: llama, qwen2, mistral"),
    ("model.dtype", "fp64", "allowed values"),
    ("quant.bits", 1, "allowed values: 2, 3, 4, 5, 6, 7, 8, 16"),
    ("quant.method", "magic", "allowed values"),
    ("eval.ppl.stride", 0, "must be >= 1"),
    ("eval.recall.context_lens", [], "non-empty list"),
    ("data.recall_fraction", 1.5, "must be <= 1"),
    ("tracking.mode", "sometimes", "allowed values: offline, online, disabled"),
    ("hardware.mem_bw", -1.0, "must be > 0"),
])
def test_bad_values_name_the_key(path, value, needle):
    cfg = _base()
    cur = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        cur = cur[p]
    cur[leaf] = value
    with pytest.raises(C.ConfigError) as e:
        C.validate_point(cfg, cuda_available=False)
    assert path.split(".")[0] in e.value.key and needle in str(e.value)


def test_unknown_key_lists_allowed_keys():
    cfg = _base()
    cfg["quant"]["gruop_size"] = 32
    with pytest.raises(C.ConfigError, match=r"quant.gruop_size.*allowed keys: .*bits, .*group_size, .*method, name"):
        C.validate_point(cfg)


def test_cross_field_rules():
    cfg = C.compose((("quant", "int4_g32"), ("attention", "sliding_window")))
    cfg.pop("sweep")
    bad = copy.deepcopy(cfg)
    bad["quant"]["group_size"] = 48
    with pytest.raises(C.ConfigError, match="48 must divide model.hidden"):
        C.validate_point(bad)
    bad = copy.deepcopy(cfg)
    bad["attention"]["window"] = 4096
    with pytest.raises(C.ConfigError, match="window 4096 must be below"):
        C.validate_point(bad)
    bad = copy.deepcopy(cfg)
    bad["model"]["kv_heads"] = 3
    with pytest.raises(C.ConfigError, match="must divide model.heads"):
        C.validate_point(bad)


def test_unknown_option_lists_available():
    with pytest.raises(C.ConfigError, match="unknown option 'int9'; available: .*int8"):
        C.compose((("quant", "int9"),))


def test_softmax_fraction_keeps_a_share_of_the_layers_whatever_the_depth():
    a = {"n_softmax": 1, "softmax_fraction": 0.25}
    assert [C.softmax_layer_count(a, n) for n in (2, 4, 30, 32)] == [1, 1, 7, 8]
    assert C.softmax_layer_count({"n_softmax": 3, "softmax_fraction": None}, 30) == 3
    cfg = C.compose((("model", "micro"), ("attention", "hybrid_lolcats")))
    C.validate_point(cfg)   # a quarter of 2 layers: 1 kept, 1 swapped
    cfg["attention"]["softmax_fraction"] = None
    cfg["attention"]["n_softmax"] = 2
    with pytest.raises(C.ConfigError, match=r"attention.n_softmax.*hybrid_lolcats.*softmax_fraction"):
        C.validate_point(cfg)
