"""Sweep grid: expand conf/sweep/<name>.yaml (+ command-line overrides) into grid points.

The grid uses Hydra's own override grammar (comma lists, range(), glob()), parsed with
Hydra's OverridesParser and expanded like Hydra's BasicSweeper. Hydra composes the sweep's
base config once and each group option once (`compose()` costs 40 ms to 1 s, whatever it
composes); a point is the base with its groups' sections put in (group options write only
under their own group and nothing interpolates across groups, so this equals composing the
combination: tests/test_grid.py checks it), then value overrides are set, and every point is
validated against the schemas in `frontier.config`.

A point's stages form a chain: base → quantize → surgery → finetune → evaluate. Each stage
has a path component (the option name plus a slug of the value overrides that touch it);
points that share a prefix share the job. Trivial stages (quant none, softmax attention,
no fine-tuning) write nothing: the next stage loads the nearest real parent.

`quant.when: post` moves quantization after fine-tuning: base → surgery → finetune →
quantize → evaluate. Such a point's path keeps the five components with the quant slot
`none` (its surgery and fine-tuning run on the unquantized base, so they are the very jobs
of the `quant=none` points and shared with them) and adds the post-quantize component after
the finetune one: `work/<model>/none/<attention>/<finetune>/<quant>~when=post/<eval>/`.
`quant.when` itself is never part of a slug otherwise (`when=pre` is the default layout).

The KV-cache keys `quant.kv_bits`, `quant.kv_group` and `quant.kv_residual` are read only by
the evaluate stage: their overrides go into the eval component
(`work/tiny/none/softmax/none/default~kv_bits=2/`), and the quantize stage's config leaves
them out, so points that differ only in their KV cache share every job before evaluate.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from . import config as C

STAGES = ("model", "quant", "attention", "finetune", "eval")
# the path of a `quant.when: post` point: the quantize stage follows the finetune stage
POST_STAGES = ("model", "quant", "attention", "finetune", "post_quant", "eval")
# stage key in the path → name of the pipeline stage that produces its checkpoint
PIPELINE = {"model": "base", "quant": "quantize", "attention": "surgery", "finetune": "finetune",
            "post_quant": "quantize", "eval": "evaluate"}
MAX_COMPONENT = 64


@dataclass
class Point:
    point_id: str
    choices: dict            # stage → option name
    overrides: dict          # dotted key → value (value overrides only)
    components: tuple        # path components, one per stage in self.stages
    cfg: dict                # resolved, validated config

    @property
    def stages(self) -> tuple:
        """The path's stage keys in chain order: STAGES, or POST_STAGES for `quant.when: post`."""
        return POST_STAGES if quant_when(self.cfg) == "post" else STAGES

    def stage_dir(self, stage: str, work_dir: str = "work") -> str:
        i = self.stages.index(stage)
        return "/".join([work_dir, *self.components[: i + 1]])

    def trivial(self, stage: str) -> bool:
        return is_trivial(stage, self.cfg)

    def ckpt_dir(self, stage: str, work_dir: str = "work") -> str:
        """Checkpoint dir that a stage's successor loads: the nearest non-trivial stage at or above `stage`."""
        i = self.stages.index(stage)
        for s in reversed(self.stages[: i + 1]):
            if s == "model" or not self.trivial(s):
                return f"{self.stage_dir(s, work_dir)}/_ckpt"
        raise AssertionError

    def metrics_path(self, work_dir: str = "work") -> str:
        return f"{self.stage_dir('eval', work_dir)}/metrics.json"


def quant_when(cfg: dict) -> str:
    return cfg["quant"].get("when", "pre")


def is_trivial(stage: str, cfg: dict) -> bool:
    if stage == "quant":    # the quantize stage before surgery (quant.when: pre)
        return cfg["quant"]["method"] == "none" or quant_when(cfg) == "post"
    if stage == "post_quant":  # the quantize stage after fine-tuning (quant.when: post)
        return cfg["quant"]["method"] == "none" or quant_when(cfg) != "post"
    if stage == "attention":
        return cfg["attention"]["kind"] == "softmax"
    if stage == "finetune":
        return cfg["finetune"]["method"] == "none"
    return False


