"""DeepSpeed's CPU Adam keeps beta^t in its C++ kernel, outside any state dict: a resumed process must rebuild
it (dstrain.optim.replay_adam_bias_correction), or its updates are an ulp off the uninterrupted run's."""

import copy

import numpy as np
import torch

from dstrain.optim import replay_adam_bias_correction

STEPS, RESUME_AFTER = 30, 12


class _Engine:
    """The part of a DeepSpeed engine the replay reads."""

    def __init__(self, optimizer):
        self.basic_optimizer = optimizer


def _gradients():
    torch.manual_seed(0)
    return torch.randn(64, 64), [torch.randn(64, 64) for _ in range(STEPS)]


def _optimizer(initial):
    from deepspeed.ops.adam import FusedAdam

    parameter = torch.nn.Parameter(initial.clone())
    return parameter, FusedAdam([parameter], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _train(parameter, optimizer, gradients):
    for gradient in gradients:
        parameter.grad = gradient.clone()
        optimizer.step()


def _as_in_a_new_process(initial):
    """The kernel's state as a fresh process has it: created with placeholder betas (0, 0)."""
    _, optimizer = _optimizer(initial)
    optimizer.multi_tensor_adam(2048 * 32, optimizer._dummy_overflow_buf, [[torch.zeros(1)] for _ in range(4)],
                                0.0, 0.0, 0.0, 0.0, 0, optimizer.adam_w_mode, 0, 0.0)


def _resumed(initial, gradients, replay: bool):
    _as_in_a_new_process(initial)
    parameter, optimizer = _optimizer(initial)
    _train(parameter, optimizer, gradients[:RESUME_AFTER])
    saved_weights, saved_state = parameter.detach().clone(), copy.deepcopy(optimizer.state_dict())
    _as_in_a_new_process(initial)
    parameter, optimizer = _optimizer(saved_weights)
    optimizer.load_state_dict(saved_state)
    if replay:
        replay_adam_bias_correction(_Engine(optimizer))
    _train(parameter, optimizer, gradients[RESUME_AFTER:])
    return parameter.detach()


def test_the_float32_product_and_pow_disagree_at_the_resumed_step():
    """Why the kernel's hidden state matters: beta2^t as a running float32 product is not pow(beta2, t)."""
    product = np.float32(1)
    for _ in range(RESUME_AFTER + 1):
        product = np.float32(product * np.float32(0.95))
    assert product != np.float32(np.float64(np.float32(0.95)) ** (RESUME_AFTER + 1))


def test_cpu_fused_adam_resumes_bit_exactly_only_with_the_replay():
    initial, gradients = _gradients()
    _as_in_a_new_process(initial)
    parameter, optimizer = _optimizer(initial)
    _train(parameter, optimizer, gradients)
    uninterrupted = parameter.detach()

    assert not torch.equal(_resumed(initial, gradients, replay=False), uninterrupted), "the drift is gone upstream?"
    assert torch.equal(_resumed(initial, gradients, replay=True), uninterrupted)
