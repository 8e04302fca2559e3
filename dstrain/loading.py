"""Load a trained model back from a dstrain checkpoint, in one CPU process without DeepSpeed's engine or a
process group: what `dstrain export` does first, and what every command that uses a trained model shares.

The checkpoint's manifest holds the resolved training config, so the model is rebuilt exactly as it was
trained (a preset shape, or the architecture of model.pretrained, with the same PEFT method). The weights are
consolidated into one fp32 state dict with DeepSpeed's own zero_to_fp32 for ZeRO stages 1-3 (the fp32 master
weights, whatever precision trained them). A ZeRO-0 checkpoint has no ZeRO files: its module weights are read
from mp_rank_00_model_states.pt and cast to fp32. After fp32 training they are the master weights; after bf16
or fp16 training they are the 16-bit weights the engine computed with (the fp32 masters are in that file too,
but only as unnamed flat groups of the optimizer). The state dict must fit the rebuilt model exactly.
"""

import os
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from dstrain.adapters import is_quantization_state, peft_method
from dstrain.checkpoint import BEST, MANIFEST, follow_pointer, problem_with, read_manifest
from dstrain.config import TrainConfig, unflatten
from dstrain.data import build_tokenizer
from dstrain.errors import CheckpointError, ConfigError

ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class TrainedModel:
    """A checkpoint's model with its trained weights, on the CPU in fp32, in eval mode."""

    # The module as trained: a PeftModel when the run trained an adapter.
    model: torch.nn.Module
    tokenizer: Any
    # The training config, rebuilt from the manifest.
    cfg: TrainConfig
    manifest: Dict[str, Any]

    def whole_model(self) -> torch.nn.Module:
        """The model itself, or its base with the adapter merged in (methods that can merge)."""
        if peft_method(self.cfg).has_adapter:
            return self.model.merge_and_unload()
        return self.model


def load_trained_model(checkpoint: Path) -> TrainedModel:
    """checkpoint: a step_* directory, or checkpoints/best or checkpoints/latest, which name one.

    The weights that training changed come from the checkpoint. The ones it kept frozen (a PEFT method's base,
    freeze's frozen blocks) come from the model as training built it before its first step, in fp32:
    model.pretrained as stored, or the preset's weights from the seed. The checkpoint holds them too, but only
    rounded to the training precision, and an adapter merged into bf16-rounded base weights is not the adapter
    merged into the base it will be used with. They are checked against the checkpoint's copy, so a
    model.pretrained that changed since training is refused rather than silently used."""
    checkpoint = follow_pointer(Path(checkpoint)).resolve()
    manifest = checked_manifest(checkpoint)
    cfg = train_config_from_manifest(manifest)
    tokenizer = load_tokenizer(cfg)
    # The template that rendered the training data, so that generation and every export prompt alike.
    chat_template = manifest.get("data", {}).get("chat_template")
    if chat_template:
        tokenizer.chat_template = chat_template
    model = rebuild_model(cfg, tokenizer)
    state_dict = consolidated_state_dict(checkpoint, manifest["zero_stage"])
    if peft_method(cfg).quantized_base:
        state_dict = with_dequantized_base(state_dict, model)
    check_fits(model, state_dict, checkpoint)
    frozen = frozen_weight_names(model)
    check_frozen_weights_unchanged(model, state_dict, frozen, cfg, checkpoint)
    model.load_state_dict({name: tensor for name, tensor in state_dict.items() if name not in frozen}, strict=False)
    return TrainedModel(model, tokenizer, cfg, manifest)


def locate_model(path: Path) -> Tuple[Path, bool]:
    """The model directory that `path` names (checkpoints/best and latest followed), and whether it is a dstrain
    checkpoint (else an exported Hugging Face directory: a full model or an adapter). A ConfigError otherwise."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist. Give a checkpoint (checkpoints/step_*, best or latest) or an "
                          f"exported model directory.")
    resolved = follow_pointer(path).resolve()
    if (resolved / MANIFEST).is_file():
        return resolved, True
    if (resolved / "config.json").is_file() or (resolved / "adapter_config.json").is_file():
        return resolved, False
    newest = newest_checkpoint_under(resolved)
    hint = f" The newest checkpoint under it is {newest}." if newest is not None else ""
    raise ConfigError(
        f"{path} is neither a dstrain checkpoint (no {MANIFEST}) nor an exported model (no config.json or "
        f"adapter_config.json). Give checkpoints/step_*, checkpoints/best, checkpoints/latest or a `dstrain export` "
        f"directory.{hint}"
    )


def load_exported_model(directory: Path) -> Tuple[torch.nn.Module, Any]:
    """A `dstrain export` directory (or any Hugging Face model directory) in fp32 and eval mode, with its
    tokenizer; an adapter directory comes with the base its adapter_config.json names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (directory / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(directory))


