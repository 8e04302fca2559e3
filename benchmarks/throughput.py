#!/usr/bin/env python
"""Throughput of dstrain's training loop against a minimal hand-written DeepSpeed loop, in one invocation.

    deepspeed --num_gpus 2 benchmarks/throughput.py +zero=2 +precision=bf16 trainer.max_steps=60
    python benchmarks/throughput.py                                   # a world of one
    python benchmarks/throughput.py --rounds 6 --warmup 10 +model=125m

Everything after the benchmark's own flags (--rounds, --warmup, --keep, --verbose) is a Hydra override, read
as `launch/train.py` reads it (same conf dir, schema and argv clean-up, via Hydra's compose API). The benchmark
changes only this: trainer.max_steps defaults to 60 (an explicit override wins), and trainer.eval_every=0,
trainer.save_every=0, trainer.resume=never are forced, so neither side evaluates or saves periodically.

Both sides get the same model, data and DeepSpeed config, built by dstrain's own functions: the config dict
from `build_deepspeed_config`, the engine (model seeded with trainer.seed, optimizer groups, LR schedule) from
`dstrain.trainer.build_engine`, and the batches from `packed_blocks` + `BatchPlan`, so step s of both sides
reads the same blocks. The table's
"final loss" column (mean loss of the last step over ranks) is the check that they did the same work; a
mismatch prints a warning.

- dstrain: the real `dstrain.trainer.train(cfg, run_dir)`, into a fresh temporary run directory each time.
- raw: `deepspeed.initialize` and a plain loop of forward / `engine.backward` / `engine.step` over batches
  that were gathered from the BatchPlan and moved to the device before the clock starts. This is the floor:
  no data indexing, no loss all-reduce, no grad norm, no metrics.

How time is measured. The clock is read once at the end of every optimizer step on both sides: for dstrain
in the `on_step_end` callback that train() takes (called right after the step's loss has been all-reduced
and turned into a Python float, so the device is synchronised), for raw right after
`accelerator.synchronize()`. The time of step k is the gap
between the stamps of steps k-1 and k, so it holds everything the loop does per step, including dstrain's
logging of the step before; train()'s own tokens_per_s does not (its timer stops before logging and
restarts after eval and save), which is why it is not used. The first --warmup steps (default 5) of every
run are dropped on both sides. The checkpoint that train() always writes after its last step comes after
the last stamp and is not counted; neither are start-up costs (data packing, model build, initialize).

tokens/s of a step = global batch x seq_len / step time. "median tokens/s" is the median over all measured
steps of all runs of that side (robust against a shared machine's hiccups), "mean tokens/s" is all measured
tokens / all measured time (it also counts periodic costs, e.g. a log line every logger.log_every steps),
and "runs" is the lowest and highest per-run median, a feel for the noise. The ratio line compares medians.

Runs alternate in ABBA order (raw, dstrain, dstrain, raw, raw, dstrain, ...; --rounds 4 by default) in one
process group, so drift in the machine's state (clocks, other jobs, caches) falls on both sides alike.
Only rank 0 prints; --verbose shows dstrain's own log lines. Temporary run directories are removed unless
--keep.

Running train() repeatedly in one process: train() destroys its engine and restores the signal handlers it
installed, and the process group stays for the next run. Under ZeRO-3, DeepSpeed
0.19.8 keeps even destroyed engines reachable (module-level state in deepspeed.runtime.zero), so each run's
memory stays held: mind that with large models (fewer --rounds).
"""

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dstrain.checks import validate, validate_accelerator  # noqa: E402
from dstrain.compose import compose  # noqa: E402
from dstrain.config import TrainConfig  # noqa: E402
from dstrain.data import BatchPlan, build_tokenizer, packed_blocks  # noqa: E402
from dstrain.deepspeed_config import build_deepspeed_config  # noqa: E402
from dstrain.distributed import init_distributed, local_device, rank_zero_first, seed_everything  # noqa: E402
from dstrain.errors import ConfigError  # noqa: E402
from dstrain.trainer import build_engine, setup_logging, train  # noqa: E402

