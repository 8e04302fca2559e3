"""Exact resume, tested on drawn scenarios rather than one shape of run.

Each scenario is drawn from a seed: ZeRO stage, precision, ranks, micro-batch, accumulation, seq_len, how
often it saves, when it is interrupted, and how (SIGKILL of every process, or SIGUSR1 to one rank, which
saves and exits 75). An uninterrupted run and the interrupted-then-rerun run must agree on every step's loss,
LR and batch (the digest of the tokens rank 0 read), and on the final weights, bit for bit.

Instruction data (alpaca records, packed rows with position_ids and masked labels) gets two fixed scenarios
of its own: a SIGKILL after a checkpoint, and a move from 2 ranks to 1 at the same global batch. They share
one uninterrupted 2-rank run (shared_run), and every run prepares its data afresh (a cache directory per run),
so they also check that preparing the same records twice gives the same rows.

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
import shutil
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

from conftest import TRAIN, _env, launch_ranks, rank_processes, train

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
    # More overrides, e.g. the data: what the drawn scenarios leave at the defaults (built-in text).
    data: Tuple[str, ...] = ()

    def overrides(self) -> Tuple[str, ...]:
        return (
            f"+zero={self.zero}", f"+precision={self.precision}", f"trainer.micro_batch_size={self.micro_batch}",
            f"trainer.gradient_accumulation_steps={self.accumulation}", f"data.seq_len={self.seq_len}",
            f"trainer.max_steps={self.max_steps}", f"trainer.save_every={self.save_every}",
            "scheduler.warmup_steps=2", "trainer.eval_every=0", "logger.log_every=5", *self.data,
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
        command = [*launch_ranks(scenario.ranks), str(TRAIN)]
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
        ranks = [process.pid] if scenario.ranks == 1 else [rank.pid for rank in rank_processes(process)]
        os.kill(ranks[-1], signal.SIGUSR1)
    output, _ = process.communicate(timeout=600)
    if scenario.how == "sigusr1":
        assert process.returncode == 75, f"{scenario}:\n{output[-4000:]}"
    return output


def check_scenario(tmp_path, scenario: Scenario, reference=None) -> None:
    """`reference`: the uninterrupted run of the same overrides on as many ranks, where one exists already."""
    print(f"resume scenario: {scenario}")
    # One rank runs as a plain process (ranks=0 to the helper), as _start starts it.
    launch = scenario.ranks if scenario.ranks > 1 else 0
    if reference is None:
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


@pytest.mark.slow
@pytest.mark.faults
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


# --- Instruction data ---------------------------------------------------------------------------------------

_WORDS = ("the river model answer question light small quickly under between data water city garden music "
          "number simple green travel history window because before after every people write explain").split()


def alpaca_records(count: int, seed: int) -> list:
    """Alpaca records of varied length (about one in seven longer than 256 bytes, so truncated), a third with
    an input, most with a short system prompt, some with an earlier exchange (two counted answers), and a few
    exact copies (which cleaning drops). Every record has every field (empty where unused)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    records = []
    for _ in range(count):
        if records and rng.random() < 0.03:
            records.append(dict(rng.choice(records)))
            continue
        records.append({
            "instruction": text(1, 6),
            "input": text(1, 6) if rng.random() < 0.35 else "",
            "output": "\n".join(text(1, 6) for _ in range(rng.choice([1, 1, 1, 1, 2, 2, 3, 12]))),
            # A short system prompt stands in for the template's 100-token preamble, so most samples share rows.
            "system": rng.choice(["Be brief.", "Answer plainly.", "You are a helpful assistant."])
            if rng.random() < 0.85 else "",
            "history": [[text(1, 5), text(1, 6)]] if rng.random() < 0.15 else [],
        })
    return records


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(alpaca_records(300, seed=9)))
    return path


def instruction_scenario(alpaca_file) -> Scenario:
    """2 ranks x micro-batch 4 x accumulation 2 packed rows of 256 tokens per step: the 12 steps read about 1.3
    epochs of the ~140 training rows (~210 samples, 1 to 3 a row), so the resumed run crosses an epoch
    boundary. ZeRO-2 (which a world-size change converts through DeepSpeed's universal format) in fp32 (a
    world-size change only reorders fp32 sums, which the comparison's tolerance allows)."""
    data = (
        "+data=alpaca", f"data.train_files=[{alpaca_file}]", "data.template=alpaca",
        # Every run prepares its own data: two preparations of the same records must give the same rows.
        "data.cache_dir=${run.root}/data_cache_${run.name}",
    )
    return Scenario(seed=0, zero="2", precision="fp32", ranks=2, micro_batch=4, accumulation=2, seq_len=256,
                    max_steps=12, save_every=4, interrupt_after=4, how="sigkill", data=data)


