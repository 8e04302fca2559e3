"""A dstrain checkpoint in, a Hugging Face directory out: what `dstrain export` does, in one CPU process.

The checkpoint's manifest holds the resolved training config, so the model is rebuilt exactly as it was
trained (a preset shape, or the architecture of model.pretrained, with the same LoRA config), without any
DeepSpeed engine or process group. The weights are consolidated into one fp32 state dict with DeepSpeed's
own zero_to_fp32 for ZeRO stages 1-3 (the fp32 master weights, whatever precision trained them). A ZeRO-0
checkpoint has no ZeRO files: its module weights are read from mp_rank_00_model_states.pt and cast to fp32.
After fp32 training they are the master weights; after bf16 or fp16 training they are the 16-bit weights the
engine computed with (the fp32 masters are in that file too, but only as unnamed flat groups of the
optimizer). The state dict must fit the rebuilt model exactly.

Output:
    full model   OUTPUT/model.safetensors, config.json, generation_config.json, the tokenizer
    LoRA         OUTPUT/adapter_model.safetensors, adapter_config.json (base: model.pretrained), the tokenizer;
                 with merged=True also OUTPUT/merged/, the full model with the adapter merged in

Everything is written into a staging directory next to OUTPUT and renamed into place at the end, so an
export that fails halfway leaves no directory that looks finished.
"""

import os
import shutil
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from dstrain.checkpoint import MANIFEST, problem_with, read_manifest
from dstrain.config import ConfigError, TrainConfig
from dstrain.data import build_tokenizer

ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_SUBDIR = "merged"


@dataclass
class Exported:
    """What an export wrote, for the command to report."""

    step: int
    zero_stage: int
    dtype: str
    lora: bool
    directories: List[Path]


def export_checkpoint(checkpoint: Path, output: Path, merged: bool = False) -> Exported:
    checkpoint, output = Path(checkpoint).resolve(), Path(output).resolve()
    manifest = checked_manifest(checkpoint)
    cfg = train_config_from_manifest(manifest)
    lora = cfg.peft.method == "lora"
    if merged and not lora:
        raise ConfigError(
            f"--merged merges a LoRA adapter, but {checkpoint} was trained with peft.method={cfg.peft.method}. "
            f"Leave out --merged: the export is the full model."
        )
    if lora and not cfg.model.pretrained and not merged:
        raise ConfigError(
            f"{checkpoint} holds a LoRA adapter on a randomly initialised base (model.pretrained was not set), "
            f"so an adapter alone could not be used. Export with --merged to get the full model as well."
        )
    check_output_dir(output)

    tokenizer = load_tokenizer(cfg)
    model = rebuild_model(cfg)
    state_dict = consolidated_state_dict(checkpoint, manifest["zero_stage"])
    load_strictly(model, state_dict, checkpoint)
    del state_dict

    staging = staging_dir_for(output)
    try:
        if lora:
            save_adapter(model, staging, cfg.model.pretrained)
            tokenizer.save_pretrained(staging)
            if merged:
                save_full_model(model.merge_and_unload(), tokenizer, staging / MERGED_SUBDIR)
        else:
            save_full_model(model, tokenizer, staging)
        move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = [output, output / MERGED_SUBDIR] if merged else [output]
    return Exported(manifest["step"], manifest["zero_stage"], cfg.precision.dtype, lora, written)


