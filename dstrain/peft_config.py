"""The peft section of the typed config (dstrain.config): which PEFT method trains (dstrain.adapters) and each
method's settings under its name."""

from dataclasses import dataclass, field
from typing import List

from dstrain.config_fields import in_range, one_of


@dataclass
class LoraConfig:
    # Rank of the low-rank update.
    r: int = in_range(8, at_least=1)
    # Scale of the update: it is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
    alpha: int = in_range(16, above=0)
    # Dropout on the adapter's input during training.
    dropout: float = in_range(0.0, at_least=0, below=1)
    # Module names (suffixes) that get an adapter; the default is every linear projection of a Llama block.
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # DoRA: split each adapted weight into a trained magnitude and a LoRA-updated direction.
    use_dora: bool = False
    # rsLoRA: scale the update by alpha / sqrt(r), which keeps high ranks learning.
    use_rslora: bool = False
    # How the adapters start: "default" is peft's (Kaiming-uniform A, zero B: the model starts unchanged),
    # "gaussian" draws A from a normal distribution, "pissa" and "olora" start A and B from the base weights'
    # SVD or QR and take that part out of the base (so the base weights change too).
    init: str = one_of("default", "default", "gaussian", "pissa", "olora")
    # LoRA+: the B matrices train at optim.lr times this; 1 trains A and B alike.
    loraplus_lr_ratio: float = in_range(1.0, above=0)


@dataclass
class Ia3Config:
    # Module names (suffixes) whose activations get a learned scaling vector.
    target_modules: List[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # Those of target_modules that are feed-forward layers: their input is scaled rather than their output.
    feedforward_modules: List[str] = field(default_factory=lambda: ["down_proj"])


@dataclass
class VirtualTokensConfig:
    # Learned virtual tokens prepended to every sequence (prompt tuning: to the input embeddings; prefix
    # tuning: to every layer's keys and values).
    num_virtual_tokens: int = in_range(16, at_least=1)


@dataclass
class FreezeConfig:
    # Train the last this many transformer blocks (0: none of them); everything not chosen here stays frozen.
    last_blocks: int = in_range(1, at_least=0)
    # Modules whose parameters train as well, as fnmatch patterns on their names, e.g. "*.mlp" or
    # "model.layers.0.self_attn".
    modules: List[str] = field(default_factory=list)
    # Train the input embeddings too.
    train_embeddings: bool = False
    # Train the output layer (the LM head) too; with tied embeddings it is the input embedding.
    train_head: bool = False


@dataclass
class PeftConfig:
    # "none" trains every weight; the others train only part of the model or an adapter (dstrain.adapters).
    method: str = one_of("none", registry="dstrain.adapters:PEFT_METHODS")
    # Settings of peft.method=lora, and of the adapters of peft.method=qlora.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Settings of peft.method=ia3.
    ia3: Ia3Config = field(default_factory=Ia3Config)
    # Settings of peft.method=prompt (prompt tuning).
    prompt: VirtualTokensConfig = field(default_factory=VirtualTokensConfig)
    # Settings of peft.method=prefix (prefix tuning).
    prefix: VirtualTokensConfig = field(default_factory=VirtualTokensConfig)
    # Settings of peft.method=freeze.
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
