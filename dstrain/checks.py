"""The checks a composed config passes before any process group or model exists: every named choice and every
numeric range declared in the schema (dstrain.config_fields), then the combinations that cannot work. Each
failure is one ConfigError naming the key and the fix."""

import importlib
from dataclasses import fields, is_dataclass

from dstrain.config import PrecisionConfig, TrainConfig
from dstrain.config_fields import check_ranges
from dstrain.data_config import check_split_ratios
from dstrain.errors import ConfigError


def allowed_values(spec) -> list:
    """The names a field declared with config.one_of may take."""
    if spec.metadata.get("registry"):
        module, attribute = spec.metadata["registry"].split(":")
        return getattr(importlib.import_module(module), attribute).names()
    return list(spec.metadata["choices"])


def check_choices(node, prefix: str = "") -> None:
    """Every field declared with one_of holds one of its names, in node and the dataclasses below it."""
    for spec in fields(node):
        value = getattr(node, spec.name)
        if is_dataclass(value):
            check_choices(value, f"{prefix}{spec.name}.")
        elif "choices" in spec.metadata:
            allowed = allowed_values(spec)
            for item in value if isinstance(value, list) else [value]:
                if item not in allowed:
                    where = f"{prefix}{spec.name}: {item!r}" if isinstance(value, list) else f"{prefix}{spec.name}={item!r}"
                    raise ConfigError(f"{where} is not one of {allowed}")


def validate(cfg: TrainConfig) -> None:
    """Reject combinations that cannot work, before any process group or model exists."""
    from dstrain.data import DATA_SOURCES
    from dstrain.evaluation import EVALUATORS

    check_choices(cfg)
    check_ranges(cfg)
    for metric in cfg.trainer.eval_metrics:
        if metric not in EVALUATORS.names():
            raise ConfigError(f"trainer.eval_metrics: {metric!r} is not one of {EVALUATORS.names()}")

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
    if trainer.nonfinite == "skip" and zero.stage == 0 and precision.dtype == "fp32":
        # Only DeepSpeed's optimizer wrappers (ZeRO 1-3, bf16, fp16) check gradients before updating; plain
        # ZeRO-0 fp32 hands them straight to torch's AdamW, which would write the NaN into the weights.
        raise ConfigError(
            "trainer.nonfinite=skip needs an engine that can drop an update, and ZeRO-0 in fp32 cannot. "
            "Use +zero=1 (the same memory on one rank), +precision=bf16, or trainer.nonfinite=stop."
        )
    check_eval(cfg)
    check_early_stopping(cfg)
    check_grad_norm_watch(trainer)
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

    DATA_SOURCES[cfg.data.name].check(cfg)
    check_data(cfg)
    if cfg.model.pretrained is None and cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    check_peft(cfg)


def check_peft(cfg: TrainConfig) -> None:
    """The PEFT methods' combinations with the model, ZeRO, checkpointing and packing that cannot work (README,
    "PEFT methods")."""
    peft, method = cfg.peft, cfg.peft.method
    lora = peft.lora
    if method == "freeze" and not cfg.model.pretrained and peft.freeze.last_blocks > cfg.model.num_hidden_layers:
        raise ConfigError(
            f"peft.freeze.last_blocks={peft.freeze.last_blocks} exceeds model.num_hidden_layers="
            f"{cfg.model.num_hidden_layers}"
        )

    stage = cfg.zero.stage
    if method in ("lora", "qlora") and lora.init in ("pissa", "olora") and stage == 3:
        raise ConfigError(
            f"peft.lora.init={lora.init} decomposes the whole base weights, which ZeRO-3 has partitioned. "
            f"Use +zero=2 (or 0/1), or peft.lora.init=default."
        )
    if lora.init in ("pissa", "olora") and lora.use_dora and method == "lora":
        raise ConfigError(
            f"peft.lora.init={lora.init} with peft.lora.use_dora=true: the adapter could not be exported for the "
            f"unchanged base (DoRA's magnitudes depend on the base weights). Set one of them only."
        )
    if method == "qlora":
        if lora.init in ("pissa", "olora"):
            raise ConfigError(
                f"peft.lora.init={lora.init} with peft.method=qlora would decompose the 4-bit weights, and the "
                f"adapter would not fit the unquantised base. Use +peft=lora with it, or peft.lora.init=default."
            )
        if not cfg.model.pretrained:
            raise ConfigError(
                "peft.method=qlora quantises a pretrained model while loading it: set model.pretrained=<dir> "
                "(or use +peft=lora on a preset shape)."
            )
        if stage == 3:
            raise ConfigError(
                "peft.method=qlora cannot train under ZeRO-3, which cannot partition 4-bit weights. Use +zero=2 "
                "(or 0/1: the frozen 4-bit base is small on every rank), or +peft=lora with +zero=3."
            )
        if stage in (1, 2) and lora.use_dora:
            raise ConfigError(
                f"peft.lora.use_dora=true with peft.method=qlora under zero.stage={stage}: DeepSpeed's ZeRO-1/2 "
                f"checkpoint loses track of the 4-bit weights DoRA re-creates, and cannot be saved. Use +zero=0."
            )
    if method == "prefix" and cfg.trainer.gradient_checkpointing:
        raise ConfigError(
            "peft.method=prefix does not work with trainer.gradient_checkpointing=true (peft refuses it). Set "
            "trainer.gradient_checkpointing=false, or use +peft=prompt or +peft=lora."
        )
    if method in ("prompt", "prefix") and cfg.data.packing and cfg.data.format != "text":
        raise ConfigError(
            f"peft.method={method} puts its virtual tokens in front of each row, so in packed rows only the "
            f"first sample would see them. Set data.packing=false, or use +peft=lora."
        )


