"""Measure a rank's peak of bytes held in torch tensors while dstrain builds its engine and trains a few steps:
the CPU analogue of torch.cuda.max_memory_allocated, which `dstrain plan` predicts.

    deepspeed --num_gpus 2 tests/probes/memory_peak.py OUTPUT_DIR STEPS OVERRIDE...

The config is composed as `launch/train.py OVERRIDE...` composes it, and the engine, data and steps are
dstrain's own (trainer.setup, trainer.train_step). torch.profiler records every CPU allocation and free
("[memory]" events, + or - bytes); the running sum of those events in time order is the bytes live in tensors,
and its maximum is the peak. The peak while setting up (fp32 model, then DeepSpeed's copies and flat buffers) and
the peak while stepping are kept apart. Each rank writes OUTPUT_DIR/rank<N>.json.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

from dstrain.compose import compose, normalize_argv
from dstrain.distributed import init_distributed
from dstrain.trainer import setup, train_step

STEPS_MARKER = "memory_peak.steps"


def memory_events(prof) -> list:
    """(time, bytes) of every allocation (+) and free (-), in time order."""
    return sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                  if event.name() == "[memory]")


def peaks(events: list, boundary_ns: int) -> dict:
    """The highest running sum before boundary_ns (setup) and after it (steps)."""
    running, peak = 0, {"setup": 0, "steps": 0}
    for start, nbytes in events:
        running += nbytes
        phase = "setup" if start < boundary_ns else "steps"
        peak[phase] = max(peak[phase], running)
    return peak


def main() -> None:
    output, steps, *overrides = normalize_argv(sys.argv[1:])
    output = Path(output)
    cfg = compose([*overrides, f"run.root={output}", "run.name=probe"])
    rank, world_size = init_distributed(timedelta(minutes=10))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        training = setup(cfg, output / "probe", rank, world_size)
        # A marker on the profiler's own clock: where setup ends and the steps begin.
        with record_function(STEPS_MARKER):
            for step in range(int(steps)):
                batches = [training.plan.micro_batch(step * training.plan.global_batch, micro)
                           for micro in range(training.plan.accumulation_steps)]
                train_step(training, batches, False)
    boundary_ns = min(event.start_ns() for event in prof.profiler.kineto_results.events()
                      if event.name() == STEPS_MARKER)
    result = peaks(memory_events(prof), boundary_ns)
    (output / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **result}))
    training.metrics.close()
    training.engine.destroy()


if __name__ == "__main__":
    main()
