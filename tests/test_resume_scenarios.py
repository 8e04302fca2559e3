"""Exact resume, tested on drawn scenarios rather than one shape of run.

Each scenario is drawn from a seed: ZeRO stage, precision, ranks, micro-batch, accumulation, seq_len, how
often it saves, when it is interrupted, and how (SIGKILL of every process, or SIGUSR1 to one rank, which
saves and exits 75). An uninterrupted run and the interrupted-then-rerun run must agree on every step's loss,
LR and batch (the digest of the tokens rank 0 read), and on the final weights, bit for bit.

CI runs the draws in CI_SEEDS. Before a release, run many more:
    DSTRAIN_RESUME_DRAWS=40 pytest -m release tests/test_resume_scenarios.py
(the seeds then start at DSTRAIN_RESUME_FIRST_SEED, default 1000; each scenario's seed is in its test id, and
`-k seed1234` reruns one.)
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Tuple

import psutil
import pytest
import torch

from conftest import TRAIN, _env, _free_port, train

CI_SEEDS = (1, 2, 3)
RELEASE_DRAWS = int(os.environ.get("DSTRAIN_RESUME_DRAWS", "20"))
RELEASE_FIRST_SEED = int(os.environ.get("DSTRAIN_RESUME_FIRST_SEED", "1000"))


@dataclass(frozen=True)
class Scenario:
    seed: int
    zero: str
    precision: str
    ranks: int
    micro_batch: int
    accumulation: int
    seq_len: int
    max_steps: int
    save_every: int
    # The interruption comes once this step's loss is logged (SIGUSR1), or this step's checkpoint exists (SIGKILL).
    interrupt_after: int
    how: str

    def overrides(self) -> Tuple[str, ...]:
        return (
            f"+zero={self.zero}", f"+precision={self.precision}", f"trainer.micro_batch_size={self.micro_batch}",
            f"trainer.gradient_accumulation_steps={self.accumulation}", f"data.seq_len={self.seq_len}",
            f"trainer.max_steps={self.max_steps}", f"trainer.save_every={self.save_every}",
            "scheduler.warmup_steps=2", "trainer.eval_every=0", "logger.log_every=5",
        )


def draw(seed: int) -> Scenario:
    rng = random.Random(seed)
    max_steps = rng.randint(12, 24)
    save_every = rng.choice([2, 3, 4, 5])
    how = rng.choice(["sigkill", "sigusr1"])
    # A SIGKILL lands after a checkpoint, so there is one to resume from, with steps after it still to train.
    saves = [step for step in range(save_every, max_steps - 1, save_every)]
    interrupt_after = rng.choice(saves) if how == "sigkill" else rng.randint(2, max_steps - 3)
    return Scenario(
        seed=seed,
        zero=rng.choice(["0", "1", "2", "3"]),
        precision=rng.choice(["fp32", "bf16"]),
        ranks=rng.choice([1, 2]),
        micro_batch=rng.randint(1, 4),
        accumulation=rng.randint(1, 3),
        seq_len=rng.choice([32, 48, 64, 96, 128]),
        max_steps=max_steps,
        save_every=save_every,
        interrupt_after=interrupt_after,
        how=how,
    )


def _rows(run_dir):
    """Per step, the row of the attempt that got furthest: a rerun overwrites the steps it repeats."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row
    return rows


def _final_weights(run_dir, step):
    from dstrain.checkpoint import read_manifest
    from dstrain.loading import consolidated_state_dict

    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    return consolidated_state_dict(checkpoint, read_manifest(checkpoint)["zero_stage"])


