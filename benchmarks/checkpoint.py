#!/usr/bin/env python
"""Checkpoint save and load time, against step time and against the disk's own write speed, in one run.

    deepspeed --num_gpus 2 benchmarks/checkpoint.py                   # tiny and 125m x ZeRO 0-3
    python benchmarks/checkpoint.py --models tiny                     # a world of one
    python benchmarks/checkpoint.py --stages 2,3_offload --repeats 5 +precision=bf16

Flags: --models and --stages (options of conf/model and conf/zero, comma-separated), --repeats (saves and
loads per cell, default 3), --steps (timed training steps per cell, default 3), --dir (where checkpoints and
the disk test go; default a fresh directory under run.root, the filesystem training writes to), --keep,
--verbose. Everything else is a Hydra override, composed as `benchmarks/throughput.py` composes it (so
trainer.max_steps=60, no periodic eval or save), plus trainer.micro_batch_size=1 by default so that a 125m
step on a CPU takes seconds; an explicit override wins.

Each cell (model x ZeRO option) is set up by dstrain.trainer.setup, as train() does, steps with its
train_step, and then:
1. one warm-up step, then --steps timed steps: "step s" is their median;
2. --repeats times: one step, then `CheckpointManager.save` (the class train() uses, with the config's
   keep_last/keep_every), timed from a barrier before to a barrier after, so it is the time of the slowest
   rank and includes the manifest, the rename and pruning. "save s" is the median;
3. one more step, whose loss L is the reference, then --repeats times `CheckpointManager.load` of the newest
   checkpoint into the same engine, timed the same way ("load s" is the median), then that step again on the
   same batch: "loss" is OK if it gives L exactly (and load returned the saved step), MISMATCH if not.
"size MB" is all files of one checkpoint (10^6 bytes); save and load MB/s are size / median time, all ranks
together. Loads read files that were written moments before, so they mostly come from the page cache.

The disk's own speed is measured after the cells, on rank 0 alone, in the same directory: --repeats writes
of one file as large as the largest checkpoint (at least 256 MiB, at most 1 GiB), plain (written and closed,
so it may only reach the page cache) and with fsync before close; "save/buf" and "save/fsync" are save MB/s
as a fraction of each. A save is durable when it returns (every rank syncs its shards to disk before the
manifest is written), so "save/fsync" is the like-for-like comparison. Only rank 0 prints.
"""

import argparse
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dstrain.checks import validate, validate_accelerator  # noqa: E402
from dstrain.compose import CONF_DIR  # noqa: E402
from dstrain.distributed import init_distributed  # noqa: E402
from dstrain.errors import ConfigError  # noqa: E402
from dstrain.model import parameter_counts  # noqa: E402
from dstrain.trainer import setup, setup_logging, train_step  # noqa: E402
from throughput import _remove_shm_workspace, compose_config, release_memory  # noqa: E402  (this script's folder)

DEFAULT_OVERRIDES = ["trainer.micro_batch_size=1"]
MB = 1e6
DISK_TEST_CHUNK = 8 << 20
DISK_TEST_BOUNDS = (256 << 20, 1 << 30)


def _options(group: str):
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [flags] [hydra overrides]")
    parser.add_argument("--models", default="tiny,125m", help="conf/model options (default tiny,125m)")
    parser.add_argument("--stages", default="0,1,2,3", help="conf/zero options (default 0,1,2,3)")
    parser.add_argument("--repeats", type=int, default=3, help="saves, loads and disk writes per cell (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per cell (default 3)")
    parser.add_argument("--dir", type=Path, help="directory to write into (default: a new one under run.root)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and the directory")
    parser.add_argument("--verbose", action="store_true", help="show dstrain's own log lines")
    args, overrides = parser.parse_known_args(argv)
    args.models, args.stages = args.models.split(","), args.stages.split(",")
    for flag, chosen, group in (("--models", args.models, "model"), ("--stages", args.stages, "zero")):
        unknown = sorted(set(chosen) - set(_options(group)))
        if unknown:
            parser.error(f"{flag}: {', '.join(unknown)} not in conf/{group} ({', '.join(_options(group))})")
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    for override in overrides:
        if re.match(r"^\+{0,2}(model|zero)=", override):
            parser.error(f"{override}: choose models and ZeRO options with --models and --stages")
    return args, overrides


def timed(call) -> float:
    """Wall time of call() on all ranks: from when the last rank starts to when the last one is done."""
    dist.barrier()
    start = time.perf_counter()
    call()
    dist.barrier()
    return time.perf_counter() - start


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run_cell(cfg, cell_dir: Path, args, rank: int, world_size: int) -> dict:
    """One model x ZeRO option: build, train, save and load as described in the module docstring."""
    training = setup(cfg, cell_dir, rank, world_size)
    engine, checkpoints, plan = training.engine, training.checkpoints, training.plan
    parameters, _ = parameter_counts(engine.module)
    engine.train()
    state = training.state

    def step():
        nonlocal state
        batches = [plan.micro_batch(state.samples_consumed, micro) for micro in range(plan.accumulation_steps)]
        result = train_step(training, batches, stop_requested=False)
        state = replace(state, step=state.step + 1, samples_consumed=state.samples_consumed + plan.global_batch)
        return result.loss

    step()
    step_times = [timed(step) for _ in range(args.steps)]

    save_times = []
    for _ in range(args.repeats):
        step()
        save_times.append(timed(lambda: checkpoints.save(engine, state)))
    saved_state, newest = state, checkpoints.checkpoints()[-1]
    size = directory_bytes(newest)
    reference_loss = step()

    def load():
        nonlocal state
        state = replace(checkpoints.load(engine, newest), tracker_run_id=saved_state.tracker_run_id)

    load_times = [timed(load) for _ in range(args.repeats)]
    loaded_state = state
    loss_after_load = step()

    training.metrics.close()
    engine.destroy()
    return {
        "parameters": parameters,
        "step": statistics.median(step_times),
        "save": statistics.median(save_times),
        "load": statistics.median(load_times),
        "size": size,
        "loss_ok": loss_after_load == reference_loss and loaded_state == saved_state,
        "losses": (reference_loss, loss_after_load),
        "states": (saved_state, loaded_state),
    }


