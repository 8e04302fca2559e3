"""What the optimizer gets: parameter groups with and without weight decay, and the LR schedule. Both are
handed to deepspeed.initialize, which builds the AdamW of the DeepSpeed config around them. And what a
checkpoint cannot give back to it: the CPU Adam kernel's hidden step products (replay_adam_bias_correction)."""

import math
from typing import List

import torch

from dstrain.config import TrainConfig


def weight_decay_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices; leave norms, biases and other vectors alone."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        dims = len(getattr(parameter, "ds_shape", parameter.shape))
        (decay if dims >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig):
    """weight_decay_groups, with LoRA+ (peft.lora.loraplus_lr_ratio) when it is on: the LoRA B matrices in a
    group of their own at optim.lr x the ratio. The LR schedule scales every group from its own LR, so B keeps
    its ratio through warmup and decay; the group logged as the LR stays the first, at optim.lr."""
    groups = weight_decay_groups(model, cfg.optim.weight_decay)
    ratio = cfg.peft.lora.loraplus_lr_ratio
    b_matrices = [
        parameter for name, parameter in model.named_parameters() if ".lora_B." in name and parameter.requires_grad
    ]
    if ratio == 1 or not b_matrices:  # off, or a method without LoRA matrices
        return groups
    moved = {id(parameter) for parameter in b_matrices}
    for group in groups:
        group["params"] = [parameter for parameter in group["params"] if id(parameter) not in moved]
    return groups + [{"params": b_matrices, "weight_decay": cfg.optim.weight_decay, "lr": cfg.optim.lr * ratio}]


def warmup_cosine_schedule(optimizer, cfg: TrainConfig):
    """Step s (counting from 0) trains at lr x (s + 1) / warmup during warmup, then decays along a cosine to
    min_lr_ratio x lr at trainer.max_steps."""
    warmup, max_steps = cfg.scheduler.warmup_steps, cfg.trainer.max_steps
    floor = cfg.scheduler.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _count(value) -> int:
    return int(value.item() if torch.is_tensor(value) else value)


def _optimizer_steps(optimizer) -> List[int]:
    """How many updates each param group's Adam state has taken. FusedAdam counts in one parameter's state
    of each group; ZeRO-3 empties the groups between steps and DeepSpeedCPUAdam may key state by sub-group,
    so a group without a count of its own takes the largest count anywhere."""
    everywhere = [_count(state.get("step", 0)) for state in optimizer.state.values()]
    everywhere += [_count(group.get("step", 0)) for group in optimizer.param_groups]
    overall = max(everywhere, default=0)
    steps = []
    for group in optimizer.param_groups:
        own = [_count(optimizer.state[p]["step"]) for p in group["params"] if "step" in optimizer.state.get(p, {})]
        steps.append(max(own) if own else overall)
    return steps


def replay_adam_bias_correction(engine) -> None:
    """Bring the hidden state of DeepSpeed's C++ CPU Adam kernels to where an uninterrupted run has it.

    DeepSpeed's CPU Adam (FusedAdam's CPU build, and DeepSpeedCPUAdam for ZeRO-Offload) keeps beta1^t and
    beta2^t inside the C++ extension, not in the optimizer state: an uninterrupted run multiplies them by
    beta once per step in float32, while the first step after a load recomputes them with pow(beta, t).
    The two differ in the last bit for many t (beta2=0.95 from t=6 on), which changes the bias corrections,
    and so the resumed run's weights and losses, by an ulp from its first step (issue 13). Replaying steps
    1..t through the kernel on a one-element dummy, exactly as the optimizer calls it, rebuilds the
    product an uninterrupted run has. A checkpoint does not hold the value, so this is the only way back.
    Optimizers that compute the corrections from the step alone (CUDA FusedAdam, torch.optim) need none.
    """
    optimizer = getattr(engine, "basic_optimizer", None)
    if optimizer is None or not optimizer.param_groups:
        return
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    dummy = [torch.zeros(1, dtype=torch.float32) for _ in range(4)]  # grad, param, exp_avg, exp_avg_sq
    if isinstance(optimizer, DeepSpeedCPUAdam):
        def kernel(step, group):
            beta1, beta2 = group["betas"]
            optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                              0.0, group["bias_correction"], dummy[1], dummy[0], dummy[2], dummy[3])
    elif isinstance(optimizer, FusedAdam) and dummy[0].device.type == optimizer._dummy_overflow_buf.device.type:
        def kernel(step, group):
            beta1, beta2 = group["betas"]
            optimizer.multi_tensor_adam(2048 * 32, optimizer._dummy_overflow_buf, [[tensor] for tensor in dummy],
                                        group["lr"], beta1, beta2, group["eps"], step, optimizer.adam_w_mode,
                                        1 if group["bias_correction"] else 0, 0.0)
    else:
        return
    steps = _optimizer_steps(optimizer)
    # The calls of the steps so far, in their order: every group, step after step. A call with the same step
    # and betas as the one before leaves the kernel's state as it is, so it is left out (about 40 us each).
    previous = None
    for step in range(1, max(steps) + 1):
        for group, done in zip(optimizer.param_groups, steps):
            if step <= done and (step, tuple(group["betas"])) != previous:
                kernel(step, group)
                previous = (step, tuple(group["betas"]))
