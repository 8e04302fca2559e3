"""Where a plan runs and whether it fits: the hardware (a GPU from dstrain.gpus, or this machine's RAM), the
largest micro-batch that fits, the settings that would make a job fit, the lines `dstrain plan` prints, and the
check training makes before it builds anything."""

import logging
import math
import re
from dataclasses import replace
from typing import List, Optional

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError
from dstrain.model_census import ParameterCensus, census
from dstrain.plan import ALLREDUCE_BUCKET_ELEMENTS, GB, STAGE3_MAX_LIVE_PARAMETERS, Hardware, MemoryPlan, plan_memory

# A CUDA context with cuBLAS and NCCL workspaces: about 1 GB on current GPUs (it is outside PyTorch's allocator).
CUDA_RUNTIME_BYTES = 1.0 * GB
# Training stops before building only when the plan is beyond doubt: the model states alone do not fit, or the
# whole plan exceeds the memory by more than this factor (activations are the least certain part).
CLEARLY_EXCEEDS = 1.25
# The largest micro-batch searched for.
MAX_MICRO_BATCH = 1 << 16

_SIZE = re.compile(r"^\s*(?P<number>\d+(\.\d+)?)\s*(?P<unit>[KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": GB, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
          "TI": 2**40}


def parse_size(text: str, option: str) -> float:
    """Bytes from "80GB", "80G", "141GiB" or a bare number of GB."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{option}={text!r} is not a memory size such as 80GB, 80G or 141GiB")
    unit = (match.group("unit") or "").upper().rstrip("B")
    if match.group("unit") and match.group("unit").upper() == "B":
        unit = "B"
    return float(match.group("number")) * _UNITS[unit]


def count_option(text: str, option: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{option}={text!r} must be a whole number of at least 1")
    return int(text)


def positive_number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option}={text!r} must be a number above 0")
    return value


def this_machine(ranks_per_node: int, nodes: int = 1) -> Hardware:
    """CPU ranks: each gets an equal share of this machine's RAM; the runtime is this process's own resident
    memory (the interpreter, torch and transformers already loaded), which every rank holds too."""
    import psutil

    ram = psutil.virtual_memory().total
    return Hardware(device_bytes=ram / ranks_per_node, host_bytes=ram, ranks_per_node=ranks_per_node, nodes=nodes,
                    name="cpu", runtime_bytes=psutil.Process().memory_info().rss)


def gpus(gpu_type: Optional[str], gpu_memory: Optional[str], ranks_per_node: int, nodes: int,
         host_bytes: Optional[float] = None) -> Hardware:
    """One GPU per rank: its memory from --gpu-memory, else from the GPU table."""
    from dstrain.gpus import gpu_spec

    if gpu_memory is not None:
        memory = parse_size(gpu_memory, "--gpu-memory")
    else:
        memory = gpu_spec(gpu_type).memory_gb * GB
    return Hardware(device_bytes=memory, host_bytes=host_bytes or 0.0, ranks_per_node=ranks_per_node, nodes=nodes,
                    name=gpu_type or "", runtime_bytes=CUDA_RUNTIME_BYTES)


def launcher_hardware(launcher) -> Optional[Hardware]:
    """The hardware `dstrain submit` asks for: launcher.nodes x launcher.gpus_per_node launcher.gpu_type GPUs,
    or CPU ranks (launcher.device=cpu, planned against this machine's RAM); None without a GPU type."""
    if launcher.device == "cpu":
        return this_machine(launcher.gpus_per_node, launcher.nodes)
    if launcher.gpu_type is None:
        return None
    host = parse_size(launcher.mem, "launcher.mem") if launcher.mem else None
    return gpus(launcher.gpu_type, None, launcher.gpus_per_node, launcher.nodes, host)


def training_hardware(world_size: int) -> Hardware:
    """The hardware a starting run has: this machine's RAM for CPU ranks, else the local GPU's memory."""
    import os

    import torch
    from deepspeed.accelerator import get_accelerator

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    nodes = max(1, world_size // local_ranks)
    if get_accelerator().device_name() == "cpu":
        return this_machine(local_ranks, nodes)
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return Hardware(device_bytes=memory, host_bytes=0.0, ranks_per_node=local_ranks, nodes=nodes,
                    name=torch.cuda.get_device_name(), runtime_bytes=CUDA_RUNTIME_BYTES)


def with_micro_batch(cfg: TrainConfig, micro_batch_size: int) -> TrainConfig:
    return replace(cfg, trainer=replace(cfg.trainer, micro_batch_size=micro_batch_size))


def largest_micro_batch(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware) -> int:
    """The largest micro-batch whose plan fits (0: not even one sequence). Memory grows with the micro-batch,
    so a doubling search then a bisection finds it in a few dozen plans."""
    def fits(size: int) -> bool:
        return plan_memory(with_micro_batch(cfg, size), params, hardware).fits

    if not fits(1):
        return 0
    low = 1
    while low < MAX_MICRO_BATCH and fits(low * 2):
        low *= 2
    high = min(low * 2, MAX_MICRO_BATCH + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fixes(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware) -> List[str]:
    """Settings that make a job that does not fit fit, in the order they cost least throughput: gradient
    checkpointing, a higher ZeRO stage, offload (GPUs only: on a CPU the host is the device), then more GPUs.
    The changes accumulate until the plan fits; more GPUs are counted for ZeRO-3 with checkpointing."""
    changes, candidate = [], cfg
    steps = [
        ("trainer.gradient_checkpointing=true", lambda c: not c.trainer.gradient_checkpointing,
         lambda c: replace(c, trainer=replace(c.trainer, gradient_checkpointing=True))),
        *[(f"+zero={stage}", lambda c, s=stage: c.zero.stage < s,
           lambda c, s=stage: replace(c, zero=replace(c.zero, stage=s))) for stage in (1, 2, 3)],
    ]
    if not hardware.on_cpu:
        steps += [
            ("zero.offload_optimizer=true", lambda c: not c.zero.offload_optimizer,
             lambda c: replace(c, zero=replace(c.zero, offload_optimizer=True))),
            ("zero.offload_param=true", lambda c: not c.zero.offload_param,
             lambda c: replace(c, zero=replace(c.zero, offload_param=True))),
        ]
    for change, applies, apply in steps:
        if plan_memory(candidate, params, hardware).fits:
            break
        if applies(candidate):
            candidate = apply(candidate)
            changes.append(change)
    if plan_memory(candidate, params, hardware).fits:
        found = [" ".join(changes)] if changes else []
    else:
        found = []
    sharded = replace(cfg, zero=replace(cfg.zero, stage=3),
                      trainer=replace(cfg.trainer, gradient_checkpointing=True))
    nodes = nodes_needed(sharded, params, hardware)
    if nodes is not None and nodes > hardware.nodes:
        found.append(f"{nodes} nodes x {hardware.ranks_per_node} ranks (+zero=3 trainer.gradient_checkpointing=true)")
    return found


def nodes_needed(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware) -> Optional[int]:
    """The fewest nodes on which the plan fits (None: none do: what does not shrink with ranks is too large)."""
    nodes = 1
    while nodes <= 4096:
        if plan_memory(cfg, params, replace(hardware, nodes=nodes)).fits:
            return nodes
        nodes *= 2
    return None


def gb(value: float) -> str:
    return f"{value / GB:,.2f} GB"


def memory_lines(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware, plan: MemoryPlan) -> List[str]:
    """The plan, one line per term, per rank."""
    stage, dtype = cfg.zero.stage, cfg.precision.dtype
    gpu = f"{hardware.name} GPU(s)" if hardware.name else "GPU(s)"
    where = (f"{hardware.ranks_per_node} CPU rank(s) sharing this machine's {gb(hardware.host_bytes)} of RAM"
             if hardware.on_cpu else
             f"{hardware.nodes} node(s) x {hardware.ranks_per_node} {gpu} of {gb(hardware.device_bytes)}")
    per_param = plan.model_states * hardware.world_size / params.total if params.total else 0.0
    lines = [
        f"memory per rank: {where}; ZeRO-{stage}, {dtype}, peft.method={cfg.peft.method}",
        f"  parameters            {params.total:,} ({params.trainable:,} trainable, {params.frozen:,} frozen)",
        f"  weights               {gb(plan.weights)}",
        f"  gradients             {gb(plan.gradients)}",
        f"  optimizer states      {gb(plan.optimizer_states)}",
        f"  = model states        {gb(plan.model_states)} (x {hardware.world_size} ranks / {params.total:,} "
        f"parameters = {per_param:.2f} bytes per parameter)",
        f"  fp32 gradients        {gb(plan.fp32_gradients)} (DeepSpeed's, "
        + ("held throughout" if plan.fp32_gradients_held else "during the optimizer step") + ")",
        f"  activations           {gb(plan.activations)} (micro-batch {cfg.trainer.micro_batch_size} x "
        f"{cfg.data.seq_len} tokens, {cfg.model.attn_implementation}, checkpointing "
        f"{'on' if cfg.trainer.gradient_checkpointing else 'off'})",
    ]
    if cfg.trainer.gradient_checkpointing:
        lines.append(f"  one block recomputed  {gb(plan.recompute)} (backward; counted when above the logits)")
    lines += [
        f"  logits and loss       {gb(plan.logits)} (the counted positions' hidden states; one chunk's logits, fp32, and gradients)",
        f"  DeepSpeed buffers     {gb(plan.buffers)} ("
        + (f"the gradients' all-reduce copy, up to {ALLREDUCE_BUCKET_ELEMENTS:,} elements, after the backward pass"
           if stage == 0 else f"reduce bucket {cfg.zero.reduce_bucket_size:,} elements")
        + (f", prefetch {cfg.zero.stage3_prefetch_bucket_size:,}, gathered parameters up to "
           f"{STAGE3_MAX_LIVE_PARAMETERS:,}" if stage == 3 else "") + ")",
    ]
    if plan.gather_staging:
        lines.append(f"  gloo's gather copies  {gb(plan.gather_staging)} (backward; the model gathered again after "
                     f"the checkpointed forward, every bucket in flight)")
    lines += [
        f"  = peak in tensors     {gb(plan.tensor_peak)} (in {plan.peak_phase}; backward "
        f"{gb(plan.backward_peak)}, optimizer step {gb(plan.step_peak)}, building in fp32 {gb(plan.build)})",
        f"  runtime               {gb(plan.runtime)} ("
        + ("this process's resident memory before building" if hardware.on_cpu else "CUDA context and workspaces")
        + ")",
        f"  total                 {gb(plan.total)} of {gb(plan.available)}",
        f"  headroom              {gb(plan.headroom)}" + ("" if plan.fits else "  (DOES NOT FIT)"),
    ]
    if plan.host:
        lines.append(f"  host RAM (offloaded)  {gb(plan.host)} per rank, {gb(plan.host * hardware.ranks_per_node)} "
                     f"per node")
    return lines


def report_lines(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware,
                 peak_tflops: Optional[float] = None) -> List[str]:
    """What `dstrain plan` prints after the DeepSpeed config: the batch arithmetic, the memory plan, the
    largest micro-batch that fits, for a job that does not fit the fixes, and the step-time forecast."""
    trainer, world = cfg.trainer, hardware.world_size
    global_batch = trainer.micro_batch_size * trainer.gradient_accumulation_steps * world
    lines = [
        f"batch: micro-batch {trainer.micro_batch_size} x accumulation {trainer.gradient_accumulation_steps} x "
        f"{world} ranks = {global_batch} sequences = {global_batch * cfg.data.seq_len:,} tokens per step",
    ]
    plan = plan_memory(cfg, params, hardware)
    lines += memory_lines(cfg, params, hardware, plan)
    largest = largest_micro_batch(cfg, params, hardware)
    lines.append(f"largest micro-batch that fits: {largest}" if largest else
                 "largest micro-batch that fits: none, not even 1")
    if not plan.fits:
        found = fixes(cfg, params, hardware)
        lines.append("to fit: " + (" | or ".join(found) if found else "no setting dstrain knows of makes it fit"))
    return lines + forecast_lines(cfg, hardware, peak_tflops)


# CPU ranks exchange gradients through gloo: shared memory inside a machine, TCP between machines (10 GbE).
CPU_LINKS_GBPS = {"intra_node_gbps": 5.0, "inter_node_gbps": 1.25}


def forecast_lines(cfg: TrainConfig, hardware: Hardware, peak_tflops: Optional[float]) -> List[str]:
    """The step-time and MFU forecast (dstrain.forecast) on the plan's nodes, from the GPU table's peak and links,
    a given peak, or on a CPU a matmul timed here and shared by the node's ranks."""
    from dstrain.forecast import forecast
    from dstrain.gpus import GPUS, GpuSpec
    from dstrain.mfu import measured_cpu_tflops

    spec = GPUS.get(hardware.name.lower())
    if hardware.on_cpu:
        per_rank = peak_tflops or measured_cpu_tflops(cfg.precision.dtype) / hardware.ranks_per_node
        spec = GpuSpec(hardware.device_bytes / GB, per_rank, per_rank, **CPU_LINKS_GBPS)
    elif peak_tflops is not None:
        links = ({"intra_node_gbps": spec.intra_node_gbps, "inter_node_gbps": spec.inter_node_gbps} if spec else
                 {"intra_node_gbps": GPUS["h100"].intra_node_gbps, "inter_node_gbps": GPUS["h100"].inter_node_gbps})
        spec = GpuSpec(hardware.device_bytes / GB, peak_tflops, peak_tflops, **links)
    if spec is None:
        known = f"{hardware.name} is not in dstrain.gpus" if hardware.name else "no GPU type given"
        return [f"forecast: {known}; give --gpu-type (one of {sorted(GPUS)}) or --peak-tflops for a step-time and "
                f"MFU forecast"]
    return forecast(cfg, hardware.nodes, hardware.ranks_per_node, spec).lines()


def check_fits(cfg: TrainConfig, params: ParameterCensus, hardware: Hardware) -> None:
    """Raise ConfigError when the plan clearly exceeds the memory: the model states alone do not fit, or the
    whole plan is over CLEARLY_EXCEEDS x the memory. Short of that, training starts: activations are the
    least certain part of the plan, and a job that may fit is better tried."""
    plan = plan_memory(cfg, params, hardware)
    if plan.model_states <= plan.available and plan.total <= CLEARLY_EXCEEDS * plan.available:
        return
    ranks = hardware.ranks_per_node
    what = "model states alone" if plan.model_states > plan.available else "the whole plan"
    needed = plan.model_states if plan.model_states > plan.available else plan.total
    if hardware.on_cpu:
        where = (f"{ranks} rank(s) on this machine need {gb(needed * ranks)} for {what} "
                 f"({gb(needed)} per rank) but it has {gb(hardware.host_bytes)} of RAM")
    else:
        where = f"each rank needs {gb(needed)} for {what} but a {hardware.name} has {gb(plan.available)}"
    found = fixes(cfg, params, hardware)
    fix = "; fix: " + " | or ".join(found) if found else "; no setting makes it fit: use a smaller model"
    raise ConfigError(f"the memory plan does not fit: {where} (ZeRO-{cfg.zero.stage}, {cfg.precision.dtype}, "
                      f"{params.total / 1e9:.2f}B parameters){fix}. `dstrain plan` shows the whole plan.")


def check_memory_plan(cfg: TrainConfig, world_size: int) -> None:
    """Training's first step: plan the run's memory before anything is built, log it, and stop with the plan and
    the fix when it clearly does not fit, rather than be killed for memory minutes later."""
    params, hardware = census(cfg), training_hardware(world_size)
    plan = plan_memory(cfg, params, hardware)
    logging.getLogger("dstrain").info(
        "memory plan per rank: %s of %s (peak in tensors %s in %s; `dstrain plan` for the details)",
        gb(plan.total), gb(plan.available), gb(plan.tensor_peak), plan.peak_phase)
    check_fits(cfg, params, hardware)
