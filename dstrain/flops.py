"""Model FLOPs of training, per token, from the model's shape and the PEFT method: what MFU (dstrain.mfu) and
the step-time forecast (dstrain.forecast) count. No model is built: a preset's shape comes from model.*, a
pretrained model's from its config.json.

Conventions, which FlopCounterMode reproduces exactly on a real forward and backward (tests/test_flops.py):
- Only matmuls count, 2 FLOPs per multiply-add: the linear layers, lm_head included, and attention's QK^T and
  AV. The embedding is a lookup, not a matmul (tied to lm_head, its weight is counted once, as lm_head).
  Norms, rotary embeddings, activations, softmax and the loss are left out (a few percent at most).
- A linear layer of n weights costs, per token, 2n forward, 2n for its input's gradient and 2n for its
  weight's gradient. The input's gradient is only computed where something before it trains (a frozen block
  ahead of every trained weight has no backward at all), the weight's only where the weight trains. Full
  training is thus 6N; LoRA's frozen base 4N plus 6 per adapter weight (less in the first block, whose input
  needs no gradient).
- Attention is counted over the whole s x s score matrix, not halved for the causal mask (PaLM's and
  Megatron's convention; the kernels skip part of it, so MFU is slightly flattering for long sequences):
  4·s·d forward per token and layer, twice that backward, so 12·L·s·d = 6·(2·L·s·d) when everything trains
  (backward counts only the gradients autograd needs: V's alone, in a first block where only v_proj trains).
- Gradient checkpointing's recomputed forward is not counted: MFU is model FLOPs, not hardware FLOPs. The
  forecast adds it to the compute time (recompute_per_token).
- Prompt tuning's virtual tokens pass through every layer, prefix tuning's only through attention, as extra
  keys and values; both cost FLOPs that are charged to the real tokens.
"""

import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from dstrain.config import TrainConfig

# A Llama block's linear layers in the order the forward runs them; q, k and v share their input, as do
# gate and up.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    # Tokens in the embedding and lm_head.
    vocab_size: int
    # Width of the residual stream.
    hidden_size: int
    # Width of the SwiGLU feed-forward layer.
    intermediate_size: int
    # Transformer blocks.
    num_layers: int
    # Query heads and key/value heads (fewer under grouped-query attention).
    num_heads: int
    num_kv_heads: int
    # Width of one head (hidden_size / num_heads unless the config says otherwise).
    head_dim: int
    # lm_head shares the embedding's weight.
    tied: bool

    def linears(self) -> Dict[str, Tuple[int, int]]:
        """Every projection of one block: name -> (inputs, outputs)."""
        d, inner = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, inner), "up_proj": (d, inner), "down_proj": (inner, d)}

    def parameters(self) -> int:
        block = sum(inputs * outputs for inputs, outputs in self.linears().values()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied else 2)
        return self.num_layers * block + embeddings + self.hidden_size


def shape_from_hf_config(config) -> ModelShape:
    """The shape of a transformers config of a Llama-like model (Mistral, Qwen2, ...: the same projections)."""
    heads = config.num_attention_heads
    return ModelShape(
        config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
        getattr(config, "num_key_value_heads", None) or heads,
        getattr(config, "head_dim", None) or config.hidden_size // heads,
        bool(getattr(config, "tie_word_embeddings", False)),
    )


