"""The training loop: config in, a trained DeepSpeed engine and checkpoints out. Read it top to bottom."""

import atexit
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import datasets
import deepspeed
import numpy as np
import psutil
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator

from dstrain.checkpoint import CheckpointManager, TrainState
from dstrain.config import ConfigError, TrainConfig, validate, validate_accelerator
from dstrain.data import BatchPlan, build_tokenizer, eval_batches, packed_blocks
from dstrain.deepspeed_config import build_deepspeed_config
from dstrain.metrics import MetricsLogger
from dstrain.preemption import PREEMPTED_EXIT_CODE, StopSignal
from dstrain.runlock import hold_run_dir
from dstrain.watchdog import ProgressWatchdog
from dstrain.slurm import rendezvous_from_slurm
from dstrain.model import build_model, model_fingerprint, parameter_counts, weight_decay_groups

log = logging.getLogger("dstrain")


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss or gradient norm that trainer.nonfinite says to stop on."""


def train(cfg: TrainConfig, run_dir: Path) -> bool:
    """Train until trainer.max_steps; returns False if a stop signal ended the run early (after saving)."""
    validate(cfg)
    validate_accelerator(cfg, get_accelerator())
    rank, world_size = init_distributed(timedelta(seconds=cfg.trainer.collective_timeout_s))
    # One live run per run directory: rank 0 locks it, and every rank refuses together if it could not.
    with hold_run_dir(run_dir, rank), StopSignal(cfg.trainer.stop_grace_s) as stop_signal:
        return _train(cfg, run_dir, rank, world_size, stop_signal)


def _train(cfg: TrainConfig, run_dir: Path, rank: int, world_size: int, stop_signal: StopSignal) -> bool:
    setup_logging(rank, run_dir)
    require_one_config(cfg, run_dir, world_size)
    seed_everything(cfg.trainer.seed)
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    trainer = cfg.trainer
    ds_config = build_deepspeed_config(cfg, world_size)
    log.info("run directory: %s", run_dir)
    log.info(
        "global batch: %d sequences of %d tokens (micro-batch %d x accumulation %d x %d ranks)",
        ds_config["train_batch_size"], cfg.data.seq_len, trainer.micro_batch_size,
        trainer.gradient_accumulation_steps, world_size,
    )

    tokenizer = build_tokenizer(cfg)
    with rank_zero_first(rank):
        train_blocks = packed_blocks(cfg, tokenizer, "train")
        val_blocks = packed_blocks(cfg, tokenizer, "val") if trainer.eval_every else None

    # Keeping this object alive is what tells transformers to build the model inside deepspeed.zero.Init.
    hf_deepspeed_config = _register_zero3_with_transformers(ds_config)
    if cfg.peft.method != "none" and not cfg.model.pretrained:
        log.warning("peft.method=%s on a randomly initialised model: only the adapters train. "
                    "Set model.pretrained=<dir> to fine-tune real weights.", cfg.peft.method)
    model = build_model(cfg, tokenizer)
    # Whatever building consumed, training draws the same random numbers under every ZeRO stage.
    seed_everything(cfg.trainer.seed)
    total, trainable = parameter_counts(model)
    log.info("model %s: %s parameters, %s trainable", cfg.model.name, f"{total:,}", f"{trainable:,}")
    if hf_deepspeed_config is not None:
        tensors = list(model.parameters())
        partitioned = sum(hasattr(parameter, "ds_id") for parameter in tensors)
        log.info("ZeRO-3: %d of %d parameter tensors partitioned as they were built", partitioned, len(tensors))
    checkpoints = CheckpointManager(
        run_dir / "checkpoints", rank, world_size, model_fingerprint(model), flatten(asdict(cfg)),
        trainer.keep_last, trainer.keep_every,
    )
    resume_from = checkpoints.choose(trainer.resume)
    if resume_from is not None and checkpoints.needs_universal(resume_from):
        checkpoints.convert_to_universal(resume_from)
        ds_config["checkpoint"] = {"load_universal": True}

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, cfg.optim.weight_decay),
        config=ds_config,
        # Handing the scheduler to DeepSpeed is what puts its state into every checkpoint.
        lr_scheduler=lambda optimizer: warmup_cosine_schedule(optimizer, cfg),
    )
    del hf_deepspeed_config

    state = checkpoints.load(engine, resume_from) if resume_from is not None else TrainState()

    plan = BatchPlan(
        train_blocks, trainer.seed, trainer.micro_batch_size, trainer.gradient_accumulation_steps, world_size, rank
    )
    metrics = MetricsLogger(
        run_dir, cfg.logger, rank == 0, trainer.max_steps, state.step, asdict(cfg), state.tracker_run_id
    )
    state = replace(state, tracker_run_id=metrics.tracker_run_id)
    tokens_per_step = plan.global_batch * cfg.data.seq_len
    # DeepSpeed's plain fp32 path clips without keeping the norm; its grads are whole on every rank there.
    engine_skips_grad_norm = engine.zero_optimization_stage() == 0 and cfg.precision.dtype == "fp32"
    engine.train()
    skipped_in_a_row, stops = 0, False
    step_started = time.perf_counter()

    with ProgressWatchdog(trainer.collective_timeout_s) as watchdog:
        while state.step < trainer.max_steps:
            watchdog.progress()
            step = state.step + 1
            micro_losses, grad_norm = [], None
            skipped_before = engine.skipped_steps
            for micro_step in range(trainer.gradient_accumulation_steps):
                input_ids = plan.micro_batch(state.samples_consumed, micro_step).to(device)
                loss = engine(input_ids=input_ids, labels=input_ids).loss
                engine.backward(loss)
                if engine_skips_grad_norm and engine.is_gradient_accumulation_boundary():
                    grad_norm = replicated_grad_norm(engine.module)
                engine.step()
                micro_losses.append(loss.detach().float())
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm)
            epoch = plan.epoch_of_sample(state.samples_consumed)
            state = replace(state, step=step, samples_consumed=state.samples_consumed + plan.global_batch)
            # One collective per step carries both the loss and whether any rank was told to stop.
            loss_sum, stops = sum_over_ranks(
                [torch.stack(micro_losses).mean(), float(stop_signal.received is not None)], device
            )
            loss = loss_sum / world_size

            now = time.perf_counter()
            elapsed, step_started = now - step_started, now
            # Under fp16 an infinite gradient norm is the loss scaler's routine overflow, not a fault.
            finite = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.precision.dtype == "fp16")
            update_skipped = engine.skipped_steps > skipped_before
            metrics.advance(step, loss, tokens_per_step / elapsed)
            if step % cfg.logger.log_every == 0 or step == trainer.max_steps or step == 1 or not finite:
                metrics.log(step, {
                    "loss": loss,
                    "lr": engine.get_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_step / elapsed,
                    "samples_per_s": plan.global_batch / elapsed,
                    "epoch": epoch,
                    **({} if finite else {"update_skipped": update_skipped}),
                    **_loss_scale_metrics(engine, cfg),
                    **memory_per_rank(device, world_size),
                })
            else:
                metrics.log(step, {"loss": loss, "lr": engine.get_lr()[0]}, echo=False)
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
            if not finite:
                check_nonfinite_step(step, loss, grad_norm, update_skipped, skipped_in_a_row, trainer, checkpoints)
                if rank == 0:
                    log.warning("step %d: loss %s, gradient norm %s: update skipped, weights unchanged "
                                "(%d in a row, trainer.nonfinite=skip)", step, loss, grad_norm, skipped_in_a_row)

            is_last = step == trainer.max_steps
            if trainer.eval_every and (step % trainer.eval_every == 0 or is_last):
                watchdog.progress()
                eval_loss = evaluate(engine, val_blocks, trainer, world_size, rank, device)
                metrics.log(step, {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
            if (trainer.save_every and step % trainer.save_every == 0) or is_last or stops:
                watchdog.progress()
                save_started = time.perf_counter()
                path = checkpoints.save(engine, state)
                log.info("saved checkpoint %s", path)
                metrics.log(step, {"checkpoint_step": step, "checkpoint_save_s": time.perf_counter() - save_started},
                            echo=False)
            if stops:
                log.warning("stop signal received: saved at step %d; exiting with code %d so that the job is "
                            "restarted, and a restart resumes here", step, PREEMPTED_EXIT_CODE)
                break
            step_started = time.perf_counter()

    metrics.close()
    if not stops:
        log.info("done: step %d of %d", state.step, trainer.max_steps)
    engine.destroy()
    dist.barrier()
    return not stops


def check_nonfinite_step(step, loss, grad_norm, update_skipped, skipped_in_a_row, trainer, checkpoints) -> None:
    """Raise TrainingDiverged unless trainer.nonfinite=skip allows going on. Raised before the step could be
    saved, so the newest checkpoint is always from a finite step. Every rank sees the same all-reduced loss
    and global gradient norm, so all ranks decide alike."""
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    newest = checkpoints.checkpoints()
    kept = f"The newest checkpoint, {newest[-1]}, is from before it and is kept." if newest else "No checkpoint was saved yet."
    if trainer.nonfinite == "stop":
        raise TrainingDiverged(
            f"{what}; stopped (trainer.nonfinite=stop) without saving. {kept} Lower optim.lr, raise "
            f"precision (fp32), check the data, or set trainer.nonfinite=skip to drop such steps."
        )
    if not update_skipped:
        raise TrainingDiverged(f"{what}, and DeepSpeed applied the update anyway; stopped without saving. {kept}")
    if skipped_in_a_row > trainer.max_consecutive_skips:
        raise TrainingDiverged(
            f"{what}: {skipped_in_a_row} steps in a row were NaN/inf and skipped "
            f"(trainer.max_consecutive_skips={trainer.max_consecutive_skips}); the model has diverged. {kept}"
        )


def require_one_config(cfg: TrainConfig, run_dir: Path, world_size: int) -> None:
    """Every rank must train the same config in the same directory; a value resolved separately per process
    (a timestamp, an environment variable that differs between nodes) would silently split them."""
    described = json.dumps({"config": asdict(cfg), "run_dir": str(run_dir)}, sort_keys=True, default=str)
    digests = [None] * world_size
    dist.all_gather_object(digests, hashlib.sha1(described.encode()).hexdigest())
    if len(set(digests)) > 1:
        groups = {digest: [rank for rank, other in enumerate(digests) if other == digest] for digest in digests}
        raise ConfigError(
            f"the ranks composed different configs or run directories (ranks grouped by config: "
            f"{list(groups.values())}). Give every rank the same command line, and avoid values resolved per "
            f"process such as ${{now:...}} in run.name or run.root."
        )


def evaluate(engine, blocks, trainer, world_size: int, rank: int, device) -> float:
    engine.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for input_ids in eval_batches(blocks, trainer.micro_batch_size, world_size, rank, trainer.eval_batches):
            input_ids = input_ids.to(device)
            total += engine(input_ids=input_ids, labels=input_ids).loss.float()
            count += 1
    engine.train()
    return mean_over_ranks(total / max(count, 1))


def warmup_cosine_schedule(optimizer, cfg: TrainConfig):
    warmup, max_steps = cfg.scheduler.warmup_steps, cfg.trainer.max_steps
    floor = cfg.scheduler.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def mean_over_ranks(value: torch.Tensor) -> float:
    return sum_over_ranks([value], value.device)[0] / dist.get_world_size()


def sum_over_ranks(values, device) -> list:
    """Sum a few scalars over all ranks in one collective, on the device the backend (NCCL or gloo) serves."""
    packed = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replicated_grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def memory_per_rank(device: torch.device, world_size: int) -> dict:
    """Each rank's peak accelerator memory (resident memory on a CPU), in GB; a collective, so every rank
    calls it at the same steps."""
    if device.type == "cpu":
        used = psutil.Process().memory_info().rss
    else:
        used = get_accelerator().max_memory_allocated(device)
    gathered = torch.zeros(world_size, dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, torch.tensor([used / 1e9], dtype=torch.float64, device=device))
    per_rank = gathered.tolist()
    return {"memory_gb_max": round(max(per_rank), 3),
            **{f"memory_gb/rank{rank}": round(value, 3) for rank, value in enumerate(per_rank)}}


def _loss_scale_metrics(engine, cfg: TrainConfig) -> dict:
    if cfg.precision.dtype != "fp16":
        return {}
    return {"loss_scale": float(engine.optimizer.cur_scale), "skipped_steps": int(engine.skipped_steps)}


def _register_zero3_with_transformers(ds_config: dict):
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


class rank_zero_first:
    """Rank 0 prepares (and caches) the data first; the others then read its cache."""

    def __init__(self, rank: int):
        self.rank = rank

    def __enter__(self):
        if self.rank != 0:
            dist.barrier()

    def __exit__(self, *exc):
        if self.rank == 0 and exc[0] is None:
            dist.barrier()


def init_distributed(timeout: timedelta):
    """Join the process group that the launcher (deepspeed, torchrun, srun) described in the environment.
    A plain `python launch/train.py` becomes a world of one. The group lives as long as the process: the jobs
    of a Hydra multirun train one after another in it, and a group set up again on the same port could meet
    the previous one's store."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.update(rendezvous_from_slurm(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; without this each would start a thread per core.
        # LOCAL_WORLD_SIZE: torchrun, srun (dstrain.slurm); LOCAL_SIZE: DeepSpeed's launcher.
        local_world = int(
            os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1")
        )
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), timeout=timeout, verbose=False
    )
    atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    # Gloo's worker threads outlive a group that is not destroyed, and abort the interpreter at exit.
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 tells the user what happens; other ranks only speak up about problems."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank {rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    datasets.disable_progress_bars()
    # DeepSpeed still calls the old names of these collectives; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if rank != 0:
        transformers.logging.set_verbosity_error()
