"""SLURM: the rank mapping and the rendered job script (fast), then real jobs on a real one-node SLURM cluster
(`slurm` and `slow`): preemption, requeue and resume; cancel; an allocation that does not match."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dstrain import commands
from dstrain.config import LauncherConfig
from dstrain.errors import ConfigError
from dstrain.distributed import first_host, rendezvous_from_slurm, tasks_per_node
from dstrain.slurm import check_cluster, read_partitions, time_limit_s
from slurm_cluster import FINAL_STATES, slurm_cluster  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "launch" / "slurm" / "train.sbatch"
# What the 2-task jobs train: steps heavy enough (about 0.1-0.3 s here) that a test can act between two.
RUN = ("+launcher=cpu", "trainer.max_steps=24", "scheduler.warmup_steps=2", "trainer.eval_every=0",
       "trainer.micro_batch_size=32", "+zero=2")


# ------------------------------------------------------------------------ rank mapping inside srun


def _srun_task(**changes):
    """The SLURM variables of task 3 of an 8-task step on two nodes of four."""
    environ = {
        "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
        "SLURM_NODEID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu-[007-008]",
        "SLURM_STEP_NODELIST": "gpu-[007-008]",
    }
    environ.update(changes)
    return {key: value for key, value in environ.items() if value is not None}


def test_srun_task_gets_rank_world_and_rendezvous_from_slurm():
    assert rendezvous_from_slurm(_srun_task()) == {
        "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu-007", "MASTER_PORT": str(10000 + 123456 % 50000),
    }


def test_master_port_differs_between_jobs_and_stays_in_range():
    ports = {int(rendezvous_from_slurm(_srun_task(SLURM_JOB_ID=str(job)))["MASTER_PORT"]) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= port < 60000 for port in ports)


def test_other_launchers_and_the_batch_shell_are_left_alone():
    assert rendezvous_from_slurm(_srun_task(RANK="5")) == {}  # deepspeed or torchrun under srun
    assert rendezvous_from_slurm(_srun_task(SLURM_STEP_ID=None)) == {}  # the batch script has SLURM_PROCID too
    assert rendezvous_from_slurm({"PATH": "/usr/bin"}) == {}


@pytest.mark.parametrize(
    "nodelist,first",
    [("vm", "vm"), ("node1,node2", "node1"), ("gpu-[007-009,012],cpu1", "gpu-007"), ("a[3,1-2]", "a3"),
     ("rack[2-3]-n[01-04]", "rack2-n01"), ("x[10-11],y[1-2]", "x10")],
)
def test_first_host_of_a_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]


def test_uneven_ranks_per_node_are_refused():
    with pytest.raises(ConfigError, match=r"uneven number of ranks per node \(3,2\).*--ntasks-per-node"):
        rendezvous_from_slurm(_srun_task(SLURM_STEP_NUM_TASKS="5", SLURM_STEP_TASKS_PER_NODE="3,2"))


def test_an_allocation_that_differs_from_the_submitted_one_is_refused():
    environ = _srun_task(DSTRAIN_EXPECTED_NODES="2", DSTRAIN_EXPECTED_RANKS_PER_NODE="8")
    with pytest.raises(ConfigError, match=r"runs 2 node\(s\) x 4 rank\(s\), but it was submitted for "
                                          r"launcher.nodes=2 x launcher.gpus_per_node=8 \(world size 16\)"):
        rendezvous_from_slurm(environ)
    assert rendezvous_from_slurm(_srun_task(DSTRAIN_EXPECTED_NODES="2", DSTRAIN_EXPECTED_RANKS_PER_NODE="4"))


def test_gpus_bound_per_task_are_refused():
    with pytest.raises(ConfigError, match=r"sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\) for 4 ranks.*--gpu-bind"):
        rendezvous_from_slurm(_srun_task(CUDA_VISIBLE_DEVICES="3"))
    assert rendezvous_from_slurm(_srun_task(CUDA_VISIBLE_DEVICES="0,1,2,3"))


# --------------------------------------------------------------------------- the rendered script


def _dstrain(tmp_path, *args):
    """The real `dstrain` console script, as a user types it, on a machine without SLURM's commands."""
    env = dict(os.environ, PATH=str(tmp_path / "no-slurm-here"))
    return subprocess.run([str(Path(sys.executable).parent / "dstrain"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _submit(tmp_path, monkeypatch, capsys, *overrides, dry_run=True):
    """`dstrain submit` in this process with no SLURM on PATH: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    try:
        commands.main(["submit", *(["--dry-run"] if dry_run else []), *overrides])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def _sbatch_options(script):
    return re.findall(r"^#SBATCH (.*)$", script, re.M)


def test_dry_run_prints_a_script_that_srun_starts_the_ranks_with(tmp_path):
    done = _dstrain(tmp_path, "submit", "--dry-run", *RUN, f"run.root={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert _sbatch_options(script) == [
        "--job-name=dstrain", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--signal=USR1@300",
        "--requeue", "--open-mode=append", f"--output={tmp_path}/out/slurm-%j/slurm-%j.out", f"--chdir={tmp_path}",
    ]
    srun = next(line for line in script.splitlines() if line.startswith("srun ")).split()
    assert srun[:2] == ["srun", "--cpus-per-task=1"] and Path(srun[2]).samefile(sys.executable)
    assert srun[3:] == [f"{REPO}/launch/train.py", *RUN, f"run.root={tmp_path}/out", '"run.name=${RUN_NAME}"']
    assert 'RUN_NAME="slurm-${SLURM_JOB_ID}"' in script and "REQUEUE=1" in script
    assert "export DS_ACCELERATOR=cpu" in script and "export OMP_NUM_THREADS=1" in script
    assert "DSTRAIN_EXPECTED_NODES=1 DSTRAIN_EXPECTED_RANKS_PER_NODE=2" in script
    assert "ssh" not in script.replace("no ssh", "") and "pdsh" not in script.replace("no pdsh", "")
    assert "sinfo not found: the partition, node and GPU checks were skipped" in done.stderr
    assert not (tmp_path / "out").exists()
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_gpu_job_with_every_launcher_setting(tmp_path, monkeypatch, capsys):
    code, script, _ = _submit(
        tmp_path, monkeypatch, capsys, "+model=125m", "+launcher=gpu8", "launcher.nodes=4", "launcher.gpu_type=a100",
        "launcher.partition=gpu", "launcher.account=proj1", "launcher.qos=high", "launcher.time=1-12:00:00",
        "launcher.mem=0", "launcher.signal=TERM", "launcher.signal_lead_s=600", "launcher.requeue=false",
        "launcher.job_name=llama", 'launcher.extra_sbatch=["--constraint=h100","--mail-type=END"]', "run.name=big",
    )
    assert code == 0
    assert _sbatch_options(script) == [
        "--job-name=llama", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=a100:8", "--cpus-per-task=8",
        "--mem=0", "--partition=gpu", "--account=proj1", "--qos=high", "--time=1-12:00:00", "--signal=TERM@600",
        "--no-requeue", "--open-mode=append", f"--output={tmp_path}/outputs/big/slurm-%j.out", f"--chdir={tmp_path}",
        f"--comment=dstrain:{tmp_path}/outputs/big",
        "--constraint=h100", "--mail-type=END",  # a list on the command line replaces gpu8.yaml's [--exclusive]
    ]
    assert "RUN_NAME=big" in script and "REQUEUE=0" in script and "DS_ACCELERATOR" not in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.startswith(f"srun --cpus-per-task=8 {sys.executable} ") and "run.name=big" not in srun
    assert srun.endswith(
        " launcher.job_name=llama 'launcher.extra_sbatch=[\"--constraint=h100\",\"--mail-type=END\"]' "
        '"run.name=${RUN_NAME}"'
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["launcher.signal_lead_s=60"], r"launcher.signal_lead_s=60 must exceed trainer.stop_grace_s=120"),
        (["launcher.time=00:04:00"], r"launcher.time=00:04:00 is not longer than launcher.signal_lead_s=300"),
        (["launcher.time=soon"], r"launcher.time='soon' is not a SLURM time limit"),
        (['launcher.extra_sbatch=["--nodes=2"]'],
         r"extra_sbatch sets --nodes, which dstrain submit writes from launcher.nodes: set launcher.nodes instead$"),
        (["launcher.extra_sbatch=[-N2]"], r"extra_sbatch sets -N2, which dstrain submit writes from launcher.nodes"),
        (['launcher.extra_sbatch=["--gres=gpu:4"]'], r"sets --gres, which dstrain submit writes from launcher.gpus"),
        (['launcher.extra_sbatch=["--output=x.log"]'],
         r"sets --output, which dstrain submit writes from run.root and run.name: remove it$"),
        (["launcher.extra_sbatch=[exclusive]"], r"item 'exclusive' is not an sbatch option: write it as --"),
        (["launcher.device=tpu"], r"launcher.device='tpu' is not one of \['gpu', 'cpu'\]"),
        (["launcher.signal=HUP"], r"launcher.signal='HUP' is not one of \['USR1', 'TERM'\]"),
        (["launcher.nodes=0"], r"launcher.nodes=0 must be at least 1"),
        (["launcher.device=cpu", "launcher.gpu_type=a100"], r"launcher.gpu_type is set, but launcher.device=cpu"),
        (["trainer.resume=never"], r"trainer.resume=never cannot resume a requeued job.*launcher.requeue=false"),
        (["trainer.resume=must"], r"trainer.resume=must needs the run to continue: add run.name="),
        (["trainer.resume=must", "run.name=slurm-4242"],
         r"trainer.resume=must, but \S+/outputs/slurm-4242/checkpoints holds no complete checkpoint"),
        (["run.name=my run"], r"holds a space or a %, which SLURM's --output cannot take"),
        (["+zero=7"], r"Could not find 'zero/7' Available options in 'zero': 0 1 2 2_offload 3 3_offload$"),
        (["model.bogus=1"], r"Could not override 'model.bogus'"),
        (["precision.grad_accum_dtype=fp32"], r"precision.grad_accum_dtype is a bf16-only option"),
    ],
)
def test_a_config_that_cannot_work_is_one_line_and_nothing_is_submitted(
    tmp_path, monkeypatch, capsys, overrides, message
):
    code, out, err = _submit(tmp_path, monkeypatch, capsys, *overrides, dry_run=False)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstrain: config error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_resume_must_finds_the_run_it_continues(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "outputs" / "slurm-4242" / "checkpoints" / "step_00000008" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    code, script, _ = _submit(tmp_path, monkeypatch, capsys, "trainer.resume=must", "run.name=slurm-4242")
    assert code == 0 and "RUN_NAME=slurm-4242" in script and "trainer.resume=must" in script


def test_missing_sbatch_is_a_clear_error(tmp_path):
    done = _dstrain(tmp_path, "submit", *RUN)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "dstrain: slurm error: sbatch not found on PATH: run dstrain submit on a SLURM login node (or put SLURM's bin "
        "directory on PATH); --dry-run prints the script without submitting\n"
    )


def test_partition_is_checked_with_sinfo_before_submitting(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\nprintf 'cpu*|10|64|(null)\\ngpu|4|96|gpu:h100:8(S:0-1)\\n'\n")
    (fake / "sinfo").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(SystemExit):
        commands.main(["submit", "--dry-run", "launcher.partition=gpux"])
    assert capsys.readouterr().err.strip() == (
        "dstrain: config error: launcher.partition=gpux: no partition 'gpux' here (sinfo lists: cpu, gpu)"
    )
    commands.main(["submit", "--dry-run", "launcher.partition=gpu", "launcher.gpus_per_node=8"])
    out, err = capsys.readouterr()
    assert "#SBATCH --partition=gpu" in out and err == ""


def test_cluster_checks():
    sinfo = "cpu*|10|64|(null)\ngpu|3|96|gpu:h100:8(S:0-1)\ngpu|1|48+|gpu:a100:4,gpu:h100:2\n"
    partitions = read_partitions(sinfo, None)
    assert {name: (p.nodes, p.cpus, p.gpus, p.default) for name, p in partitions.items()} == {
        "cpu": (10, 64, 0, True), "gpu": (4, 96, 8, False)
    }
    assert read_partitions("gpu|1|48|gpu:a100:4,gpu:h100:2\n", "a100")["gpu"].gpus == 4

    check_cluster(LauncherConfig(device="cpu", gpus_per_node=4, cpus_per_task=16, nodes=10), partitions)
    check_cluster(LauncherConfig(partition="gpu", gpus_per_node=8, nodes=4), partitions)
    refused = {
        r"launcher.gpus_per_node=1, but the nodes of partition cpu have at most 0 GPUs \(GRES: \(null\)\): lower "
        r"it, choose another launcher.partition, or use launcher.device=cpu for CPU ranks": {},
        r"launcher.nodes=5, but partition gpu has 4 node\(s\)": {"partition": "gpu", "nodes": 5},
        r"launcher.gpus_per_node=2 x launcher.cpus_per_task=64 needs 128 CPUs per node, but the nodes of "
        r"partition cpu have at most 64": {"device": "cpu", "gpus_per_node": 2, "cpus_per_task": 64},
        r"launcher.partition=cpu,gpux: no partition 'gpux' here \(sinfo lists: cpu, gpu\)": {"partition": "cpu,gpux"},
    }
    for message, launcher in refused.items():
        with pytest.raises(ConfigError, match=f"^{message}$"):
            check_cluster(LauncherConfig(**launcher), partitions)
    with pytest.raises(ConfigError, match=r"^launcher.partition is not set and this cluster has no default "
                                          r"partition: set launcher.partition=<one of: gpu>$"):
        check_cluster(LauncherConfig(), {"gpu": partitions["gpu"]})


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("4:00:00", 14400), ("2-0", 172800),
                                           ("1-12:30", 131400), ("1-00:00:05", 86405), ("UNLIMITED", None),
                                           ("0", None)])
def test_slurm_time_limits(value, seconds):
    assert time_limit_s(value) == seconds


# ------------------------------------------------------------------- real jobs on a local SLURM cluster


def _cluster_env(cluster):
    """The cluster's client environment, with this Python's bin (dstrain, python) first on PATH."""
    return dict(cluster.env, PATH=f"{Path(sys.executable).parent}:{cluster.env['PATH']}")


def _submit_job(cluster, tmp_path, *overrides):
    done = subprocess.run(["dstrain", "submit", *overrides, f"run.root={tmp_path / 'outputs'}"], cwd=tmp_path,
                          env=_cluster_env(cluster), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job_id = int(re.match(r"submitted job (\d+):", done.stdout).group(1))
    return job_id, tmp_path / "outputs" / f"slurm-{job_id}", done.stdout


def _steps_done(run_dir):
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def _wait_for_steps(cluster, job_id, run_dir, steps, timeout=180):
    deadline = time.monotonic() + timeout
    while len(_steps_done(run_dir)) < steps:
        info = cluster.job(job_id) or {}
        assert info.get("JobState") not in FINAL_STATES, f"job ended early: {info}\n{_log(run_dir, job_id)}"
        assert time.monotonic() < deadline, f"no {steps} steps in {timeout} s\n{_log(run_dir, job_id)}"
        time.sleep(0.02)


def _log(run_dir, job_id):
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else f"(no {path})"


def _last_losses(run_dir):
    """Per step, the loss of the attempt that got furthest: a resumed run overwrites what it repeats."""
    return {row["step"]: row["loss"] for row in _steps_done(run_dir) if "loss" in row}


@pytest.mark.slow
@pytest.mark.slurm
def test_stop_signal_requeues_the_job_and_it_resumes_with_the_uninterrupted_losses(slurm_cluster, tmp_path):
    # The uninterrupted reference runs through the plain-sbatch example, adapted on the command line as its
    # header says. The node has room for one of the two jobs at a time, so SLURM runs them one after the other.
    reference_log = tmp_path / "reference.out"
    reference = slurm_cluster.sbatch(
        "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--export=ALL,DS_ACCELERATOR=cpu",
        f"--output={reference_log}", str(EXAMPLE), *RUN, f"run.root={tmp_path / 'outputs'}", "run.name=reference",
        cwd=REPO,
    )
    job_id, run_dir, submitted = _submit_job(slurm_cluster, tmp_path, *RUN)
    assert f"run directory: {run_dir}" in submitted
    # Now, while SLURM still remembers it (MinJobAge).
    reference_info = slurm_cluster.wait_job(reference, timeout=180)
    assert reference_info["JobState"] == "COMPLETED", reference_log.read_text()
    assert "micro-batch 32 x accumulation 1 x 2 ranks" in reference_log.read_text()

    _wait_for_steps(slurm_cluster, job_id, run_dir, 3)
    slurm_cluster.signal(job_id, "USR1")  # to the job's steps, as --signal=USR1@<lead> does at the time limit
    info = slurm_cluster.wait_job(job_id, restart_count=1, timeout=240)
    log = _log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log

    stopped_at = int(re.search(r"stop signal received: saved at step (\d+)", log).group(1))
    assert 3 <= stopped_at < 24
    first, second = log.split(f"dstrain: job {job_id}, start 2")
    assert "Exited with exit code 75" in first and f"requeueing job {job_id}" in first
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in second
    assert "done: step 24 of 24" in second

    expected = _last_losses(tmp_path / "outputs" / "reference")
    assert sorted(expected) == list(range(1, 25))
    assert _last_losses(run_dir) == expected


@pytest.mark.slow
@pytest.mark.slurm
def test_scancel_cancels_and_the_job_does_not_requeue_itself(slurm_cluster, tmp_path):
    job_id, run_dir, _ = _submit_job(slurm_cluster, tmp_path, "+launcher=cpu", "trainer.max_steps=400",
                                     "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=0")
    _wait_for_steps(slurm_cluster, job_id, run_dir, 2)
    slurm_cluster.run("scancel", str(job_id))
    slurm_cluster.wait_job(job_id, timeout=60)
    # A job the script requeued would be PENDING again within KillWait; give it that long and a bit.
    time.sleep(slurm_cluster.kill_wait + 2)
    info = slurm_cluster.job(job_id)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), _log(run_dir, job_id)
    assert "requeueing" not in _log(run_dir, job_id)


@pytest.mark.slow
@pytest.mark.slurm
def test_an_allocation_changed_on_the_sbatch_command_line_fails_before_training(slurm_cluster, tmp_path):
    run_dir = tmp_path / "outputs" / "changed"
    run_dir.mkdir(parents=True)
    done = subprocess.run(["dstrain", "submit", "--dry-run", *RUN, f"run.root={tmp_path / 'outputs'}",
                           "run.name=changed"], cwd=tmp_path, env=_cluster_env(slurm_cluster), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    (tmp_path / "job.sbatch").write_text(done.stdout)
    job_id = slurm_cluster.sbatch("--ntasks-per-node=1", str(tmp_path / "job.sbatch"), cwd=tmp_path)
    info = slurm_cluster.wait_job(job_id, timeout=120)
    log = _log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert ("dstrain: config error: the job step runs 1 node(s) x 1 rank(s), but it was submitted for "
            "launcher.nodes=1 x launcher.gpus_per_node=2 (world size 2)") in log
    assert not (run_dir / "checkpoints").exists() and "requeueing" not in log


@pytest.mark.slow
@pytest.mark.slurm
def test_launcher_settings_are_checked_against_the_real_sinfo(slurm_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key in ("PATH", "SLURM_CONF"):
        monkeypatch.setenv(key, slurm_cluster.env[key])
    refused = [
        ("launcher.partition=gpu", "launcher.partition=gpu: no partition 'gpu' here (sinfo lists: debug)"),
        ("launcher.nodes=2", "launcher.nodes=2, but partition debug has 1 node(s)"),
        ("launcher.device=gpu", "launcher.gpus_per_node=2, but the nodes of partition debug have at most 0 GPUs"),
    ]
    for override, message in refused:
        with pytest.raises(SystemExit):
            commands.main(["submit", "--dry-run", "+launcher=cpu", override])
        assert message in capsys.readouterr().err
    commands.main(["submit", "--dry-run", "+launcher=cpu", "launcher.partition=debug"])
    out, err = capsys.readouterr()
    assert "#SBATCH --partition=debug" in out and err == ""
