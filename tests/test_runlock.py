"""One live run per run directory (dstrain/runlock.py): the lock between real processes (fast), real 2-rank
runs contending for one directory and a SIGKILLed run's rerun (`slow`), and `dstrain submit` against jobs on
a real local SLURM cluster (`slurm`)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, STANDARD_RUN, TRAIN, _env, launch_ranks, rank_processes, train
from dstrain import commands
from dstrain.errors import ConfigError
from dstrain.runlock import LOCK_FILE, RunDirInUse, RunLock, hold_run_dir, live_holder, live_jobs_for
from slurm_cluster import slurm_cluster  # noqa: F401 - a fixture

HOLD = (
    "import sys\n"
    "from dstrain.runlock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def _holding_process(run_dir):
    """Another process that takes the lock on run_dir and keeps it until its stdin closes."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline() == "held\n"
    return process


# --------------------------------------------------------------------------------- the lock itself


def test_a_second_process_is_refused_with_the_holder_named_until_the_holder_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holding_process(run_dir)
    try:
        assert live_holder(run_dir)["pid"] == holder.pid
        with pytest.raises(RunDirInUse, match=rf"^the run directory {run_dir} is in use by another live training "
                                              rf"run \(host \S+, pid {holder.pid}, since \S+, command: .*\): wait "
                                              rf"for it to end, or choose another run.name$"):
            RunLock(run_dir).acquire(wait_s=0)
        assert issubclass(RunDirInUse, ConfigError)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    # Its record stays behind, but the kernel dropped its lock: the file is stale and the next run takes it.
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    assert live_holder(run_dir) is None
    with RunLock(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (run_dir / LOCK_FILE).read_text() == ""


def test_a_stale_lock_file_without_a_holder_is_taken(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "gone", "pid": 1, "started": "yesterday"}\n')
    assert live_holder(tmp_path) is None
    lock = RunLock(tmp_path)
    assert lock.acquire(wait_s=0)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / LOCK_FILE).write_text("not json")
    with RunLock(tmp_path):
        pass


def test_a_released_lock_lets_another_process_in(tmp_path):
    with hold_run_dir(tmp_path, rank=0):  # no process group: a world of one
        assert live_holder(tmp_path)["pid"] == os.getpid()
    holder = _holding_process(tmp_path)
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def test_other_ranks_and_probes_create_nothing(tmp_path):
    run_dir = tmp_path / "not-yet"
    with hold_run_dir(run_dir, rank=1):
        pass
    assert live_holder(run_dir) is None
    assert not run_dir.exists()


def test_squeue_lines_for_the_run_directory():
    output = (
        "101|RUNNING|dstrain:/data/outputs/a\n"
        "102|PENDING|dstrain:/data/outputs/a\n"
        "103|RUNNING|dstrain:/data/outputs/a-b\n"
        "104|CANCELLED|dstrain:/data/outputs/a\n"
        "105|RUNNING|(null)\n"
    )
    assert live_jobs_for(output, Path("/data/outputs/a")) == [("101", "RUNNING"), ("102", "PENDING")]


# ---------------------------------------------------------------------------------- dstrain submit


def test_the_script_marks_a_named_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    commands.main(["submit", "--dry-run", "run.name=mine"])
    assert f"#SBATCH --comment=dstrain:{tmp_path}/outputs/mine\n" in capsys.readouterr().out
    commands.main(["submit", "--dry-run"])  # slurm-<job id>: no other run can use it
    assert "--comment" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        commands.main(["submit", "--dry-run", 'launcher.extra_sbatch=["--comment=mine"]'])
    assert "sets --comment, which dstrain submit writes from run.root and run.name" in capsys.readouterr().err


