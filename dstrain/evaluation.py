"""What an evaluation reports: the evaluators trainer.eval_metrics names, each a component that takes the
engine and this rank's validation batches and returns metrics agreed by all ranks. Each declares the names it
`reports`, so that a config naming one (trainer.early_stopping.metric) is checked before training."""

import math
from typing import Dict, Iterable

import torch

from dstrain.data import Batch, counted_tokens
from dstrain.distributed import sum_over_ranks
from dstrain.loss import summed_token_loss
from dstrain.registry import Registry


class Perplexity:
    """Validation loss per counted token over every rank's batches, and its exponential."""

    reports = ("eval_loss", "eval_perplexity")

    def evaluate(self, engine, batches: Iterable[Batch], device) -> Dict[str, float]:
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
        with torch.no_grad():
            for batch in batches:
                batch = {key: value.to(device) for key, value in batch.items()}
                loss_sum += summed_token_loss(engine, batch).double()
                count += counted_tokens(batch)
        total, total_count = sum_over_ranks([loss_sum, count], device)
        loss = total / max(total_count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


EVALUATORS: Registry = Registry("trainer.eval_metrics")
EVALUATORS.register("perplexity")(Perplexity())