def _check_instruction_rows(run_dir) -> None:
    """The run read packed instruction rows (position_ids, masked labels), not plain text blocks."""
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["format"] == "alpaca" and "packing_efficiency" in report["splits"]["train"], report
    assert report["splits"]["train"]["truncated"]["kept_the_answer"] > 0, report


@pytest.mark.slow
@pytest.mark.faults
def test_an_interrupted_instruction_run_resumes_exactly(tmp_path, shared_run, alpaca_file):
    scenario = instruction_scenario(alpaca_file)
    reference = shared_run(*scenario.overrides())
    _check_instruction_rows(reference.run_dir)
    assert max(row.get("epoch", 0) for row in reference.metrics()) >= 1, "the run never reached a second epoch"
    check_scenario(tmp_path, scenario, reference)


@pytest.mark.slow
@pytest.mark.faults
def test_an_instruction_run_resumes_on_another_world_size(tmp_path, shared_run, alpaca_file):
    """The shared 2-rank run's step-4 checkpoint, resumed on 1 rank with twice the accumulation (the global
    batch stays 16 rows, so every step reads the same rows): as tests/test_faults.py's
    test_resume_on_another_world_size checks text runs, the LR is the same and the losses agree up to the
    order of floating-point sums."""
    scenario = instruction_scenario(alpaca_file)
    reference = shared_run(*scenario.overrides())
    step = scenario.save_every
    run_dir = tmp_path / "outputs" / "moved"
    checkpoint = f"step_{step:08d}"
    shutil.copytree(reference.run_dir / "checkpoints" / checkpoint, run_dir / "checkpoints" / checkpoint)
    (run_dir / "checkpoints" / "latest").write_text(checkpoint)

    one_rank = (*scenario.overrides(), f"trainer.gradient_accumulation_steps={2 * scenario.accumulation}")
    resumed = train(tmp_path, *one_rank, ranks=0, name="moved")
    assert "to DeepSpeed's universal format" in resumed.output and f"at step {step}" in resumed.output, \
        resumed.output[-4000:]
    _check_instruction_rows(run_dir)
    expected, got = _rows(reference.run_dir), _rows(run_dir)
    assert sorted(got) == list(range(step + 1, scenario.max_steps + 1))
    for number in got:
        assert got[number]["lr"] == expected[number]["lr"], f"step {number}"
        assert got[number]["loss"] == pytest.approx(expected[number]["loss"], rel=1e-4), f"step {number}"


# --- PEFT methods -------------------------------------------------------------------------------------------
# One scenario per ZeRO stage, each a different representative method: qlora (a 4-bit base, DoRA, LoRA+ groups)
# under ZeRO-0, LoRA with rsLoRA and the PiSSA init in bf16 under ZeRO-2, freeze (requires_grad alone, named
# modules, the head) under ZeRO-3 with gradient checkpointing. Their uninterrupted runs are shared_run's, which
# tests/test_peft_methods.py also reads (training, trainable counts, export).


def peft_scenario(zero: str, precision: str, *peft: str) -> Scenario:
    return Scenario(seed=0, zero=zero, precision=precision, ranks=2, micro_batch=4, accumulation=1, seq_len=64,
                    max_steps=10, save_every=4, interrupt_after=4, how="sigkill", data=peft)


def qlora_scenario(pretrained) -> Scenario:
    return peft_scenario("0", "fp32", f"model.pretrained={pretrained}", "+peft=qlora",
                         "trainer.gradient_checkpointing=true", "peft.lora.use_dora=true",
                         "peft.lora.loraplus_lr_ratio=4", "optim.lr=1e-2")


def rslora_pissa_scenario() -> Scenario:
    return peft_scenario("2", "bf16", "+peft=lora", "peft.lora.use_rslora=true", "peft.lora.init=pissa",
                         "optim.lr=1e-2")


def freeze_scenario() -> Scenario:
    return peft_scenario("3", "fp32", "+peft=freeze", "peft.freeze.modules=[model.layers.0.mlp]",
                         "peft.freeze.train_head=true", "trainer.gradient_checkpointing=true")


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("name", ["qlora-dora-zero0", "rslora-pissa-zero2", "freeze-zero3"])
def test_an_interrupted_peft_run_resumes_exactly(tmp_path, shared_run, tiny_pretrained_dir, name):
    scenario = {"qlora-dora-zero0": lambda: qlora_scenario(tiny_pretrained_dir),
                "rslora-pissa-zero2": rslora_pissa_scenario, "freeze-zero3": freeze_scenario}[name]()
    check_scenario(tmp_path, scenario, shared_run(*scenario.overrides()))