DEFAULT_OVERRIDES = ["trainer.max_steps=60"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [flags] [hydra overrides]")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (raw, dstrain), in ABBA order (default 4)")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps of each run not measured (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    parser.add_argument("--verbose", action="store_true", help="show dstrain's own log lines")
    args, overrides = parser.parse_known_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        parser.error("--rounds and --warmup must be at least 1")
    return args, overrides


def compose_config(overrides) -> TrainConfig:
    # run.name only names Hydra's output directory, which this benchmark does not use.
    cfg = compose([*DEFAULT_OVERRIDES, *overrides], run_name="throughput")
    cfg.trainer.eval_every = 0
    cfg.trainer.save_every = 0
    cfg.trainer.resume = "never"
    return cfg


def synchronize() -> None:
    get_accelerator().synchronize()


def run_dstrain(cfg: TrainConfig, run_dir: Path):
    """train() itself; returns the end-of-step time stamps and the last logged loss."""
    stamps = []
    train(cfg, run_dir, on_step_end=lambda step: stamps.append(time.perf_counter()))
    last_loss = None
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        losses = [row for row in rows if "loss" in row]
        last_loss = losses[-1]["loss"] if losses else None
    return stamps, last_loss


def run_raw(cfg: TrainConfig, rank: int, world_size: int):
    """The minimal DeepSpeed loop; returns the end-of-step time stamps and the final step's loss."""
    trainer = cfg.trainer
    seed_everything(trainer.seed)
    device = local_device()
    ds_config = build_deepspeed_config(cfg, world_size)
    tokenizer = build_tokenizer(cfg)
    with rank_zero_first(rank):
        blocks = packed_blocks(cfg, tokenizer, "train")
    with tempfile.TemporaryDirectory() as unused_run_dir:  # a fresh start: no checkpoint to find there
        engine, _, _ = build_engine(cfg, tokenizer, ds_config, Path(unused_run_dir), rank, world_size)
    plan = BatchPlan(
        blocks, trainer.seed, trainer.micro_batch_size, trainer.gradient_accumulation_steps, world_size, rank
    )
    # Step s starts after (s - 1) * global_batch samples, as in train() from a fresh start.
    accumulation = range(trainer.gradient_accumulation_steps)
    batches = [
        [plan.micro_batch(step * plan.global_batch, micro)["input_ids"].to(device) for micro in accumulation]
        for step in range(trainer.max_steps)
    ]

    engine.train()
    stamps, losses = [], []
    synchronize()
    for step_batches in batches:
        losses = []
        for input_ids in step_batches:
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        synchronize()
        stamps.append(time.perf_counter())

    last_loss = torch.stack(losses).float().mean().reshape(1)
    dist.all_reduce(last_loss)
    last_loss = last_loss.item() / world_size
    engine.destroy()
    del engine, batches, losses
    return stamps, last_loss


def step_times(stamps, warmup: int, max_steps: int):
    """Durations of steps warmup+1 .. max_steps from the end-of-step stamps of steps 1 .. max_steps."""
    if len(stamps) != max_steps:
        raise RuntimeError(f"expected {max_steps} step stamps, got {len(stamps)}")
    return [stamps[k] - stamps[k - 1] for k in range(warmup, max_steps)]


def release_memory() -> None:
    gc.collect()
    get_accelerator().empty_cache()


def live_engines():
    gc.collect()
    # type() rather than isinstance(): the latter reads __class__, which some lazy module objects warn on.
    return [obj for obj in gc.get_objects() if issubclass(type(obj), deepspeed.DeepSpeedEngine)]


def _remove_shm_workspace(rank: int) -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce creates a 66 MB segment per rank in /dev/shm and never
    unlinks it (DeepSpeed 0.19.8, ops/csrc/cpu/comm/shm.cpp), so every run would leave RAM-backed files
    behind. Remove this rank's own segment once the last collective is done; the mapping stays valid."""
    if get_accelerator().device_name() != "cpu":
        return
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


def main() -> None:
    args, overrides = parse_args(sys.argv[1:])
    try:
        cfg = compose_config(overrides)
        validate(cfg)
        validate_accelerator(cfg, get_accelerator())
        if args.warmup >= cfg.trainer.max_steps - 1:
            raise ConfigError(f"--warmup={args.warmup} leaves no steps of trainer.max_steps={cfg.trainer.max_steps}")
    except ConfigError as error:
        print(f"throughput: config error: {error}", file=sys.stderr)
        sys.exit(2)

    rank, world_size = init_distributed(timedelta(seconds=cfg.trainer.collective_timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    holder = [tempfile.mkdtemp(prefix="dstrain-throughput-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    root = Path(holder[0])
    setup_logging(rank, root)  # quiets DeepSpeed/transformers/datasets the way training does
    if not args.verbose:
        logging.getLogger("dstrain").setLevel(logging.WARNING)

    def say(message=""):
        if rank == 0:
            print(message, flush=True)

    trainer = cfg.trainer
    tokens_per_step = trainer.micro_batch_size * trainer.gradient_accumulation_steps * world_size * cfg.data.seq_len
    say(
        f"throughput: model={cfg.model.name} zero={cfg.zero.stage}"
        f"{' +offload' if cfg.zero.offload_optimizer or cfg.zero.offload_param else ''} "
        f"precision={cfg.precision.dtype} ranks={world_size} device={get_accelerator().device_name()} "
        f"micro_batch={trainer.micro_batch_size} accumulation={trainer.gradient_accumulation_steps} "
        f"seq_len={cfg.data.seq_len} -> {tokens_per_step} tokens/step; {trainer.max_steps} steps per run, "
        f"first {args.warmup} not measured; {args.rounds} rounds"
    )

    times = {"raw": [], "dstrain": []}
    per_run = {"raw": [], "dstrain": []}
    last_losses = {"raw": None, "dstrain": None}
    for round_index in range(args.rounds):
        order = ("raw", "dstrain") if round_index % 2 == 0 else ("dstrain", "raw")
        for side in order:
            release_memory()
            dist.barrier()
            if side == "raw":
                stamps, last_losses[side] = run_raw(cfg, rank, world_size)
            else:
                run_dir = root / f"dstrain-round{round_index}"
                stamps, last_losses[side] = run_dstrain(cfg, run_dir)
                if local_rank == 0 and not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
            measured = step_times(stamps, args.warmup, trainer.max_steps)
            times[side].extend(measured)
            per_run[side].append(tokens_per_step / statistics.median(measured))
            say(f"  round {round_index + 1} {side:<7} median {per_run[side][-1]:>12,.0f} tokens/s")
    release_memory()
    leftover = len(live_engines())

    say()
    say(f"{'side':<8} {'steps measured':>14} {'median tokens/s':>16} {'mean tokens/s':>14} "
        f"{'runs (min..max)':>17} {'final loss':>11}")
    summary = {}
    for side in ("raw", "dstrain"):
        median = tokens_per_step / statistics.median(times[side])
        mean = tokens_per_step * len(times[side]) / sum(times[side])
        summary[side] = (median, mean)
        loss = "-" if last_losses[side] is None else f"{last_losses[side]:.4f}"
        runs = f"{min(per_run[side]) / 1000:.1f}k..{max(per_run[side]) / 1000:.1f}k"
        say(f"{side:<8} {len(times[side]):>14} {median:>16,.0f} {mean:>14,.0f} {runs:>17} {loss:>11}")
    say(f"ratio dstrain/raw: {summary['dstrain'][0] / summary['raw'][0]:.3f}"
        f"   (mean: {summary['dstrain'][1] / summary['raw'][1]:.3f})")
    raw_loss, dstrain_loss = last_losses["raw"], last_losses["dstrain"]
    if rank == 0 and raw_loss is not None and dstrain_loss is not None:
        if abs(raw_loss - dstrain_loss) > 0.02 * max(1.0, abs(raw_loss)):
            say("warning: the final losses differ, so the two sides did not train on the same batches or "
                "weights; check that the raw loop still matches dstrain.trainer.train()")
    if leftover:
        say(f"note: {leftover} DeepSpeed engine(s) still alive even after engine.destroy(), so their memory was not "
            f"released between runs (ZeRO-3 does this in DeepSpeed 0.19.8); mind memory with large models")

    dist.barrier()
    _remove_shm_workspace(rank)
    if local_rank == 0 and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    elif args.keep:
        say(f"run directories kept under {root}")


if __name__ == "__main__":
    main()