def check_early_stopping(cfg: TrainConfig) -> None:
    from dstrain.evaluation import reported_metrics

    early_stopping = cfg.trainer.early_stopping
    if not early_stopping.enabled:
        return
    if not cfg.trainer.eval_every:
        raise ConfigError(
            "trainer.early_stopping judges evaluations, but trainer.eval_every=0 never evaluates. "
            "Set trainer.eval_every to a number of steps."
        )
    reported = reported_metrics(cfg)
    if early_stopping.metric not in reported:
        raise ConfigError(
            f"trainer.early_stopping.metric={early_stopping.metric!r} is not a metric that trainer.eval_metrics="
            f"{cfg.trainer.eval_metrics} or eval.metrics (with eval.generate_every set) report: choose one of "
            f"{reported}."
        )
    generated = [f"eval_{name}" for name in cfg.eval.metrics]
    if early_stopping.metric in generated and cfg.eval.generate_every != cfg.trainer.eval_every:
        raise ConfigError(
            f"trainer.early_stopping.metric={early_stopping.metric} is scored only every eval.generate_every="
            f"{cfg.eval.generate_every} steps, but early stopping judges every evaluation (trainer.eval_every="
            f"{cfg.trainer.eval_every}). Set eval.generate_every={cfg.trainer.eval_every}."
        )


def check_eval(cfg: TrainConfig) -> None:
    """Evaluation by generation (the eval section)."""
    from dstrain.scoring import SCORES

    every, evaluation = cfg.eval.generate_every, cfg.eval
    unknown = [name for name in evaluation.metrics if name not in SCORES]
    if unknown or not evaluation.metrics:
        raise ConfigError(f"eval.metrics={list(evaluation.metrics)} must name some of {list(SCORES)}")
    if not every:
        return
    if not cfg.trainer.eval_every or every % cfg.trainer.eval_every:
        raise ConfigError(
            f"eval.generate_every={every} generates at an evaluation, so it must be a multiple of "
            f"trainer.eval_every={cfg.trainer.eval_every} (which must be set)."
        )
    if cfg.data.format == "text":
        raise ConfigError(
            "eval.generate_every needs prompts and reference answers, which only instruction data has "
            "(+data=alpaca, sharegpt or messages); plain text (data.format=text) has none. Set eval.generate_every=0."
        )
    if evaluation.max_new_tokens >= cfg.data.seq_len:
        raise ConfigError(
            f"eval.max_new_tokens={evaluation.max_new_tokens} must be below data.seq_len={cfg.data.seq_len} (the "
            f"prompt keeps the rest)."
        )


def check_grad_norm_watch(trainer) -> None:
    band = trainer.grad_norm_band
    if band and (len(band) != 2 or not band[0] < band[1]):
        raise ConfigError(
            f"trainer.grad_norm_band={list(band)} must be [low, high] with 0 <= low < high, or [] for no watch."
        )


def check_data(cfg: TrainConfig) -> None:
    """The data settings that cannot work together, before any file is read."""
    data = cfg.data
    if data.format != "text" and data.name != "files":
        raise ConfigError(
            f"data.format={data.format} reads records from files, but data.name={data.name}. Use "
            f"+data={data.format} data.train_files=[...] (or data.name=files)."
        )
    if data.train_on_prompt and data.last_turn_only:
        raise ConfigError("data.train_on_prompt and data.last_turn_only contradict each other: set at most one.")
    if data.split:
        check_split_ratios(data.split)
    data.clean.check()


def validate_accelerator(cfg: TrainConfig, accelerator) -> None:
    """Checks that need to know the hardware, still before any process group starts."""
    name = accelerator.device_name()
    if cfg.precision.dtype == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(f"precision.dtype=bf16 is not supported on this {name} device. Use +precision=fp16.")
    if cfg.precision.dtype == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"precision.dtype=fp16 is not supported on the {name} accelerator. Use +precision=bf16 or fp32."
        )
