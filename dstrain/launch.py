"""What `launch/train.py` runs: argv clean-up for the launchers, Hydra's main, and one exit code per outcome
(dstrain.errors.ExitCode).

Hydra prints its own composition errors (an unknown key or group option, a wrong type, a bad override, an
interpolation that does not resolve) over several lines and exits 1, which job scripts read as "requeue".
`main` has Hydra raise them instead (HYDRA_FULL_ERROR), and ends each as one line with ExitCode.CONFIG, as every
other config error; this covers every job that a multirun composes too."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dstrain.compose import CONF_DIR, normalize_argv, one_line, register
from dstrain.config import TrainConfig
from dstrain.distributed import global_rank
from dstrain.errors import ConfigError, DstrainError, ExitCode


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(dict_config) -> None:
    from dstrain.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    cfg: TrainConfig = OmegaConf.to_object(dict_config)
    try:
        finished = train(cfg, run_dir)
    except DstrainError as error:
        # Hydra would print a traceback; a known failure deserves one clear line and its own exit code. A
        # failure each rank finds for itself is printed by each (a rank may be alone in a log); one that all
        # ranks decided together is said once.
        if global_rank() == 0 or not error.decided_together:
            print(f"dstrain: {error.kind}: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    if not finished:
        requeue_submitit_job()
        sys.exit(ExitCode.PREEMPTED)


def requeue_submitit_job() -> None:
    """A sweep point that Hydra's submitit launcher runs as a SLURM job stopped and saved: rank 0 requeues the
    job, as dstrain's own job script does on ExitCode.PREEMPTED (submitit's script does not). The requeued job
    keeps its id and runs the same sweep point, which resumes from the checkpoint just saved."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or global_rank() != 0 or not job_id:
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


def check_sweep(argv: List[str]) -> None:
    """Under -m, compose and check every job of the sweep before the first one starts, so that a value out of
    range in the last job does not wait for the others to train. Hydra itself composes them all up front but
    checks only keys and types; other sweepers (hydra/sweeper=...) choose their values as they go."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    if not {"-m", "--multirun"} & set(argv) or any(arg.startswith("hydra/sweeper=") for arg in overrides):
        return
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dstrain.checks import validate
    from dstrain.compose import compose

    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), max_batch_size=None)
    for job in jobs:
        validate(compose(job))


def main() -> None:
    argv = with_sweep_group(with_sweep_run_names(normalize_argv(sys.argv[1:])))
    # The trainer saves the composed config once it holds the run directory (compose.save_run_config).
    argv = with_override(argv, "hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv]
    register()
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        check_sweep(argv)
        _hydra_main()
    except ConfigError as error:
        print(f"dstrain: {error.kind}: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    except (CompactHydraException, OmegaConfBaseException) as error:
        # OmegaConf's own errors come from resolving an interpolation (${...}) of the composed config.
        if wants_traceback:
            raise
        print(f"dstrain: {ConfigError.kind}: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(ConfigError.exit_code)
