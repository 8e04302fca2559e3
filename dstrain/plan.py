"""The memory plan of a run, per rank, before anything is built: what `dstrain plan` prints and what training
checks before it builds its engine.

Model states follow the ZeRO paper (Rajbhandari et al., 2020): mixed-precision Adam keeps 2 + 2 + 12 = 16 bytes
per trained parameter (16-bit weights and gradients; fp32 master weights, momentum and variance); stage 1
partitions the 12 over the ranks, stage 2 the gradients too, stage 3 the weights too. fp32 training keeps 4 + 4
+ 8. Frozen weights (PEFT) keep their weights only. DeepSpeed adds to the paper a partition of fp32 gradients
(stages 1-3), its communication buckets, and under bf16 at stage 0 whole fp32 gradient accumulators.

Activations are counted from the autograd graph of one transformers Llama block (what each op saves, per token);
checkpointing keeps each block's input and recomputes one block at a time. The planned peak is the larger of
building (the model is built in fp32, then DeepSpeed casts it) and training.
"""

from dataclasses import dataclass, replace

from dstrain.config import TrainConfig
from dstrain.model_census import ModelShape, ParameterCensus

GB = 1e9
# DeepSpeed's stage3_max_live_parameters default: gathered parameters it keeps before releasing any.
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
# ZeRO-0's all-reduce bucket: the engine's allreduce_gradients default (deepspeed.runtime.engine).
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
_FP32_BYTES = 4


@dataclass(frozen=True)
class Hardware:
    # Memory of one device (a GPU, or one rank's share of a CPU machine's RAM), bytes.
    device_bytes: float
    # RAM of one node, bytes: where offloaded states go, shared by the node's ranks.
    host_bytes: float
    # Ranks per node.
    ranks_per_node: int
    # Nodes.
    nodes: int
    # What the device is, for the printout ("h100", "cpu").
    name: str
    # Memory the runtime holds before any tensor: a CUDA context, or a CPU rank's own interpreter and libraries.
    runtime_bytes: float

    @property
    def world_size(self) -> int:
        return self.ranks_per_node * self.nodes

    @property
    def on_cpu(self) -> bool:
        return self.name == "cpu"


@dataclass(frozen=True)
class MemoryPlan:
    # 16-bit (or fp32) weights held on the device.
    weights: float
    # Gradients of the trained parameters on the device: 16-bit under bf16/fp16, fp32 under fp32.
    gradients: float
    # DeepSpeed's fp32 gradients under bf16/fp16: whole accumulators at stage 0 (held throughout), an fp32
    # partition at stages 1-3 (held during the optimizer step, when activations are gone); 0 when offloaded.
    fp32_gradients: float
    # fp32 master weights, Adam's momentum and variance, on the device (0 when offloaded).
    optimizer_states: float
    # Activations one micro-batch keeps through its forward pass (all blocks', or their inputs only).
    activations: float
    # Under checkpointing: one block recomputed in the backward pass (0 without).
    recompute: float
    # The output layer's logits and the loss's fp32 copy of them, with their gradients.
    logits: float
    # DeepSpeed's gradient-reduction and parameter-gather buckets.
    buffers: float
    # ZeRO-3 under checkpointing on a CPU: gloo's own flat copy of each all-gather still in flight while the
    # backward pass gathers the model again (0 otherwise).
    gather_staging: float
    # The model as built (fp32) while DeepSpeed casts it: the peak before training when that is larger.
    build: float
    # The runtime's own memory (CUDA context, or the CPU rank's process before building).
    runtime: float
    # What is offloaded to host RAM per rank (optimizer states, and weights under offload_param).
    host: float
    # The device's memory.
    available: float
    # "the backward pass", "the optimizer step" or "building": where the peak is.
    peak_phase: str
    # Whether the buffers are allocated at the first gradient (ZeRO-1/2) rather than with the engine (ZeRO-3).
    buffers_from_first_gradient: bool
    # Whether the buffers exist only after the backward pass (ZeRO-0's all-reduce copies).
    buffers_after_backward: bool
    # Whether the 16-bit gradients exist before the backward pass (ZeRO-3's flat partition buffer).
    gradients_preallocated: bool
    # Whether fp32_gradients are held throughout (stage 0's accumulators) rather than during the step only.
    fp32_gradients_held: bool

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def backward_peak(self) -> float:
        """The start of the backward pass: every activation and the loss's memory are live."""
        held_fp32_gradients = self.fp32_gradients if self.fp32_gradients_held else 0.0
        # Below ZeRO-3 the 16-bit gradients are made during the backward pass, as activations are freed.
        not_yet_made = 0.0 if self.gradients_preallocated else self.gradients
        if self.buffers_after_backward:
            after_loss = max(self.logits, self.recompute)
        elif self.buffers_from_first_gradient:
            # The loss's memory is freed before the first gradient, when the bucket is allocated.
            after_loss = max(self.logits, self.recompute + self.buffers)
        else:
            after_loss = max(self.logits, self.recompute) + self.buffers + self.gather_staging
        return self.model_states - not_yet_made + held_fp32_gradients + self.activations + after_loss

    @property
    def step_peak(self) -> float:
        """The optimizer step: activations are freed, the fp32 gradients are live."""
        return self.model_states + self.fp32_gradients + self.buffers

    @property
    def training_peak(self) -> float:
        return max(self.backward_peak, self.step_peak)

    @property
    def tensor_peak(self) -> float:
        """Bytes held in tensors at the peak: what torch.cuda.max_memory_allocated would report."""
        return max(self.training_peak, self.build)

    @property
    def total(self) -> float:
        return self.tensor_peak + self.runtime

    @property
    def headroom(self) -> float:
        return self.available - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


