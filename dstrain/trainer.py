"""The training loop: config in, a trained DeepSpeed engine and checkpoints out.

Read `train` top to bottom: `setup` builds everything the loop needs (engine, data, checkpoints, metrics),
`run` is the loop, `train_step` is one optimizer step, and `Cadence` is the one place that says when to log,
evaluate and save.
"""

import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional

import datasets
import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator

from dstrain.adapters import warn_about_random_base
from dstrain.checkpoint import CheckpointManager, DataIdentity, TrainState
from dstrain.checks import validate, validate_accelerator
from dstrain.compose import save_run_config
from dstrain.config import TrainConfig, flatten
from dstrain.data import Batch, BatchPlan, build_tokenizer, counted_tokens, eval_batches, pad_id
from dstrain.deepspeed_config import build_deepspeed_config
from dstrain.deepspeed_ops import load_op
from dstrain.distributed import (
    from_rank_zero, init_distributed, local_device, rank_zero_first, require_same_on_all_ranks, seed_everything, sum_over_ranks,
)
from dstrain.early_stopping import EarlyStopping
from dstrain.errors import ConfigError, ExitCode, TrainingDiverged
from dstrain.evaluation import EVALUATORS, Generation
from dstrain.grad_norm import GradNormWatch
from dstrain.loss import step_loss
from dstrain.metrics import MetricsLogger
from dstrain.mfu import MfuMeter, mfu_meter, mfu_metrics
from dstrain.model import build_model, model_fingerprint, parameter_counts
from dstrain.optim import optimizer_groups, warmup_cosine_schedule
from dstrain.plan_fit import check_memory_plan
from dstrain.preemption import StopSignal
from dstrain.preparation import data_fingerprint, prepare, write_report
from dstrain.runlock import hold_run_dir
from dstrain.step_stats import (
    batch_digest, loss_scale_metrics, memory_per_rank, replicated_grad_norm, samples_in, tokens_in,
)
from dstrain.watchdog import ProgressWatchdog

log = logging.getLogger("dstrain")


def train(cfg: TrainConfig, run_dir: Path, on_step_end: Optional[Callable[[int], None]] = None) -> bool:
    """Train until trainer.max_steps; returns False if a stop signal ended the run early (after saving).
    on_step_end(step) is called as soon as each step's loss is known on every rank (the benchmarks' clock)."""
    validate(cfg)
    validate_accelerator(cfg, get_accelerator())
    # The watchdog decides, after collective_timeout_s, that a peer hung (and exits with its own code); the
    # backend's timeout is a backstop behind it, so that it never races the watchdog.
    rank, world_size = init_distributed(timedelta(seconds=2 * cfg.trainer.collective_timeout_s))
    # One live run per run directory: rank 0 locks it, and every rank refuses together if it could not.
    with hold_run_dir(run_dir, rank), StopSignal(cfg.trainer.stop_grace_s) as stop_signal:
        training = setup(cfg, run_dir, rank, world_size)
        finished = run(training, stop_signal, on_step_end)
        training.metrics.close()
        training.engine.destroy()
        dist.barrier()
    return finished


@dataclass
class Cadence:
    """When to log, evaluate and save."""

    max_steps: int
    log_every: int
    eval_every: int
    save_every: int

    def logs_in_full(self, step: int, finite: bool) -> bool:
        return step % self.log_every == 0 or step in (1, self.max_steps) or not finite

    def evaluates(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.max_steps)

    def saves(self, step: int, stopping: bool, new_best: bool) -> bool:
        return bool(self.save_every and step % self.save_every == 0) or step == self.max_steps or stopping or new_best


