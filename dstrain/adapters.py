"""PEFT methods: what peft.method selects, each a component that wraps a built model for training and knows
what an export of it contains. peft.method=none trains every weight."""

import torch

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError
from dstrain.registry import Registry


class FullFineTuning:
    """Every weight trains; the export is the whole model."""

    # Whether the method adds an adapter of its own (exported on its own, mergeable into the base).
    has_adapter = False

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        return model


class Lora:
    """Low-rank adapters on peft.lora.target_modules; the base weights stay frozen."""

    has_adapter = True

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        settings = cfg.peft.lora
        lora = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        # The adapters' initial weights depend on the seed alone, as the base's do.
        torch.manual_seed(cfg.trainer.seed)
        try:
            return get_peft_model(model, lora)
        except ValueError as error:
            raise ConfigError(f"peft.lora.target_modules={list(settings.target_modules)}: {error}") from None


PEFT_METHODS: Registry = Registry("peft.method")
PEFT_METHODS.register("none")(FullFineTuning())
PEFT_METHODS.register("lora")(Lora())


def peft_method(cfg: TrainConfig):
    return PEFT_METHODS[cfg.peft.method]


def warn_about_random_base(cfg: TrainConfig, log) -> None:
    if peft_method(cfg).has_adapter and not cfg.model.pretrained:
        log.warning("peft.method=%s on a randomly initialised model: only the adapters train. "
                    "Set model.pretrained=<dir> to fine-tune real weights.", cfg.peft.method)
