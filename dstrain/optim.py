"""What the optimizer gets: parameter groups with and without weight decay, and the LR schedule. Both are
handed to deepspeed.initialize, which builds the AdamW of the DeepSpeed config around them."""

import math

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
