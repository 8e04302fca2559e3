"""Model FLOPs utilisation: the model FLOPs a step did per second (dstrain.flops) over the peak the ranks could
have done, logged with tokens_per_s; and on a CPU, a warning when the 16-bit training dtype multiplies slower
than fp32 would.

The peak per rank is, in this order: trainer.peak_tflops; on a GPU, its name looked up in dstrain.gpus (an
unknown GPU logs no MFU and says how to give its peak); on a CPU, a linear layer of the training dtype timed at start.
Every rank times its own matmul with its own threads, all at once, because ranks on one machine share its
cores: what each measures is its share. MFU = achieved FLOP/s / (the ranks' peaks summed), which is peak per
rank x ranks when they are alike.
"""

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dstrain.config import TrainConfig
from dstrain.distributed import sum_over_ranks
from dstrain.flops import training_flops
from dstrain.gpus import GPUS

log = logging.getLogger("dstrain")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Long enough for many timed matmuls, short enough not to delay the start noticeably.
_MEASURE_SECONDS = 0.3
# Large enough for the matmul kernels to run at their full rate, small enough (a few ms on a CPU core) that
# the window holds dozens of them.
_MATMUL_SIZE = 512
# A 16-bit dtype at under this fraction of fp32's speed is worth a warning: training in fp32 would be faster.
_SLOW_16_BIT = 0.5


@dataclass(frozen=True)
class MfuMeter:
    # Model FLOPs of training per token (dstrain.flops).
    flops_per_token: float
    # Peak FLOP/s of all ranks together.
    peak_flops: float

    def metrics(self, tokens_per_s: float) -> Dict[str, float]:
        return {"mfu": tokens_per_s * self.flops_per_token / self.peak_flops}


def mfu_metrics(meter: Optional[MfuMeter], tokens_per_s: float) -> Dict[str, float]:
    """{"mfu": ...} for a step's metrics, or nothing where the peak is unknown."""
    return meter.metrics(tokens_per_s) if meter is not None else {}


def gpu_for_device_name(name: str) -> Optional[str]:
    """The dstrain.gpus key of a name as torch.cuda.get_device_name gives it ("NVIDIA H100 80GB HBM3" -> h100,
    "NVIDIA A100-SXM4-40GB" -> a100-40gb), or None. The table's peaks are the SXM parts', so a PCIe card of an
    SXM name is unknown rather than overrated."""
    split = [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word]
    # Neighbours joined as well: "GeForce RTX 4090" holds rtx4090.
    words = set(split) | {first + second for first, second in zip(split, split[1:])}
    # The most specific key first: a100-40gb before a100.
    for key in sorted(GPUS, key=lambda key: -len(key.split("-"))):
        if all(part in words for part in key.split("-")):
            if "pcie" in words and GPUS[key].intra_node_gbps > 64:
                return None
            return key
    return None


def measured_cpu_tflops(dtype: str) -> float:
    """TFLOP/s of a square linear layer in `dtype` with this process's threads: the fastest of those timed in
    about _MEASURE_SECONDS. The fastest, because other processes on the machine only ever slow one down, and a
    peak lowered by them would overstate MFU. A linear layer, with its weight laid out as nn.Linear keeps it:
    that is what training multiplies, and a CPU without bf16 instructions runs torch.mm's other layout in bf16
    7x slower still (measured on an AVX2-only AMD EPYC: 1.3 against 9.5 GFLOP/s per core)."""
    # Its own generator: drawing from the global one would shift a resumed run's dropout from the checkpoint's.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(_DTYPES[dtype])
    weight = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(_DTYPES[dtype])
    F.linear(inputs, weight)  # the first call picks and prepares the kernel
    fastest, started = math.inf, time.perf_counter()
    while time.perf_counter() - started < _MEASURE_SECONDS:
        before = time.perf_counter()
        F.linear(inputs, weight)
        fastest = min(fastest, time.perf_counter() - before)
    return 2 * _MATMUL_SIZE ** 3 / fastest / 1e12