def bytes_per_element(dtype: str) -> int:
    return _FP32_BYTES if dtype == "fp32" else 2


def model_states(cfg: TrainConfig, params: ParameterCensus, world: int) -> dict:
    """Weights, gradients and optimizer states per rank on the device, and what offload moves to the host."""
    stage, zero, dtype = cfg.zero.stage, cfg.zero, cfg.precision.dtype
    mixed = dtype != "fp32"
    weight_bytes = bytes_per_element(dtype)
    trained, frozen = params.trainable, params.frozen - params.quantized
    # Weights: every rank holds all of them, except under ZeRO-3 (a 1/N partition plus the small tensors whole).
    weights = weight_bytes * (trained + frozen) + params.quantized / 2
    if stage == 3:
        persistent = params.persistent(zero.stage3_param_persistence_threshold)
        weights = weights / world + weight_bytes * persistent
    # Gradients of the trained parameters: whole below stage 2. Mixed precision at stage 0 accumulates them in
    # fp32 (DeepSpeed's BF16_Optimizer) besides the 16-bit ones; stages 1-3 keep an fp32 partition of them.
    grads16 = weight_bytes * trained / (world if stage >= 2 else 1)
    fp32_grads = 0.0
    if mixed:
        fp32_grads = _FP32_BYTES * trained / (1 if stage == 0 else world)
    # Optimizer: fp32 master (mixed precision only) + momentum + variance, partitioned from stage 1.
    optimizer = (3 if mixed else 2) * _FP32_BYTES * trained / (world if stage >= 1 else 1)
    host = 0.0
    if zero.offload_optimizer:
        host += optimizer + fp32_grads
        optimizer, fp32_grads = 0.0, 0.0
    if zero.offload_param:
        host += weights
        weights = weight_bytes * params.persistent(zero.stage3_param_persistence_threshold)
    return {"weights": weights, "gradients": grads16, "fp32_gradients": fp32_grads, "optimizer_states": optimizer,
            "host": host}


# The linear layers of a Llama block, with the width of their input: q/k/v read one tensor (the first norm's
# output), gate/up another (the second norm's), o_proj the attention output and down_proj the MLP's product.
_BLOCK_LINEARS = {"q_proj": "h", "k_proj": "h", "v_proj": "h", "o_proj": "h", "gate_proj": "h", "up_proj": "h",
                  "down_proj": "i"}
_SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"})


