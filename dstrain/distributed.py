"""The process group and everything a rank needs to know about its peers.

A launcher describes the world in the environment: DeepSpeed's launcher and torchrun set RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; under `srun` (SLURM) they are derived here from SLURM's own
variables; a plain `python launch/train.py` becomes a world of one. The helpers below are the few collectives
the trainer and the checkpointer share.
"""

import atexit
import hashlib
import json
import os
import random
import re
import socket
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping

import numpy as np
import torch
import torch.distributed as dist

from dstrain.deepspeed_ops import load_op
from dstrain.errors import ConfigError

# MASTER_PORT under SLURM = PORT_BASE + job id % PORT_SPAN, in 10000-59999. Two jobs on one node collide only if
# their ids differ by a multiple of 50000. Above 32767 the range overlaps Linux's ephemeral ports, so an outgoing
# connection holding the port is possible, if rare.
PORT_BASE, PORT_SPAN = 10000, 50000
# The allocation a job was submitted for (dstrain submit sets them); every rank compares it with what SLURM
# actually started.
EXPECTED_NODES = "DSTRAIN_EXPECTED_NODES"
EXPECTED_RANKS_PER_NODE = "DSTRAIN_EXPECTED_RANKS_PER_NODE"


def init_distributed(timeout: timedelta):
    """Join the process group that the launcher described in the environment, and return (rank, world size).
    The group lives as long as the process: the jobs of a Hydra multirun train one after another in it, and a
    group set up again on the same port could meet the previous one's store."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.update(rendezvous_from_slurm(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; without this each would start a thread per core.
        # LOCAL_WORLD_SIZE: torchrun, srun; LOCAL_SIZE: DeepSpeed's launcher.
        local_world = int(
            os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1")
        )
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    if accelerator.device_name() == "cpu":
        # The shared-memory collectives DeepSpeed's CPU backend loads as the group starts.
        load_op("ShareMemCommBuilder")
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), timeout=timeout, verbose=False
    )
    atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    # Gloo's worker threads outlive a group that is not destroyed, and abort the interpreter at exit.
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def global_rank() -> int:
    """This process's rank before (or without) a process group: what the launcher or SLURM says."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def local_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sum_over_ranks(values, device) -> list:
    """Sum a few scalars over all ranks in one collective, on the device the backend (NCCL or gloo) serves."""
    packed = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def all_ranks_agree(ok: bool) -> bool:
    return sum_over_ranks([0.0 if ok else 1.0], local_device())[0] == 0


def from_rank_zero(rank: int, compute: Callable[[], Any]) -> Any:
    """compute() on rank 0 only (reading every input file once, not once per rank), its value on every rank."""
    value = [compute() if rank == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


class rank_zero_first:
    """Rank 0 does the work first (preparing and caching data); the others then read its result."""

    def __init__(self, rank: int):
        self.rank = rank

    def __enter__(self):
        if self.rank != 0:
            dist.barrier()

    def __exit__(self, *exc):
        if self.rank == 0 and exc[0] is None:
            dist.barrier()


def require_same_on_all_ranks(description: dict, what: str) -> None:
    """Every rank must train the same config in the same directory; a value resolved separately per process
    (a timestamp, an environment variable that differs between nodes) would silently split them."""
    digest = hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        groups = {digest: [rank for rank, other in enumerate(digests) if other == digest] for digest in digests}
        raise ConfigError(
            f"the ranks composed different {what} (ranks grouped by what they composed: {list(groups.values())}). "
            f"Give every rank the same command line, and avoid values resolved per process such as ${{now:...}} "
            f"in run.name or run.root."
        )


# ------------------------------------------------------------------------------------ ranks from SLURM


def rendezvous_from_slurm(environ: Mapping[str, str]) -> Dict[str, str]:
    """The variables torch.distributed's env:// rendezvous reads, for a task that srun started.

    Empty when a launcher already set RANK (deepspeed, torchrun: they know better), and outside an srun step:
    the batch script itself has SLURM_PROCID=0 and SLURM_NTASKS too, but no SLURM_STEP_ID.
    """
    if "RANK" in environ or "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return {}
    world_size = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ["SLURM_TASKS_PER_NODE"])
    check_allocation(environ, per_node)
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(per_node[0]),
        # Task 0 runs on the first node of the step (block and cyclic distribution alike).
        "MASTER_ADDR": first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN),
    }


def check_allocation(environ: Mapping[str, str], per_node: List[int]) -> None:
    """Raise ConfigError, before any process group, when the ranks SLURM started cannot train as configured."""
    if len(set(per_node)) > 1:
        raise ConfigError(
            f"SLURM started an uneven number of ranks per node ({','.join(map(str, per_node))}); dstrain needs the "
            f"same number on every node. Ask for --nodes and --ntasks-per-node rather than --ntasks."
        )
    expected_nodes, expected_ranks = environ.get(EXPECTED_NODES), environ.get(EXPECTED_RANKS_PER_NODE)
    if expected_nodes and (int(expected_nodes), int(expected_ranks)) != (len(per_node), per_node[0]):
        raise ConfigError(
            f"the job step runs {len(per_node)} node(s) x {per_node[0]} rank(s), but it was submitted for "
            f"launcher.nodes={expected_nodes} x launcher.gpus_per_node={expected_ranks} "
            f"(world size {int(expected_nodes) * int(expected_ranks)}): an sbatch or srun option changed the "
            f"allocation. Submit again with dstrain submit and the launcher.* values you want."
        )
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible and environ.get("DS_ACCELERATOR") != "cpu" and len(visible.split(",")) < per_node[0]:
        raise ConfigError(
            f"this task sees {len(visible.split(','))} GPU(s) (CUDA_VISIBLE_DEVICES={visible}) for {per_node[0]} "
            f"ranks on its node, and rank r uses GPU LOCAL_RANK: request the GPUs with --gpus-per-node="
            f"{per_node[0]} and do not bind them per task (--gpus-per-task, --gpu-bind)."
        )


def tasks_per_node(value: str) -> List[int]:
    """SLURM_TASKS_PER_NODE's compressed form, e.g. `2(x3),1`, as one count per node: [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ConfigError(f"cannot read SLURM's tasks per node {value!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: `gpu-[007-009,012],cpu1` gives `gpu-007` (zero padding kept).
    Read here rather than with `scontrol show hostnames`, which every rank of a large job would run."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[,-]", match.group(1))[0], nodelist[:end])