def model_shape(cfg: TrainConfig) -> ModelShape:
    if cfg.model.pretrained:
        from transformers import AutoConfig

        return shape_from_hf_config(AutoConfig.from_pretrained(cfg.model.pretrained))
    m = cfg.model
    return ModelShape(m.vocab_size, m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads,
                      m.num_key_value_heads, m.hidden_size // m.num_attention_heads, m.tie_word_embeddings)


@dataclass(frozen=True)
class TrainingFlops:
    # Model FLOPs of one forward and backward per real (non-virtual) token: what MFU divides.
    per_token: float
    # Gradient checkpointing's recomputed forward per token (0 without it): hardware work MFU leaves out.
    recompute_per_token: float
    # The forward's share of per_token (the rest is backward, when gradient reductions can overlap).
    forward_per_token: float
    # Every parameter of the model, adapters included.
    parameters: int
    # Those that train (and whose gradients ZeRO reduces).
    trainable: int
    # The shape counted.
    shape: ModelShape


class _Trained:
    """Which of the model's parts train, by module name as transformers and peft name them."""

    def __init__(self, cfg: TrainConfig, shape: ModelShape):
        method = cfg.peft.method
        self.everything = method == "none"
        self.lora_rank = cfg.peft.lora.r if method in ("lora", "qlora") else 0
        self.lora_targets = set(cfg.peft.lora.target_modules) if self.lora_rank else set()
        self.chosen: List[str] = []
        if method == "freeze":
            settings = cfg.peft.freeze
            first = shape.num_layers - settings.last_blocks
            self.chosen = [f"model.layers.{index}" for index in range(first, shape.num_layers)]
            self.chosen += list(settings.modules)
            self.chosen += ["model.embed_tokens"] if settings.train_embeddings else []
            self.chosen += ["lm_head"] if settings.train_head else []
        self.tied = shape.tied
        # peft's IA3 and prefix tuning put trained values inside each block, prompt tuning at the input.
        self.ia3_targets = set(cfg.peft.ia3.target_modules) if method == "ia3" else set()
        self.ia3_feedforward = set(cfg.peft.ia3.feedforward_modules) if method == "ia3" else set()
        self.prefix_tokens = cfg.peft.prefix.num_virtual_tokens if method == "prefix" else 0
        self.prompt_tokens = cfg.peft.prompt.num_virtual_tokens if method == "prompt" else 0

    def added_parameters(self, shape: ModelShape) -> int:
        """What prompt and prefix tuning and IA3 add to the model (all of it trains); LoRA's adapters aside."""
        kv_width = shape.num_kv_heads * shape.head_dim
        ia3 = sum(inputs if name in self.ia3_feedforward else outputs
                  for name, (inputs, outputs) in shape.linears().items() if name in self.ia3_targets)
        return (self.prompt_tokens * shape.hidden_size + self.prefix_tokens * 2 * kv_width * shape.num_layers
                + ia3 * shape.num_layers)

    def trains(self, name: str) -> bool:
        """Whether the module `name` trains: it, or a module above it, was chosen."""
        if self.everything:
            return True
        if self.tied and name in ("model.embed_tokens", "lm_head"):
            # One weight: training either module trains both.
            return self._chosen("model.embed_tokens") or self._chosen("lm_head")
        return self._chosen(name)

    def _chosen(self, name: str) -> bool:
        parts = name.split(".")
        ancestors = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatchcase(ancestor, pattern) for ancestor in ancestors for pattern in self.chosen)


@dataclass
class _Tally:
    flops: float = 0.0
    forward: float = 0.0
    trainable: int = 0
    adapters: int = 0

    def linear(self, inputs: int, outputs: int, input_needs_grad: bool, weight_trains: bool, lora_rank: int) -> bool:
        """Adds one linear layer (and its LoRA adapter); returns whether its output needs a gradient."""
        weights = inputs * outputs
        self.forward += 2 * weights
        self.flops += 2 * weights * (1 + input_needs_grad + weight_trains)
        self.trainable += weights if weight_trains else 0
        if lora_rank:
            a, b = inputs * lora_rank, lora_rank * outputs
            self.forward += 2 * (a + b)
            # A and B train; B's input (A's output) always needs its gradient, A's only if the layer's does.
            self.flops += 2 * (a + b) * 2 + 2 * b + (2 * a if input_needs_grad else 0)
            self.adapters += a + b
        return input_needs_grad or weight_trains or bool(lora_rank)


