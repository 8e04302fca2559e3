"""Tracking for real: W&B in offline mode read back from its run files, TensorBoard event files read back
with TensorBoard's own EventAccumulator, Hydra multirun sweeps, and the command a W&B sweep agent runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TRAIN, _env, launch_ranks, start_ranks_without_a_launcher, train
from wandb_offline import find_runs, read_history

pytestmark = pytest.mark.slow

SHORT = ("scheduler.warmup_steps=1", "trainer.eval_every=4", "logger.log_every=2")


def _metrics_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _offline_env(**extra) -> dict:
    return dict(_env(), WANDB_MODE="offline", WANDB_SILENT="true", **extra)


def _train_tracked(tmp_path, *overrides, name, env, ranks=2, check=True):
    command = [*launch_ranks(ranks), str(TRAIN), *overrides, f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
    completed = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=600)
    if check and completed.returncode != 0:
        pytest.fail(f"training failed ({completed.returncode}):\n{completed.stdout[-6000:]}")
    return completed


def test_wandb_and_tensorboard_log_one_run_that_a_resumed_job_continues(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = ("+logger=[wandb,tensorboard]", "logger.wandb.project=tracking", "logger.wandb.tags=[a,b]")
    _train_tracked(tmp_path, *SHORT, *loggers, "trainer.max_steps=8", "optim.lr=0.002", name="tracked",
                   env=_offline_env())
    resumed = _train_tracked(tmp_path, *SHORT, *loggers, "trainer.max_steps=12", "optim.lr=0.002", name="tracked",
                             env=_offline_env())
    assert "at step 8" in resumed.stdout
    run_dir = tmp_path / "outputs" / "tracked"

    runs = find_runs(run_dir / "wandb")
    assert len(runs) == 2, "one offline run directory per job"
    assert runs[0].run_id == runs[1].run_id, "the resumed job must log into the same W&B run"
    assert runs[0].project == "tracking" and runs[0].tags == ["a", "b"] and runs[0].name == "tracked"
    config = runs[0].config
    assert config["optim"]["lr"] == 0.002 and config["trainer"]["max_steps"] == 8 and config["zero"]["stage"] == 0

    history = read_history(run_dir / "wandb", runs[0].run_id)
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == list(range(1, 13)), "steps continue after the resume, they do not restart"
    metrics_file = {}
    for row in _metrics_rows(run_dir):
        metrics_file.setdefault(row["step"], {}).update(row)
    for step in range(1, 13):
        assert by_step[step]["loss"] == metrics_file[step]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "memory_gb/rank0", "memory_gb/rank1"):
        assert key in by_step[2], key
    assert "eval_loss" in by_step[4] and "eval_perplexity" in by_step[12]
    assert by_step[8]["checkpoint_step"] == 8

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = {event.step: event.value for event in events.Scalars("loss")}
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] == pytest.approx(metrics_file[12]["loss"])
    assert "eval_loss" in events.Tags()["scalars"]


@pytest.mark.parametrize("api_key", [None, "0" * 40], ids=["no-api-key", "network-down"])
def test_wandb_online_trouble_falls_back_to_offline_and_training_goes_on(tmp_path, api_key):
    # Nothing listens on port 9: with a key, W&B retries until logger.wandb.init_timeout_s runs out.
    env = dict(_env(), WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    if api_key:
        env["WANDB_API_KEY"] = api_key
    run = _train_tracked(tmp_path, *SHORT, "+logger=wandb", "logger.wandb.mode=online",
                         "logger.wandb.init_timeout_s=5", "trainer.max_steps=4", name="offline", env=env, ranks=1)
    warnings = [line for line in run.stdout.splitlines() if "W&B could not start online" in line]
    assert len(warnings) == 1, run.stdout[-4000:]
    assert "wandb sync" in warnings[0]
    wandb_dir = tmp_path / "outputs" / "offline" / "wandb"
    # The failed online attempt may leave its own run-* directory; the steps are in the offline one.
    (offline,) = [run for run in find_runs(wandb_dir) if run.path.parent.name.startswith("offline-run-")]
    assert offline.steps == [1, 2, 3, 4]


def test_multirun_runs_one_distributed_job_per_point_grouped_in_wandb(tmp_path):
    run = _train_tracked(
        tmp_path, "-m", "optim.lr=0.001,0.003", "trainer.max_steps=3", "scheduler.warmup_steps=1",
        "trainer.eval_every=0", "+logger=wandb", name="sweep", env=_offline_env(),
    )
    assert run.stdout.count("x 2 ranks)") == 2, run.stdout[-4000:]
    run_dirs = sorted(path for path in (tmp_path / "outputs" / "sweep").iterdir() if (path / "wandb").is_dir())
    assert len(run_dirs) == 2, "one run directory per point"
    runs = [find_runs(path / "wandb")[0] for path in run_dirs]
    assert runs[0].run_id != runs[1].run_id
    assert runs[0].group == runs[1].group and runs[0].group.startswith("sweep-")
    assert sorted(run.config["optim"]["lr"] for run in runs) == [0.001, 0.003]


def test_the_command_a_wandb_sweep_agent_runs_trains_with_the_swept_values(tmp_path):
    """Builds the agent's command exactly as wandb's agent does (wandb/wandb_agent.py, _command_run) from
    conf/sweep/lr_zero.yaml and one point of its parameters, then runs it: no W&B server needed."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = yaml.safe_load((REPO / "conf" / "sweep" / "lr_zero.yaml").read_text())
    assert set(sweep["parameters"]) == {"optim.lr", "zero"}
    point = {"args": {"optim.lr": {"value": 0.0007}, "zero": {"value": "3"}}, "program": sweep["program"]}
    sweep_vars = sweep_utils.create_sweep_command_args(point)
    sweep_vars.update(env=["/usr/bin/env"], program=[point["program"]], interpreter=["python"])
    command = []
    for part in map(str, sweep_utils.create_sweep_command(sweep["command"])):
        command += sweep_vars.get(part[2:-1], []) if part.startswith("${") and part.endswith("}") else [part]
    assert command[:4] == ["/usr/bin/env", "deepspeed", "launch/train.py", "+logger=wandb"]
    assert command[4:] == ["optim.lr=0.0007", "zero=3"]

    short = ["trainer.max_steps=2", "scheduler.warmup_steps=1", "trainer.eval_every=0",
             f"run.root={tmp_path / 'outputs'}", "run.name=point"]
    # LOCAL_SIZE=2: DeepSpeed's launcher sees two CPU "accelerators" and starts two ranks, as on a 2-GPU node.
    env = _offline_env(WANDB_RUN_ID="agentrun01", LOCAL_SIZE="2")
    completed = subprocess.run([*command, *short], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-6000:]
    assert "x 2 ranks)" in completed.stdout and "lr=0.0007" in completed.stdout
    run_dir = tmp_path / "outputs" / "point"
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert composed["optim"]["lr"] == 0.0007 and composed["zero"]["stage"] == 3
    (run,) = find_runs(run_dir / "wandb")
    assert run.run_id == "agentrun01", "the agent's run, not a new one"
    assert run.config["optim"]["lr"] == 0.0007


