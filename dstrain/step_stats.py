"""What a training step measured, beyond its loss: tokens read, a checksum of the batch, the gradient norm
where DeepSpeed keeps none, memory per rank and the fp16 loss scale."""

import zlib
from typing import List

import psutil
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from dstrain.config import TrainConfig
from dstrain.data import IGNORE_INDEX, Batch


def tokens_in(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def samples_in(batch: Batch) -> int:
    """The samples (conversations, documents) a micro-batch trains on: its rows, or in packed rows the segments
    whose positions restart at 0 and that count a token (a row's padding tail is a segment of its own, and
    counts none)."""
    if "position_ids" not in batch:
        return batch["input_ids"].size(0)
    rows, width = batch["position_ids"].shape
    segments = (batch["position_ids"] == 0).cumsum(dim=1) + torch.arange(rows).unsqueeze(1) * (width + 1)
    return int(segments[batch["labels"] != IGNORE_INDEX].unique().numel())


def batch_digest(batches: List[Batch]) -> int:
    """CRC-32 of the tokens and labels of this rank's micro-batches (microseconds, on the CPU copies)."""
    digest = 0
    for batch in batches:
        for key in sorted(batch):
            digest = zlib.crc32(batch[key].numpy().tobytes(), digest)
    return digest


def replicated_grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


def memory_per_rank(device: torch.device, world_size: int) -> dict:
    """Each rank's peak accelerator memory (resident memory on a CPU), in GB; a collective, so every rank
    calls it at the same steps."""
    if device.type == "cpu":
        used = psutil.Process().memory_info().rss
    else:
        used = get_accelerator().max_memory_allocated(device)
    gathered = torch.zeros(world_size, dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, torch.tensor([used / 1e9], dtype=torch.float64, device=device))
    per_rank = gathered.tolist()
    return {"memory_gb_max": round(max(per_rank), 3),
            **{f"memory_gb/rank{rank}": round(value, 3) for rank, value in enumerate(per_rank)}}


def loss_scale_metrics(engine, cfg: TrainConfig) -> dict:
    if cfg.precision.dtype != "fp16":
        return {}
    return {"loss_scale": float(engine.optimizer.cur_scale), "skipped_steps": int(engine.skipped_steps)}