@dataclass
class Training:
    """Everything setup builds for the loop."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    engine: deepspeed.DeepSpeedEngine
    plan: BatchPlan
    val_blocks: Optional[datasets.Dataset]
    checkpoints: CheckpointManager
    metrics: MetricsLogger
    cadence: Cadence
    # Evaluation by generation on the validation prompts; None when eval.generate_every=0.
    generation: Optional[Generation]
    # Where training stands: the step, the data position, the trackers' run ids. Restored from a checkpoint.
    state: TrainState
    # Turns tokens/s into MFU; None where the peak is unknown (dstrain.mfu).
    mfu: Optional[MfuMeter] = None


@dataclass
class StepResult:
    # The step's loss per counted token, over every rank.
    loss: float
    grad_norm: float
    # Whether any rank received a stop signal before the step ended.
    stop: bool
    # Whether DeepSpeed dropped the update (an overflow under fp16, or a NaN/inf it caught).
    update_skipped: bool
    # A checksum of the tokens this rank read (rank 0's is logged): a resumed run must read the same.
    batch_digest: int
    # Tokens the step read over all ranks, without the padding of unpacked micro-batches.
    tokens: int
    # Samples the step trained on over all ranks: conversations in packed rows, else rows.
    samples: int


def setup(cfg: TrainConfig, run_dir: Path, rank: int, world_size: int) -> Training:
    setup_logging(rank, run_dir)
    if rank == 0:
        save_run_config(cfg, run_dir)
    require_same_on_all_ranks({"config": asdict(cfg), "run_dir": str(run_dir)}, "configs or run directories")
    seed_everything(cfg.trainer.seed)
    ds_config = build_deepspeed_config(cfg, world_size)
    log.info("run directory: %s", run_dir)
    log.info(
        "global batch: %d sequences of %d tokens (micro-batch %d x accumulation %d x %d ranks)",
        ds_config["train_batch_size"], cfg.data.seq_len, cfg.trainer.micro_batch_size,
        cfg.trainer.gradient_accumulation_steps, world_size,
    )
    check_memory_plan(cfg, world_size)
    tokenizer = build_tokenizer(cfg)
    fingerprint = from_rank_zero(rank, lambda: data_fingerprint(cfg, tokenizer))
    with rank_zero_first(rank):
        data = prepare(cfg, tokenizer, fingerprint, needs_validation=bool(cfg.trainer.eval_every))
    if rank == 0:
        write_report(data, run_dir)
    if data.validation is not None and len(data.validation) < cfg.trainer.micro_batch_size * world_size:
        raise ConfigError(
            f"the validation data has {len(data.validation)} rows, fewer than one micro-batch per rank "
            f"({cfg.trainer.micro_batch_size} x {world_size} ranks), so evaluation would see nothing. Give more "
            f"validation data (a larger data.split ratio or more data.val_files) or lower trainer.micro_batch_size."
        )
    engine, checkpoints, resume_from = build_engine(cfg, tokenizer, ds_config, run_dir, rank, world_size,
                                                    DataIdentity(data.fingerprint, data.chat_template))
    state = checkpoints.load(engine, resume_from) if resume_from is not None else TrainState()
    plan = BatchPlan(
        data.train, cfg.trainer.seed, cfg.trainer.micro_batch_size, cfg.trainer.gradient_accumulation_steps,
        world_size, rank, pad_id(tokenizer),
    )
    metrics = MetricsLogger(
        run_dir, cfg.logger, rank == 0, cfg.trainer.max_steps, state.step, asdict(cfg), state.tracker_run_id,
        state.mlflow_run_id,
    )
    cadence = Cadence(cfg.trainer.max_steps, cfg.logger.log_every, cfg.trainer.eval_every, cfg.trainer.save_every)
    generation = (Generation(cfg.eval, cfg.data.seq_len, tokenizer, data.prompts["validation"], data.chat_template)
                  if cfg.eval.generate_every else None)
    return Training(
        cfg, rank, world_size, local_device(), engine, plan, data.validation, checkpoints, metrics, cadence, generation,
        replace(state, tracker_run_id=metrics.tracker_run_id, mlflow_run_id=metrics.mlflow_run_id),
        mfu_meter(cfg, local_device(), rank),
    )


def build_engine(cfg: TrainConfig, tokenizer, ds_config: dict, run_dir: Path, rank: int, world_size: int,
                 data: DataIdentity = DataIdentity()):
    """The model inside a DeepSpeed engine with its optimizer and LR schedule, the run's checkpoints, and the
    checkpoint to resume from (None for a fresh start). The checkpoint is chosen before the engine exists, so
    that one from another world size can be converted first. `data` says what the checkpoints will record of
    the data, and what a checkpoint to resume must match."""
    # Keeping this object alive is what tells transformers to build the model inside deepspeed.zero.Init.
    hf_deepspeed_config = register_zero3_with_transformers(ds_config)
    warn_about_random_base(cfg, log)
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
        cfg.trainer.keep_last, cfg.trainer.keep_every, data, cfg.data.changed_on_resume,
        EarlyStopping(cfg.trainer.early_stopping).metric,
    )
    resume_from = checkpoints.choose(cfg.trainer.resume)
    if resume_from is not None and checkpoints.needs_universal(resume_from):
        checkpoints.convert_to_universal(resume_from)
        ds_config["checkpoint"] = {"load_universal": True}
    load_op("CPUAdamBuilder" if cfg.zero.offload_optimizer else "FusedAdamBuilder")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, cfg),
        config=ds_config,
        # Handing the scheduler to DeepSpeed is what puts its state into every checkpoint.
        lr_scheduler=lambda optimizer: warmup_cosine_schedule(optimizer, cfg),
    )
    return engine, checkpoints, resume_from


def run(t: Training, stop_signal: StopSignal, on_step_end: Optional[Callable[[int], None]] = None) -> bool:
    """The loop; returns False if a stop signal ended it (after saving)."""
    state, cfg = t.state, t.cfg
    t.engine.train()
    skipped_in_a_row, stopping = 0, False
    early_stopping = EarlyStopping(cfg.trainer.early_stopping)
    grad_norms = GradNormWatch(cfg.trainer.grad_norm_band, cfg.trainer.grad_norm_patience, speaks=t.rank == 0)
    step_started = time.perf_counter()
    with ProgressWatchdog(cfg.trainer.collective_timeout_s) as watchdog:
        # A run that stopped early and is started again has nothing left to do.
        while state.step < cfg.trainer.max_steps and not stopping and not early_stopping.patience_ran_out(state):
            watchdog.progress()
            step = state.step + 1
            batches = [t.plan.micro_batch(state.samples_consumed, micro) for micro in range(t.plan.accumulation_steps)]
            result = train_step(t, batches, stop_signal.received is not None)
            epoch = t.plan.epoch_of_sample(state.samples_consumed)
            state = replace(state, step=step, samples_consumed=state.samples_consumed + t.plan.global_batch)
            if on_step_end is not None:
                on_step_end(step)
            elapsed = time.perf_counter() - step_started
            finite = log_step(t, step, result, elapsed, epoch)
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
            if not finite:
                check_nonfinite_step(step, result, skipped_in_a_row, cfg.trainer, t.checkpoints, t.rank)
            grad_norms.observe(step, result.grad_norm)
            new_best = False
            if t.cadence.evaluates(step):
                watchdog.progress()
                results = evaluate(t, step)
                t.metrics.log(step, results)
                state, new_best = early_stopping.judge(state, results)
            stopping = result.stop
            if t.cadence.saves(step, stopping or early_stopping.patience_ran_out(state), new_best):
                watchdog.progress()
                save_started = time.perf_counter()
                saved = t.checkpoints.save(t.engine, state)
                log.info("saved checkpoint %s", saved)
                t.metrics.checkpoint_saved(step, saved, time.perf_counter() - save_started)
            step_started = time.perf_counter()
    converged = early_stopping.patience_ran_out(state)
    if converged:
        log.info(early_stopping.stop_message(state))
    elif stopping:
        log.warning("stop signal received: saved at step %d; exiting with code %d so that the job is restarted, "
                    "and a restart resumes here", state.step, ExitCode.PREEMPTED)
    else:
        log.info("done: step %d of %d", state.step, cfg.trainer.max_steps)
    t.state = state
    return converged or not stopping


def train_step(t: Training, batches: List[Batch], stop_requested: bool) -> StepResult:
    """One optimizer step over this rank's micro-batches; the loss and the stop flag are agreed by all ranks."""
    engine, device = t.engine, t.device
    counted_in_step = int(sum_over_ranks([sum(counted_tokens(batch) for batch in batches)], device)[0])
    micro_batches_in_step = len(batches) * t.world_size
    # DeepSpeed's plain fp32 path clips without keeping the norm; its grads are whole on every rank there.
    norm_here = engine.zero_optimization_stage() == 0 and t.cfg.precision.dtype == "fp32"
    skipped_before, grad_norm, micro_losses = engine.skipped_steps, None, []
    for batch in batches:
        loss = step_loss(engine, {key: value.to(device) for key, value in batch.items()}, counted_in_step,
                         micro_batches_in_step)
        engine.backward(loss)
        if norm_here and engine.is_gradient_accumulation_boundary():
            grad_norm = replicated_grad_norm(engine.module)
        engine.step()
        micro_losses.append(loss.detach().float())
    grad_norm = float(engine.get_global_grad_norm() if grad_norm is None else grad_norm)
    # One collective carries the loss, whether any rank was told to stop, and the tokens and samples read.
    loss_sum, stops, tokens, samples = sum_over_ranks(
        [torch.stack(micro_losses).mean(), float(stop_requested), float(sum(tokens_in(batch) for batch in batches)),
         float(sum(samples_in(batch) for batch in batches))],
        device)
    return StepResult(loss_sum / t.world_size, grad_norm, bool(stops), engine.skipped_steps > skipped_before,
                      batch_digest(batches), int(tokens), int(samples))


