"""Where MFU's peak comes from: the GPU table by the name torch reports, a CPU linear layer timed at start, or
the config; the warning for a CPU slow at 16 bits; the trained runs' MFU and warning are checked in
test_training."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from dstrain.checks import validate
from dstrain.compose import compose
from dstrain.errors import ConfigError
from dstrain.mfu import (MfuMeter, gpu_for_device_name, linear_layer_seconds, measured_cpu_tflops, mfu_metrics,
                         slow_16_bit_warning)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA H200", "h200"), ("AMD Instinct MI300X", "mi300x"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("Tesla V100-SXM2-32GB", "v100"), ("NVIDIA A10G", "a10g"), ("NVIDIA L40S", "l40s"),
    # A PCIe card is slower than the SXM part the table holds: unknown, so MFU asks for its peak.
    ("NVIDIA H100 PCIe", None), ("NVIDIA T4", None),
])
def test_gpu_names_as_torch_reports_them(name, key):
    assert gpu_for_device_name(name) == key


def test_cpu_matmul_peak_is_measured_in_the_training_dtype():
    assert 0 < measured_cpu_tflops("fp32") < 100
    assert 0 < measured_cpu_tflops("bf16") < 100


def fastest_linear_tflops(tokens: int, width: int, out: int, dtype: torch.dtype) -> float:
    inputs, weight = torch.randn(tokens, width).to(dtype), torch.randn(out, width).to(dtype)
    F.linear(inputs, weight)
    fastest, started = math.inf, time.perf_counter()
    while time.perf_counter() - started < 0.5:
        before = time.perf_counter()
        F.linear(inputs, weight)
        fastest = min(fastest, time.perf_counter() - before)
    return 2 * tokens * width * out / fastest / 1e12


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_cpu_peak_is_not_below_what_a_training_layer_reaches(dtype):
    # A peak below what the model's own layers reach would put MFU above 1. On a CPU without bf16 instructions
    # torch.mm's layout ran bf16 at 1.3 GFLOP/s while nn.Linear's ran at 9.5: the peak must time the latter.
    # (SmolLM2-135M's MLP at a micro-batch of 2048 tokens; "fastest of" on both sides keeps this steady.)
    layer = fastest_linear_tflops(2048, 576, 1536, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    assert measured_cpu_tflops(dtype) >= 0.5 * layer


def test_a_16_bit_dtype_under_half_fp32s_speed_is_worth_a_warning():
    warning = slow_16_bit_warning("bf16", 0.30, 0.02)
    assert "bf16 trains a linear layer (forward and backward) 15.0x slower than fp32 on this CPU" in warning
    assert "+precision=fp32" in warning
    assert slow_16_bit_warning("bf16", 0.03, 0.02) is None
    assert slow_16_bit_warning("bf16", 0.01, 0.02) is None


def test_a_linear_layers_training_time_is_measured_in_the_dtype():
    assert 0 < linear_layer_seconds("fp32") < 10
    assert 0 < linear_layer_seconds("bf16") < 100


def test_mfu_is_achieved_over_peak_and_absent_without_a_peak():
    meter = MfuMeter(flops_per_token=1e9, peak_flops=4e12)
    assert mfu_metrics(meter, 1000.0) == {"mfu": 0.25}
    assert mfu_metrics(None, 1000.0) == {}


def test_peak_tflops_must_be_positive():
    with pytest.raises(ConfigError, match="trainer.peak_tflops"):
        validate(compose(["trainer.peak_tflops=0"]))
    validate(compose(["trainer.peak_tflops=312"]))
