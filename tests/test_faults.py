"""Faults injected into real 2-rank runs: SIGKILL, stop signals, damaged and partial checkpoints."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import TRAIN, _env, _free_port, train

pytestmark = [pytest.mark.slow, pytest.mark.faults]

# Steps heavy enough (about 0.1-0.3 s here) that a test can act between two of them.
RUN = ("trainer.max_steps=24", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.micro_batch_size=32")


def _start(tmp_path, *overrides, name, ranks=2):
    command = [
        "deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(TRAIN), *overrides,
        f"run.root={tmp_path / 'outputs'}", f"run.name={name}",
    ]
    return subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {path} appeared:\n{process.stdout.read()[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.005)


def _ranks(process):
    return [child for child in psutil.Process(process.pid).children(recursive=True) if "train.py" in " ".join(child.cmdline()) and "--local_rank" in " ".join(child.cmdline())]


def _last_losses(run_dir):
    """Per step, the loss of the attempt that got furthest: a restarted run overwrites what it repeats."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    return losses


def _final_weights(run_dir, step):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


@pytest.mark.parametrize(
    "zero,precision,extra",
    [
        ("1", "fp32", ()),
        ("2", "fp32", ()),
        ("3", "fp32", ()),
        ("1", "bf16", ()),
        ("2", "bf16", ()),
        ("3", "bf16", ()),
        ("2", "fp32", ("trainer.gradient_accumulation_steps=2", "trainer.micro_batch_size=16")),
        ("3", "fp32", ("+peft=lora",)),
    ],
    ids=["z1-fp32", "z2-fp32", "z3-fp32", "z1-bf16", "z2-bf16", "z3-bf16", "z2-accum", "z3-lora"],
)
def test_sigkill_then_resume_repeats_the_uninterrupted_run_exactly(tmp_path, zero, precision, extra):
    overrides = (*RUN, f"+zero={zero}", f"+precision={precision}", "trainer.save_every=8", *extra)
    reference = train(tmp_path, *overrides, name="reference")

    process = _start(tmp_path, *overrides, name="killed")
    run_dir = tmp_path / "outputs" / "killed"
    _wait_for(run_dir / "checkpoints" / "step_00000008" / "manifest.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(_last_losses(run_dir))
    assert killed_at < 24, "the run finished before it could be killed"

    resumed = train(tmp_path, *overrides, name="killed")
    assert "at step 8" in resumed.output
    expected, got = reference.losses(), _last_losses(run_dir)
    assert [got[step] for step in range(9, 25)] == [expected[step] for step in range(9, 25)]

    final, reference_final = _final_weights(run_dir, 24), _final_weights(reference.run_dir, 24)
    assert final.keys() == reference_final.keys()
    for name, tensor in reference_final.items():
        assert torch.equal(final[name], tensor), name


def test_stop_signal_to_one_rank_stops_all_at_one_step_and_resume_continues(tmp_path):
    overrides = (*RUN, "+zero=2", "trainer.save_every=100")
    reference = train(tmp_path, *overrides, name="reference")

    process = _start(tmp_path, *overrides, name="preempted")
    run_dir = tmp_path / "outputs" / "preempted"
    _wait_for(run_dir / "metrics.jsonl", process)
    ranks = _ranks(process)
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-4000:]
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    stopped_at = json.loads((saved[0] / "manifest.json").read_text())["step"]
    assert stopped_at < 24
    assert "stop signal received" in output

    resumed = train(tmp_path, *overrides, name="preempted")
    assert f"at step {stopped_at}" in resumed.output
    expected, got = reference.losses(), _last_losses(run_dir)
    assert [got[step] for step in range(1, 25)] == [expected[step] for step in range(1, 25)]


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    overrides = ("trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=6")
    first = train(tmp_path, *overrides, name="damaged")
    newest = first.run_dir / "checkpoints" / "step_00000012"
    damaged_file = newest / "mp_rank_00_model_states.pt"
    with open(damaged_file, "r+b") as handle:
        handle.truncate(damaged_file.stat().st_size // 2)

    explicit = train(tmp_path, *overrides, f"trainer.resume={newest}", name="damaged", check=False)
    assert explicit.returncode == 2
    assert "the checkpoint is damaged" in explicit.output and damaged_file.name in explicit.output

    resumed = train(tmp_path, *overrides, name="damaged")
    assert f"skipping checkpoint {newest}" in resumed.output and "the manifest says" in resumed.output
    assert "at step 6" in resumed.output
    assert _last_losses(resumed.run_dir) == first.losses()


def test_partial_save_is_never_loaded_and_is_cleared_by_the_next_save(tmp_path):
    overrides = ("trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=6")
    first = train(tmp_path, *overrides, name="partial")
    checkpoints = first.run_dir / "checkpoints"
    # What a save cut short leaves: some of the files of a newer step, no manifest.
    staging = checkpoints / ".staging-step_00000018"
    staging.mkdir()
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    longer = ("trainer.max_steps=18", *overrides[1:])
    resumed = train(tmp_path, *longer, name="partial")
    assert "at step 12" in resumed.output
    assert not staging.exists()
    assert (checkpoints / "step_00000018" / "manifest.json").is_file()
    assert (checkpoints / "latest").read_text() == "step_00000018"
    assert "changed settings: trainer.max_steps: 12 -> 18" in resumed.output


def test_retention_keeps_the_newest_and_every_kth(tmp_path):
    run = train(
        tmp_path, "trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=2",
        "trainer.keep_last=2", "trainer.keep_every=4",
    )
    kept = sorted(path.name for path in (run.run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000008", "step_00000010", "step_00000012"]


@pytest.mark.parametrize("zero", ["1", "2", "3"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size(tmp_path, zero, before, after):
    """The global batch stays 32 (micro-batch 32 / ranks), so every step reads the same blocks before and
    after; only the order of floating-point reductions changes."""
    common = ("trainer.max_steps=16", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=8",
              f"+zero={zero}")
    micro = {1: "trainer.micro_batch_size=32", 2: "trainer.micro_batch_size=16"}
    reference = train(tmp_path, *common, micro[before], name="reference", ranks=before)

    process = _start(tmp_path, *common, micro[before], name="moved", ranks=before)
    run_dir = tmp_path / "outputs" / "moved"
    _wait_for(run_dir / "checkpoints" / "step_00000008" / "manifest.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    resumed = train(tmp_path, *common, micro[after], name="moved", ranks=after)
    assert "to DeepSpeed's universal format" in resumed.output and "at step 8" in resumed.output
    expected, got = reference.losses(), _last_losses(run_dir)
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"
