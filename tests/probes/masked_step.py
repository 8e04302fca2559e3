"""One optimizer step over a fixed, unevenly masked global batch, split as the launch says (ranks) and as
argv says (micro-batch size); writes the step's loss and each weight's update to OUT. optim.eps=1 keeps
Adam's first update proportional to the gradient (eps=1e-8 would make it lr x sign(gradient), where
rounding noise in a near-zero gradient decides the sign). Run it as
`python tests/probes/masked_step.py OUT MICRO_BATCH_SIZE` or under `deepspeed --num_gpus N`."""

import sys
from datetime import timedelta
from pathlib import Path

import torch

from dstrain.compose import compose
from dstrain.data import IGNORE_INDEX
from dstrain.distributed import init_distributed
from dstrain.trainer import setup, train_step

GLOBAL_BATCH = 4

# The deepspeed launcher puts --local_rank=N first; LOCAL_RANK in the environment says the same.
args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
out, micro_batch_size = Path(args[0]), int(args[1])
rank, world_size = init_distributed(timedelta(seconds=600))
accumulation = GLOBAL_BATCH // (micro_batch_size * world_size)
cfg = compose([
    "+zero=0", "+precision=fp32", "data.seq_len=32", "trainer.eval_every=0", "scheduler.warmup_steps=1",
    f"trainer.micro_batch_size={micro_batch_size}", f"trainer.gradient_accumulation_steps={accumulation}",
    "trainer.resume=never", "optim.lr=1.0", "optim.eps=1.0", "optim.weight_decay=0.0", "trainer.gradient_clipping=0.0",
], run_name="masked")
training = setup(cfg, out.parent / f"run-{out.stem}", rank, world_size)

# The same global batch everywhere: the first blocks of the data, each row with a different share of its
# labels masked, as prompts of different lengths would be.
input_ids = torch.stack([training.plan.blocks[index]["input_ids"] for index in range(GLOBAL_BATCH)])
labels = input_ids.clone()
for row, masked in enumerate((2, 28, 10, 20)):
    labels[row, :masked] = IGNORE_INDEX
# Micro-batch m of rank r holds rows of slot m * world_size + r, as dstrain.data.BatchPlan assigns them.
batches = []
for micro in range(accumulation):
    first = (micro * world_size + rank) * micro_batch_size
    rows = slice(first, first + micro_batch_size)
    batches.append({"input_ids": input_ids[rows], "labels": labels[rows]})

before = {name: parameter.detach().clone() for name, parameter in training.engine.module.named_parameters()}
result = train_step(training, batches, stop_requested=False)
if rank == 0:
    updates = {name: parameter.detach() - before[name] for name, parameter in training.engine.module.named_parameters()}
    torch.save({"loss": result.loss, "updates": updates, "input_ids": input_ids, "labels": labels}, out)
