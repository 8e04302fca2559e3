"""PEFT methods: what peft.method selects, each a component that wraps a built model for training and knows
what an export of it contains. peft.method=none trains every weight, freeze a chosen part of it; the others
train an adapter through the peft library (lora, qlora, ia3, prompt, prefix)."""

import fnmatch
from typing import List

import torch

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError
from dstrain.registry import Registry


class FullFineTuning:
    """Every weight trains; the export is the whole model."""

    # Whether the method adds an adapter of its own (exported on its own, and loaded with PeftModel).
    has_adapter = False
    # Whether the adapter can be merged into the base weights (`dstrain export --merged`).
    can_merge = False
    # Whether the base model is built 4-bit quantised (from model.pretrained, through bitsandbytes).
    quantized_base = False
    # Whether some of the model's own weights stay frozen (every method with an adapter freezes its base).
    freezes_weights = False

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        return model


class Freeze(FullFineTuning):
    """Only the chosen parts train (the last blocks, named modules, embeddings, head), by requires_grad alone:
    the model keeps its structure, so the export is the whole model as with full fine-tuning."""

    freezes_weights = True

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        chosen = trained_module_names(model, cfg)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        modules = dict(model.named_modules())
        for name in chosen:
            for parameter in modules[name].parameters():
                parameter.requires_grad_(True)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ConfigError(
                "peft.method=freeze trains nothing: set peft.freeze.last_blocks, peft.freeze.modules, "
                "peft.freeze.train_embeddings or peft.freeze.train_head."
            )
        return model


def trained_module_names(model: torch.nn.Module, cfg: TrainConfig) -> List[str]:
    """The modules peft.freeze chooses to train, by name."""
    settings = cfg.peft.freeze
    by_module = {module: name for name, module in model.named_modules()}
    blocks = list(getattr(model.base_model, "layers", None) or [])
    if settings.last_blocks and not blocks:
        raise ConfigError(
            "peft.freeze.last_blocks needs the model's blocks as base_model.layers (Llama, Mistral, Qwen, ...); "
            "this model has none. Set peft.freeze.last_blocks=0 and name what trains in peft.freeze.modules."
        )
    if settings.last_blocks > len(blocks):
        raise ConfigError(
            f"peft.freeze.last_blocks={settings.last_blocks} exceeds the model's {len(blocks)} blocks"
        )
    chosen = [by_module[block] for block in blocks[len(blocks) - settings.last_blocks:]]
    names = [name for name, _ in model.named_modules()]
    for pattern in settings.modules:
        matching = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matching:
            raise ConfigError(
                f"peft.freeze.modules: {pattern!r} matches no module of the model (names look like "
                f"'model.layers.0.mlp' or 'lm_head')"
            )
        chosen += matching
    if settings.train_embeddings:
        chosen.append(by_module[model.get_input_embeddings()])
    if settings.train_head:
        chosen.append(by_module[model.get_output_embeddings()])
    return chosen


class PeftLibraryMethod(FullFineTuning):
    """A method of the peft library: its config from ours, then get_peft_model."""

    has_adapter = True
    freezes_weights = True
    # The config key named when peft refuses the settings (mostly: target modules the model does not have).
    settings_key = ""

    def peft_config(self, cfg: TrainConfig):
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import get_peft_model

        # The adapters' initial weights depend on the seed alone, as the base's do.
        torch.manual_seed(cfg.trainer.seed)
        try:
            return get_peft_model(model, self.peft_config(cfg))
        except ValueError as error:
            raise ConfigError(f"{self.settings_key}: {error}") from None


class Lora(PeftLibraryMethod):
    """Low-rank adapters on peft.lora.target_modules, with DoRA, rsLoRA, the init and LoRA+ as options; the
    base weights stay frozen (pissa and olora move part of them into the adapters first)."""

    can_merge = True
    settings_key = "peft.lora.target_modules"

    def peft_config(self, cfg: TrainConfig):
        from peft import LoraConfig

        settings = cfg.peft.lora
        return LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            use_dora=settings.use_dora,
            use_rslora=settings.use_rslora,
            # peft's own default is True; the other names are peft's.
            init_lora_weights=True if settings.init == "default" else settings.init,
            task_type="CAUSAL_LM",
        )


