"""Typed config schema: every key, its default and what it means.

The primary config (`conf/train.yaml`) has the defaults `[schema, _self_]`. `schema` is `TrainConfig` below,
so a bare run uses these defaults, `+model=7b` merges `conf/model/7b.yaml` over the `model` node, and any key
that is not declared here is rejected by OmegaConf before training starts.

A field whose value is one of a few names says so next to it: `one_of(default, names...)` for fixed names, or
`one_of(default, registry="module:NAME")` (`some_of` for lists) for the choice axes whose components live in a registry
(dstrain.registry): PEFT methods, data sources, evaluators. dstrain.checks.validate checks every such field.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from dstrain.config_fields import in_range, one_of, some_of
from dstrain.data_config import DataConfig
from dstrain.peft_config import PeftConfig
from dstrain.eval_config import EvalConfig


@dataclass
class ModelConfig:
    # The preset's name (conf/model/<name>.yaml), shown in logs; "pretrained" requires model.pretrained.
    name: str = "tiny"
    # A local Hugging Face directory (or a hub name where there is network). When set, the architecture,
    # the weights and the tokenizer all come from it and the shape fields below are ignored.
    pretrained: Optional[str] = None
    # Tokens in the embedding and output layers; at least the tokenizer's length.
    vocab_size: int = in_range(258, at_least=1)
    # Width of the residual stream.
    hidden_size: int = in_range(64, at_least=1)
    # Width of each block's SwiGLU feed-forward layer.
    intermediate_size: int = in_range(176, at_least=1)
    # Transformer blocks.
    num_hidden_layers: int = in_range(2, at_least=1)
    # Query heads per block; hidden_size must divide by it.
    num_attention_heads: int = in_range(4, at_least=1)
    # Key/value heads (grouped-query attention when below num_attention_heads).
    num_key_value_heads: int = in_range(2, at_least=1)
    # Longest sequence the rotary embedding is set up for; data.seq_len may not exceed it.
    max_position_embeddings: int = in_range(512, at_least=1)
    # Base of the rotary position embedding's frequencies.
    rope_theta: float = in_range(10000.0, above=0)
    # Epsilon of the RMS norms.
    rms_norm_eps: float = in_range(1e-5, above=0)
    # Share the input embedding and the output layer's weights.
    tie_word_embeddings: bool = False
    # Attention kernel: "sdpa" (PyTorch's fused attention), "eager", or "flash_attention_2" where installed.
    attn_implementation: str = "sdpa"


@dataclass
class ZeroConfig:
    # ZeRO stage: 0 replicates everything, 1 partitions optimizer states, 2 also gradients, 3 also parameters.
    stage: int = one_of(0, 0, 1, 2, 3)
    # Keep optimizer states (and run the optimizer step) on the CPU; stages 1-3.
    offload_optimizer: bool = False
    # Keep partitioned parameters on the CPU; stage 3 only.
    offload_param: bool = False
    # Overlap gradient reduction with the backward pass (uses more memory for buckets).
    overlap_comm: bool = False
    # Copy gradients into one contiguous buffer as they are produced (less fragmentation).
    contiguous_gradients: bool = True
    # Elements reduced per gradient all-reduce / reduce-scatter bucket.
    reduce_bucket_size: int = in_range(50_000_000, at_least=1)
    # Elements gathered per parameter all-gather bucket (stages 1-2).
    allgather_bucket_size: int = in_range(50_000_000, at_least=1)
    # Stage 3: elements of parameters fetched ahead of their use.
    stage3_prefetch_bucket_size: int = in_range(50_000_000, at_least=0)
    # Stage 3: parameters below this many elements stay whole on every rank (not partitioned).
    stage3_param_persistence_threshold: int = in_range(100_000, at_least=0)


@dataclass
class PrecisionConfig:
    # The dtype of the forward and backward pass; the optimizer keeps fp32 master weights under bf16/fp16.
    dtype: str = one_of("fp32", "fp32", "bf16", "fp16")
    # fp16 only: dynamic loss scaling when loss_scale is 0, else a static scale.
    loss_scale: float = in_range(0.0, at_least=0)
    # fp16 only: the dynamic scale starts at 2**initial_scale_power.
    initial_scale_power: int = in_range(16, at_least=0, at_most=32)
    # fp16 only: steps without overflow before the scale doubles.
    loss_scale_window: int = in_range(1000, at_least=1)
    # fp16 only: overflows tolerated before the scale halves.
    hysteresis: int = in_range(2, at_least=1)
    # fp16 only: the scale never falls below this.
    min_loss_scale: float = in_range(1.0, above=0)
    # bf16 only: the dtype that gradients accumulate in across micro-batches (None: DeepSpeed's default).
    grad_accum_dtype: Optional[str] = one_of(None, None, "fp32", "bf16")


@dataclass
class OptimConfig:
    # The optimizer; AdamW is the only one.
    name: str = one_of("adamw", "adamw")
    # Peak learning rate, reached after scheduler.warmup_steps.
    lr: float = in_range(1e-3, above=0)
    # Decoupled weight decay on matrices; norms, biases and other vectors are never decayed.
    weight_decay: float = in_range(0.1, at_least=0)
    # Adam's decay rate of the gradient's running mean.
    beta1: float = in_range(0.9, at_least=0, below=1)
    # Adam's decay rate of the squared gradient's running mean.
    beta2: float = in_range(0.95, at_least=0, below=1)
    # Adam's denominator term.
    eps: float = in_range(1e-8, above=0)


@dataclass
class SchedulerConfig:
    # The LR schedule: linear warmup, then cosine decay.
    name: str = one_of("cosine", "cosine")
    # Steps of linear warmup from optim.lr / warmup_steps to optim.lr.
    warmup_steps: int = in_range(10, at_least=0)
    # The LR decays from optim.lr to min_lr_ratio * optim.lr over the steps after warmup.
    min_lr_ratio: float = in_range(0.1, at_least=0, at_most=1)


@dataclass
class EarlyStoppingConfig:
    # Stop the run when trainer.early_stopping.metric has not improved for `patience` evaluations in a row.
    # The best checkpoint is marked in its manifest, named by checkpoints/best and never pruned.
    enabled: bool = False
    # The eval metric that judges: a name the evaluators of trainer.eval_metrics report (eval_loss,
    # eval_perplexity, ...).
    metric: str = "eval_loss"
    # "min": lower is better (losses, perplexity); "max": higher is better (scores).
    mode: str = one_of("min", "min", "max")
    # Evaluations in a row without improvement after which the run stops.
    patience: int = in_range(3, at_least=1)
    # An evaluation improves only if it beats the best by more than this, in the metric's units.
    min_delta: float = in_range(0.0, at_least=0)


@dataclass
class TrainerConfig:
    # Seeds the initial weights, the data order and every rank's random numbers.
    seed: int = in_range(1234, at_least=0, below=2**32)
    # Sequences per rank per forward/backward pass.
    micro_batch_size: int = in_range(8, at_least=1)
    # Micro-batches per optimizer step; global batch = micro_batch_size x this x ranks.
    gradient_accumulation_steps: int = in_range(1, at_least=1)
    # Clip the global gradient norm to this (0: no clipping).
    gradient_clipping: float = in_range(1.0, at_least=0)
    # Optimizer steps to train for.
    max_steps: int = in_range(200, at_least=1)
    # Recompute each block's activations in the backward pass instead of keeping them (less memory).
    gradient_checkpointing: bool = False
    # Peak dense TFLOP/s of one rank in precision.dtype, what MFU is measured against. None: a GPU's from its
    # name in dstrain.gpus (an unknown GPU logs no MFU), a CPU's from a linear layer timed at start (dstrain.mfu).
    peak_tflops: Optional[float] = in_range(None, above=0)
    # Evaluate every this many steps and after the last (0: never).
    eval_every: int = in_range(50, at_least=0)
    # Validation micro-batches per rank per evaluation.
    eval_batches: int = in_range(8, at_least=1)
    # What an evaluation reports (dstrain.evaluation.EVALUATORS).
    eval_metrics: List[str] = some_of(["perplexity"], registry="dstrain.evaluation:EVALUATORS")
    # Save a checkpoint every this many steps (0: only after the last step or a stop signal).
    save_every: int = in_range(100, at_least=0)
    # Checkpoints kept: the newest keep_last (0 keeps all), plus every keep_every-th step (0: none) forever.
    keep_last: int = in_range(3, at_least=0)
    keep_every: int = in_range(0, at_least=0)
    # How long a rank waits for a peer that died or hung before it exits (code 4): the limit for one
    # collective, and for one step, evaluation or save (dstrain.watchdog). Set it above the longest of these.
    collective_timeout_s: float = in_range(1800.0, above=0)
    # After SIGTERM/SIGUSR1, the time allowed to reach the next step boundary and save. When it runs out the
    # run exits anyway (code 75, no new checkpoint) so that the scheduler's SIGKILL never lands mid-save.
    stop_grace_s: float = in_range(120.0, above=0)
    # A step whose loss or gradient norm is NaN/inf: "stop" ends the run without saving it (the newest
    # checkpoint stays the last good one); "skip" lets DeepSpeed drop the update and trains on, and stops
    # after max_consecutive_skips such steps in a row.
    nonfinite: str = one_of("stop", "stop", "skip")
    max_consecutive_skips: int = in_range(10, at_least=1)
    # "auto": continue from the newest checkpoint in the run directory, if any.
    # "must": the same, but refuse to start from step 0 when there is none that loads.
    # "never": start fresh, and refuse to if the run directory already has checkpoints.
    # A path: load that checkpoint directory.
    resume: str = "auto"
    # Stop when validation stops improving, keeping the best checkpoint (off by default).
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # [low, high]: rank 0 warns, once per episode, when the global gradient norm (before clipping) stays
    # outside this band for grad_norm_patience steps in a row; an episode ends when it comes back inside.
    # []: no watch.
    grad_norm_band: List[float] = in_range([0.1, 10.0], at_least=0)
    # Steps in a row outside trainer.grad_norm_band before the warning (0: no watch).
    grad_norm_patience: int = in_range(20, at_least=0)


@dataclass
class WandbConfig:
    # Log to Weights & Biases (+logger=wandb turns it on).
    enabled: bool = False
    # The W&B project.
    project: str = "dstrain"
    # The W&B team or user; None: the API key's default.
    entity: Optional[str] = None
    # Runs of one Hydra multirun share a group by default (the sweep's name); set it to group runs yourself.
    group: Optional[str] = None
    # Tags shown on the W&B run.
    tags: List[str] = field(default_factory=list)
    # The W&B run's display name; by default the run directory's name.
    name: Optional[str] = None
    # The WANDB_MODE environment variable, where set, wins.
    mode: str = one_of("online", "online", "offline", "disabled")
    # How long to try to reach the W&B server before falling back to offline logging.
    init_timeout_s: float = in_range(90.0, above=0)


@dataclass
class TensorBoardConfig:
    # Write TensorBoard event files to <run dir>/tensorboard (+logger=tensorboard turns it on).
    enabled: bool = False


@dataclass
class MlflowConfig:
    # Log to MLflow (+logger=mlflow turns it on).
    enabled: bool = False
    # Where runs are tracked: a server ("http://host:5000") or any MLflow store URI; None: a local SQLite store
    # in the run directory, sqlite:///<run dir>/mlflow.db.
    tracking_uri: Optional[str] = None
    # The MLflow experiment, created on first use.
    experiment: str = "dstrain"
    # The MLflow run's name; by default the run directory's name.
    run_name: Optional[str] = None
    # Tags set on the MLflow run.
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    # The metrics file in the run directory, always written.
    file: str = one_of("jsonl", "jsonl", "csv")
    # Print and log the full set of step metrics every this many steps (loss and LR go to the file every step).
    log_every: int = in_range(10, at_least=1)
    # Weights & Biases.
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # TensorBoard.
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    # MLflow.
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class RunConfig:
    # Checkpoints, metrics and the composed config go to <root>/<name>.
    root: str = "outputs"
    # The run directory's name; by default derived from the command-line overrides, so every rank and every
    # restart of the same command finds the same directory.
    name: str = "${dstrain_run_name:}"


@dataclass
class LauncherConfig:
    # Read by `dstrain submit` (dstrain/slurm.py, which checks it); training itself ignores it.

    # Nodes to allocate.
    nodes: int = in_range(1, at_least=1)
    # Ranks per node, one GPU each. With device=cpu: CPU processes per node, and no GPU is requested.
    gpus_per_node: int = in_range(1, at_least=1)
    # A GPU type in the cluster's GRES (a100, h100, ...); None: any.
    gpu_type: Optional[str] = None
    # "gpu" requests GPUs; "cpu" runs CPU ranks (DS_ACCELERATOR=cpu).
    device: str = one_of("gpu", "gpu", "cpu")
    # CPUs per rank (also OMP_NUM_THREADS); None: the cluster's default.
    cpus_per_task: Optional[int] = in_range(None, at_least=1)
    # Memory per node in sbatch's --mem form ("200G"); None: the cluster's default.
    mem: Optional[str] = None
    # The SLURM partition; None: the cluster's default.
    partition: Optional[str] = None
    # The account charged; None: your default account.
    account: Optional[str] = None
    # The quality of service; None: the account's default.
    qos: Optional[str] = None
    # SLURM's --time ("HH:MM:SS", "D-HH:MM:SS", minutes); None: the partition's default.
    time: Optional[str] = None
    # The job's name in the queue; None: run.name, else "dstrain".
    job_name: Optional[str] = None
    # More sbatch options, one per item ("--exclusive", "--constraint=a100"); one #SBATCH line each.
    extra_sbatch: List[str] = field(default_factory=list)
    # Sent to every rank signal_lead_s before the time limit: dstrain saves at the next step boundary and
    # exits with 75, and with requeue the job goes back into the queue and resumes from that checkpoint.
    # The signals dstrain.preemption stops on.
    signal: str = one_of("USR1", "USR1", "TERM")
    signal_lead_s: int = in_range(300, at_least=0)
    # Requeue the job when it stopped after the signal (exit 75).
    requeue: bool = True


@dataclass
class TrainConfig:
    # The architecture and where the weights come from (+model=...).
    model: ModelConfig = field(default_factory=ModelConfig)
    # ZeRO partitioning and offload (+zero=...).
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    # Compute dtype and fp16 loss scaling (+precision=...).
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # Which weights train: all, or an adapter (+peft=...).
    peft: PeftConfig = field(default_factory=PeftConfig)
    # The optimizer (+optim=...).
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The LR schedule (+scheduler=...).
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Training and validation data (+data=...).
    data: DataConfig = field(default_factory=DataConfig)
    # The loop: batch sizes, steps, evaluation, checkpoints, fault handling (+trainer=...).
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Evaluation by generation: answers to validation prompts scored against their references.
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Metrics file and trackers (+logger=...).
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Where the run directory is.
    run: RunConfig = field(default_factory=RunConfig)
    # The SLURM job `dstrain submit` asks for (+launcher=...).
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=TrainConfig)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"model": {"hidden_size": 64}} as {"model.hidden_size": 64}: the form a checkpoint's manifest keeps."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of flatten."""
    nested: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested
