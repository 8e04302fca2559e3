"""What the planner knows of a model without building it: its parameters (counted on the meta device, where
no weight takes memory) and the shape its activations follow.

DeepSpeed's own estimators count parameters by data pointer, and every meta tensor has the same one, so the
parameters are counted here, tensor by tensor.
"""

from dataclasses import dataclass
from typing import List

import torch

from dstrain.adapters import peft_method
from dstrain.config import TrainConfig


@dataclass(frozen=True)
class ModelShape:
    # Width of the residual stream.
    hidden_size: int
    # Width of the SwiGLU feed-forward layer.
    intermediate_size: int
    # Transformer blocks.
    num_layers: int
    # Query heads.
    num_heads: int
    # Width of the keys (and of the values): key/value heads x head size.
    kv_size: int
    # Tokens of the output layer (its logits' last dimension).
    vocab_size: int


@dataclass(frozen=True)
class ParameterCensus:
    # Every parameter's element count (the base model's and any adapter's).
    total: int
    # Elements that train: all of them, or the PEFT method's trainable set.
    trainable: int
    # Elements of the largest single module's own parameters (DeepSpeed's ZeRO-3 estimate gathers one at a time).
    largest_module: int
    # Each parameter tensor's element count, for ZeRO-3's persistence threshold (small tensors stay whole).
    tensor_sizes: List[int]
    # Elements of the base model that are stored 4-bit (peft.method=qlora), half a byte each.
    quantized: int
    shape: ModelShape

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def persistent(self, threshold: int) -> int:
        """Elements that ZeRO-3 keeps whole on every rank: tensors below stage3_param_persistence_threshold."""
        return sum(size for size in self.tensor_sizes if size < threshold)


def hf_config(cfg: TrainConfig):
    """The transformers config training would build: from the preset, or model.pretrained's config.json alone."""
    if cfg.model.pretrained:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.pretrained)
        config._attn_implementation = cfg.model.attn_implementation
        return config
    from dstrain.model import llama_config

    return llama_config(cfg.model)


def census(cfg: TrainConfig) -> ParameterCensus:
    """Build the model on the meta device, apply the PEFT method as training does, and count."""
    from transformers import AutoModelForCausalLM

    config = hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = peft_method(cfg).apply(model, cfg)
    parameters = list(model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    quantized = 0
    if peft_method(cfg).quantized_base:
        # bitsandbytes quantises the base's linear layers (the output layer stays in the compute dtype).
        quantized = sum(module.weight.numel() for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
                        and not name.endswith("lm_head"))
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape = ModelShape(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                       config.num_attention_heads, kv_heads * head_size, config.vocab_size)
    return ParameterCensus(
        total=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        largest_module=largest, tensor_sizes=[p.numel() for p in parameters], quantized=quantized, shape=shape,
    )
