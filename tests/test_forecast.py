"""dstrain.forecast on paper: one small case by hand, the directions it must move in, and a cluster of
hundreds of GPUs sized without building anything."""

import pytest

from dstrain.compose import compose
from dstrain.forecast import forecast
from dstrain.gpus import GpuSpec, gpu_spec

# Round numbers for the hand check: 100 TFLOP/s bf16, 100 GB/s inside a node, 10 GB/s between nodes.
ROUND_GPU = GpuSpec(memory_gb=80, bf16_tflops=100, fp32_tflops=10, intra_node_gbps=100, inter_node_gbps=10)


def test_a_small_case_by_hand():
    """The tiny preset under ZeRO-1 in bf16 on 2 nodes x 2 GPUs, 8 sequences of 128 tokens per GPU.
    Matmul weights per block: q 64·64 + k, v 2·64·32 + o 64·64 + gate, up, down 3·64·176 = 46,080; two blocks
    and lm_head 64·258: N = 108,672. FLOPs per token 6N + 12·L·s·d = 652,032 + 12·2·128·64 = 848,640.
    Compute: 1,024 tokens · 848,640 / (100e12 · 0.5) = 1.73801472e-5 s.
    ZeRO-1 moves the 125,504 parameters' bf16 gradients (S = 251,008 bytes) in one reduce-scatter and the
    updated bf16 parameters in one all-gather, one message each, neither hidden (overlap_comm=false):
    each α(1 step inside + 1 between) + S·(1/2)/100e9 + S·(1/4)/10e9 = 15e-6 + 1.25504e-6 + 6.2752e-6
    = 2.253024e-5 s. Step 1.73801472e-5 + 2 · 2.253024e-5 = 6.2440627e-5 s; MFU 0.5 · compute / step."""
    cfg = compose(["+zero=1", "+precision=bf16", "data.seq_len=128", "trainer.micro_batch_size=8"])
    result = forecast(cfg, nodes=2, gpus_per_node=2, gpu=ROUND_GPU, efficiency=0.5)
    assert result.flops.per_token == 848_640
    assert result.compute_s == pytest.approx(1.73801472e-5)
    assert result.communication_s == pytest.approx(2 * 2.253024e-5)
    assert result.step_s == pytest.approx(6.2440627e-5)
    assert result.tokens_per_s == pytest.approx(4 * 1024 / 6.2440627e-5)
    assert result.mfu == pytest.approx(0.5 * 1.73801472e-5 / 6.2440627e-5)
    assert any("5 µs" in line and "10 µs" in line for line in result.lines())


def _7b(*overrides: str):
    return compose(["+model=7b", "+precision=bf16", "data.seq_len=2048", "model.max_position_embeddings=2048",
                    "trainer.micro_batch_size=2", *overrides])


def test_zero3_moves_more_than_zero2_and_more_nodes_expose_more_communication():
    h100 = gpu_spec("h100")
    zero2, zero3 = (forecast(_7b(f"+zero={stage}"), 4, 8, h100) for stage in (2, 3))
    moved = [sum(c.bytes_per_gpu(32) for c in result.collectives) for result in (zero2, zero3)]
    assert moved[1] > 1.4 * moved[0]
    shares = [result.exposed_communication_s / result.step_s
              for result in (forecast(_7b("+zero=2"), nodes, 8, h100) for nodes in (1, 2, 8, 64))]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_lora_reduces_only_the_adapters_but_zero3_still_gathers_the_base():
    h100 = gpu_spec("h100")
    full, lora = (forecast(_7b("+zero=3", *extra), 2, 8, h100) for extra in ((), ("+peft=lora",)))
    assert lora.collectives[0].size_bytes == full.collectives[0].size_bytes  # the frozen base's gathers
    assert lora.collectives[1].size_bytes < 0.01 * full.collectives[1].size_bytes


def test_70b_on_512_h100_is_finite_and_plausible():
    cfg = compose(["+model=70b", "+zero=3", "+precision=bf16", "data.seq_len=4096", "trainer.micro_batch_size=1",
                   "trainer.gradient_accumulation_steps=8"])
    result = forecast(cfg, nodes=64, gpus_per_node=8, gpu=gpu_spec("h100"))
    assert 0.2 < result.mfu < 0.6
    assert result.flops.parameters == pytest.approx(69e9, rel=0.01)
    assert "MFU" in "\n".join(result.lines())


def test_offload_adds_pcie_and_cpu_time():
    h100 = gpu_spec("h100")
    plain, offloaded = (forecast(_7b(f"+zero={preset}"), 1, 8, h100) for preset in ("2", "2_offload"))
    assert plain.offload_s == 0 and offloaded.offload_s > 0
    assert any("PCIe" in line for line in offloaded.lines())


def test_only_overlap_comm_hides_zero3s_gathers():
    """DeepSpeed gathers on the compute stream unless zero.overlap_comm is on."""
    h100 = gpu_spec("h100")
    serial, overlapped = (forecast(_7b("+zero=3", f"zero.overlap_comm={on}"), 4, 8, h100) for on in ("false", "true"))
    assert serial.exposed_communication_s == pytest.approx(serial.communication_s)
    assert overlapped.exposed_communication_s < 0.5 * serial.exposed_communication_s
