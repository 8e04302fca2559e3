"""SLURM: `dstrain submit` turns a training command into a batch job, and every rank of that job finds its peers
from SLURM's own variables.

Submitting (`submit`): the overrides are composed and validated exactly as `launch/train.py` would, then
checked against the launcher settings (`launcher.*`) and, where `sinfo` exists, against the cluster's
partitions. `launch/slurm/job.sbatch.template` is rendered with them and handed to `sbatch`. The job is
submitted held, so that its run directory, which holds the log and may be named by the job id, exists before
it starts; then it is released.

Inside the job: `srun` starts one task per rank (no ssh, no pdsh), and `init_distributed` takes RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
`dstrain.distributed.rendezvous_from_slurm`.

Preemption: `--signal=<launcher.signal>@<launcher.signal_lead_s>` (without `B:`) reaches the ranks only.
They save at the next step boundary and exit with ExitCode.PREEMPTED, and the batch script, seeing that
code from srun, runs `scontrol requeue` on its own job. That works on any cluster, unlike slurm.conf's
RequeueExit. A requeued job keeps its id, so it finds its run directory, and `trainer.resume=auto` loads
the checkpoint it saved.
"""

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dstrain.checks import validate
from dstrain.config import LauncherConfig, TrainConfig
from dstrain.distributed import EXPECTED_NODES, EXPECTED_RANKS_PER_NODE
from dstrain.errors import ConfigError, ExitCode, SlurmError
from dstrain.runlock import check_run_dir_free, job_comment

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "launch" / "slurm" / "job.sbatch.template"
TRAIN_SCRIPT = REPO / "launch" / "train.py"

# The run directory of a run without run.name: keyed by the job id, which a requeued job keeps.
JOB_ID_RUN_NAME = "slurm-${SLURM_JOB_ID}"

# SLURM keeps the --signal lead time in 16 bits.
MAX_SIGNAL_LEAD_S = 65535

# sbatch options that `dstrain submit` writes itself, and what it writes each one from.
MANAGED_OPTIONS = {
    "--nodes": "launcher.nodes", "-N": "launcher.nodes",
    "--ntasks": "launcher.nodes and launcher.gpus_per_node", "-n": "launcher.nodes and launcher.gpus_per_node",
    "--ntasks-per-node": "launcher.gpus_per_node", "--gpus-per-node": "launcher.gpus_per_node",
    "--gpus": "launcher.gpus_per_node", "-G": "launcher.gpus_per_node", "--gpus-per-task": "launcher.gpus_per_node",
    "--cpus-per-task": "launcher.cpus_per_task", "-c": "launcher.cpus_per_task",
    "--mem": "launcher.mem",
    "--partition": "launcher.partition", "-p": "launcher.partition",
    "--account": "launcher.account", "-A": "launcher.account",
    "--qos": "launcher.qos", "-q": "launcher.qos",
    "--time": "launcher.time", "-t": "launcher.time",
    "--job-name": "launcher.job_name", "-J": "launcher.job_name",
    "--signal": "launcher.signal and launcher.signal_lead_s",
    "--requeue": "launcher.requeue", "--no-requeue": "launcher.requeue",
    "--output": "run.root and run.name", "-o": "run.root and run.name",
    "--error": "run.root and run.name", "-e": "run.root and run.name",
    "--open-mode": "the requeue (append: a requeued run adds to the log)",
    "--chdir": "the directory you submit from", "-D": "the directory you submit from",
    "--hold": "the submission (held until the run directory exists)", "-H": "the submission",
    "--comment": "run.root and run.name (dstrain.runlock finds the job by it)",
}


# ----------------------------------------------------------------------------------------- submitting


@dataclass
class JobPlan:
    cfg: TrainConfig
    # run.name as given, or None: the job id names the run directory.
    run_name: Optional[str]
    run_root: Path
    # The user's overrides without run.name, which the script adds itself.
    overrides: List[str]

    def run_dir(self, job_id: str = "%j") -> Path:
        return self.run_root / (self.run_name or f"slurm-{job_id}")


