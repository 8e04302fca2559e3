"""Several nodes without SLURM, emulated on this machine.

- Per-node launches, `deepspeed --hostfile H --no_ssh --node_rank=I --master_addr=A --master_port=P` on every node:
  two launchers here, one rank each, meeting on 127.0.0.1, must train exactly as one node with two ranks does
  (same ranks, same data: bit-identical losses).
- One launch for all nodes, `deepspeed --hostfile H launch/train.py`, goes through pdsh and ssh; there is no sshd
  here. A stand-in `pdsh` records what DeepSpeed hands it: the same per-node launch on every host, with pdsh's
  `%n` as the node rank.
"""

import base64
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TRAIN, _free_port
RUN = ("trainer.max_steps=8", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.micro_batch_size=16",
       "+zero=2")
# What a step computed; the rest of a metrics row (throughput, memory) is timing.
COMPUTED = ("step", "loss", "lr", "grad_norm", "epoch")


def _env(**changes) -> dict:
    # One thread per rank in both runs: the emulated nodes share this machine's cores.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **changes)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _start(directory: Path, log_name: str, *launcher_args: str, env=None) -> subprocess.Popen:
    """`deepspeed <launcher_args> launch/train.py <RUN>` from `directory`, training into directory/outputs/run."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / log_name, "w") as log:
        command = ["deepspeed", *launcher_args, str(TRAIN), *RUN, f"run.root={directory / 'outputs'}", "run.name=run"]
        return subprocess.Popen(command, cwd=directory, env=env or _env(), stdout=log, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, deadline: float) -> int:
    try:
        return process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -9


def _computed(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: row[key] for key in COMPUTED if key in row} for row in rows if "loss" in row]


@pytest.mark.slow
def test_two_nodes_launched_one_by_one_with_node_rank_train_as_one_node_with_two_ranks(tmp_path):
    # The hostfile lists the nodes and their slots (one rank each); its names are only labels with --no_ssh,
    # and --node_rank picks this node's line, so global ranks follow the hostfile's order.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = _free_port()
    # Both "nodes" train into one run directory, as on a shared file system; the one-node run alongside them.
    nodes = [
        _start(tmp_path / "two-nodes", f"node{rank}.log", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={rank}",
               "--master_addr=127.0.0.1", f"--master_port={port}")
        for rank in (0, 1)
    ]
    one_node = _start(tmp_path / "one-node", "launcher.log", "--num_gpus=2", f"--master_port={_free_port()}")

    deadline = time.monotonic() + 240
    codes = [_wait(process, deadline) for process in (*nodes, one_node)]
    node0, node1 = ((tmp_path / "two-nodes" / f"node{rank}.log").read_text() for rank in (0, 1))
    reference_log = (tmp_path / "one-node" / "launcher.log").read_text()
    assert codes == [0, 0, 0], f"exit codes {codes}\n--- node 0\n{node0[-4000:]}\n--- node 1\n{node1[-4000:]}\n" \
                               f"--- one node\n{reference_log[-4000:]}"

    # Each launcher started one local rank of a two-rank world: rank 0 on node 0, rank 1 on node 1.
    assert "nnodes=2, num_local_procs=1, node_rank=0" in node0 and "dist_world_size=2" in node0
    assert "nnodes=2, num_local_procs=1, node_rank=1" in node1
    assert "micro-batch 16 x accumulation 1 x 2 ranks" in node0 and "done: step 8 of 8" in node0
    assert "step 1 loss=" not in node1  # only global rank 0 reports

    expected = _computed(tmp_path / "one-node" / "outputs" / "run")
    assert [row["step"] for row in expected] == list(range(1, 9))
    assert _computed(tmp_path / "two-nodes" / "outputs" / "run") == expected


# Records its arguments, as pdsh would receive them, and runs nothing.
RECORDING_PDSH = """#!/bin/sh
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$(dirname "$0")/pdsh.args"
"""


def test_a_hostfile_launch_hands_every_node_the_per_node_launch_through_pdsh(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pdsh").write_text(RECORDING_PDSH)
    (tmp_path / "bin" / "pdsh").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    # A remote node gets only what DeepSpeed exports (PYTHON*, NCCL* on CUDA, ...) and what .deepspeed_env in
    # the launch directory (or ~) lists.
    (tmp_path / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\n")
    # --no_ssh_check and --master_addr: otherwise the runner itself would ssh to node0 first.
    done = subprocess.run(
        ["deepspeed", f"--hostfile={hostfile}", "--launcher=pdsh", "--no_ssh_check", "--master_addr=10.0.0.1",
         "--master_port=29500", str(TRAIN), *RUN, "run.name=multi"],
        cwd=tmp_path, env=_env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    args = (tmp_path / "bin" / "pdsh.args").read_text().splitlines()
    # pdsh -S (exit with the largest exit code) on both hosts of the hostfile, in the hostfile's order.
    assert args[:5] == ["-S", "-f", "1024", "-w", "node0,node1"]
    # What pdsh runs on each host (its words joined, as pdsh does): the exports, then the same checkout and
    # Python at the same path, then DeepSpeed's per-node launcher with pdsh's %n as the node rank.
    remote = shlex.split(" ".join(args[5:]))
    assert "DS_ACCELERATOR=cpu;" in remote and f"PYTHONPATH={tmp_path}" in " ".join(remote)
    launch = remote[remote.index(f"{tmp_path};") + 1:]
    assert Path(launch[0]).samefile(sys.executable) and launch[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    world_info = next(arg for arg in launch if arg.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world_info.split("=", 1)[1])) == {"node0": [0], "node1": [0]}
    assert {"--node_rank=%n", "--master_addr=10.0.0.1", "--master_port=29500"} <= set(launch)
    assert launch[launch.index(str(TRAIN)):] == [str(TRAIN), *RUN, "run.name=multi"]