def log_step(t: Training, step: int, result: StepResult, elapsed: float, epoch: int) -> bool:
    """Write the step's metrics; returns whether its loss and gradient norm were finite."""
    # Under fp16 an infinite gradient norm is the loss scaler's routine overflow, not a fault.
    finite = math.isfinite(result.loss) and (math.isfinite(result.grad_norm) or t.cfg.precision.dtype == "fp16")
    tokens_per_s = result.tokens / elapsed
    t.metrics.advance(step, result.loss, tokens_per_s)
    every_step = {"loss": result.loss, "lr": t.engine.get_lr()[0], "batch_digest": result.batch_digest}
    if not t.cadence.logs_in_full(step, finite):
        t.metrics.log(step, every_step, echo=False)
        return finite
    t.metrics.log(step, {
        **every_step,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens_per_s,
        **mfu_metrics(t.mfu, tokens_per_s),
        "samples_per_s": result.samples / elapsed,
        "epoch": epoch,
        **({} if finite else {"update_skipped": result.update_skipped}),
        **loss_scale_metrics(t.engine, t.cfg),
        **memory_per_rank(t.device, t.world_size),
    })
    return finite


def evaluate(t: Training, step: int) -> dict:
    t.engine.eval()
    results = {}
    for name in t.cfg.trainer.eval_metrics:
        batches = eval_batches(t.val_blocks, t.cfg.trainer.micro_batch_size, t.world_size, t.rank,
                               t.cfg.trainer.eval_batches, t.plan.pad_id)
        results.update(EVALUATORS[name].evaluate(t.engine, batches, t.device))
    if t.generation is not None and t.generation.due(step, t.cfg.trainer.max_steps):
        synced = t.engine.zero_optimization_stage() == 3
        results.update(t.generation.evaluate(t.engine.module, t.device, t.rank, t.world_size, synced))
    t.engine.train()
    return results