def plan_job(overrides: Sequence[str]) -> JobPlan:
    """Compose the overrides exactly as training will, and check everything that can be checked here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from dstrain.compose import compose, one_line

    try:
        parser = OverridesParser.create()
        names = [parser.parse_overrides([override])[0].key_or_group == "run.name" for override in overrides]
    except HydraException as error:
        raise ConfigError(one_line(error)) from None
    # The resolver names runs after their overrides, which only Hydra's runtime knows; a run without run.name
    # is named by its job id, which only SLURM knows. A stand-in lets the rest of the config be checked.
    cfg = compose(overrides, run_name=None if any(names) else "slurm-JOBID")
    validate(cfg)
    validate_launcher(cfg)
    plan = JobPlan(
        cfg=cfg,
        run_name=cfg.run.name if any(names) else None,
        run_root=Path(cfg.run.root).resolve(),
        overrides=[override for override, is_name in zip(overrides, names) if not is_name],
    )
    where = plan.run_root / (plan.run_name or "")
    if re.search(r"[\s%]", str(where)):
        raise ConfigError(
            f"the run directory {where} holds a space or a %, which SLURM's --output cannot take: "
            f"choose run.root and run.name without them"
        )
    check_resume(plan)
    return plan


def validate_launcher(cfg: TrainConfig) -> None:
    launcher = cfg.launcher
    if launcher.gpu_type and launcher.device == "cpu":
        raise ConfigError("launcher.gpu_type is set, but launcher.device=cpu requests no GPUs. Remove one of them.")
    if not cfg.trainer.stop_grace_s < launcher.signal_lead_s <= MAX_SIGNAL_LEAD_S:
        raise ConfigError(
            f"launcher.signal_lead_s={launcher.signal_lead_s} must exceed trainer.stop_grace_s="
            f"{cfg.trainer.stop_grace_s:g} (the time the ranks may take to reach a step boundary and save) "
            f"and be at most {MAX_SIGNAL_LEAD_S}: raise it, or lower trainer.stop_grace_s."
        )
    limit = time_limit_s(launcher.time) if launcher.time is not None else None
    if limit is not None and limit <= launcher.signal_lead_s:
        raise ConfigError(
            f"launcher.time={launcher.time} is not longer than launcher.signal_lead_s={launcher.signal_lead_s}: "
            f"the stop signal would come before training starts. Raise launcher.time or lower the lead."
        )
    for option in launcher.extra_sbatch:
        name = option.strip().split("=", 1)[0].split(" ", 1)[0]
        if not name.startswith("-"):
            raise ConfigError(
                f"launcher.extra_sbatch item {option!r} is not an sbatch option: write it as --option=value"
            )
        source = managed_by(name, option)
        if source:
            fix = f"set {source} instead" if source.startswith("launcher.") else "remove it"
            raise ConfigError(f"launcher.extra_sbatch sets {name}, which dstrain submit writes from {source}: {fix}")
    for key in ("gpu_type", "mem", "partition", "account", "qos", "time", "job_name"):
        value = getattr(launcher, key)
        if value is not None and (not value or any(char.isspace() for char in value)):
            raise ConfigError(f"launcher.{key}={value!r} must be one word (no spaces), or unset")
    if launcher.requeue and cfg.trainer.resume not in ("auto", "must"):
        raise ConfigError(
            f"trainer.resume={cfg.trainer.resume} cannot resume a requeued job, which must continue from its "
            f"own newest checkpoint: use trainer.resume=auto (with run.name=<run> to continue another run), "
            f"or launcher.requeue=false."
        )


def managed_by(name: str, option: str) -> Optional[str]:
    """What decides the sbatch option `name` (from `option`, e.g. `-N2`, `--nodes=2`), if the launcher writes it."""
    if name == "--gres":
        return "launcher.gpus_per_node" if "gpu" in option else None
    if name in MANAGED_OPTIONS:
        return MANAGED_OPTIONS[name]
    # Short options take their value attached: -N2, -pgpu.
    return MANAGED_OPTIONS.get(name[:2]) if not name.startswith("--") else None


def time_limit_s(value: str) -> Optional[int]:
    """Seconds in SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None for no limit (0 too)."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ConfigError(
            f"launcher.time={value!r} is not a SLURM time limit: use minutes, HH:MM:SS or D-HH:MM:SS"
        )
    days, first, second, third = (int(group) if group else None for group in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    elif third is not None:  # H:M:S
        seconds = (first * 60 + second) * 60 + third
    else:  # M, M:S
        seconds = first * 60 + (second or 0)
    return seconds or None


def check_resume(plan: JobPlan) -> None:
    if plan.cfg.trainer.resume != "must":
        return
    if plan.run_name is None:
        raise ConfigError(
            "trainer.resume=must needs the run to continue: add run.name=<its name> (slurm-<job id> for a run "
            "that a job named); a new job's own directory has no checkpoints."
        )
    from dstrain.checkpoint import MANIFEST

    checkpoints = plan.run_dir() / "checkpoints"
    if not any(checkpoints.glob(f"step_*/{MANIFEST}")):
        raise ConfigError(
            f"trainer.resume=must, but {checkpoints} holds no complete checkpoint: check run.name and run.root, "
            f"or use trainer.resume=auto to start there from step 0."
        )


@dataclass
class Partition:
    nodes: int
    cpus: int
    gpus: int
    gres: List[str]
    default: bool


def read_partitions(sinfo_output: str, gpu_type: Optional[str]) -> Dict[str, Partition]:
    """`sinfo -h -a -o %P|%D|%c|%G` (one line per group of like nodes) as {partition: Partition}: the
    node count summed, the CPUs and GPUs of its best node."""
    partitions: Dict[str, Partition] = {}
    for line in sinfo_output.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = gpus_in_gres(gres, gpu_type)
        known = partitions.setdefault(name, Partition(0, 0, 0, [], default))
        known.nodes += int(nodes)
        known.cpus = max(known.cpus, int(cpus.rstrip("+")))
        known.gpus = max(known.gpus, gpus)
        known.gres.append(gres)
    return partitions


def gpus_in_gres(gres: str, gpu_type: Optional[str]) -> int:
    """GPUs per node in a GRES string such as `gpu:a100:8(S:0-1),nvme:1`, of gpu_type if given."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        if gpu_type is None or (len(parts) == 3 and parts[1] == gpu_type):
            total += int(parts[-1])
    return total


def check_cluster(launcher: LauncherConfig, partitions: Dict[str, Partition]) -> None:
    """The launcher settings against what `sinfo` reports, so that a mismatch is one clear line now rather
    than a pending job that never starts."""
    names = ", ".join(sorted(partitions)) or "none"
    if launcher.partition is None:
        chosen = [name for name, partition in partitions.items() if partition.default]
        if not chosen:
            raise ConfigError(
                f"launcher.partition is not set and this cluster has no default partition: "
                f"set launcher.partition=<one of: {names}>"
            )
    else:
        chosen = launcher.partition.split(",")
        for name in chosen:
            if name not in partitions:
                raise ConfigError(
                    f"launcher.partition={launcher.partition}: no partition {name!r} here (sinfo lists: {names})"
                )
    for name in chosen:
        partition = partitions[name]
        if launcher.nodes > partition.nodes:
            raise ConfigError(f"launcher.nodes={launcher.nodes}, but partition {name} has {partition.nodes} node(s)")
        if launcher.device == "gpu" and launcher.gpus_per_node > partition.gpus:
            kind = f"{launcher.gpu_type} GPUs" if launcher.gpu_type else "GPUs"
            raise ConfigError(
                f"launcher.gpus_per_node={launcher.gpus_per_node}, but the nodes of partition {name} have at most "
                f"{partition.gpus} {kind} (GRES: {', '.join(partition.gres)}): lower it, choose another "
                f"launcher.partition, or use launcher.device=cpu for CPU ranks"
            )
        cpus = launcher.gpus_per_node * (launcher.cpus_per_task or 1)
        if cpus > partition.cpus:
            raise ConfigError(
                f"launcher.gpus_per_node={launcher.gpus_per_node} x launcher.cpus_per_task="
                f"{launcher.cpus_per_task or 1} needs {cpus} CPUs per node, but the nodes of partition {name} "
                f"have at most {partition.cpus}"
            )


def render(plan: JobPlan, command: str) -> str:
    launcher = plan.cfg.launcher
    run_dir = plan.run_dir()
    options = [
        f"--job-name={launcher.job_name or plan.run_name or 'dstrain'}",
        f"--nodes={launcher.nodes}",
        f"--ntasks-per-node={launcher.gpus_per_node}",
    ]
    if launcher.device == "gpu":
        gpus = f"{launcher.gpu_type}:{launcher.gpus_per_node}" if launcher.gpu_type else launcher.gpus_per_node
        options.append(f"--gpus-per-node={gpus}")
    for key, option in (("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("partition", "partition"),
                        ("account", "account"), ("qos", "qos"), ("time", "time")):
        if getattr(launcher, key) is not None:
            options.append(f"--{option}={getattr(launcher, key)}")
    options += [
        f"--signal={launcher.signal}@{launcher.signal_lead_s}",
        "--requeue" if launcher.requeue else "--no-requeue",
        # A requeued run writes to the same file; without append it would wipe the first run's log.
        "--open-mode=append",
        f"--output={run_dir / 'slurm-%j.out'}",
        f"--chdir={Path.cwd()}",
        # Marks the job's run directory, so that the next submit sees it is taken (dstrain.runlock).
        *([f"--comment={job_comment(run_dir)}"] if plan.run_name else []),
        *launcher.extra_sbatch,
    ]
    environment = {"PYTHONUNBUFFERED": "1"}
    if launcher.device == "cpu":
        environment["DS_ACCELERATOR"] = "cpu"
    if launcher.cpus_per_task is not None:
        # Otherwise each rank would start a thread per core of the whole node.
        environment["OMP_NUM_THREADS"] = str(launcher.cpus_per_task)
    values = {
        "command": command,
        "sbatch_options": "\n".join(f"#SBATCH {option}" for option in options),
        "expected_nodes": f"{EXPECTED_NODES}={launcher.nodes}",
        "expected_ranks_per_node": f"{EXPECTED_RANKS_PER_NODE}={launcher.gpus_per_node}",
        "environment": "\n".join(f"export {key}={shlex.quote(value)}" for key, value in environment.items()),
        "run_name": shlex.quote(plan.run_name) if plan.run_name else f'"{JOB_ID_RUN_NAME}"',
        # srun does not pass the batch's --cpus-per-task on to its tasks by itself (SLURM 22.05 and later).
        "srun_options": f"--cpus-per-task={launcher.cpus_per_task}" if launcher.cpus_per_task else "",
        "python": shlex.quote(sys.executable),
        "train_script": shlex.quote(str(TRAIN_SCRIPT)),
        "overrides": " ".join(shlex.quote(override) for override in plan.overrides),
        "requeue": "1" if launcher.requeue else "0",
        "preempted_exit_code": str(int(ExitCode.PREEMPTED)),
    }
    return fill_template(TEMPLATE.read_text(), values)


def fill_template(template: str, values: Dict[str, str]) -> str:
    """Replace every {{name}}; a name without a value (or a value without a name) is a bug, not a blank."""
    used = set(re.findall(r"\{\{(\w+)\}\}", template))
    if used != set(values):
        raise RuntimeError(f"{TEMPLATE} and dstrain/slurm.py disagree on placeholders: {sorted(used ^ set(values))}")
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match.group(1)], template)


def submit(overrides: Sequence[str], dry_run: bool) -> None:
    plan = plan_job(overrides)
    launcher = plan.cfg.launcher
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise SlurmError(
            "sbatch not found on PATH: run dstrain submit on a SLURM login node (or put SLURM's bin directory "
            "on PATH); --dry-run prints the script without submitting"
        )
    try:
        sinfo = shutil.which("sinfo")
        if sinfo is None:
            raise SlurmError("sinfo not found")
        partitions = read_partitions(_slurm([sinfo, "-h", "-a", "-o", "%P|%D|%c|%G"], "sinfo"), launcher.gpu_type)
    except SlurmError as error:
        # Printing the script needs no cluster; submitting does.
        if not dry_run:
            raise
        print(f"dstrain: {error}: the partition, node and GPU checks were skipped", file=sys.stderr)
    else:
        check_cluster(launcher, partitions)
    script = render(plan, "dstrain submit " + " ".join(shlex.quote(override) for override in overrides))
    if dry_run:
        print(script, end="")
        return

    if plan.run_name:  # without it the run directory is slurm-<new job id>, which no other run can use
        check_run_dir_free(plan.run_dir(), shutil.which("squeue"))
    # Held until its run directory exists: the log is written there, and SLURM does not create directories.
    job_id = _slurm([sbatch, "--parsable", "--hold"], "sbatch", stdin=script).strip().split(";")[0]
    try:
        run_dir = plan.run_dir(job_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"slurm-{job_id}.sbatch").write_text(script)
        _slurm(["scontrol", "release", job_id], "scontrol release")
    except BaseException:
        subprocess.run(["scancel", job_id], check=False)
        raise
    shape = f"{launcher.nodes} node(s) x {launcher.gpus_per_node} rank(s)" + (
        " on CPUs" if launcher.device == "cpu" else " on GPUs"
    )
    print(f"submitted job {job_id}: {shape}" + (f", partition {launcher.partition}" if launcher.partition else ""))
    print(f"  run directory: {run_dir}")
    print(f"  log:           {run_dir / f'slurm-{job_id}.out'}")
    print(f"  script:        {run_dir / f'slurm-{job_id}.sbatch'}")


def _slurm(command: List[str], what: str, stdin: Optional[str] = None) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        # SLURM's tools put the reason on their last line, after any warnings.
        lines = done.stderr.strip().splitlines()
        message = lines[-1] if lines else f"exit code {done.returncode}"
        raise SlurmError(f"{what} failed: {message}")
    return done.stdout