def linear_layer_seconds(dtype: str) -> float:
    """Seconds of the fastest forward and backward of a square linear layer in `dtype` (both gradients) timed in
    about _MEASURE_SECONDS: a training step's three products. A CPU without bf16 instructions runs some of
    them far slower than others (the input gradient's layout: 1.3 GFLOP/s against the forward's 9.5)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(_DTYPES[dtype]).requires_grad_()
    weight = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(_DTYPES[dtype]).requires_grad_()
    output_gradient = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, generator=generator).to(_DTYPES[dtype])
    fastest, started = math.inf, time.perf_counter()
    while fastest == math.inf or time.perf_counter() - started < _MEASURE_SECONDS:
        before = time.perf_counter()
        F.linear(inputs, weight).backward(output_gradient)
        fastest = min(fastest, time.perf_counter() - before)
    return fastest


def slow_16_bit_warning(dtype: str, dtype_seconds: float, fp32_seconds: float) -> Optional[str]:
    """What to tell a user whose CPU trains a linear layer in the 16-bit dtype at under half its fp32 speed (a
    CPU without bf16 instructions converts every element: AVX2-only CPUs, AMD before Zen 4, Intel before Cooper
    Lake), or None."""
    if dtype == "fp32" or dtype_seconds * _SLOW_16_BIT <= fp32_seconds:
        return None
    return (f"{dtype} trains a linear layer (forward and backward) {dtype_seconds / fp32_seconds:.1f}x slower than "
            f"fp32 on this CPU (measured at start): it has no {dtype} instructions. +precision=fp32 trains "
            f"faster here.")


def peak_tflops_per_rank(cfg: TrainConfig, device: torch.device) -> Tuple[Optional[float], str]:
    """(TFLOP/s of this rank, where the figure comes from), or (None, the device's name) for a GPU the table
    does not know."""
    dtype = cfg.precision.dtype
    if cfg.trainer.peak_tflops is not None:
        return cfg.trainer.peak_tflops, "trainer.peak_tflops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return measured_cpu_tflops(dtype), f"the fastest {dtype} linear layer timed at start on {threads} thread(s) per rank"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = gpu_for_device_name(name)
    if key is None:
        return None, name
    return GPUS[key].peak_tflops(dtype), f"{name} as {key} in dstrain.gpus, {dtype}"


def mfu_meter(cfg: TrainConfig, device: torch.device, rank: int) -> Optional[MfuMeter]:
    """Found at start on every rank together (the CPU measurement is timed side by side, and the peaks are
    summed in one collective); None, after one log line, where the peak is unknown."""
    flops = training_flops(cfg)
    dist.barrier()
    peak, source = peak_tflops_per_rank(cfg, device)
    if device.type == "cpu" and cfg.precision.dtype != "fp32":
        warn_if_16_bit_is_slow(cfg.precision.dtype, device, rank)
    # Every rank takes part in the sum; one without a peak gives 0 and makes the total unknown.
    total, unknown = sum_over_ranks([peak or 0.0, float(peak is None)], device)
    if unknown:
        if rank == 0:
            log.warning("MFU is not logged: this GPU (%s) is not in dstrain.gpus; give its dense %s peak as "
                        "trainer.peak_tflops=<TFLOP/s per GPU>", source, cfg.precision.dtype)
        return None
    log.info("MFU: %.3g model FLOPs per token (%.3g GFLOP per %d-token sequence) against %.3g TFLOP/s over %d "
             "ranks (%s)", flops.per_token, flops.per_token * cfg.data.seq_len / 1e9, cfg.data.seq_len, total,
             dist.get_world_size(), source)
    return MfuMeter(flops.per_token, total * 1e12)


def warn_if_16_bit_is_slow(dtype: str, device: torch.device, rank: int) -> None:
    """On a CPU, times `dtype` against fp32 on every rank at once (each measures with its share of the cores, as
    for the peak) and warns once when fp32 would train faster."""
    dtype_seconds, fp32_seconds = sum_over_ranks([linear_layer_seconds(dtype), linear_layer_seconds("fp32")], device)
    warning = slow_16_bit_warning(dtype, dtype_seconds, fp32_seconds)
    if warning and rank == 0:
        log.warning(warning)
