"""Common GPUs' memory, peak matmul throughput and link bandwidth: what `dstrain plan` sizes a job with and
what model FLOPs utilisation (MFU) is measured against.

Peaks are the vendors' dense (no sparsity) tensor-core figures for the SXM/OAM parts; a PCIe card of the same
name is slower, so give its peak with trainer.peak_tflops or `dstrain plan --peak-tflops`. Bandwidths are per
GPU and per direction: `intra_node_gbps` over NVLink / Infinity Fabric (PCIe where a card has none),
`inter_node_gbps` the usual fabric of a cluster of such GPUs (one 400 Gb/s NIC per H100 is 50 GB/s).
"""

from dataclasses import dataclass
from typing import Dict

from dstrain.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    # Memory in GB (10^9 bytes) as sold.
    memory_gb: float
    # Dense bf16 / fp16 tensor-core TFLOP/s (10^12).
    bf16_tflops: float
    # Plain fp32 TFLOP/s (no TF32: dstrain's fp32 runs do not enable it).
    fp32_tflops: float
    # GB/s per GPU per direction to the GPUs of the same node.
    intra_node_gbps: float
    # GB/s per GPU per direction to other nodes.
    inter_node_gbps: float

    def peak_tflops(self, dtype: str) -> float:
        return self.fp32_tflops if dtype == "fp32" else self.bf16_tflops


GPUS: Dict[str, GpuSpec] = {
    "v100": GpuSpec(32, 125, 15.7, 150, 12.5),  # no bf16: its fp16 peak
    "a10g": GpuSpec(24, 70, 35, 32, 12.5),  # AWS g5: PCIe only
    "a100-40gb": GpuSpec(40, 312, 19.5, 300, 25),
    "a100": GpuSpec(80, 312, 19.5, 300, 25),
    "l40s": GpuSpec(48, 362, 91.6, 32, 25),  # PCIe only
    "rtx4090": GpuSpec(24, 165, 82.6, 32, 12.5),  # PCIe only
    "h100": GpuSpec(80, 989, 67, 450, 50),
    "h200": GpuSpec(141, 989, 67, 450, 50),
    "b200": GpuSpec(180, 2250, 80, 900, 100),
    "mi300x": GpuSpec(192, 1307, 163, 448, 50),
}


def gpu_spec(name: str, key: str = "--gpu-type") -> GpuSpec:
    spec = GPUS.get(name.lower())
    if spec is None:
        raise ConfigError(f"{key}={name!r} is not in dstrain's GPU table {sorted(GPUS)}; give its memory and peak "
                          f"yourself (--gpu-memory, --peak-tflops)")
    return spec
