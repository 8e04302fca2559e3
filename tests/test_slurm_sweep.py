"""Sweeps on SLURM: `python launch/train.py -m hydra/launcher=submitit_slurm ...` on a real one-node SLURM cluster
(tests/slurm_cluster.py). Hydra's submitit launcher submits one job array, one job per sweep point; in each job srun
starts two tasks, which form one two-rank world from SLURM's variables (dstrain/slurm.py). A point stopped with USR1
saves, requeues its own job and resumes from that checkpoint, while the submitting process waits for every point."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from slurm_cluster import FINAL_STATES, slurm_cluster  # noqa: F401 - a fixture

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
# Each point: one node, two ranks (tasks), one CPU each; the stop signal 300 s before the time limit.
SWEEP = ("hydra/launcher=submitit_slurm", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
         "hydra.launcher.signal_delay_s=300")
# Steps heavy enough (about 0.1-0.3 s here) that the test can stop a point between two of them.
RUN = ("trainer.max_steps=24", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.micro_batch_size=32",
       "+zero=2")


def _env(cluster, **changes) -> dict:
    """The cluster's client environment, with this Python's bin first on PATH; jobs inherit it (sbatch's
    default --export=ALL)."""
    env = dict(cluster.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **changes)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env


def _rows(run_dir: Path):
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def _point(outputs: Path, lr: str):
    found = list((outputs / "sweep").glob(f"*optim.lr={lr},*"))
    return found[0] if found else None


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"(no {path})"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_point_sweep_runs_a_two_rank_job_per_point_and_a_stopped_point_requeues_and_resumes(
    slurm_cluster, tmp_path
):
    # SUBMITIT_PREEMPT_SIGNAL: submitit's sbatch asks for --signal=USR1@<signal_delay_s>, the signal dstrain
    # stops on, rather than USR2.
    env = _env(slurm_cluster, SUBMITIT_PREEMPT_SIGNAL="USR1")
    outputs = tmp_path / "outputs"
    with open(tmp_path / "sweep.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(TRAIN), "-m", *SWEEP, *RUN, f"run.root={outputs}", "run.name=sweep",
             "optim.lr=0.001,0.0005"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        # The job array's id names submitit's folder for it (submitit_folder: <run.root>/.submitit/%j).
        deadline = time.monotonic() + 120
        while not list((outputs / ".submitit").glob("*/*_submission.sh")):
            assert driver.poll() is None, _read(tmp_path / "sweep.log")
            assert time.monotonic() < deadline, "nothing submitted in 120 s"
            time.sleep(0.2)
        [script] = (outputs / ".submitit").glob("*/*_submission.sh")
        array = script.parent.name
        first, second = f"{array}_0", f"{array}_1"
        first_log = outputs / ".submitit" / first / f"{first}_0_log.out"

        # Stop the first point after a few steps, as the time limit's signal would.
        while len(_rows(_point(outputs, "0.001") or tmp_path)) < 3:
            info = slurm_cluster.job(first) or {}
            assert info.get("JobState") not in FINAL_STATES, f"{info}\n{_read(first_log)}"
            assert time.monotonic() < deadline + 60, f"no 3 steps\n{_read(first_log)}"
            time.sleep(0.02)
        slurm_cluster.signal(first, "USR1")

        # The submitting process returns once every point has a result. Without the requeue it would wait for
        # ever (no accounting here, so submitit cannot see a job that failed): watch the first point meanwhile.
        deadline = time.monotonic() + 180
        while driver.poll() is None:
            info = slurm_cluster.job(first) or {}
            state = {key: info.get(key) for key in ("JobState", "ExitCode", "Restarts")}
            assert not (state["JobState"] in FINAL_STATES and state["Restarts"] == "0"), (
                f"the stopped point was not requeued: {state}\n{_read(first_log)}"
            )
            assert time.monotonic() < deadline, f"the sweep did not finish\n{_read(first_log)}"
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, _read(tmp_path / "sweep.log")[-6000:]

    submission = script.read_text()
    assert "#SBATCH --array=0-1" in submission and "#SBATCH --ntasks-per-node=2" in submission
    assert "#SBATCH --signal=USR1@300" in submission and "#SBATCH --partition=debug" in submission

    # One run directory per point, inside run.name's folder.
    first_dir, second_dir = _point(outputs, "0.001"), _point(outputs, "0.0005")
    assert sorted(path.name for path in (outputs / "sweep").iterdir()) == sorted([first_dir.name, second_dir.name])
    for run_dir in (first_dir, second_dir):
        train_log = (run_dir / "train.log").read_text()
        assert "micro-batch 32 x accumulation 1 x 2 ranks" in train_log and "done: step 24 of 24" in train_log
        assert sorted({row["step"] for row in _rows(run_dir) if "loss" in row}) == list(range(1, 25))
    losses = [{row["step"]: row["loss"] for row in _rows(run_dir) if "loss" in row}
              for run_dir in (first_dir, second_dir)]
    assert losses[0][1] == losses[1][1] and losses[0][24] != losses[1][24]  # same start, each its own lr

    # The first point: stopped, saved, requeued (the same job), resumed from that checkpoint, finished.
    info = slurm_cluster.wait_job(first, timeout=60)  # its results are in; the batch script may still be ending
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), info
    log = first_log.read_text()
    stopped_at = int(re.search(r"stop signal received: saved at step (\d+)", log).group(1))
    assert 3 <= stopped_at < 24
    before, after = log.split("dstrain: requeueing job", 1)
    assert "Job completed successfully" not in before
    assert f"resumed from {first_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in after
    assert "done: step 24 of 24" in after and "Job completed successfully" in after
    # The second point ran once.
    second_log = (outputs / ".submitit" / second / f"{second}_0_log.out").read_text()
    assert second_log.count("Starting with JobEnvironment") == 1 and "resumed from" not in second_log

    # Both points would log to one W&B group, named from the sweep's command line.
    groups = {OmegaConf.load(run_dir / ".hydra" / "config.yaml").logger.wandb.group
              for run_dir in (first_dir, second_dir)}
    assert len(groups) == 1 and groups.pop().startswith("sweep-")


@pytest.mark.slow
@pytest.mark.slurm
def test_a_cancelled_sweep_point_is_not_requeued(slurm_cluster, tmp_path):
    env = _env(slurm_cluster)
    outputs = tmp_path / "outputs"
    with open(tmp_path / "sweep.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(TRAIN), "-m", *SWEEP, "trainer.max_steps=400", "scheduler.warmup_steps=2",
             "trainer.eval_every=0", "trainer.save_every=0", f"run.root={outputs}", "run.name=sweep", "optim.lr=0.001"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while len(_rows(_point(outputs, "0.001") or tmp_path)) < 2:
            assert driver.poll() is None, _read(tmp_path / "sweep.log")
            assert time.monotonic() < deadline, "no 2 steps in 180 s"
            time.sleep(0.05)
        # One point: a plain job, not an array.
        [job] = [path.parent.name for path in (outputs / ".submitit").glob("*/*_submission.sh")]
        slurm_cluster.run("scancel", job)  # SIGTERM: the ranks save and exit 75, and must not requeue the job
        slurm_cluster.wait_job(job, timeout=60)
        # A requeued job would be PENDING again within KillWait; give it that long and a bit.
        time.sleep(slurm_cluster.kill_wait + 2)
        info = slurm_cluster.job(job)
        log = _read(outputs / ".submitit" / job / f"{job}_0_log.err")
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
        assert re.search(rf"dstrain: job {job} is (COMPLETING|CANCELLED), not requeued", log), log
    finally:
        # Without accounting (sacct) submitit cannot tell that the job ended, and would wait for ever.
        driver.kill()
        driver.wait()
