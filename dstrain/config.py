"""Typed config schema and the checks that run before any process group starts.

The primary config (`conf/train.yaml`) has the defaults `[schema, _self_]`. `schema` is `TrainConfig` below,
so a bare run uses these defaults, `+model=7b` merges `conf/model/7b.yaml` over the `model` node, and any key
that is not declared here is rejected by OmegaConf before training starts.
"""

from dataclasses import dataclass, field, fields
from typing import List, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A config that cannot work. The message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local Hugging Face directory (or a hub name where there is network). When set, the architecture,
    # the weights and the tokenizer all come from it and the shape fields below are ignored.
    pretrained: Optional[str] = None
    vocab_size: int = 258
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    # fp16 only: dynamic loss scaling when loss_scale is 0, else a static scale.
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    # bf16 only: the dtype that gradients accumulate in across micro-batches ("fp32" or "bf16").
    grad_accum_dtype: Optional[str] = None


@dataclass
class PeftConfig:
    method: str = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_steps: int = 10
    # The LR decays from optim.lr to min_lr_ratio * optim.lr over the steps after warmup.
    min_lr_ratio: float = 0.1


@dataclass
class DataConfig:
    name: str = "builtin"
    # Local files for name=files: plain text (one document per line) or JSONL (one object per line).
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    format: str = "text"
    text_field: str = "text"
    seq_len: int = 128
    # A tokenizer directory or hub name. Unset: the pretrained model's tokenizer, else byte-level.
    tokenizer: Optional[str] = None
    builtin_train_documents: int = 4000
    builtin_val_documents: int = 200


@dataclass
class TrainerConfig:
    seed: int = 1234
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    max_steps: int = 200
    gradient_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    # Checkpoints kept: the newest keep_last (0 keeps all), plus every keep_every-th step (0: none) forever.
    keep_last: int = 3
    keep_every: int = 0
    # How long a rank waits for a peer that died or hung before it exits (code 4): the limit for one
    # collective, and for one step, evaluation or save (dstrain.watchdog). Set it above the longest of these.
    collective_timeout_s: float = 1800.0
    # After SIGTERM/SIGUSR1, the time allowed to reach the next step boundary and save. When it runs out the
    # run exits anyway (code 75, no new checkpoint) so that the scheduler's SIGKILL never lands mid-save.
    stop_grace_s: float = 120.0
    # A step whose loss or gradient norm is NaN/inf: "stop" ends the run without saving it (the newest
    # checkpoint stays the last good one); "skip" lets DeepSpeed drop the update and trains on, and stops
    # after max_consecutive_skips such steps in a row.
    nonfinite: str = "stop"
    max_consecutive_skips: int = 10
    # "auto": continue from the newest checkpoint in the run directory, if any.
    # "must": the same, but refuse to start from step 0 when there is none that loads.
    # "never": start fresh, and refuse to if the run directory already has checkpoints.
    # A path: load that checkpoint directory.
    resume: str = "auto"


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dstrain"
    entity: Optional[str] = None
    # Runs of one Hydra multirun share a group by default (the sweep's name); set it to group runs yourself.
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # The W&B run's display name; by default the run directory's name.
    name: Optional[str] = None
    # "online", "offline" or "disabled"; the WANDB_MODE environment variable, where set, wins.
    mode: str = "online"
    # How long to try to reach the W&B server before falling back to offline logging.
    init_timeout_s: float = 90.0


@dataclass
class TensorBoardConfig:
    enabled: bool = False


@dataclass
class LoggerConfig:
    # The metrics file in the run directory, always written: "jsonl" or "csv".
    file: str = "jsonl"
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


@dataclass
class RunConfig:
    # Checkpoints, metrics and the composed config go to <root>/<name>. The name is derived from the
    # command-line overrides, so every rank and every restart of the same command finds the same directory.
    root: str = "outputs"
    name: str = "${dstrain_run_name:}"


@dataclass
class LauncherConfig:
    # Read by `dstrain submit` (dstrain/slurm.py, which checks it); training itself ignores it.
    nodes: int = 1
    # Ranks per node, one GPU each. With device=cpu: CPU processes per node, and no GPU is requested.
    gpus_per_node: int = 1
    gpu_type: Optional[str] = None
    device: str = "gpu"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    # None: the cluster's default partition, account and QoS.
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # SLURM's --time ("HH:MM:SS", "D-HH:MM:SS", minutes); None: the partition's default.
    time: Optional[str] = None
    job_name: Optional[str] = None
    # More sbatch options, one per item ("--exclusive", "--constraint=a100"); one #SBATCH line each.
    extra_sbatch: List[str] = field(default_factory=list)
    # Sent to every rank signal_lead_s before the time limit: dstrain saves at the next step boundary and
    # exits with 75, and with requeue the job goes back into the queue and resumes from that checkpoint.
    signal: str = "USR1"
    signal_lead_s: int = 300
    requeue: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=TrainConfig)


