"""A step-time and MFU forecast for a cluster, on paper: the config's model FLOPs (dstrain.flops) at an
assumed fraction of the GPUs' peak, plus ZeRO's collectives in an α-β model over the node's and the fabric's
links. No model is built, so it sizes 70B on hundreds of GPUs as readily as the tiny preset.

Communication per GPU per step, Ψ the trained parameters, Ψ_g those ZeRO-3 gathers (the frozen base too),
n GPUs, following what DeepSpeed does:
- stage 0: one all-reduce of the gradients after the last micro-batch's backward (2·Ψ·(n-1)/n bytes-elements);
- stage 1: one reduce-scatter of the gradients at the accumulation boundary, and one all-gather of the
  updated parameters after the optimizer step (the same 2·Ψ·(n-1)/n);
- stage 2: the reduce-scatter in every micro-batch (its gradients are partitioned as they are produced),
  the all-gather once a step;
- stage 3: in every micro-batch, an all-gather of Ψ_g for the forward, another for the backward (a third
  with gradient checkpointing's recompute) and the reduce-scatter of Ψ; no all-gather after the step.
Each collective is hierarchical: a ring inside the node over NVLink, then a ring across nodes carrying 1/g of
the data per GPU (every GPU has its own NIC), so for S bytes one reduce-scatter or all-gather takes
    messages·(α_intra·(g-1) + α_inter·(N-1)) + S·(g-1)/g / β_intra + S·(N-1)/(N·g) / β_inter
and an all-reduce twice that. Messages are the buckets (zero.reduce_bucket_size, zero.allgather_bucket_size),
or under ZeRO-3 one gather per module that holds partitioned weights.
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

from dstrain.config import TrainConfig
from dstrain.flops import TrainingFlops, training_flops
from dstrain.gpus import GpuSpec

# Large bf16 GEMMs reach 70-80% of a GPU's peak; attention, norms, element-wise kernels and launches bring a
# whole step's compute to about half of it, what well-tuned dense training reports as MFU (PaLM 46%, Llama
# and Megatron at scale 40-55%) when communication is hidden.
DEFAULT_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Links:
    # Latency of one ring step between GPUs of a node (NVLink, NCCL's few microseconds), in seconds.
    alpha_intra_s: float = 5e-6
    # Latency of one ring step between nodes (InfiniBand / RoCE through a switch), in seconds.
    alpha_inter_s: float = 10e-6
    # Host-to-GPU bandwidth per GPU, GB/s, for offloaded optimizer states and parameters (PCIe gen4 x16's
    # achievable rate; gen5 doubles it).
    pcie_gbps: float = 25.0
    # Parameters DeepSpeed's CPU Adam updates per second for one GPU's share of the host's cores.
    cpu_adam_params_per_s: float = 1e9


@dataclass(frozen=True)
class Collective:
    # What moves, e.g. "gradient reduce-scatter".
    name: str
    # Bytes of the whole tensor set (S), before partitioning.
    size_bytes: float
    # 1 for a reduce-scatter or an all-gather, 2 for an all-reduce.
    passes: int
    # Separate collectives (buckets or modules) per pass: each pays the latency.
    messages: int
    # How often per step.
    per_step: int
    # What compute it can run behind: every micro-batch's forward and backward ("micro", prefetched
    # gathers), every micro-batch's backward ("micro-backward"), the last backward ("backward"), or none.
    hidden_behind: str

    def seconds(self, nodes: int, gpus_per_node: int, gpu: GpuSpec, links: Links) -> float:
        """Time of all its occurrences in one step."""
        latency = self.messages * (links.alpha_intra_s * (gpus_per_node - 1) + links.alpha_inter_s * (nodes - 1))
        intra = self.size_bytes * (gpus_per_node - 1) / gpus_per_node / (gpu.intra_node_gbps * 1e9)
        inter = self.size_bytes * (nodes - 1) / (nodes * gpus_per_node) / (gpu.inter_node_gbps * 1e9)
        return self.per_step * self.passes * (latency + intra + inter)

    def bytes_per_gpu(self, gpus: int) -> float:
        return self.per_step * self.passes * self.size_bytes * (gpus - 1) / gpus


@dataclass
class Forecast:
    # The cluster: nodes, GPUs per node, and their peak TFLOP/s in the training dtype.
    nodes: int
    gpus_per_node: int
    peak_tflops: float
    # The assumed fraction of peak the compute reaches.
    efficiency: float
    # Tokens of one optimizer step over the cluster.
    tokens_per_step: int
    # Model FLOPs per token and the model's parameters (dstrain.flops).
    flops: TrainingFlops
    # Seconds per step: compute (recompute included), all communication, the part not hidden behind compute,
    # and the offloaded optimizer's transfers and CPU step.
    compute_s: float
    communication_s: float
    exposed_communication_s: float
    offload_s: float
    # The collectives counted.
    collectives: List[Collective]
    # Printed with the numbers: what they rest on.
    assumptions: List[str]

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_communication_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        return self.tokens_per_s * self.flops.per_token / (self.gpus * self.peak_tflops * 1e12)

    def lines(self) -> List[str]:
        step = self.step_s
        moved = sum(collective.bytes_per_gpu(self.gpus) for collective in self.collectives)
        lines = [
            f"forecast for {self.nodes} node(s) x {self.gpus_per_node} GPUs = {self.gpus} GPUs, "
            f"{self.flops.parameters / 1e9:.3g}B parameters ({self.flops.trainable / 1e9:.3g}B trained), "
            f"{self.tokens_per_step:,} tokens per step",
            f"  compute: {self.flops.per_token:.3g} model FLOPs per token"
            + (f" + {self.flops.recompute_per_token:.3g} recomputed" if self.flops.recompute_per_token else "")
            + f", at {self.efficiency:.0%} of {self.peak_tflops:g} TFLOP/s per GPU: {self.compute_s:.3g} s",
            f"  communication: {moved / 1e9:.3g} GB per GPU per step, {self.communication_s:.3g} s, "
            f"{self.exposed_communication_s:.3g} s of it not hidden behind compute",
        ]
        lines += [f"    {c.name}: {c.size_bytes / 1e9:.3g} GB x {c.passes * c.per_step} per step in {c.messages} "
                  f"message(s) each, {'not hidden' if c.hidden_behind == 'none' else 'hidden'}"
                  for c in self.collectives]
        if self.offload_s:
            lines.append(f"  offload: {self.offload_s:.3g} s of PCIe transfers and CPU work per step")
        lines += [
            f"  step: {step:.3g} s = compute {self.compute_s / step:.0%}, exposed communication "
            f"{self.exposed_communication_s / step:.0%}, offload {self.offload_s / step:.0%}",
            f"  throughput: {self.tokens_per_s:,.0f} tokens/s for the cluster, "
            f"{self.tokens_per_s / self.gpus:,.0f} per GPU; MFU {self.mfu:.2f}",
            "  assumptions:",
        ]
        return lines + [f"    - {assumption}" for assumption in self.assumptions]


def _gathered_bytes(cfg: TrainConfig, flops: TrainingFlops, element_bytes: int) -> Tuple[int, int]:
    """(bytes, modules) that ZeRO-3 gathers: every weight tensor above zero.stage3_param_persistence_threshold
    (smaller ones, the norms and usually LoRA's adapters, stay whole on every rank)."""
    shape, threshold = flops.shape, cfg.zero.stage3_param_persistence_threshold
    tensors = [inputs * outputs for inputs, outputs in shape.linears().values()] * shape.num_layers
    tensors += [shape.vocab_size * shape.hidden_size] * (1 if shape.tied else 2)
    gathered = [size for size in tensors if size >= threshold]
    return sum(gathered) * element_bytes, len(gathered)


def collectives(cfg: TrainConfig, flops: TrainingFlops) -> List[Collective]:
    """ZeRO's collectives of one step, as the module's docstring lists them."""
    zero, accumulation = cfg.zero, cfg.trainer.gradient_accumulation_steps
    compute_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    gradient_bytes = 4 if cfg.precision.grad_accum_dtype == "fp32" else compute_bytes
    trained = flops.trainable
    reduce_messages = math.ceil(trained / zero.reduce_bucket_size)
    hidden = "backward" if zero.overlap_comm else "none"
    if zero.stage == 0:
        return [Collective("gradient all-reduce", trained * gradient_bytes, 2, reduce_messages, 1, "none")]
    update = Collective("updated-parameter all-gather", trained * compute_bytes, 1,
                        math.ceil(trained / zero.allgather_bucket_size), 1, "none")
    if zero.stage == 1:
        return [Collective("gradient reduce-scatter", trained * gradient_bytes, 1, reduce_messages, 1, hidden), update]
    if zero.stage == 2:
        return [Collective("gradient reduce-scatter", trained * gradient_bytes, 1, reduce_messages, accumulation,
                           "micro-backward" if zero.overlap_comm else "none"), update]
    gathered, modules = _gathered_bytes(cfg, flops, compute_bytes)
    gathers = 3 if cfg.trainer.gradient_checkpointing else 2
    # DeepSpeed gathers on a stream of their own only with overlap_comm (else on the compute stream), and then
    # prefetching (stage3_prefetch_bucket_size > 0) fetches the next modules' weights while one computes.
    prefetched = "micro" if zero.overlap_comm and zero.stage3_prefetch_bucket_size > 0 else "none"
    return [
        Collective("parameter all-gather (forward, backward" + (", recompute)" if gathers == 3 else ")"),
                   gathered, 1, modules, gathers * accumulation, prefetched),
        Collective("gradient reduce-scatter", trained * gradient_bytes, 1, reduce_messages, accumulation,
                   "micro-backward" if zero.overlap_comm else "none"),
    ]


def forecast(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: GpuSpec,
             efficiency: float = DEFAULT_EFFICIENCY, links: Links = Links()) -> Forecast:
    """Step time, tokens/s and MFU of cfg on nodes x gpus_per_node GPUs of `gpu`'s kind, at micro_batch_size
    per GPU and the config's gradient accumulation."""
    flops = training_flops(cfg)
    gpus = nodes * gpus_per_node
    peak = gpu.peak_tflops(cfg.precision.dtype)
    accumulation = cfg.trainer.gradient_accumulation_steps
    tokens_per_gpu = cfg.trainer.micro_batch_size * accumulation * cfg.data.seq_len
    compute_s = tokens_per_gpu * (flops.per_token + flops.recompute_per_token) / (peak * 1e12 * efficiency)
    micro_compute_s = compute_s / accumulation
    backward_s = micro_compute_s * (1 - flops.forward_per_token / flops.per_token)
    steps = collectives(cfg, flops) if gpus > 1 else []
    timed = [(collective, collective.seconds(nodes, gpus_per_node, gpu, links)) for collective in steps]
    def behind(window: str) -> float:
        return sum(seconds for collective, seconds in timed if collective.hidden_behind == window)

    # What a window cannot hide shows; the micro-batch's collectives share its compute.
    in_backward = behind("micro-backward") / accumulation
    per_micro = behind("micro") / accumulation + in_backward
    exposed = (behind("none") + max(0.0, behind("backward") - backward_s)
               + accumulation * max(0.0, per_micro - micro_compute_s, in_backward - backward_s))
    offload_s = _offload_seconds(cfg, flops, gpus, links)
    return Forecast(nodes, gpus_per_node, peak, efficiency, tokens_per_gpu * gpus, flops, compute_s,
                    sum(seconds for _, seconds in timed), exposed, offload_s, steps,
                    _assumptions(cfg, gpu, efficiency, links))


def _offload_seconds(cfg: TrainConfig, flops: TrainingFlops, gpus: int, links: Links) -> float:
    """Offloaded optimizer: each GPU's gradient partition goes to the host in fp32 and its updated parameters
    come back, around CPU Adam's step; offloaded parameters (ZeRO-3) cross PCIe before every gather."""
    seconds = 0.0
    compute_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    if cfg.zero.offload_optimizer:
        partition = flops.trainable / gpus
        seconds += partition * (4 + compute_bytes) / (links.pcie_gbps * 1e9) + partition / links.cpu_adam_params_per_s
    if cfg.zero.offload_param:
        gathered, _ = _gathered_bytes(cfg, flops, compute_bytes)
        gathers = (3 if cfg.trainer.gradient_checkpointing else 2) * cfg.trainer.gradient_accumulation_steps
        seconds += gathers * gathered / gpus / (links.pcie_gbps * 1e9)
    return seconds


def _assumptions(cfg: TrainConfig, gpu: GpuSpec, efficiency: float, links: Links) -> List[str]:
    zero = cfg.zero
    overlap = ("gradient reductions overlap the backward (zero.overlap_comm=true)" if zero.overlap_comm
               else "gradient reductions wait for the backward (zero.overlap_comm=false)")
    if zero.stage == 3:
        overlap += ("; parameter gathers are prefetched behind compute"
                    if zero.overlap_comm and zero.stage3_prefetch_bucket_size > 0
                    else "; parameter gathers share the compute stream (no overlap_comm or no prefetch)")
    lines = [
        f"compute runs at {efficiency:.0%} of the dense {cfg.precision.dtype} peak (model FLOPs per dstrain.flops; "
        f"attention not halved for the causal mask)",
        f"links per GPU: {gpu.intra_node_gbps:g} GB/s inside a node, {gpu.inter_node_gbps:g} GB/s between nodes; "
        f"α = {links.alpha_intra_s * 1e6:g} µs per ring step inside, {links.alpha_inter_s * 1e6:g} µs between",
        "hierarchical rings (NCCL's busbw); the node and fabric phases add up rather than pipeline",
        overlap,
        "the optimizer step on the GPU, data loading and evaluation take no time",
    ]
    if zero.offload_optimizer or zero.offload_param:
        lines.append(f"offload over PCIe at {links.pcie_gbps:g} GB/s per GPU, CPU Adam at "
                     f"{links.cpu_adam_params_per_s:.3g} parameters/s per GPU, not overlapped")
    return lines
