"""The model: a Llama preset or a pretrained directory, with gradient checkpointing and PEFT applied."""

import contextlib
import hashlib
from dataclasses import asdict
from typing import Tuple

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dstrain.config import ConfigError, ModelConfig, TrainConfig

_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def llama_config(model: ModelConfig) -> LlamaConfig:
    shape = {key: value for key, value in asdict(model).items() if key in _SHAPE_FIELDS}
    return LlamaConfig(**shape, attn_implementation=model.attn_implementation, use_cache=False)


def build_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    """Build on every rank. Under ZeRO-3 the caller has registered the DeepSpeed config with transformers
    (HfDeepSpeedConfig), so both from_config and from_pretrained construct inside deepspeed.zero.Init and
    no rank ever holds the whole model."""
    if cfg.model.pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.pretrained, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
        )
        model.config.use_cache = False
    else:
        model = AutoModelForCausalLM.from_config(llama_config(cfg.model), dtype=torch.float32)
        initialize_weights(model, cfg.trainer.seed)
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}. "
            f"Set model.vocab_size={len(tokenizer)} or use the model's own tokenizer."
        )
    if cfg.trainer.gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach LoRA weights even though the frozen inputs of
        # each block do not require grad; enable it before PEFT wraps the model.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft.method == "lora":
        torch.manual_seed(cfg.trainer.seed)
        model = apply_lora(model, cfg)
    return model


def initialize_weights(model: torch.nn.Module, seed: int) -> None:
    """Llama's initialisation (normal matrices, unit norms, zero biases) from a generator seeded by each
    parameter's name. The initial weights then depend only on the seed, not on the ZeRO stage, the number
    of ranks or the order in which deepspeed.zero.Init happened to build the modules."""
    std = model.config.initializer_range
    for name, parameter in model.named_parameters():
        with _gathered(parameter):
            generator = torch.Generator(device=parameter.device)
            generator.manual_seed(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16))
            with torch.no_grad():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, std, generator=generator)
                else:
                    parameter.fill_(1.0 if "norm" in name else 0.0)


def _gathered(parameter: torch.nn.Parameter):
    """The whole of a ZeRO-3 partitioned parameter for the duration, rank 0's values kept on exit."""
    if not hasattr(parameter, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameter, modifier_rank=0)


def apply_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=list(cfg.peft.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise ConfigError(f"peft.target_modules={list(cfg.peft.target_modules)}: {error}") from None


def parameter_counts(model: torch.nn.Module) -> Tuple[int, int]:
    """(total, trainable). Under ZeRO-3 each parameter's full size is ds_numel; numel() is the local shard."""
    total = trainable = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())
        total += count
        if parameter.requires_grad:
            trainable += count
    return total, trainable


def model_fingerprint(model: torch.nn.Module) -> dict:
    """The parameter names and shapes: what a checkpoint must match to be loaded into this model."""
    return {
        name: list(getattr(parameter, "ds_shape", parameter.shape)) for name, parameter in model.named_parameters()
    }


def weight_decay_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices; leave norms, biases and other vectors alone."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        dims = len(getattr(parameter, "ds_shape", parameter.shape))
        (decay if dims >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