class QLora(Lora):
    """LoRA on a base loaded 4-bit (NF4) from model.pretrained through bitsandbytes (dstrain.model builds it).
    The export holds the adapter; --merged merges it into the dequantised base, the weights training saw."""

    quantized_base = True

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import prepare_model_for_kbit_training

        # dstrain.loading rebuilds the trained model on a dequantised base, which needs no preparation.
        if is_4bit(model):
            # Norms and embeddings in fp32 and, where asked, non-reentrant checkpointing with input grads.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        model = super().apply(model, cfg)
        model.register_load_state_dict_pre_hook(drop_quantization_states)
        return model


def is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


# What bitsandbytes calls the tensors of a 4-bit weight's quantisation state in a state dict.
QUANT_STATE_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".nested_absmax", ".nested_quant_map")


def is_quantization_state(name: str) -> bool:
    return any(marker in name for marker in QUANT_STATE_MARKERS)


def drop_quantization_states(module, state_dict, *_) -> None:
    """A checkpoint of a 4-bit base holds each weight's quantisation state next to its packed bytes, and the
    layers do not take them back on load (DeepSpeed loads strictly when it resumes). Every start quantises
    model.pretrained afresh, and identically, so the states are left out rather than loaded."""
    for name in [name for name in state_dict if is_quantization_state(name)]:
        del state_dict[name]


class Ia3(PeftLibraryMethod):
    """Learned scaling vectors on the activations of peft.ia3.target_modules."""

    can_merge = True
    settings_key = "peft.ia3.target_modules"

    def peft_config(self, cfg: TrainConfig):
        from peft import IA3Config

        settings = cfg.peft.ia3
        return IA3Config(
            target_modules=list(settings.target_modules), feedforward_modules=list(settings.feedforward_modules),
            task_type="CAUSAL_LM",
        )


class PromptTuning(PeftLibraryMethod):
    """Learned embeddings of peft.prompt.num_virtual_tokens tokens prepended to every input."""

    settings_key = "peft.prompt"

    def peft_config(self, cfg: TrainConfig):
        from peft import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=cfg.peft.prompt.num_virtual_tokens, task_type="CAUSAL_LM")

    def apply(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        model = super().apply(model, cfg)
        virtual = cfg.peft.prompt.num_virtual_tokens
        # peft returns logits for the virtual tokens too; whoever reads logits (generation, scoring) gets the real
        # tokens' only. The loss reads hidden states and drops the virtual tokens' itself (dstrain.loss).
        model.register_forward_hook(lambda module, args, output: drop_leading_logits(output, virtual))
        return model


def drop_leading_logits(output, count: int):
    output.logits = output.logits[:, count:].contiguous()  # the loss views them flat
    return output


class PrefixTuning(PeftLibraryMethod):
    """Learned keys and values of peft.prefix.num_virtual_tokens tokens in front of every layer's attention."""

    settings_key = "peft.prefix"

    def peft_config(self, cfg: TrainConfig):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=cfg.peft.prefix.num_virtual_tokens, task_type="CAUSAL_LM")


PEFT_METHODS: Registry = Registry("peft.method")
PEFT_METHODS.register("none")(FullFineTuning())
PEFT_METHODS.register("freeze")(Freeze())
PEFT_METHODS.register("lora")(Lora())
PEFT_METHODS.register("qlora")(QLora())
PEFT_METHODS.register("ia3")(Ia3())
PEFT_METHODS.register("prompt")(PromptTuning())
PEFT_METHODS.register("prefix")(PrefixTuning())


def peft_method(cfg: TrainConfig):
    return PEFT_METHODS[cfg.peft.method]


def warn_about_random_base(cfg: TrainConfig, log) -> None:
    if peft_method(cfg).has_adapter and not cfg.model.pretrained:
        log.warning("peft.method=%s on a randomly initialised model: only the adapters train. "
                    "Set model.pretrained=<dir> to fine-tune real weights.", cfg.peft.method)