def disk_write_speed(directory: Path, size: int, fsync: bool) -> float:
    """MB/s of writing one file of `size` bytes, sequentially in 8 MiB chunks of random bytes."""
    chunk = os.urandom(DISK_TEST_CHUNK)
    path = directory / f"disk-speed-{os.getpid()}"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(chunk)):
            handle.write(chunk)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    if not fsync:
        # Flushed outside the clock, so that this file's write-back does not slow the next measurement.
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    path.unlink()
    return size / elapsed / MB


def main() -> None:
    args, overrides = parse_args(sys.argv[1:])
    cells = []
    try:
        for model in args.models:
            for stage in args.stages:
                cfg = compose_config([f"+model={model}", f"+zero={stage}", *DEFAULT_OVERRIDES, *overrides])
                cfg.run.name = "checkpoint-benchmark"
                validate(cfg)
                validate_accelerator(cfg, get_accelerator())
                cells.append((model, stage, cfg))
    except ConfigError as error:
        print(f"checkpoint: config error: {error}", file=sys.stderr)
        sys.exit(2)

    first = cells[0][2]
    rank, world_size = init_distributed(timedelta(seconds=first.trainer.collective_timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    holder = [None]
    if rank == 0:
        parent = args.dir or Path(first.run.root)
        parent.mkdir(parents=True, exist_ok=True)
        holder = [tempfile.mkdtemp(prefix="dstrain-checkpoint-", dir=parent)]
    dist.broadcast_object_list(holder, src=0)
    root = Path(holder[0]).resolve()
    setup_logging(rank, root)
    if not args.verbose:
        logging.getLogger("dstrain").setLevel(logging.WARNING)

    def say(message=""):
        if rank == 0:
            print(message, flush=True)

    trainer = first.trainer
    say(
        f"checkpoint: precision={first.precision.dtype} ranks={world_size} device={get_accelerator().device_name()} "
        f"micro_batch={trainer.micro_batch_size} accumulation={trainer.gradient_accumulation_steps} "
        f"seq_len={first.data.seq_len}; {args.steps} timed steps, {args.repeats} saves and loads per cell; "
        f"writing to {root}"
    )

    results = []
    for model, stage, cfg in cells:
        cell_dir = root / f"{model}-zero{stage}"
        started = time.perf_counter()
        result = run_cell(cfg, cell_dir, args, rank, world_size)
        results.append((model, stage, result))
        say(f"  {model} zero={stage}: step {result['step']:.3f} s, save {result['save']:.3f} s, "
            f"load {result['load']:.3f} s, {result['size'] / MB:.1f} MB ({time.perf_counter() - started:.0f} s)")
        release_memory()
        dist.barrier()
        if local_rank == 0 and not args.keep:
            shutil.rmtree(cell_dir, ignore_errors=True)

    largest = max(result["size"] for _, _, result in results)
    test_size = min(max(largest, DISK_TEST_BOUNDS[0]), DISK_TEST_BOUNDS[1]) // DISK_TEST_CHUNK * DISK_TEST_CHUNK
    disk = [None]
    if rank == 0:
        speeds = [[disk_write_speed(root, test_size, fsync) for fsync in (False, True)] for _ in range(args.repeats)]
        disk = [{kind: statistics.median(values) for kind, values in zip(("buffered", "fsync"), zip(*speeds))}]
    dist.broadcast_object_list(disk, src=0)
    disk = disk[0]

    say()
    say(f"disk ({root.parent}): one {test_size / MB:.0f} MB file, median of {args.repeats}: "
        f"buffered {disk['buffered']:,.0f} MB/s, with fsync {disk['fsync']:,.0f} MB/s")
    header = (f"{'model':<6} {'params':>7} {'zero':>9} {'ranks':>5} {'step s':>8} {'save s':>8} {'save/step':>9} "
              f"{'load s':>8} {'load/step':>9} {'size MB':>9} {'save MB/s':>9} {'load MB/s':>9} "
              f"{'save/buf':>8} {'save/fsync':>10} {'loss':>8}")
    say(header)
    for model, stage, result in results:
        save_speed = result["size"] / result["save"] / MB
        load_speed = result["size"] / result["load"] / MB
        say(f"{model:<6} {result['parameters'] / 1e6:>6.1f}M {stage:>9} {world_size:>5} {result['step']:>8.3f} "
            f"{result['save']:>8.3f} {result['save'] / result['step']:>9.2f} {result['load']:>8.3f} "
            f"{result['load'] / result['step']:>9.2f} {result['size'] / MB:>9.1f} {save_speed:>9,.0f} "
            f"{load_speed:>9,.0f} {save_speed / disk['buffered']:>8.2f} {save_speed / disk['fsync']:>10.2f} "
            f"{'OK' if result['loss_ok'] else 'MISMATCH':>8}")

    for model, stage, result in results:
        if not result["loss_ok"]:
            (reference, reloaded), (saved, loaded) = result["losses"], result["states"]
            say(f"MISMATCH {model} zero={stage}: the step after loading gave loss {reloaded!r}, the same step "
                f"before loading {reference!r}; load returned {loaded}, save was given {saved}")

    dist.barrier()
    _remove_shm_workspace(rank)
    if local_rank == 0 and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    elif args.keep:
        say(f"checkpoints kept under {root}")


if __name__ == "__main__":
    main()