def _start(tmp_path, scenario: Scenario):
    args = [*scenario.overrides(), f"run.root={tmp_path / 'outputs'}", "run.name=interrupted"]
    if scenario.ranks > 1:
        command = ["deepspeed", "--num_gpus", str(scenario.ranks), "--master_port", str(_free_port()), str(TRAIN)]
    else:
        command = [sys.executable, str(TRAIN)]
    return subprocess.Popen([*command, *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _interrupt(tmp_path, scenario: Scenario) -> str:
    """Start the run and interrupt it as the scenario says; returns its output."""
    run_dir = tmp_path / "outputs" / "interrupted"
    process = _start(tmp_path, scenario)
    deadline = time.monotonic() + 600

    def reached() -> bool:
        if scenario.how == "sigkill":
            return (run_dir / "checkpoints" / f"step_{scenario.interrupt_after:08d}" / "manifest.json").is_file()
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and max(_rows(run_dir), default=0) >= scenario.interrupt_after

    while not reached():
        if process.poll() is not None:
            pytest.fail(f"{scenario}: the run ended before its interruption:\n{process.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{scenario}: step {scenario.interrupt_after} never came"
        time.sleep(0.01)
    if scenario.how == "sigkill":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        ranks = [process.pid] if scenario.ranks == 1 else [
            child.pid for child in psutil.Process(process.pid).children(recursive=True)
            if "--local_rank" in " ".join(child.cmdline())
        ]
        os.kill(ranks[-1], signal.SIGUSR1)
    output, _ = process.communicate(timeout=600)
    if scenario.how == "sigusr1":
        assert process.returncode == 75, f"{scenario}:\n{output[-4000:]}"
    return output


def check_scenario(tmp_path, scenario: Scenario) -> None:
    print(f"resume scenario: {scenario}")
    # One rank runs as a plain process (ranks=0 to the helper), as _start starts it.
    launch = scenario.ranks if scenario.ranks > 1 else 0
    reference = train(tmp_path, *scenario.overrides(), ranks=launch, name="reference")
    output = _interrupt(tmp_path, scenario)
    run_dir = tmp_path / "outputs" / "interrupted"
    interrupted_at = max(_rows(run_dir))
    assert interrupted_at < scenario.max_steps, f"{scenario}: finished before the interruption:\n{output[-2000:]}"

    resumed = train(tmp_path, *scenario.overrides(), ranks=launch, name="interrupted")
    assert "resumed from" in resumed.output, f"{scenario}:\n{resumed.output[-4000:]}"

    expected, got = _rows(reference.run_dir), _rows(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, scenario.max_steps + 1))
    for key in ("batch_digest", "lr", "loss"):
        differing = [step for step in expected if got[step][key] != expected[step][key]]
        assert not differing, (
            f"{scenario}: {key} differs from the uninterrupted run at steps {differing} (interrupted after step "
            f"{interrupted_at}); first: {got[differing[0]][key]!r} vs {expected[differing[0]][key]!r}"
        )
    final = _final_weights(run_dir, scenario.max_steps)
    reference_final = _final_weights(reference.run_dir, scenario.max_steps)
    assert final.keys() == reference_final.keys()
    differing = [name for name, tensor in reference_final.items() if not torch.equal(final[name], tensor)]
    assert not differing, f"{scenario}: final weights differ in {len(differing)} tensors (first: {differing[0]})"


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("seed", CI_SEEDS, ids=lambda seed: f"seed{seed}")
def test_a_drawn_interrupted_run_resumes_exactly(tmp_path, seed):
    check_scenario(tmp_path, draw(seed))


@pytest.mark.release
@pytest.mark.parametrize("seed", range(RELEASE_FIRST_SEED, RELEASE_FIRST_SEED + RELEASE_DRAWS),
                         ids=lambda seed: f"seed{seed}")
def test_many_drawn_interrupted_runs_resume_exactly(tmp_path, seed):
    check_scenario(tmp_path, draw(seed))


def test_the_draws_cover_every_axis():
    """The seeds CI and a release run reach every ZeRO stage, precision, rank count and interruption."""
    scenarios = [draw(seed) for seed in range(RELEASE_FIRST_SEED, RELEASE_FIRST_SEED + 20)]
    for axis, values in (("zero", {"0", "1", "2", "3"}), ("precision", {"fp32", "bf16"}), ("ranks", {1, 2}),
                         ("how", {"sigkill", "sigusr1"}), ("accumulation", {1, 2, 3})):
        assert {getattr(scenario, axis) for scenario in scenarios} == values, axis
    print("CI draws:", *(draw(seed) for seed in CI_SEEDS), sep="\n  ")
