"""Command-line entry for training: argv clean-up, then Hydra composes the config and the trainer runs.

Three launcher habits would otherwise break Hydra, so they are fixed here before Hydra parses anything:
- the deepspeed launcher appends `--local_rank=N`, which Hydra rejects;
- `+zero=3` reaches Hydra as the integer 3, and group choices must be strings;
- `model=7b` without the `+` is rejected because the groups are not in the defaults list.
"""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dstrain.config import ConfigError, TrainConfig, register_schema
from dstrain.preemption import PREEMPTED_EXIT_CODE

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# conf/sweep holds W&B sweep definitions for `wandb sweep`, not options of a config group.
NOT_CONFIG_GROUPS = {"sweep"}
CONFIG_GROUPS = frozenset(
    p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name not in NOT_CONFIG_GROUPS
)

# Exit codes a job script can act on; 75 (PREEMPTED_EXIT_CODE) means "run the same command again".
CONFIG_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3

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
    same command agrees on it without a timestamp."""
    name = HydraConfig.get().job.override_dirname.replace("'", "").replace(os.sep, "_")
    if not name:
        return "default"
    if len(name) > 100:
        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(dict_config) -> None:
    from dstrain.runlock import RunDirInUse
    from dstrain.trainer import TrainingDiverged, train

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    cfg: TrainConfig = OmegaConf.to_object(dict_config)
    try:
        finished = train(cfg, run_dir)
    except ConfigError as error:
        # Hydra would print a traceback; a config mistake deserves one clear line and its own exit code.
        if _rank() == 0 or not isinstance(error, RunDirInUse):  # every rank raises RunDirInUse; one says it
            print(f"dstrain: config error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    except TrainingDiverged as error:
        if _rank() == 0:
            print(f"dstrain: training diverged: {error}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)
    if not finished:
        requeue_submitit_job()
        sys.exit(PREEMPTED_EXIT_CODE)


def requeue_submitit_job() -> None:
    """A sweep point that Hydra's submitit launcher runs as a SLURM job stopped and saved: rank 0 requeues the
    job, as dstrain's own job script does on exit code 75 (submitit's script does not). The requeued job keeps
    its id and runs the same sweep point, which resumes from the checkpoint just saved."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or _rank() != 0 or not job_id:
        return
    try:
        # A cancelled job (plain scancel sends SIGTERM) is no longer RUNNING, and a requeue would revive it.
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() != "RUNNING":
            print(f"dstrain: job {job_id} is {state.strip() or 'gone'}, not requeued", file=sys.stderr, flush=True)
            return
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        error = done.stderr.strip() if done.returncode else None
    except OSError as failure:
        error = str(failure)
    if error is None:
        print(f"dstrain: requeueing job {job_id}, which resumes from the checkpoint just saved", flush=True)
    else:
        print(f"dstrain: scontrol requeue {job_id} failed ({error}); run the sweep point again to resume",
              file=sys.stderr, flush=True)


def with_sweep_group(argv: List[str]) -> List[str]:
    """Under -m, every job of the sweep logs to one W&B group unless the user named one. The name comes from
    the command line, so every rank, and every requeue of a job, agrees on it."""
    if not ({"-m", "--multirun"} & set(argv)) or any(arg.startswith("logger.wandb.group=") for arg in argv):
        return argv
    digest = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:10]
    return with_override(argv, f"logger.wandb.group=sweep-{digest}")


def with_sweep_run_names(argv: List[str]) -> List[str]:
    """Under -m, a run.name the user gives names the sweep's folder, and each job gets its own run directory
    inside it, named by its overrides; otherwise every job would train in one directory."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    return [
        f"{arg}/${{dstrain_run_name:}}" if arg.startswith("run.name=") and "${" not in arg else arg for arg in argv
    ]


def with_override(argv: List[str], override: str) -> List[str]:
    """argv plus one override, placed next to the others: Hydra's argparse takes overrides as one run of
    positional arguments, so one after a flag such as `--cfg job` would be refused."""
    first = next((index for index, arg in enumerate(argv) if "=" in arg and not arg.startswith("-")), len(argv))
    return [*argv[:first], override, *argv[first:]]


def main() -> None:
    argv = with_sweep_group(with_sweep_run_names(normalize_argv(sys.argv[1:])))
    if _rank() != 0:
        # One copy of the composed config in the run directory is enough.
        argv = with_override(argv, "hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv]
    register_schema()
    if not OmegaConf.has_resolver("dstrain_run_name"):
        OmegaConf.register_new_resolver("dstrain_run_name", run_name_from_overrides)
    _hydra_main()