def checked_manifest(checkpoint: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; a ConfigError that says where to look otherwise."""
    if not (checkpoint / MANIFEST).is_file():
        hint = ""
        newest = newest_checkpoint_under(checkpoint)
        if newest is not None:
            hint = f" The newest complete checkpoint under it is {newest}."
        raise ConfigError(
            f"{checkpoint} is not a complete dstrain checkpoint (no {MANIFEST}). "
            f"Give a checkpoints/step_* directory that has one.{hint}"
        )
    problem = problem_with(checkpoint)
    if problem is not None:
        raise ConfigError(f"the checkpoint {checkpoint} is damaged: {problem}. Export another step_* directory.")
    return read_manifest(checkpoint)


def newest_checkpoint_under(directory: Path) -> Optional[Path]:
    """For a run directory or its checkpoints/ folder: the complete checkpoint with the highest step."""
    found = []
    for folder in (directory, directory / "checkpoints"):
        if folder.is_dir():
            found += [path for path in folder.glob("step_*") if (path / MANIFEST).is_file()]
    if not found:
        return None
    return max(found, key=lambda path: read_manifest(path)["step"])


def train_config_from_manifest(manifest: dict) -> TrainConfig:
    """Rebuild the typed config from the manifest's flat {"model.hidden_size": 64, ...} form."""
    flat = manifest.get("config")
    if not flat:
        raise ConfigError("the checkpoint's manifest has no training config, which the export rebuilds the model from")
    nested: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), nested))
    except (ConfigKeyError, ValidationError) as error:
        raise ConfigError(
            f"the checkpoint's config has {error.full_key}, which this version of dstrain does not know. "
            f"Export with the dstrain version that trained it."
        ) from error


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"the output directory {output} is a file. Choose a new directory.")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"the output directory {output} already exists and is not empty. Choose a new one.")


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer that training used: data.tokenizer, else model.pretrained's, else byte-level."""
    try:
        return build_tokenizer(cfg)
    except OSError as error:
        source = cfg.data.tokenizer or cfg.model.pretrained
        raise ConfigError(f"cannot load the tokenizer the run was trained with, {source}: {error}") from None


def model_config(cfg: TrainConfig):
    """The architecture: the preset shape from the config, or model.pretrained's config.json."""
    from transformers import AutoConfig

    from dstrain.model import llama_config

    if not cfg.model.pretrained:
        config = llama_config(cfg.model)
        config.use_cache = True  # training turns the KV cache off; generation wants it
        return config
    try:
        return AutoConfig.from_pretrained(cfg.model.pretrained)
    except OSError as error:
        raise ConfigError(
            f"the checkpoint was trained from model.pretrained={cfg.model.pretrained}, whose config.json "
            f"the export needs, but it cannot be loaded: {error}"
        ) from None


def rebuild_model(cfg: TrainConfig) -> torch.nn.Module:
    """The trained module's structure on the CPU in fp32 (a PeftModel for LoRA), weights still to load."""
    from transformers import AutoModelForCausalLM

    from dstrain.model import apply_lora

    model = AutoModelForCausalLM.from_config(
        model_config(cfg), dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
    )
    if cfg.peft.method == "lora":
        with warnings.catch_warnings():
            # PEFT asks transformers a deprecated question while wrapping; the warning is not the user's.
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            model = apply_lora(model, cfg)
    return model.eval()


def consolidated_state_dict(checkpoint: Path, zero_stage: int) -> Dict[str, torch.Tensor]:
    """Every parameter whole and in fp32."""
    if zero_stage == 0:
        return zero0_state_dict(checkpoint)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 reports its progress with print(); keep this command's stdout for its own result.
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def zero0_state_dict(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """ZeRO-0 saves the whole module, in the training precision, in one file."""
    states = torch.load(checkpoint / ZERO0_MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()
    }


def load_strictly(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = sorted(
        name for name in set(expected) & set(state_dict) if expected[name].shape != state_dict[name].shape
    )
    details = []
    if reshaped:
        name = reshaped[0]
        details.append(
            f"{name} is {list(state_dict[name].shape)} in the checkpoint but {list(expected[name].shape)} in the model"
        )
    if missing:
        details.append(f"{len(missing)} model weights are not in the checkpoint (first: {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} checkpoint weights are not in the model (first: {unexpected[0]})")
    if details:
        raise ConfigError(
            f"the weights in {checkpoint} do not fit the model rebuilt from its manifest: {'; '.join(details)}."
        )
    model.load_state_dict(state_dict, strict=True)


def staging_dir_for(output: Path) -> Path:
    staging = output.with_name(f".{output.name}.partial")
    if staging.exists():  # left by an export that did not finish
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def save_full_model(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)  # safetensors
    tokenizer.save_pretrained(directory)


def save_adapter(peft_model: torch.nn.Module, directory: Path, base: Optional[str]) -> None:
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(directory)
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
