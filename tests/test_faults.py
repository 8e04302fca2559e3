"""Faults injected into real 2-rank runs: SIGKILL, stop signals, damaged and partial checkpoints."""

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import (
    CHECKPOINTED_RUN, STANDARD_RUN, TRAIN, _env, _free_port, copy_run, launch_ranks, rank_processes,
    start_ranks_without_a_launcher, train,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

RUN = STANDARD_RUN


def _start(tmp_path, *overrides, name, ranks=2, deepspeed_launcher=False):
    launcher = (["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port())] if deepspeed_launcher
                else launch_ranks(ranks))
    command = [*launcher, str(TRAIN), *overrides, f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
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
            # A run that hangs would otherwise outlive the test and take a core from every test after it.
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{path} never appeared")
        time.sleep(0.005)


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


# Every stage and precision, accumulation and LoRA (the README's claim). The release-only cells' code paths are
# resumed bit for bit after a SIGKILL in the default run too, by other tests: z2-fp32 by z2-accum (the same
# stage and precision, with accumulation); z1-bf16 by tests/test_resume_scenarios.py's drawn seed 2 (ZeRO-1,
# bf16, 2 ranks, SIGKILL); z3-lora by its freeze-zero3 (frozen parameters under ZeRO-3) and rslora-pissa-zero2
# (a LoRA adapter) scenarios.
@pytest.mark.parametrize(
    "zero,precision,extra",
    [
        ("1", "fp32", ()),
        pytest.param("2", "fp32", (), marks=pytest.mark.release),
        ("3", "fp32", ()),
        pytest.param("1", "bf16", (), marks=pytest.mark.release),
        ("2", "bf16", ()),
        ("3", "bf16", ()),
        ("2", "fp32", ("trainer.gradient_accumulation_steps=2", "trainer.micro_batch_size=16")),
        pytest.param("3", "fp32", ("+peft=lora",), marks=pytest.mark.release),
    ],
    ids=["z1-fp32", "z2-fp32", "z3-fp32", "z1-bf16", "z2-bf16", "z3-bf16", "z2-accum", "z3-lora"],
)
def test_sigkill_then_resume_repeats_the_uninterrupted_run_exactly(tmp_path, shared_run, zero, precision, extra):
    # trainer.save_every changes no loss, so the reference is the shared uninterrupted run.
    reference = shared_run(*RUN, f"+zero={zero}", f"+precision={precision}", *extra)
    overrides = (*RUN, f"+zero={zero}", f"+precision={precision}", *extra, "trainer.save_every=8")

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


def test_stop_signal_to_one_rank_stops_all_at_one_step_and_resume_continues(tmp_path, shared_run):
    reference = shared_run(*RUN, "+zero=2", "+precision=fp32")
    overrides = (*RUN, "+zero=2", "trainer.save_every=100")

    # DeepSpeed's own launcher: it terminates the other rank when the first exits 75.
    process = _start(tmp_path, *overrides, name="preempted", deepspeed_launcher=True)
    run_dir = tmp_path / "outputs" / "preempted"
    _wait_for(run_dir / "metrics.jsonl", process)
    ranks = rank_processes(process)
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


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, shared_run):
    overrides = CHECKPOINTED_RUN  # saves at steps 6 and 12
    first = shared_run(*overrides)
    # Read now, from the uninterrupted run's own directory, before anything resumes in the copy.
    uninterrupted = first.losses()
    assert sorted(uninterrupted) == list(range(1, 13))
    run_dir = copy_run(first.run_dir, tmp_path, "damaged")
    newest = run_dir / "checkpoints" / "step_00000012"
    damaged_file = newest / "mp_rank_00_model_states.pt"
    with open(damaged_file, "r+b") as handle:
        handle.truncate(damaged_file.stat().st_size // 2)

    explicit = train(tmp_path, *overrides, f"trainer.resume={newest}", name="damaged", check=False)
    assert explicit.returncode == 2
    assert "the checkpoint is damaged" in explicit.output and damaged_file.name in explicit.output

    resumed = train(tmp_path, *overrides, name="damaged")
    assert f"skipping checkpoint {newest}" in resumed.output and "the manifest says" in resumed.output
    assert "at step 6" in resumed.output
    # The copied metrics file holds the first run's 12 steps; the resumed run appended steps 7-12 again.
    steps = [row["step"] for row in resumed.metrics() if "loss" in row]
    assert steps == [*range(1, 13), *range(7, 13)], steps
    # From step 6's checkpoint, steps 7-12 repeat the uninterrupted run's losses exactly.
    assert _last_losses(run_dir) == uninterrupted


def test_partial_save_is_never_loaded_and_is_cleared_by_the_next_save(tmp_path, shared_run):
    overrides = CHECKPOINTED_RUN
    run_dir = copy_run(shared_run(*overrides).run_dir, tmp_path, "partial")
    checkpoints = run_dir / "checkpoints"
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


# Each ZeRO stage in one direction by default, both directions over the three; the other direction of each stage
# runs before a release. (tests/test_resume_scenarios.py moves a ZeRO-2 instruction run from 2 ranks to 1.)
@pytest.mark.parametrize("before,after,zero", [
    (2, 1, "1"), (1, 2, "2"), (1, 2, "3"),
    pytest.param(1, 2, "1", marks=pytest.mark.release),
    pytest.param(2, 1, "2", marks=pytest.mark.release),
    pytest.param(2, 1, "3", marks=pytest.mark.release),
], ids=["2to1-1", "1to2-2", "1to2-3", "1to2-1", "2to1-2", "2to1-3"])
def test_resume_on_another_world_size(tmp_path, zero, before, after):
    """The global batch stays 32 (micro-batch 32 / ranks), so every step reads the same blocks before and
    after; only the order of floating-point reductions changes."""
    common = ("trainer.max_steps=16", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=8",
              f"+zero={zero}")
    micro = {1: "trainer.micro_batch_size=32", 2: "trainer.micro_batch_size=16"}
    reference = train(tmp_path, *common, micro[before], name="reference", ranks=before)

    # The reference's step-8 checkpoint, as a run on `before` ranks that stopped there would have left it.
    run_dir = tmp_path / "outputs" / "moved"
    shutil.copytree(reference.run_dir / "checkpoints" / "step_00000008", run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "latest").write_text("step_00000008")

    resumed = train(tmp_path, *common, micro[after], name="moved", ranks=after)
    assert "to DeepSpeed's universal format" in resumed.output and "at step 8" in resumed.output
    expected, got = reference.losses(), _last_losses(run_dir)
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"


NAN_LOSS = TRAIN.parent.parent / "tests" / "faults" / "nan_loss.py"
SHORT = ("trainer.max_steps=10", "scheduler.warmup_steps=2", "trainer.eval_every=0", "+zero=2")


def _train_with_nan(tmp_path, nan_steps, *overrides, name):
    command = [*launch_ranks(2), str(NAN_LOSS), *overrides, f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
    return subprocess.run(
        command, cwd=tmp_path, env=dict(_env(), NAN_STEPS=nan_steps), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600,
    )


def test_nan_loss_stops_without_saving_and_keeps_the_last_good_checkpoint(tmp_path):
    run = _train_with_nan(tmp_path, "6", *SHORT, "trainer.save_every=4", name="nan")
    assert run.returncode == 3, run.stdout[-4000:]
    errors = [line for line in run.stdout.splitlines() if line.startswith("dstrain: training diverged:")]
    assert len(errors) == 1, run.stdout[-4000:]
    assert "step 6: loss nan" in errors[0] and "step_00000004" in errors[0] and "is kept" in errors[0]
    checkpoints = tmp_path / "outputs" / "nan" / "checkpoints"
    assert [path.name for path in checkpoints.glob("*step_*")] == ["step_00000004"]
    assert (checkpoints / "latest").read_text() == "step_00000004"


def test_nan_loss_with_skip_leaves_the_weights_unchanged_and_trains_on(tmp_path):
    run = _train_with_nan(
        tmp_path, "6", *SHORT, "trainer.save_every=1", "trainer.keep_last=10", "trainer.nonfinite=skip",
        name="skip",
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "step 6: loss nan" in run.stdout and "update skipped, weights unchanged" in run.stdout
    run_dir = tmp_path / "outputs" / "skip"
    rows = {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}
    assert rows[6]["update_skipped"] is True and math.isnan(rows[6]["loss"])
    assert all(math.isfinite(rows[step]["loss"]) for step in (7, 8, 9, 10))
    before, skipped, after = (_final_weights(run_dir, step) for step in (5, 6, 7))
    for name, tensor in before.items():
        assert torch.equal(skipped[name], tensor), name
    assert any(not torch.equal(after[name], tensor) for name, tensor in before.items())


def test_nan_loss_every_step_stops_after_max_consecutive_skips(tmp_path):
    run = _train_with_nan(
        tmp_path, "3-", *SHORT, "trainer.nonfinite=skip", "trainer.max_consecutive_skips=2", name="diverged"
    )
    assert run.returncode == 3, run.stdout[-4000:]
    assert "dstrain: training diverged: step 5: loss nan" in run.stdout
    assert "3 steps in a row were NaN/inf" in run.stdout


def test_stop_signal_during_a_step_longer_than_the_grace_period_exits_without_saving(tmp_path):
    # About 4 s per step (40 micro-batches of 32): the signal lands mid-step and the grace period ends first.
    overrides = (
        "trainer.max_steps=4", "scheduler.warmup_steps=1", "trainer.eval_every=0", "trainer.save_every=1",
        "trainer.micro_batch_size=32", "trainer.gradient_accumulation_steps=40", "trainer.stop_grace_s=1",
    )
    process = _start(tmp_path, *overrides, name="grace")
    run_dir = tmp_path / "outputs" / "grace"
    _wait_for(run_dir / "checkpoints" / "step_00000001" / "manifest.json", process)
    signalled = time.monotonic()
    for rank in rank_processes(process):
        rank.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-4000:]
    assert time.monotonic() - signalled < 30
    assert "trainer.stop_grace_s" in output and "without a new checkpoint" in output
    complete = [path.name for path in (run_dir / "checkpoints").glob("step_*") if (path / "manifest.json").is_file()]
    assert complete == ["step_00000001"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_survivor_of_a_dead_or_hung_peer_exits_and_a_restart_resumes(tmp_path, fault):
    overrides = (*RUN, "+zero=2", "trainer.save_every=8", "trainer.collective_timeout_s=15")
    # Only dstrain's own timeouts stand between a dead or hung peer and a hang.
    args = [*overrides, f"run.root={tmp_path / 'outputs'}", "run.name=fault"]
    survivor, peer = start_ranks_without_a_launcher(tmp_path, [args, args])
    run_dir = tmp_path / "outputs" / "fault"
    _wait_for(run_dir / "checkpoints" / "step_00000008" / "manifest.json", survivor)
    peer.send_signal(fault)
    faulted = time.monotonic()
    try:
        output, _ = survivor.communicate(timeout=120)
        waited = time.monotonic() - faulted
    finally:
        peer.kill()
        peer.communicate()
    # The README's exit codes: 1 for an error such as a dead peer, 4 for no progress (the watchdog).
    assert survivor.returncode == (1 if fault == signal.SIGKILL else 4), output[-4000:]
    assert max(_last_losses(run_dir)) < 24, "the run finished before the fault"
    # A dead peer's socket closes at once; a hung one is only noticed when trainer.collective_timeout_s ends.
    assert waited < (60 if fault == signal.SIGKILL else 15 + 60), output[-4000:]
    if fault == signal.SIGSTOP:
        assert waited > 10, f"gave up after {waited:.1f} s, before trainer.collective_timeout_s=15"
        assert "no training progress for" in output, output[-4000:]

    resumed = train(tmp_path, *overrides, name="fault")
    assert "at step 8" in resumed.output
    assert max(_last_losses(run_dir)) == 24


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    # About 12M parameters: a ZeRO-2 checkpoint of some 200 MB takes long enough to be killed half-way.
    overrides = (
        "trainer.max_steps=4", "scheduler.warmup_steps=1", "trainer.eval_every=0", "trainer.save_every=2",
        "trainer.micro_batch_size=4", "+zero=2", "model.hidden_size=512", "model.intermediate_size=1408",
        "model.num_hidden_layers=4", "model.num_attention_heads=8", "model.num_key_value_heads=4",
    )
    process = _start(tmp_path, *overrides, name="cut")
    checkpoints = tmp_path / "outputs" / "cut" / "checkpoints"
    staging = checkpoints / ".staging-step_00000004"
    _wait_for(staging, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert staging.is_dir(), "the save finished before the kill"
    assert not (checkpoints / "step_00000004").exists()
    assert (checkpoints / "latest").read_text() == "step_00000002"

    resumed = train(tmp_path, *overrides, name="cut")
    assert "at step 2" in resumed.output
    assert not staging.exists()
    assert (checkpoints / "step_00000004" / "manifest.json").is_file()


def test_a_lock_left_by_a_process_killed_while_loading_deepspeeds_ops_does_not_hang_the_next_run(tmp_path):
    """torch.utils.cpp_extension's lock file in an op's build directory, as a process killed while it loaded
    the op leaves it: without dstrain's own lock every later run would wait for it forever."""
    from dstrain.deepspeed_ops import op_build_directory

    stale = [op_build_directory(name) / "lock" for name in ("deepspeed_shm_comm", "fused_adam")]
    for lock in stale:
        lock.touch()
    try:
        run = train(tmp_path, "trainer.max_steps=2", "scheduler.warmup_steps=1", "trainer.eval_every=0",
                    timeout=180)
    finally:
        leftover = [lock for lock in stale if lock.exists()]
        for lock in leftover:
            lock.unlink()
    assert not leftover
    assert "done: step 2 of 2" in run.output
    for lock in stale:
        assert f"deleting {lock}, left by a process killed while it loaded" in run.output