def check_nonfinite_step(step, result: StepResult, skipped_in_a_row, trainer, checkpoints, rank) -> None:
    """Raise TrainingDiverged unless trainer.nonfinite=skip allows going on. Raised before the step could be
    saved, so the newest checkpoint is always from a finite step. Every rank sees the same all-reduced loss
    and global gradient norm, so all ranks decide alike."""
    what = f"step {step}: loss {result.loss}, gradient norm {result.grad_norm}"
    newest = checkpoints.checkpoints()
    kept = f"The newest checkpoint, {newest[-1]}, is from before it and is kept." if newest else "No checkpoint was saved yet."
    if trainer.nonfinite == "stop":
        raise TrainingDiverged(
            f"{what}; stopped (trainer.nonfinite=stop) without saving. {kept} Lower optim.lr, raise "
            f"precision (fp32), check the data, or set trainer.nonfinite=skip to drop such steps."
        )
    if not result.update_skipped:
        raise TrainingDiverged(f"{what}, and DeepSpeed applied the update anyway; stopped without saving. {kept}")
    if skipped_in_a_row > trainer.max_consecutive_skips:
        raise TrainingDiverged(
            f"{what}: {skipped_in_a_row} steps in a row were NaN/inf and skipped "
            f"(trainer.max_consecutive_skips={trainer.max_consecutive_skips}); the model has diverged. {kept}"
        )
    if rank == 0:
        log.warning("%s: update skipped, weights unchanged (%d in a row, trainer.nonfinite=skip)", what,
                    skipped_in_a_row)


def register_zero3_with_transformers(ds_config: dict):
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


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
    silence_library_notices()
    if rank != 0:
        transformers.logging.set_verbosity_error()


def silence_library_notices() -> None:
    """Warnings from the libraries about their own internals, which the user cannot act on."""
    # DeepSpeed still calls the old names of these collectives.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # peft's prefix tuning hands its virtual keys and values to transformers under their old name.
    warnings.filterwarnings("ignore", message=r".*`past_key_values`.*(deprecated|are set)", category=FutureWarning)
    # bitsandbytes looks for an optional faster CPU 4-bit kernel on the Hub and says so when it is not there.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
