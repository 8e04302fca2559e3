"""A dstrain checkpoint in, a model directory out: what `dstrain export` does, in one CPU process.

The trained model comes back through dstrain.loading (rebuilt from the manifest's config, weights consolidated
to fp32). Each output format (EXPORT_FORMATS, `--format`) is a component that writes it:

    hf, full model   OUTPUT/model.safetensors, config.json, generation_config.json, the tokenizer
    hf, adapter      OUTPUT/adapter_model.safetensors, adapter_config.json (base: model.pretrained), the
                     tokenizer; with merged=True also OUTPUT/merged/, the full model with the adapter merged in
                     (methods that can merge: lora and its variants, qlora into the dequantised base, ia3)
    onnx             OUTPUT/model.onnx with dynamic batch and sequence, config.json and the tokenizer
                     (dstrain.export_onnx); --quantize int8: onnxruntime's dynamic INT8 quantisation
    gguf             OUTPUT/model.<quantize>.gguf (f32, f16 or q8_0) with the tokenizer and chat template
                     embedded, for llama.cpp, LM Studio and Ollama (dstrain.export_gguf)

peft.method=freeze and none train the model itself, so their export is the full model. ONNX and GGUF hold a
whole model, so an adapter is always merged into its base for them (TrainedModel.whole_model).

Everything is written into a staging directory next to OUTPUT and renamed into place at the end, so an
export that fails halfway leaves no directory that looks finished.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from dstrain.adapters import peft_method
from dstrain.checkpoint import follow_pointer
from dstrain.errors import ConfigError
from dstrain.export_gguf import GgufFormat
from dstrain.export_onnx import OnnxFormat
from dstrain.loading import TrainedModel, checked_manifest, load_trained_model, train_config_from_manifest
from dstrain.registry import Registry

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_SUBDIR = "merged"


@dataclass
class Exported:
    """What an export wrote, for the command to report."""

    step: int
    zero_stage: int
    dtype: str
    # What was written: "the adapter" (with --merged, the merged model too, in its own directory), "the model",
    # or "the model with its adapter merged in".
    contents: str
    # The weights' type in the output: fp32, or the --quantize choice.
    weights: str
    directories: List[Path]


class HuggingFaceFormat:
    """safetensors weights, config and tokenizer: what from_pretrained (and PeftModel.from_pretrained) load."""

    # --quantize values the format takes, the first being the default (None: the option is refused).
    quantize_choices: Tuple[Optional[str], ...] = (None,)
    # Whether the format holds an adapter apart from its base (else the adapter is merged in: TrainedModel.whole_model).
    holds_adapter = True

    def write(self, trained: TrainedModel, staging: Path, merged: bool, quantize: Optional[str]) -> None:
        cfg, tokenizer = trained.cfg, trained.tokenizer
        if not peft_method(cfg).has_adapter:
            save_full_model(trained.model, tokenizer, staging)
            return
        save_adapter(trained.model, staging, cfg.model.pretrained, initial_adapter(trained))
        tokenizer.save_pretrained(staging)
        if merged:
            save_full_model(trained.model.merge_and_unload(), tokenizer, staging / MERGED_SUBDIR)


EXPORT_FORMATS: Registry = Registry("--format")
EXPORT_FORMATS.register("hf")(HuggingFaceFormat())
EXPORT_FORMATS.register("onnx")(OnnxFormat())
EXPORT_FORMATS.register("gguf")(GgufFormat())


def export_checkpoint(checkpoint: Path, output: Path, merged: bool = False, output_format: str = "hf",
                      quantize: Optional[str] = None) -> Exported:
    checkpoint, output = follow_pointer(Path(checkpoint)).resolve(), Path(output).resolve()
    writer = EXPORT_FORMATS[output_format]
    quantize = checked_quantize(writer, output_format, quantize)
    cfg = train_config_from_manifest(checked_manifest(checkpoint))
    if not writer.holds_adapter and peft_method(cfg).has_adapter:
        if not peft_method(cfg).can_merge:
            raise ConfigError(
                f"--format {output_format} holds a whole model, and peft.method={cfg.peft.method} adds virtual "
                f"tokens, which cannot be merged into the model's weights. Export with --format hf (the adapter, "
                f"for PeftModel.from_pretrained)."
            )
        merged = True
    check_exportable(cfg, checkpoint, merged)
    adapter = peft_method(cfg).has_adapter
    check_output_dir(output)
    trained = load_trained_model(checkpoint)

    staging = staging_dir_for(output)
    try:
        writer.write(trained, staging, merged, quantize)
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = [output, output / MERGED_SUBDIR] if merged and writer.holds_adapter else [output]
    if not adapter:
        contents = "the model"
    elif writer.holds_adapter:
        contents = "the adapter"
    else:
        contents = "the model with its adapter merged in"
    manifest = trained.manifest
    return Exported(manifest["step"], manifest["zero_stage"], cfg.precision.dtype, contents, quantize or "fp32",
                    written)


def checked_quantize(writer, output_format: str, quantize: Optional[str]) -> Optional[str]:
    choices = writer.quantize_choices
    if quantize is None:
        return choices[0]
    if quantize not in choices:
        allowed = [choice for choice in choices if choice is not None]
        fix = f"use one of {allowed}" if allowed else "leave it out"
        raise ConfigError(f"--quantize {quantize} is not available for --format {output_format}: {fix}.")
    return quantize


def check_exportable(cfg, checkpoint: Path, merged: bool) -> None:
    """What the method's export can hold: the full model, an adapter, a merged model (module docstring)."""
    method = peft_method(cfg)
    adapter = method.has_adapter
    if merged and not adapter:
        raise ConfigError(
            f"--merged merges an adapter, but {checkpoint} was trained with peft.method={cfg.peft.method}. "
            f"Leave out --merged: the export is the full model."
        )
    if merged and not method.can_merge:
        raise ConfigError(
            f"peft.method={cfg.peft.method} adds virtual tokens, which cannot be merged into the model's weights. "
            f"Leave out --merged: the export is the adapter, for PeftModel.from_pretrained."
        )
    if adapter and not cfg.model.pretrained and not method.can_merge:
        raise ConfigError(
            f"{checkpoint} holds a peft.method={cfg.peft.method} adapter on a randomly initialised base "
            f"(model.pretrained was not set), which exists only in the checkpoint and cannot be merged with "
            f"the adapter: there is nothing usable to export. Train from model.pretrained=<dir>."
        )
    if adapter and not cfg.model.pretrained and not merged:
        raise ConfigError(
            f"{checkpoint} holds an adapter on a randomly initialised base (model.pretrained was not set), "
            f"so an adapter alone could not be used. Export with --merged to get the full model as well."
        )


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"the output directory {output} is a file. Choose a new directory.")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"the output directory {output} already exists and is not empty. Choose a new one.")


