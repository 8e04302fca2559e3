"""The model: a Llama preset or a pretrained directory, with gradient checkpointing and the PEFT method applied."""

import contextlib
import hashlib
from dataclasses import asdict
from typing import Tuple

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dstrain.adapters import peft_method
from dstrain.config import ModelConfig, TrainConfig
from dstrain.errors import ConfigError

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
            cfg.model.pretrained, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation,
            **quantization(cfg),
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
    return peft_method(cfg).apply(model, cfg)


_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantization(cfg: TrainConfig) -> dict:
    """from_pretrained's arguments for a 4-bit base (peft.method=qlora): NF4 weights, computed in the training
    precision. bitsandbytes quantises only while loading a pretrained model, hence qlora's need of
    model.pretrained (dstrain.checks)."""
    if not peft_method(cfg).quantized_base:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_COMPUTE_DTYPES[cfg.precision.dtype],
    )}


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


def parameter_counts(model: torch.nn.Module) -> Tuple[int, int]:
    """(total, trainable). Under ZeRO-3 each parameter's full size is ds_numel; numel() is the local shard. A
    4-bit bitsandbytes weight packs two values a byte: its quant_state knows the weight's real shape."""
    total = trainable = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None:
            count = quant_state.shape.numel()
        else:
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