def block_activation_bytes_per_token(cfg: TrainConfig, shape: ModelShape) -> float:
    """Bytes one Llama block keeps for its backward pass, per token (transformers 5, PyTorch autograd).
    Always: each RMSNorm's fp32 copy of its input (2 x 4h); the attention kernel's queries, keys, values and
    output (h + 2kv + h); SiLU's input, its output and the up projection's output (3i). A trained base also keeps
    each norm's normalised output (2 x h) and every linear layer's input (3h + i); a frozen one the linear
    inputs too under ZeRO-3. LoRA keeps each adapter's
    input (its own dropout output and mask when lora.dropout > 0) and its rank-r middle. Eager attention keeps
    its fp32 softmax and 16-bit probabilities, heads x seq_len per token; fused kernels (sdpa, flash) only a
    log-sum-exp per head."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    width = bytes_per_element(cfg.precision.dtype)
    sizes = {"h": h, "i": i}
    per_token = 2 * _FP32_BYTES * h + width * (2 * h + 2 * kv + 3 * i)
    if base_trains(cfg):
        per_token += width * (2 * h + 3 * h + i)
    elif cfg.zero.stage == 3:
        # ZeRO-3 replaces F.linear with its own autograd function, which saves the input even of a frozen weight.
        per_token += width * (3 * h + i)
    if not base_trains(cfg) and cfg.peft.method in ("lora", "qlora"):
        targets = [name for name in _BLOCK_LINEARS if name in set(cfg.peft.lora.target_modules)]
        adapter = adapter_bytes_per_element(cfg)
        if cfg.peft.lora.dropout > 0:
            # peft casts x to the adapter's dtype; each adapter's dropout keeps its scaled noise (a tensor of x's
            # dtype, PyTorch's CPU dropout is x * noise) and lora_A keeps the dropped-out input.
            per_token += sum(2 * adapter * sizes[_BLOCK_LINEARS[name]] for name in targets)
        else:
            per_token += sum(adapter * sizes[_BLOCK_LINEARS[next(iter(group))]]
                             for group in _SHARED_INPUTS if group & set(targets))
        per_token += len(targets) * adapter * cfg.peft.lora.r
    if cfg.model.attn_implementation == "eager":
        per_token += (_FP32_BYTES + width) * shape.num_heads * cfg.data.seq_len
    else:
        per_token += _FP32_BYTES * shape.num_heads
    return per_token


def adapter_bytes_per_element(cfg: TrainConfig) -> int:
    """The dtype LoRA's adapters compute in. Below ZeRO-3 DeepSpeed casts the whole module to the 16-bit dtype.
    Under ZeRO-3 it does not (parameters are expected to be converted as deepspeed.zero.Init builds them), and
    peft adds its adapters after the build, in fp32: they stay fp32, and peft casts each adapter's input to fp32,
    so everything an adapter saves is fp32 (measured: every lora_A/lora_B input and dropout noise is fp32)."""
    return _FP32_BYTES if cfg.zero.stage == 3 else bytes_per_element(cfg.precision.dtype)


def base_trains(cfg: TrainConfig) -> bool:
    """Whether the model's own weights train (full fine-tuning, or peft.method=freeze's chosen part, counted as if
    all of it trained): their layers then keep their inputs for the weight gradients."""
    return cfg.peft.method in ("none", "freeze")


def activation_bytes(cfg: TrainConfig, shape: ModelShape) -> float:
    """Activations one micro-batch keeps through the forward pass: every block's, or under checkpointing only
    each block's 16-bit input; then the final norm's fp32 copy (and, with a trained head, its output)."""
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    width = bytes_per_element(cfg.precision.dtype)
    if cfg.trainer.gradient_checkpointing:
        blocks = shape.num_layers * width * shape.hidden_size
    else:
        blocks = shape.num_layers * block_activation_bytes_per_token(cfg, shape)
    head_input = (_FP32_BYTES + (2 * width if base_trains(cfg) else 0)) * shape.hidden_size
    return tokens * (blocks + head_input)


def recompute_bytes(cfg: TrainConfig, shape: ModelShape) -> float:
    """Under checkpointing, the one block recomputed in the backward pass, with the gradient of its output; it
    lives after the loss's memory is freed, so the larger of the two counts."""
    if not cfg.trainer.gradient_checkpointing:
        return 0.0
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    width = bytes_per_element(cfg.precision.dtype)
    per_token = block_activation_bytes_per_token(cfg, shape) + width * shape.hidden_size
    if not base_trains(cfg):
        # Measured: behind a frozen base the MLP's three i-wide gradients are live together with the block's
        # saved tensors (the adapters' backward runs after the base's, which frees nothing of its own).
        per_token += 3 * width * shape.intermediate_size
    return tokens * per_token


