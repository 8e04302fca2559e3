"""Issue 13, reduced to DeepSpeed's CPU FusedAdam alone (no dstrain, no model, one process).

DeepSpeed's CPU build of FusedAdam keeps beta1^t and beta2^t in a static C++ Adam_Optimizer
(csrc/includes/cpu_adam.h, IncrementStep): a run that steps 1, 2, 3, ... multiplies them by beta in float32
each step, but the first step after a restore (the step counter jumps from 0 to t+1, or the betas differ
from the placeholder it was created with) recomputes them as pow(beta, t). Neither value is in the
optimizer state dict, so a checkpoint cannot carry it.

This trains one weight matrix on fixed random gradients for N steps straight, and again with a
save/load of the optimizer state after step S into a new FusedAdam (as a resumed process has), with and
without dstrain's replay. Run:  DS_ACCELERATOR=cpu python scratch/cpu_adam_hidden_state.py
"""
import copy
import sys

import numpy as np
import torch
from deepspeed.ops.adam import FusedAdam

from dstrain.checkpoint import replay_adam_bias_correction

N, S = 30, 12
torch.manual_seed(0)
grads = [torch.randn(64, 64) for _ in range(N)]
init = torch.randn(64, 64)


class Engine:  # what replay_adam_bias_correction looks at
    def __init__(self, optimizer):
        self.basic_optimizer = optimizer


def make():
    p = torch.nn.Parameter(init.clone())
    return p, FusedAdam([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def train(p, opt, steps):
    for g in steps:
        p.grad = g.clone()
        opt.step()


def reset_kernel_state():
    """What a fresh process has: the static C++ optimizer with its placeholder betas (0, 0)."""
    p, opt = make()
    opt.multi_tensor_adam(2048 * 32, opt._dummy_overflow_buf, [[torch.zeros(1)] for _ in range(4)],
                          0.0, 0.0, 0.0, 0.0, 0, opt.adam_w_mode, 0, 0.0)


def resumed(replay):
    reset_kernel_state()
    p, opt = make()
    train(p, opt, grads[:S])
    saved_p, saved_opt = p.detach().clone(), copy.deepcopy(opt.state_dict())
    reset_kernel_state()  # "a new process"
    q, opt2 = make()
    with torch.no_grad():
        q.copy_(saved_p)
    opt2.load_state_dict(saved_opt)
    if replay:
        replay_adam_bias_correction(Engine(opt2))
    train(q, opt2, grads[S:])
    return q.detach()


reset_kernel_state()
p, opt = make()
train(p, opt, grads)
straight = p.detach()
for replay in (False, True):
    got = resumed(replay)
    diff = (got - straight).abs()
    print(f"resume after step {S}, replay={replay}: bitwise equal {torch.equal(got, straight)}, "
          f"{int((diff > 0).sum())}/{diff.numel()} elements differ, max {diff.max().item():.3g}")

b2 = np.float32(0.95)
prod = np.float32(1)
for t in range(1, S + 2):
    prod = np.float32(prod * b2)
print(f"beta2^{S + 1}: float32 product {prod!r}, pow {np.float32(np.float64(b2) ** (S + 1))!r}")
sys.exit(0)