@dataclass
class Plan:
    sweep: str
    points: list = field(default_factory=list)
    globals: dict = field(default_factory=dict)   # hardware, tracking, work_dir, results_dir
    excluded: int = 0

    def jobs(self) -> dict:
        """Unique jobs per pipeline stage after prefix sharing: {stage: {stage_dir: stage_cfg}}."""
        out: dict = {PIPELINE[s]: {} for s in STAGES}
        for p in self.points:
            for s in p.stages:
                if s != "eval" and s != "model" and p.trivial(s):
                    continue
                out[PIPELINE[s]].setdefault(p.stage_dir(s, self.globals["work_dir"]), p)
        return out

    def job_counts(self) -> dict:
        return {k: len(v) for k, v in self.jobs().items()}


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_slug(v) for v in value) + "]"
    return str(value).replace("/", "_").replace(" ", "")


def component(name: str, overrides: dict) -> str:
    """`sliding_window` + {'attention.window': 256} → `sliding_window~window=256` (hashed if long)."""
    if not overrides:
        return name
    parts = []
    for key in sorted(overrides):
        short = key.split(".", 1)[1] if key.split(".", 1)[0] in C.GROUPS else key
        parts.append(f"{short}={_slug(overrides[key])}")
    comp = f"{name}~{','.join(parts)}"
    if len(comp) > MAX_COMPONENT or any(c in comp for c in "{}*?'\""):
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
        comp = f"{name}~{digest}"
    return comp


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = C._hydra().config_loader()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    except Exception as e:  # hydra's OverrideParseException
        raise C.ConfigError("overrides", f"cannot parse {overrides!r}: {e}") from e
    for o in parsed:
        o.config_loader = loader
    return parsed


def _expand(overrides: list[str]) -> list[list[str]]:
    """Hydra's BasicSweeper.split_arguments: the cartesian product of every sweep axis."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if not overrides:
        return [[]]
    parsed = _parse(overrides)
    for o in parsed:
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise C.ConfigError(o.get_key_element(), "only choice, range() and glob() sweeps can be expanded")
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


@functools.lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@functools.lru_cache(maxsize=65536)
def _typed_cached(value: str) -> Any:
    return _parser().parse_override(f"x={value}").value()


def _typed(value: str) -> Any:
    """Parse an override value the way Hydra does (ints stay ints, lists stay lists)."""
    return copy.deepcopy(_typed_cached(value))


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        if not isinstance(cur, dict) or p not in cur or not isinstance(cur[p], dict):
            where = ".".join(parts[: i + 1])
            raise C.ConfigError(key, f"'{where}' is not a config section; cannot set '{key}'")
        cur = cur[p]
    if parts[-1] not in cur:
        section = ".".join(parts[:-1])
        allowed = ", ".join(sorted(cur)) if isinstance(cur, dict) else ""
        raise C.ConfigError(key, f"unknown key; allowed keys under '{section}': {allowed}")
    cur[parts[-1]] = value


def _applies(cfg: dict, key: str) -> bool:
    """A value override applies to a point when its group option has the key's parent section.

    `finetune.lora.steps=5` applies to the lolcats points of a sweep and is dropped for
    `finetune=none`; a key no point has is reported by `plan` as an error.
    """
    parts = key.split(".")
    cur = cfg
    for p in parts[:-1]:
        if not isinstance(cur, dict) or p not in cur or not isinstance(cur[p], dict):
            return False
        cur = cur[p]
    return parts[-1] in cur


def _matches(rule: dict, choices: dict, overrides: dict) -> bool:
    for k, v in rule.items():
        have = str(choices.get(k, overrides.get(k)))
        if have not in (map(str, v) if isinstance(v, (list, tuple)) else (str(v),)):  # a list: any of
            return False
    return True


def _split_cli(cli: Iterable[str]) -> tuple[Optional[str], list[str]]:
    sweep, rest = None, []
    for o in cli:
        o = o.strip()
        if not o:
            continue
        if o.startswith("sweep="):
            sweep = o.split("=", 1)[1]
        else:
            if "=" not in o:
                raise C.ConfigError(o, "overrides look like key=value (e.g. quant=int8 or attention.window=128)")
            rest.append(o)
    return sweep, rest


@functools.lru_cache(maxsize=None)
def _base_config(sweep_name: Optional[str]) -> dict:
    return C.compose((("sweep", sweep_name),) if sweep_name else ())


@functools.lru_cache(maxsize=None)
def _group_section(group: str, option: str) -> dict:
    return C.compose(((group, option),))[group]


def compose_point(sweep_name: Optional[str], choices: Iterable[tuple]) -> dict:
    """The composed config of one group combination: the sweep's base config with the chosen
    options' sections (each composed once per process)."""
    cfg = copy.deepcopy(_base_config(sweep_name))
    for group, option in choices:
        cfg[group] = copy.deepcopy(_group_section(group, option))
    return cfg