_CHOICES = {
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "peft.method": ("none", "lora"),
    "optim.name": ("adamw",),
    "scheduler.name": ("cosine",),
    "data.name": ("builtin", "files"),
    "data.format": ("text", "jsonl"),
    "logger.file": ("jsonl", "csv"),
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "zero.stage": (0, 1, 2, 3),
    "trainer.nonfinite": ("stop", "skip"),
    "precision.grad_accum_dtype": (None, "fp32", "bf16"),
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: TrainConfig) -> None:
    """Reject combinations that cannot work, before any process group or model exists."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")

    precision = cfg.precision
    if precision.dtype != "fp16":
        defaults = PrecisionConfig()
        changed = [
            f.name
            for f in fields(PrecisionConfig)
            if f.name in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
            and getattr(precision, f.name) != getattr(defaults, f.name)
        ]
        if changed:
            raise ConfigError(
                f"precision.{changed[0]} is an fp16 loss-scaling option, but precision.dtype={precision.dtype}. "
                f"Remove it, or train in fp16 with +precision=fp16."
            )
    if precision.grad_accum_dtype is not None and precision.dtype != "bf16":
        raise ConfigError(
            f"precision.grad_accum_dtype is a bf16-only option, but precision.dtype={precision.dtype}. "
            f"Remove it, or train in bf16 with +precision=bf16."
        )

    zero = cfg.zero
    if zero.offload_param and zero.stage != 3:
        raise ConfigError(
            f"zero.offload_param needs ZeRO stage 3, but zero.stage={zero.stage}. Use +zero=3_offload."
        )
    if zero.offload_optimizer and zero.stage == 0:
        raise ConfigError("zero.offload_optimizer needs ZeRO stage 1, 2 or 3. Use +zero=2_offload.")

    trainer = cfg.trainer
    for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "max_consecutive_skips"):
        if getattr(trainer, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(trainer, key)} must be at least 1")
    for key in ("eval_every", "save_every"):
        if getattr(trainer, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(trainer, key)} must be 0 (off) or positive")
    if trainer.stop_grace_s <= 0 or trainer.collective_timeout_s <= 0:
        raise ConfigError("trainer.stop_grace_s and trainer.collective_timeout_s must be positive (seconds)")
    if trainer.nonfinite == "skip" and zero.stage == 0 and precision.dtype == "fp32":
        # Only DeepSpeed's optimizer wrappers (ZeRO 1-3, bf16, fp16) check gradients before updating; plain
        # ZeRO-0 fp32 hands them straight to torch's AdamW, which would write the NaN into the weights.
        raise ConfigError(
            "trainer.nonfinite=skip needs an engine that can drop an update, and ZeRO-0 in fp32 cannot. "
            "Use +zero=1 (the same memory on one rank), +precision=bf16, or trainer.nonfinite=stop."
        )
    if cfg.scheduler.warmup_steps >= trainer.max_steps:
        raise ConfigError(
            f"scheduler.warmup_steps={cfg.scheduler.warmup_steps} must be below "
            f"trainer.max_steps={trainer.max_steps}"
        )

    # conf/model/pretrained.yaml says `pretrained: ???`, but merging MISSING over the schema's None keeps None,
    # so without this check `+model=pretrained` alone would quietly train the tiny shape from scratch.
    if cfg.model.name == "pretrained" and not cfg.model.pretrained:
        raise ConfigError(
            "+model=pretrained needs a Hugging Face directory: model.pretrained=/path/to/model_dir"
        )

    data = cfg.data
    if data.name == "files" and not data.train_files:
        raise ConfigError("data.name=files needs data.train_files, e.g. data.train_files=[/abs/path/train.jsonl]")
    if data.name == "files" and trainer.eval_every and not data.val_files:
        raise ConfigError(
            "trainer.eval_every is set but data.val_files is empty. Give data.val_files=[...] "
            "or turn evaluation off with trainer.eval_every=0."
        )
    if cfg.model.pretrained is None and data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    if cfg.peft.method == "lora" and cfg.peft.r < 1:
        raise ConfigError(f"peft.r={cfg.peft.r} must be at least 1")


def validate_accelerator(cfg: TrainConfig, accelerator) -> None:
    """Checks that need to know the hardware, still before any process group starts."""
    name = accelerator.device_name()
    if cfg.precision.dtype == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"precision.dtype=bf16 is not supported on this {name} device. Use +precision=fp16.")
    if cfg.precision.dtype == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"precision.dtype=fp16 is not supported on the {name} accelerator. Use +precision=bf16 or fp32."
        )
