"""The one loss step of training and evaluation: cross-entropy summed over the positions that count.

Dividing by the step's count of counted tokens (over every micro-batch, accumulation step and rank) makes the
step's loss the mean per counted token, so micro-batches with different numbers of counted tokens (masked
prompts, padding) weigh by their tokens, not as one mean each. DeepSpeed divides what `engine.backward` gets by
the accumulation steps and averages gradients over ranks; `step_loss` undoes both, so the gradient is that of
the per-token mean. With every token counting, as in plain-text pretraining, it equals the model's own mean
loss.

The full-vocabulary logits are never made at once: the model returns its final hidden states (and no logits),
and the output layer, the fp32 cast and the cross-entropy run over chunks of the counted positions, each chunk
under activation checkpointing so that the backward recomputes one chunk's logits at a time. For a 49k-token
vocabulary the fp32 logits of a micro-batch outweigh everything else the step keeps; positions whose label
does not count (masked prompts, padding) never reach the output layer at all.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dstrain.data import IGNORE_INDEX, Batch

# The counted positions of a micro-batch are split into this many chunks, not into chunks of a fixed size:
# every rank must call the output layer equally often, since under ZeRO-3 each call gathers its weight with a
# collective, and ranks' micro-batches differ in width (padding to the longest) and in counted positions.
# With 8 chunks, a LoRA step of SmolLM2-135M with half its labels masked (a prompt) took 0.82x the time and
# memory of the full logits; with every label counting, 0.87x-0.98x the memory for up to 1.09x the time, the
# recomputed output layer (benchmarks/train_step.py, README "Speed: what helps where").
#
# The recomputation skips checkpoint's check that recomputed tensors match the forward's: under ZeRO-3 the
# output layer's weight is gathered for each call and released right after, so the recomputed weight has
# shape [0] by the time the check runs; the output layer's own backward hook gathers it again before its
# gradient needs it, as for every other ZeRO-3 layer.
LOSS_CHUNKS = 8


def summed_token_loss(model, batch: Batch, chunks: int = LOSS_CHUNKS) -> torch.Tensor:
    """Cross-entropy summed over the counted positions, computed in fp32 whatever the model's dtype."""
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    # Finding the counted positions waits for the device (their number sets a shape); asked before the
    # model's forward is queued, the wait is for the batch's copy only, not for the forward.
    counted = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = final_hidden_states(model, batch).flatten(0, 1).index_select(0, counted)
    output_layer = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(hidden.tensor_split(chunks), targets[counted].tensor_split(chunks)):
        total = total + checkpoint(chunk_loss, output_layer, hidden_chunk, target_chunk, use_reentrant=False,
                                   determinism_check="none")
    return total


def final_hidden_states(model, batch: Batch) -> torch.Tensor:
    """The model's last hidden states (after the final norm) at the batch's own positions, with the output
    layer applied to none of them."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    # An empty index keeps no position for the output layer; hidden_states[-1] is the normed last state.
    no_positions = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=no_positions).hidden_states[-1]
    # Prompt tuning prepends its virtual tokens' states; the batch's positions are the last ones.
    return hidden[:, -batch["input_ids"].size(1):]


def chunk_loss(output_layer: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of one chunk of positions (every target counts), its logits in fp32."""
    logits = output_layer(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def step_loss(model, batch: Batch, counted_in_step: int, micro_batches_in_step: int) -> torch.Tensor:
    """One micro-batch's loss for `engine.backward`: its summed token loss over the step's counted tokens,
    times the micro-batches in the step (accumulation steps x ranks), which DeepSpeed divides out again.
    The mean of these over the step's micro-batches is the step's loss per counted token."""
    return summed_token_loss(model, batch) / (counted_in_step / micro_batches_in_step)
