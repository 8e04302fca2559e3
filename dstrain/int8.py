"""INT8 inference on the CPU (`dstrain generate --int8`, `dstrain serve --int8`): PyTorch's dynamic quantisation.

Every nn.Linear of a loaded fp32 model becomes torch.ao's dynamic quantised Linear (its weight packed once as
symmetric INT8 with a scale per output channel, its input quantised per call, the matmul in INT8: fbgemm on
x86), except the layers `stays_fp32` names: the MLP's output projection in every layer and lm_head.
Embeddings and norms stay fp32. `dstrain export --format onnx --quantize int8` leaves the same layers in fp32.

Why those: the MLP's output projection reads the MLP's hidden activations, which have a few channels of
outliers far larger than the rest (the LLM.int8() observation, Dettmers et al. 2022); one dynamic scale per
input tensor spent on them rounds every other channel to a handful of levels. On SmolLM2-135M-Instruct
(the first 800 tokens of benchmarks/int8.py's built-in text; fp32 perplexity 60.1), quantising in PyTorch:
    every Linear 175.9; all but lm_head 165.3; all but down_proj 72.3; all but down_proj and lm_head 68.6;
    attention only 62.4; gate/up only 67.7
and in ONNX Runtime (whose lm_head MatMul is not quantised, see dstrain.export_onnx): every MatMul 106.5, all
but down_proj 62.4. (PyTorch's dynamic Linear quantises its input to 7 bits, reduce_range for fbgemm, ONNX
Runtime's to 8: hence the gap between the two.) The rest of the MLP and attention cost little, so down_proj
is the outlier. Keeping lm_head fp32 as well gains 3.7 more in PyTorch, and with tied embeddings it costs no
memory: the tie holds, where a quantised lm_head packs a copy of the embedding matrix. down_proj in fp32 is
26.5M of SmolLM2's 134.5M parameters, so the model shrinks less than with every Linear in INT8; the
benchmark's table gives the size, speed and perplexity of the rule as shipped.

The rule goes by module name, so that it holds beyond Llama: `down_proj` (Llama, Mistral, Qwen, Gemma,
Phi-3), `fc2` (OPT, Phi), `mlp.c_proj` (GPT-2) and `dense_4h_to_h` (GPT-NeoX, Falcon) are the MLP's
output projection in transformers' models.

Per-channel weight scales cost nothing at run time and keep more of the model than one scale per tensor (with
every Linear quantised on SmolLM2-135M: the same top token as fp32 at 44% of positions against 37%, mean
next-token loss +1.0 nats against +1.1).

An adapter is merged into its base first (LoRA and its variants, IA3); an adapter of virtual tokens (prompt
or prefix tuning) cannot be, and is refused with a ConfigError.
"""

import warnings

import torch

from dstrain.errors import ConfigError

# The last parts of the module names transformers gives the MLP's output projection (see the module docstring).
MLP_OUTPUT_PROJECTIONS = ("down_proj", "fc2", "mlp.c_proj", "dense_4h_to_h")


def stays_fp32(linear_name: str) -> bool:
    """Whether the Linear layer of this module name (as named_modules gives it) is left in fp32 by both INT8
    paths: lm_head and the MLP's output projection."""
    return linear_name == "lm_head" or f".{linear_name}".endswith(
        tuple(f".{projection}" for projection in MLP_OUTPUT_PROJECTIONS))


def quantized_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model, changed in place, with INT8 dynamic Linear layers where stays_fp32 allows (an adapter merged in
    first)."""
    model = without_adapter(model)
    to_quantize = [name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and not stays_fp32(name)]
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated for torchao, which this project cannot use (it declares no torch
        # version, and transformers imports it once installed); the eager API still works in torch 2.13.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        torch.ao.quantization.quantize_dynamic(
            model, {name: torch.ao.quantization.per_channel_dynamic_qconfig for name in to_quantize}, dtype=torch.qint8,
            inplace=True,
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