def training_flops(cfg: TrainConfig, shape: Optional[ModelShape] = None) -> TrainingFlops:
    """Model FLOPs per token of training cfg's model at data.seq_len, following the module's conventions."""
    shape = shape or model_shape(cfg)
    trained = _Trained(cfg, shape)
    seq_len = cfg.data.seq_len
    positions = seq_len + trained.prompt_tokens  # what every layer processes per sequence
    keys = positions + trained.prefix_tokens  # what each query attends to
    attention_width = shape.num_heads * shape.head_dim
    d = shape.hidden_size
    tally = _Tally()
    # The residual stream needs a gradient from where something trains onwards: the embedding, or a prompt.
    stream = trained.trains("model.embed_tokens") or bool(trained.prompt_tokens)
    tally.trainable += shape.vocab_size * d if trained.trains("model.embed_tokens") else 0
    for index in range(shape.num_layers):
        block = f"model.layers.{index}"
        norms_train = [trained.trains(f"{block}.{norm}") for norm in ("input_layernorm", "post_attention_layernorm")]
        tally.trainable += d * sum(norms_train)
        outputs_need_grad = {}
        attention_needs_grad = False  # set once q, k and v are known, before o_proj reads it
        for name, (inputs, outputs) in shape.linears().items():
            module = f"{block}.{'self_attn' if name in PROJECTIONS[:4] else 'mlp'}.{name}"
            if name in ("q_proj", "k_proj", "v_proj"):
                input_needs_grad = stream or norms_train[0]
            elif name == "o_proj":
                input_needs_grad = attention_needs_grad
            elif name in ("gate_proj", "up_proj"):
                input_needs_grad = stream or norms_train[1]
            else:
                input_needs_grad = outputs_need_grad["gate_proj"] or outputs_need_grad["up_proj"]
            # IA3 scales a feed-forward layer's input, so that input needs its gradient.
            input_needs_grad = input_needs_grad or name in trained.ia3_feedforward & trained.ia3_targets
            lora = trained.lora_rank if name in trained.lora_targets else 0
            outputs_need_grad[name] = (tally.linear(inputs, outputs, input_needs_grad, trained.trains(module), lora)
                                       or name in trained.ia3_targets)
            if name == "v_proj":
                # Prefix tuning's trained keys and values join every layer's own.
                q, k, v = (outputs_need_grad["q_proj"], outputs_need_grad["k_proj"] or bool(trained.prefix_tokens),
                           outputs_need_grad["v_proj"] or bool(trained.prefix_tokens))
                attention_needs_grad = q or k or v
                # QK^T and AV cost 2·keys·width each per query; backward, a matmul of the same size for each
                # gradient autograd needs: V's, the scores' (for Q's or K's), Q's and K's.
                matmul = 2 * keys * attention_width
                tally.forward += 2 * matmul
                tally.flops += matmul * (2 + v + (q or k) + q + k)
            if name == "o_proj":
                stream = stream or outputs_need_grad["o_proj"]
        stream = stream or outputs_need_grad["down_proj"]
    block_forward = tally.forward
    final_norm_trains = trained.trains("model.norm")
    tally.trainable += d if final_norm_trains else 0
    head_trains = trained.trains("lm_head")
    head_lora = trained.lora_rank if "lm_head" in trained.lora_targets else 0
    tally.linear(d, shape.vocab_size, stream or final_norm_trains, head_trains, head_lora)
    if head_trains and shape.tied:
        tally.trainable -= shape.vocab_size * d  # one weight, already counted as the embedding
    per_real_token = positions / seq_len
    recompute = block_forward * per_real_token if cfg.trainer.gradient_checkpointing else 0.0
    added = tally.adapters + trained.added_parameters(shape)
    return TrainingFlops(tally.flops * per_real_token, recompute, tally.forward * per_real_token,
                         shape.parameters() + added,
                         tally.trainable + added, shape)