def checked_manifest(checkpoint: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint; a CheckpointError that says where to look otherwise."""
    if not (checkpoint / MANIFEST).is_file():
        hint = ""
        newest = newest_checkpoint_under(checkpoint)
        if newest is not None:
            hint = f" The newest complete checkpoint under it is {newest}."
        if checkpoint.name == BEST:
            hint = " A run has checkpoints/best only when it trains with trainer.early_stopping.enabled=true."
        raise CheckpointError(
            f"{checkpoint} is not a complete dstrain checkpoint (no {MANIFEST}). "
            f"Give a checkpoints/step_* directory that has one.{hint}"
        )
    problem = problem_with(checkpoint)
    if problem is not None:
        raise CheckpointError(f"the checkpoint {checkpoint} is damaged: {problem}. Use another step_* directory.")
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
        raise CheckpointError("the checkpoint's manifest has no training config, which the model is rebuilt from")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), unflatten(flat)))
    except (ConfigKeyError, ValidationError) as error:
        raise CheckpointError(
            f"the checkpoint's config has {error.full_key}, which this version of dstrain does not know. "
            f"Use the dstrain version that trained it."
        ) from error


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer that training used: data.tokenizer, else model.pretrained's, else byte-level."""
    try:
        return build_tokenizer(cfg)
    except OSError as error:
        source = cfg.data.tokenizer or cfg.model.pretrained
        raise CheckpointError(f"cannot load the tokenizer the run was trained with, {source}: {error}") from None


def model_config(cfg: TrainConfig):
    """The architecture: the preset shape from the config, or model.pretrained's config.json."""
    from transformers import AutoConfig

    from dstrain.model import llama_config

    if not cfg.model.pretrained:
        return llama_config(cfg.model)
    try:
        return AutoConfig.from_pretrained(cfg.model.pretrained)
    except OSError as error:
        raise CheckpointError(
            f"the checkpoint was trained from model.pretrained={cfg.model.pretrained}, whose config.json "
            f"the export needs, but it cannot be loaded: {error}"
        ) from None


def rebuild_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    """The trained module's structure on the CPU in fp32 (a PeftModel for an adapter). Frozen weights already
    hold their values from before training (see load_trained_model); the trained ones are still to load. A
    4-bit base (qlora) comes back dequantised: model.pretrained quantised as training did, then turned into
    plain fp32 layers, so that its adapter merges into the weights training computed with."""
    from transformers import AutoModelForCausalLM

    from dstrain.model import build_model

    method = peft_method(cfg)
    with warnings.catch_warnings():
        # PEFT asks transformers a deprecated question while wrapping; the warning is not the user's.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if method.quantized_base:
            model = method.apply(dequantized_base(cfg), cfg)
        elif method.freezes_weights:
            model = build_model(cfg, tokenizer)
        else:  # every weight was trained: only the structure is needed
            model = method.apply(AutoModelForCausalLM.from_config(
                model_config(cfg), dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
            ), cfg)
    if cfg.trainer.gradient_checkpointing:
        (model.get_base_model() if method.has_adapter else model).gradient_checkpointing_disable()
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    return model.eval()


def dequantized_base(cfg: TrainConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from dstrain.model import quantization

    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.pretrained, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation,
            **quantization(cfg),
        )
    except OSError as error:
        raise CheckpointError(
            f"the checkpoint trained a 4-bit base from model.pretrained={cfg.model.pretrained}, which the export "
            f"needs, but it cannot be loaded: {error}"
        ) from None
    return model.dequantize().float()


def with_dequantized_base(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A qlora checkpoint holds its frozen base as packed 4-bit bytes with their quantisation states; the
    rebuilt model holds the same weights dequantised. Keep the checkpoint's other tensors (the adapter first);
    check_fits reports any that do not fit."""
    expected = model.state_dict()
    kept = {}
    for name, tensor in state_dict.items():
        if is_quantization_state(name):
            continue
        packed = tensor.dtype == torch.uint8 and name in expected and expected[name].shape != tensor.shape
        kept[name] = expected[name] if packed else tensor
    return kept


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


def check_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: Path) -> None:
    """The checkpoint holds exactly the rebuilt model's weights, each of the same shape."""
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
        raise CheckpointError(
            f"the weights in {checkpoint} do not fit the model rebuilt from its manifest: {'; '.join(details)}."
        )


def frozen_weight_names(model: torch.nn.Module) -> set:
    """Every name of a parameter that training did not change; a tied weight under each of its names."""
    return {name for name, parameter in model.named_parameters(remove_duplicate=False) if not parameter.requires_grad}


# How far a weight may move when the engine casts it to the training precision (round to nearest: half a unit in
# the last place, relative), with a margin; fp32 weights are kept as they are.
_ROUNDING = {"fp32": 1e-6, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
# And how far, relative to the tensor's largest entry, a weight built by a decomposition may: lora.init=pissa and
# olora's residual bases come from an SVD or QR, whose last bits depend on the thread count (1e-6 of 0.09 seen
# between 1 and 2 threads), and entries near zero would otherwise count as changed. A different base moves by
# the size of the weights themselves.
_DECOMPOSITION_NOISE = 1e-4


def check_frozen_weights_unchanged(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], frozen: set, cfg,
                                   checkpoint: Path) -> None:
    tolerance = _ROUNDING[cfg.precision.dtype]
    built = model.state_dict()
    for name in sorted(frozen):
        original, saved = built[name].float(), state_dict[name].float()
        allowed = tolerance * original.abs() + _DECOMPOSITION_NOISE * original.abs().max()
        if bool(((saved - original).abs() > allowed).any()):
            source = f"model.pretrained={cfg.model.pretrained}" if cfg.model.pretrained else \
                f"the preset's weights from trainer.seed={cfg.trainer.seed}"
            raise CheckpointError(
                f"the frozen weight {name} in {checkpoint} is not {source} (up to the training precision, "
                f"{cfg.precision.dtype}): the base model changed since training. Use the base the run was trained on."
            )
