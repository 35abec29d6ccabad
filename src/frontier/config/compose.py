"""Composition: Hydra on the project's conf/ directory, option files, and derived counts."""
from __future__ import annotations

import functools

from .schemas import CONF_DIR, GROUPS, ConfigError


# ---------------------------------------------------------------- composition
@functools.lru_cache(maxsize=1)
def _hydra():
    """Initialise Hydra once per process on the project's conf/ directory."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="frontier")
    return GlobalHydra.instance()


def group_options(group: str) -> list[str]:
    from hydra.core.object_type import ObjectType

    return sorted(_hydra().config_loader().get_group_options(group, results_filter=ObjectType.CONFIG))


@functools.lru_cache(maxsize=None)
def _option_file(group: str, name: str) -> dict:
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        opts = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(group, f"unknown option {name!r}; available: {', '.join(opts)}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "defaults" in cfg:
        raise ConfigError(group, f"{path} uses a defaults list; option_config reads plain option files only")
    return cfg


def option_config(group: str, name: str) -> dict:
    """The plain contents of ``conf/<group>/<name>.yaml`` (a fresh dict; no Hydra initialisation),
    for code that needs an option's values outside a composed point (benchmarks, tests)."""
    import copy

    return copy.deepcopy(_option_file(group, name))


def option_names(group: str) -> list[str]:
    """Option names of a group, from the files in ``conf/<group>/`` (no Hydra initialisation)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(group_choices: tuple[tuple[str, str], ...]) -> dict:
    """Compose config.yaml with group choices (e.g. (("quant", "int8"),)); returns a plain dict.

    An unknown option fails here with the list of available ones for that group.
    """
    from hydra import compose as hydra_compose
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    _hydra()
    for group, choice in group_choices:
        if group in GROUPS or group == "sweep":
            opts = group_options(group)
            if choice not in opts:
                raise ConfigError(group, f"unknown option {choice!r}; available: {', '.join(opts)}")
    try:
        cfg = hydra_compose(config_name="config", overrides=[f"{g}={c}" for g, c in group_choices])
    except MissingConfigException as e:  # pragma: no cover - guarded above
        raise ConfigError(group_choices[0][0] if group_choices else "config", str(e)) from e
    return OmegaConf.to_container(cfg, resolve=True)


def softmax_layer_count(attention_cfg: dict, layers: int) -> int:
    """How many layers a `keep_softmax: auto` hybrid keeps softmax: `softmax_fraction` of the
    model's layers (rounded down, at least 1) when set, else `n_softmax`."""
    frac = attention_cfg.get("softmax_fraction")
    if frac is not None:
        return max(1, int(float(frac) * int(layers)))
    return int(attention_cfg.get("n_softmax", 1))