def test_ranks_with_different_configs_are_stopped(tmp_path):
    """The per-rank `${now:...}` trap: each process resolves its own run directory."""
    processes = start_ranks_without_a_launcher(tmp_path, [
        ["trainer.max_steps=2", "scheduler.warmup_steps=1", f"run.root={tmp_path / 'outputs'}", f"run.name=run-{rank}"]
        for rank in range(2)
    ])
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 2, output[-3000:]
        assert "the ranks composed different configs or run directories" in output
        assert "${now:...}" in output


def test_progress_bar_on_a_terminal_and_plain_lines_with_eta_elsewhere(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    overrides = ["trainer.max_steps=6", "scheduler.warmup_steps=1", "trainer.eval_every=0", "logger.log_every=2",
                 f"run.root={tmp_path / 'outputs'}"]
    controller, terminal = pty.openpty()
    # A terminal 120 columns wide, as a user's would be (a bare pty has no size).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, str(TRAIN), *overrides, "run.name=terminal"], cwd=tmp_path,
                               env=_env(), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=300) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "train: 100%" in shown and "6/6" in shown and "tokens_per_s=" in shown, shown[-3000:]
    assert "eta=" not in shown, "the bar shows the ETA; the lines need not"

    piped = train(tmp_path, *overrides[:-1], name="piped", ranks=0)
    assert "train:" not in piped.output
    step_lines = [line for line in piped.output.splitlines() if " step 2 " in f" {line} " and "loss=" in line]
    assert step_lines and "eta=" in step_lines[0], piped.output[-3000:]
