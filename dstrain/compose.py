"""Hydra composition, shared by training (`launch/train.py`), `dstrain submit`, the benchmarks and the tests.

Three launcher habits would otherwise break Hydra, so `normalize_argv` fixes them before Hydra parses anything:
- the deepspeed launcher appends `--local_rank=N`, which Hydra rejects;
- `+zero=3` reaches Hydra as the integer 3, and group choices must be strings;
- `model=7b` without the `+` is rejected because the groups are not in the defaults list.
"""

import hashlib
import os
import re
from pathlib import Path
from dataclasses import asdict
from typing import List, Sequence

from omegaconf import OmegaConf, open_dict

from dstrain.config import TrainConfig, register_schema
from dstrain.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# conf/sweep holds W&B sweep definitions for `wandb sweep`, not options of a config group.
NOT_CONFIG_GROUPS = {"sweep"}
CONFIG_GROUPS = frozenset(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name not in NOT_CONFIG_GROUPS
)

_GROUP_OVERRIDE = re.compile(r"^(?P<plus>\+{0,2})(?P<group>[A-Za-z_]\w*)=(?P<value>.*)$")
_PLAIN_CHOICES = re.compile(r"^[\w.-]+(,[\w.-]+)*$")
_LOCAL_RANK = re.compile(r"^--local_rank(=(?P<value>\d+))?$")


def normalize_argv(argv: List[str], groups=CONFIG_GROUPS) -> List[str]:
    """Return argv as Hydra needs it. `--local_rank` is dropped (LOCAL_RANK in the environment stays the
    source of truth), and `[+]group=a[,b]` for a known group becomes `+group='a'[,'b']`."""
    normalized = []
    args = iter(argv)
    for arg in args:
        local_rank = _LOCAL_RANK.match(arg)
        if local_rank:
            value = local_rank.group("value") or next(args, None)
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        match = _GROUP_OVERRIDE.match(arg)
        if match and match.group("group") in groups:
            value = match.group("value")
            if _PLAIN_CHOICES.match(value):
                value = ",".join(f"'{choice}'" for choice in value.split(","))
            arg = f"{match.group('plus') or '+'}{match.group('group')}={value}"
        normalized.append(arg)
    return normalized


def run_name_from_overrides() -> str:
    """The run directory's name: the command-line overrides, so that every rank and every restart of the
    same command agrees on it without a timestamp. Only Hydra's runtime (hydra.main) knows them."""
    from hydra.core.hydra_config import HydraConfig

    name = HydraConfig.get().job.override_dirname.replace("'", "").replace(os.sep, "_")
    if not name:
        return "default"
    if len(name) > 100:
        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def register() -> None:
    """The schema and the run-name resolver, which the primary config (conf/train.yaml) refers to."""
    register_schema()
    if not OmegaConf.has_resolver("dstrain_run_name"):
        OmegaConf.register_new_resolver("dstrain_run_name", run_name_from_overrides)


def compose(overrides: Sequence[str], run_name: str = None) -> TrainConfig:
    """The typed config that `launch/train.py <overrides>` would train, run.name included: without run.name=
    (or `run_name`) it is named after the overrides, which only Hydra's runtime config knows, so that is
    composed too and set for the moment, as hydra.main would."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            dict_config = hydra_compose("train", overrides=normalize_argv(list(overrides)), return_hydra_config=True)
    except HydraException as error:
        raise ConfigError(one_line(error)) from None
    if run_name is not None:
        dict_config.run.name = run_name
    HydraConfig.instance().set_config(dict_config)
    try:
        with open_dict(dict_config):
            del dict_config["hydra"]
        return OmegaConf.to_object(dict_config)
    finally:
        HydraConfig.instance().cfg = None


def one_line(error: Exception) -> str:
    """Hydra's (or OmegaConf's) error message on one line, without the search-path listing and help links."""
    lines = []
    for line in str(error).splitlines():
        if line.startswith(("Config search path", "See https")):
            break
        lines.append(line.strip())
    cause = f": {str(error.__cause__).splitlines()[0]}" if error.__cause__ else ""
    # A parse error names only the bad input ("no viable alternative at input '[1,'"), not its key.
    override = f"{error.override}: " if getattr(error, "override", None) else ""
    return override + " ".join(line for line in lines if line) + cause


def save_run_config(cfg: TrainConfig, run_dir: Path) -> None:
    """The composed config into <run dir>/.hydra, where Hydra would have put it. Written by the run that holds
    the run directory (dstrain.runlock) rather than by Hydra before it starts, so that a run refused because
    another one is live leaves that run's copy alone."""
    from hydra.core.hydra_config import HydraConfig

    directory = run_dir / ".hydra"
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(asdict(cfg)), directory / "config.yaml")
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra}), directory / "hydra.yaml")
        OmegaConf.save(hydra.overrides.task, directory / "overrides.yaml")
