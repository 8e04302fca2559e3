"""The one loss step of training and evaluation: cross-entropy summed over the positions that count.

Dividing by the step's count of counted tokens (over every micro-batch, accumulation step and rank) makes the
step's loss the mean per counted token, so micro-batches with different numbers of counted tokens (masked
prompts, padding) weigh by their tokens, not as one mean each. DeepSpeed divides what `engine.backward` gets by
the accumulation steps and averages gradients over ranks; `step_loss` undoes both, so the gradient is that of
the per-token mean. With every token counting, as in plain-text pretraining, it equals the model's own mean
loss.
"""

import torch
import torch.nn.functional as F

from dstrain.data import IGNORE_INDEX, Batch


def summed_token_loss(model, batch: Batch) -> torch.Tensor:
    """Cross-entropy summed over the counted positions, computed in fp32 whatever the model's dtype."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def step_loss(model, batch: Batch, counted_in_step: int, micro_batches_in_step: int) -> torch.Tensor:
    """One micro-batch's loss for `engine.backward`: its summed token loss over the step's counted tokens,
    times the micro-batches in the step (accumulation steps x ranks), which DeepSpeed divides out again.
    The mean of these over the step's micro-batches is the step's loss per counted token."""
    return summed_token_loss(model, batch) / (counted_in_step / micro_batches_in_step)
