"""INT8 inference on the CPU (`dstrain generate --int8`, `dstrain serve --int8`): PyTorch's dynamic quantisation.

Every nn.Linear of a loaded fp32 model (lm_head included) becomes torch.ao's dynamic quantised Linear: its
weight packed once as symmetric INT8 with a scale per output channel, its input quantised per call, the
matmul in INT8 (fbgemm on x86). Embeddings and norms stay fp32. Per-channel scales cost nothing at run time
and keep more of the model than one scale per tensor (on SmolLM2-135M: the same top token as fp32 at 44% of
positions against 37%, mean next-token loss +1.0 nats against +1.1); small models lose a good deal to
dynamic INT8 all the same (benchmarks/int8.py measures perplexity).

Tied embeddings (lm_head.weight is embed_tokens.weight, as in SmolLM2): quantising lm_head packs a copy of
the shared weight into the new module, and embed_tokens keeps the fp32 Parameter, so the token lookup is
unchanged. The tie itself is over from then on; nothing in generation re-ties it, and the model is not
meant to be saved or trained again.

An adapter is merged into its base first (LoRA and its variants, IA3); an adapter of virtual tokens (prompt
or prefix tuning) cannot be, and is refused with a ConfigError.
"""

import warnings

import torch

from dstrain.errors import ConfigError


def quantized_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model, changed in place, with INT8 dynamic Linear layers (an adapter merged in first)."""
    model = without_adapter(model)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated for torchao, which this project cannot use (it declares no torch
        # version, and transformers imports it once installed); the eager API still works in torch 2.13.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return model.eval()


def without_adapter(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if model.active_peft_config.is_prompt_learning:
        raise ConfigError(
            f"--int8 quantises the model's linear layers, and its {model.active_peft_config.peft_type.value} "
            f"adapter adds virtual tokens, which cannot be merged into them. Leave out --int8."
        )
    return model.merge_and_unload()
