"""Where MFU's peak comes from: the GPU table by the name torch reports, a CPU matmul timed at start, or the
config; the trained runs' MFU itself is checked in test_training."""

import pytest

from dstrain.checks import validate
from dstrain.compose import compose
from dstrain.errors import ConfigError
from dstrain.mfu import MfuMeter, gpu_for_device_name, measured_cpu_tflops, mfu_metrics


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


def test_mfu_is_achieved_over_peak_and_absent_without_a_peak():
    meter = MfuMeter(flops_per_token=1e9, peak_flops=4e12)
    assert mfu_metrics(meter, 1000.0) == {"mfu": 0.25}
    assert mfu_metrics(None, 1000.0) == {}


def test_peak_tflops_must_be_positive():
    with pytest.raises(ConfigError, match="trainer.peak_tflops"):
        validate(compose(["trainer.peak_tflops=0"]))
    validate(compose(["trainer.peak_tflops=312"]))