def staging_dir_for(output: Path) -> Path:
    staging = output.with_name(f".{output.name}.partial")
    if staging.exists():  # left by an export that did not finish
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def save_full_model(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(directory)


def initial_adapter(trained: TrainedModel) -> Optional[torch.nn.Module]:
    """For peft.lora.init=pissa or olora, which moved part of the base weights into the adapter: the model as
    training built it before its first step (model.pretrained's weights, or the preset's from the seed, and the
    same decomposition of them), which the adapter export is converted against. None for every other init."""
    cfg = trained.cfg
    if cfg.peft.method != "lora" or cfg.peft.lora.init not in ("pissa", "olora"):
        return None
    from dstrain.model import build_model

    return build_model(cfg, trained.tokenizer).eval()


def save_adapter(peft_model: torch.nn.Module, directory: Path, base: Optional[str],
                 initial: Optional[torch.nn.Module] = None) -> None:
    """initial: see initial_adapter. peft then writes an ordinary LoRA adapter (of twice the rank) that applies
    to the unchanged model.pretrained."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    if initial is None:
        peft_model.save_pretrained(directory)
    else:
        with tempfile.TemporaryDirectory() as initial_dir:
            initial.peft_config["default"].init_lora_weights = True  # peft's marker of a converted start
            initial.save_pretrained(initial_dir)
            peft_model.save_pretrained(directory, path_initial_model_for_weight_conversion=initial_dir)
    check_no_empty_tensors(directory / ADAPTER_WEIGHTS)


def check_no_empty_tensors(weights: Path) -> None:
    """An adapter saved from partitioned ZeRO-3 parameters without gathering them holds 0-element tensors."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        names = list(handle.keys())
        empty = [name for name in names if 0 in handle.get_slice(name).get_shape()]
    if not names:
        raise ConfigError(f"{weights} holds no tensors: the adapter was not saved")
    if empty:
        raise ConfigError(f"{weights} holds {len(empty)} empty tensors (first: {empty[0]}): the adapter is not usable")


def move_into_place(staging: Path, output: Path) -> None:
    if output.is_dir():
        output.rmdir()  # empty, as check_output_dir made sure
    os.rename(staging, output)