def logits_bytes(cfg: TrainConfig, shape: ModelShape) -> float:
    """The loss's memory at its peak (dstrain.loss): the final hidden states of the counted positions, kept for
    the output layer's recomputation, with their gradient, and one chunk of positions recomputed in the backward
    pass: its logits in the model's dtype, their fp32 copy, the log-probabilities cross-entropy saves and the
    gradients that pass back through them. Every position is counted as counting (plain text); masked prompts
    make it smaller."""
    from dstrain.loss import LOSS_CHUNKS

    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    width = bytes_per_element(cfg.precision.dtype)
    chunk = -(-tokens // LOSS_CHUNKS)
    fp32_copies = 3 if width == _FP32_BYTES else 4
    return 2 * tokens * shape.hidden_size * width + chunk * shape.vocab_size * (fp32_copies * _FP32_BYTES + width)


def deepspeed_buffer_bytes(cfg: TrainConfig, params: ParameterCensus) -> float:
    """DeepSpeed's buckets (elements x bytes of the gradient-accumulation dtype, 16-bit unless
    precision.grad_accum_dtype says fp32): ZeRO-1/2 reduce gradients through one reduce_bucket_size buffer (two
    with overlap_comm), allocated when the first gradient arrives. ZeRO-3 keeps its reduce bucket from the start,
    gathers up to stage3_prefetch_bucket_size elements ahead, and keeps gathered parameters live up to
    stage3_max_live_parameters (DeepSpeed's default, 1e9 elements, which dstrain leaves) when they are used again
    soon, as every parameter is between the forward and the backward pass: at most the whole model."""
    zero = cfg.zero
    if zero.stage == 0:
        # After the backward pass the engine all-reduces the gradients (bf16's are its fp32 accumulators) in
        # flat copies of up to DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE elements: measured as a 536 MB fp32
        # torch.cat on 125m at ZeRO-0 bf16, the step's peak.
        width = _FP32_BYTES if cfg.precision.dtype == "bf16" else bytes_per_element(cfg.precision.dtype)
        return min(params.trainable, ALLREDUCE_BUCKET_ELEMENTS) * width
    width = _FP32_BYTES if cfg.precision.grad_accum_dtype == "fp32" else bytes_per_element(cfg.precision.dtype)
    if not zero.contiguous_gradients and zero.stage < 3:
        return 0.0
    if zero.stage in (1, 2):
        return (2 if zero.overlap_comm else 1) * zero.reduce_bucket_size * width
    prefetch = min(zero.stage3_prefetch_bucket_size, params.total)
    gathered = min(STAGE3_MAX_LIVE_PARAMETERS, params.total)
    return (zero.reduce_bucket_size + prefetch + gathered) * bytes_per_element(cfg.precision.dtype)


def gather_staging_bytes(cfg: TrainConfig, params: ParameterCensus, on_cpu: bool) -> float:
    """Without checkpointing ZeRO-3 keeps the parameters it gathered in the forward pass for the backward pass
    (they are used again within stage3_max_reuse_distance). Under checkpointing the backward pass starts by
    gathering the whole model again: one coalesced all-gather per prefetch bucket, all issued before the first
    is waited for (measured on 125m, full and LoRA: 51.3M, 51.1M and 31.7M elements). On a CPU the all-gather
    is gloo's, which gathers into a flat buffer of its own and then copies it into DeepSpeed's, so each bucket
    in flight is held twice. How many are still in flight at the backward pass's peak varies with timing
    (measured: all three, 268 MB of gloo's buffers, or the last two, 165 MB); the plan counts all of them.
    NCCL gathers in place."""
    if cfg.zero.stage != 3 or not cfg.trainer.gradient_checkpointing or not on_cpu:
        return 0.0
    return min(STAGE3_MAX_LIVE_PARAMETERS, params.total) * bytes_per_element(cfg.precision.dtype)


def build_bytes(cfg: TrainConfig, params: ParameterCensus, world: int) -> float:
    """The model as built, in fp32, plus its 16-bit copy being made: every rank holds it whole, except under
    ZeRO-3, which builds each parameter partitioned (deepspeed.zero.Init)."""
    fp32 = _FP32_BYTES * params.total
    if cfg.zero.stage == 3:
        return fp32 / world
    return fp32


def plan_memory(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware) -> MemoryPlan:
    world = hardware.world_size
    states = model_states(cfg, params, world)
    if hardware.on_cpu:
        # On a CPU the host is the device: offloaded states stay in the same RAM.
        states["optimizer_states"] += states["host"]
        states["host"] = 0.0
    activations = activation_bytes(cfg, params.shape)
    recompute = recompute_bytes(cfg, params.shape)
    logits = logits_bytes(cfg, params.shape)
    buffers = deepspeed_buffer_bytes(cfg, params)
    gather_staging = gather_staging_bytes(cfg, params, hardware.on_cpu)
    build = build_bytes(cfg, params, world)
    plan = MemoryPlan(
        weights=states["weights"], gradients=states["gradients"], fp32_gradients=states["fp32_gradients"],
        optimizer_states=states["optimizer_states"], activations=activations, recompute=recompute, logits=logits,
        buffers=buffers, gather_staging=gather_staging, build=build, runtime=hardware.runtime_bytes,
        host=states["host"], available=hardware.device_bytes, peak_phase="", fp32_gradients_held=cfg.zero.stage == 0,
        buffers_from_first_gradient=cfg.zero.stage in (1, 2), buffers_after_backward=cfg.zero.stage == 0,
        gradients_preallocated=cfg.zero.stage == 3,
    )
    phases = {"the backward pass": plan.backward_peak, "the optimizer step": plan.step_peak, "building": build}
    return replace(plan, peak_phase=max(phases, key=phases.get))