def _in_own_grid(key: str, grid_axes: dict, sweep_name: Optional[str]) -> bool:
    """Whether some option of the sweep's own grid (before command-line overrides) has `key`."""
    top = key.split(".", 1)[0]
    if top in C.GROUPS and top in grid_axes:
        options = [combo[0].split("=", 1)[1] for combo in _expand([f"{top}={grid_axes[top]}"])]
        return any(_applies(compose_point(sweep_name, [(top, opt)]), key) for opt in options)
    return _applies(_base_config(sweep_name), key)


def _from_set(e: "C.ConfigError", set_values: dict, sweep_file: str) -> "C.ConfigError":
    """`e` with a note naming the sweep file when a `set:` entry of it is the key (or under it)."""
    keys = [k for k in set_values if k == e.key or k.startswith(f"{e.key}.") or e.key.startswith(f"{k}.")]
    if not keys:
        return e
    message = str(e)[len(f"config error at '{e.key}': "):]
    where = ", ".join(f"{k}: {set_values[k]!r}" for k in sorted(keys))
    return C.ConfigError(e.key, f"{message} (from the sweep file {sweep_file}, `set:` {where})")


def plan(cli_overrides: Iterable[str] = (), *, cuda_available: Optional[bool] = None) -> Plan:
    """Expand and validate a sweep. `cli_overrides` e.g. ["sweep=demo", "quant=int8"].

    Command-line overrides replace the sweep's axis of the same key (and may be sweeps
    themselves); value overrides in the sweep's `set:` apply to every point that has the key.
    A `set:` entry (or a value axis of the sweep's grid) that no point has once the command
    line replaced an axis (e.g.
    `finetune.lora.steps` after `attention=softmax` left only `finetune: none` points) is
    skipped; one that no option of the sweep's own grid has is an error naming the sweep file.
    """
    sweep_name, cli = _split_cli(cli_overrides)
    base = _base_config(sweep_name)
    sweep = copy.deepcopy(base["sweep"])
    C.validate_section(sweep, C.SweepCfg, "sweep")
    sweep = {"grid": {}, "exclude": [], "set": {}, **sweep}
    sweep_file = f"conf/sweep/{sweep_name or sweep['name']}.yaml"
    axes: dict[str, str] = {}
    for k, v in sweep["grid"].items():
        axes[k] = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    grid_axes = dict(axes)
    for k, v in sweep["set"].items():
        axes.setdefault(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    cli_keys = set()
    for o in cli:
        k, v = o.split("=", 1)
        axes[k.lstrip("+")] = v
        cli_keys.add(k.lstrip("+"))
    # the sweep's own `set:` values that the command line left in place
    set_values = {k: v for k, v in sweep["set"].items() if k not in cli_keys and k not in sweep["grid"]}
    for k in axes:
        top = k.split(".", 1)[0]
        if top not in C.TOP_LEVEL_KEYS or top == "sweep":
            raise _from_set(C.ConfigError(k, f"unknown key; allowed: {', '.join(sorted(C.TOP_LEVEL_KEYS - {'sweep'}))}"),
                            set_values, sweep_file)
        if "." not in k and k not in C.GROUPS:
            raise _from_set(C.ConfigError(k, f"not a config group; groups are: {', '.join(C.GROUPS)}"),
                            set_values, sweep_file)
    combos = _expand([f"{k}={v}" for k, v in axes.items()])
    for rule in sweep["exclude"]:
        if not isinstance(rule, dict) or not rule:
            raise C.ConfigError("sweep.exclude", f"each rule is a mapping of key: value, got {rule!r}")

    composed: dict = {}
    validated: dict = {}
    out = Plan(sweep=sweep["name"])
    seen_ids: set = set()
    used_keys: set = set()
    for combo in combos:
        choices, overrides = {}, {}
        for item in combo:
            k, v = item.split("=", 1)
            if "." in k or k in ("work_dir", "results_dir"):
                overrides[k] = _typed(v)
            else:
                choices[k] = v
        if any(_matches(r, choices, overrides) for r in sweep["exclude"]):
            out.excluded += 1
            continue
        key = tuple(sorted(choices.items()))
        if key not in composed:
            composed[key] = compose_point(sweep_name, key)
        cfg = copy.deepcopy(composed[key])
        cfg.pop("sweep", None)
        applied = {}
        for k, v in overrides.items():
            if _applies(cfg, k):
                _set_dotted(cfg, k, v)
                applied[k] = v
                used_keys.add(k)
        overrides = applied
        fp = json.dumps(cfg, sort_keys=True, default=str)
        if fp not in validated:
            try:
                C.validate_point(cfg, cuda_available=cuda_available)
            except C.ConfigError as e:
                raise _from_set(e, {k: v for k, v in set_values.items() if k in overrides}, sweep_file) from None
            validated[fp] = True
        names = {s: cfg[s]["name"] for s in STAGES}
        post = quant_when(cfg) == "post"
        comps = []
        for s in (POST_STAGES if post else STAGES):
            group = "quant" if s == "post_quant" else s
            own = {k: v for k, v in overrides.items()
                   if C.stage_of_key(k) == group and k != "quant.when"}
            if s == "quant" and post:     # surgery and fine-tuning run unquantized: the quant=none dirs
                comps.append("none")
            elif s == "post_quant":
                comps.append(component(names["quant"], {**own, "quant.when": "post"}))
            else:
                comps.append(component(names[group], own))
        pid = "/".join(comps)
        if pid in seen_ids:
            continue
        seen_ids.add(pid)
        glob = {"hardware": cfg["hardware"], "tracking": cfg["tracking"], "resources": cfg["resources"],
                "work_dir": cfg["work_dir"], "results_dir": cfg["results_dir"]}
        if out.globals and any(out.globals[k] != glob[k] for k in glob):
            raise C.ConfigError("hardware", "hardware, tracking, resources, work_dir and results_dir must be the same for every point of a sweep")
        out.globals = glob
        out.points.append(Point(point_id=pid, choices=names, overrides=overrides, components=tuple(comps), cfg=cfg))
    value_keys = {k for k in axes if "." in k}
    for k in sorted(value_keys - used_keys):
        from_file = k in set_values or (k in grid_axes and k not in cli_keys)  # the sweep file's own value axes
        if from_file and cli and _in_own_grid(k, grid_axes, sweep_name):
            continue  # valid in the sweep's own grid; the command line removed every point it applies to
        parent = k.rsplit(".", 1)[0]
        allowed: set = set()
        for cfg in composed.values():   # the keys that section has in any point of the sweep
            sec = cfg
            for part in parent.split("."):
                sec = sec.get(part) if isinstance(sec, dict) else None
            if isinstance(sec, dict):
                allowed |= set(sec)
        if not allowed:
            err = C.ConfigError(k, f"'{parent}' is not a config section in any point of this sweep")
        else:
            err = C.ConfigError(k, f"unknown key for the options in this sweep; keys under '{parent}': "
                                f"{', '.join(sorted(allowed))}")
        raise _from_set(err, set_values, sweep_file) if k in set_values else err
    if not out.points:
        raise C.ConfigError("sweep.exclude", "the sweep has no points left after exclusions")
    return out


def stage_config(point: Point, stage: str) -> dict:
    """The part of a point's config that a pipeline stage's result depends on."""
    cfg = point.cfg
    if stage == "model":
        return {"model": cfg["model"], "data": cfg["data"]}
    if stage in ("quant", "post_quant"):  # calibrated methods draw their samples from the sweep's data
        q = {k: v for k, v in cfg["quant"].items() if f"quant.{k}" not in C.EVAL_ONLY_KEYS}  # the KV cache: evaluate's
        if q["method"] in ("gptq", "awq"):
            return {"quant": q, "data": cfg["data"]}
        return {"quant": q}
    if stage == "attention":  # keep_softmax: auto chooses layers on calibration text from the sweep's data
        if cfg["attention"].get("keep_softmax") == "auto":
            return {"attention": cfg["attention"], "data": cfg["data"]}
        return {"attention": cfg["attention"]}
    if stage == "finetune":
        return {"finetune": cfg["finetune"], "data": cfg["data"]}
    return {k: v for k, v in cfg.items() if k not in ("tracking", "resources", "work_dir", "results_dir")}


def format_plan(p: Plan, max_rows: int = 40) -> str:
    counts = p.job_counts()
    lines = [f"sweep {p.sweep}: {len(p.points)} points ({p.excluded} excluded)",
             "unique jobs per stage: " + ", ".join(f"{k}={v}" for k, v in counts.items())]
    for pt in p.points[:max_rows]:
        lines.append(f"  {pt.point_id}")
    if len(p.points) > max_rows:
        lines.append(f"  ... {len(p.points) - max_rows} more")
    return "\n".join(lines)