def test_submit_refuses_a_run_directory_a_live_process_holds(tmp_path, monkeypatch, capsys):
    holder = _holding_process(tmp_path / "outputs" / "busy")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, script in {"sbatch": "echo should-not-run >&2; exit 1", "sinfo": "echo 'debug*|1|4|(null)'"}.items():
        (fake / tool).write_text(f"#!/bin/sh\n{script}\n")
        (fake / tool).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(fake))
    try:
        with pytest.raises(SystemExit) as exit:
            commands.main(["submit", "+launcher=cpu", "run.name=busy"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the run directory {tmp_path}/outputs/busy is in use by a live training run (host" in err
    assert f"pid {holder.pid}," in err and "should-not-run" not in err


# ------------------------------------------------------------------------------- real 2-rank runs

# Long enough that the second launch (about 15 s of startup) meets the first still training.
LONG_RUN = (*STANDARD_RUN[1:], "trainer.max_steps=100000", "trainer.save_every=0")


def _start(tmp_path, *overrides, name):
    command = [*launch_ranks(2), str(TRAIN), *overrides, f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
    return subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {path} appeared:\n{process.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _steps(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_run_in_a_live_run_directory_exits_2_naming_the_holder_and_the_first_trains_on(tmp_path):
    first = _start(tmp_path, *LONG_RUN, name="busy")
    run_dir = tmp_path / "outputs" / "busy"
    try:
        _wait_for(run_dir / "metrics.jsonl", first)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        rank0 = next(rank for rank in rank_processes(first) if "--local_rank=0" in rank.cmdline())
        assert holder["pid"] == rank0.pid

        saved_config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = train(tmp_path, *LONG_RUN, "trainer.seed=7", name="busy", check=False, timeout=300)
        assert second.returncode == 2, second.output[-4000:]
        assert (run_dir / ".hydra" / "config.yaml").read_text() == saved_config, "the refused run wrote its config"
        command = holder["command"]
        assert len(command) > 200  # shortened in the message; whole in the lock file
        refusals = [line for line in second.output.splitlines() if line.startswith("dstrain: config error:")]
        assert refusals == [
            f"dstrain: config error: the run directory {run_dir} is in use by another live training run "
            f"(host {holder['host']}, pid {rank0.pid}, since {holder['started']}, command: {command[:197]}...): "
            f"wait for it to end, or choose another run.name"
        ], second.output[-4000:]
        # Refused before any model: the second run wrote nothing to the first one's log.
        assert (run_dir / "train.log").read_text().count("run directory:") == 1

        steps_at_refusal = len(_steps(run_dir))
        deadline = time.monotonic() + 120
        while len(_steps(run_dir)) < steps_at_refusal + 3:
            assert first.poll() is None and time.monotonic() < deadline, "the first run stopped training"
            time.sleep(0.05)
        for rank in rank_processes(first):
            rank.send_signal(signal.SIGUSR1)
        output, _ = first.communicate(timeout=300)
        assert first.returncode == 75, output[-4000:]
        assert re.search(r"stop signal received: saved at step \d+", output)
        assert live_holder(run_dir) is None and (run_dir / LOCK_FILE).read_text() == ""
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


@pytest.mark.slow
def test_a_sigkilled_run_leaves_no_lock_that_blocks_its_rerun(tmp_path):
    overrides = (*STANDARD_RUN, "trainer.save_every=4")
    killed = _start(tmp_path, *overrides, name="killed")
    run_dir = tmp_path / "outputs" / "killed"
    _wait_for(run_dir / "checkpoints" / "step_00000004" / "manifest.json", killed)
    ranks = rank_processes(killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    # Killed is not yet gone: the kernel lets go of the lock when the process has finished exiting.
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert len(ranks) == 2 and not alive
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"]  # the dead holder's record is still there
    assert live_holder(run_dir) is None

    rerun = train(tmp_path, *overrides, name="killed")
    assert int(re.search(r"resumed from \S+ at step (\d+)", rerun.output).group(1)) >= 4
    assert "done: step 24 of 24" in rerun.output


@pytest.mark.slow
def test_multirun_points_in_one_directory_each_take_and_release_the_lock(tmp_path):
    # Both points train, one after the other in one process, in the same directory: the second could not
    # lock it had the first not released it.
    run = train(tmp_path, "-m", "trainer.max_steps=2,3", "scheduler.warmup_steps=1", "trainer.eval_every=0",
                "hydra.sweep.subdir=same", ranks=0, name="sweep", check=False, timeout=300)
    assert run.returncode == 0, run.output[-4000:]
    run_dir = tmp_path / "outputs" / "same"
    assert "done: step 2 of 2" in run.output and "resumed from" in run.output and "done: step 3 of 3" in run.output, run.output[-4000:]
    assert (run_dir / LOCK_FILE).read_text() == ""


# ------------------------------------------------------------------- dstrain submit on a real SLURM

def _cluster_env(cluster):
    return dict(cluster.env, PATH=f"{Path(sys.executable).parent}:{cluster.env['PATH']}")


def _dstrain_submit(cluster, tmp_path, *overrides):
    return subprocess.run(["dstrain", "submit", "+launcher=cpu", *overrides, f"run.root={tmp_path / 'outputs'}"],
                          cwd=tmp_path, env=_cluster_env(cluster), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_refuses_while_a_job_for_the_run_directory_is_pending_or_running_and_accepts_once_it_is_gone(
    slurm_cluster, tmp_path
):
    # Pending for an hour: it holds the run directory without training.
    first = _dstrain_submit(slurm_cluster, tmp_path, "run.name=busy", 'launcher.extra_sbatch=["--begin=now+1hour"]')
    assert first.returncode == 0, first.stderr
    job_id = re.match(r"submitted job (\d+):", first.stdout).group(1)
    run_dir = tmp_path / "outputs" / "busy"
    second = None
    try:
        refused = _dstrain_submit(slurm_cluster, tmp_path, "run.name=busy")
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout
        assert refused.stderr == (
            f"dstrain: config error: job {job_id} (PENDING) already trains in the run directory {run_dir}: "
            f"scancel {job_id}, or choose another run.name\n"
        )
        slurm_cluster.run("scancel", job_id)
        slurm_cluster.wait_job(int(job_id), timeout=60)
        accepted = _dstrain_submit(slurm_cluster, tmp_path, "run.name=busy", "trainer.max_steps=100000")
        assert accepted.returncode == 0, accepted.stderr
        second = re.match(r"submitted job (\d+):", accepted.stdout).group(1)
        # Once it runs, it is refused as RUNNING.
        slurm_cluster.wait_job(int(second), states={"RUNNING"}, timeout=60)
        refused = _dstrain_submit(slurm_cluster, tmp_path, "run.name=busy")
        assert refused.returncode == 2 and refused.stderr == (
            f"dstrain: config error: job {second} (RUNNING) already trains in the run directory {run_dir}: "
            f"scancel {second}, or choose another run.name\n"
        ), refused.stderr
    finally:
        for job in (job_id, second):
            if job:
                slurm_cluster.run("scancel", job, check=False)
