#!/usr/bin/env python
"""launch/train.py with a NaN loss injected, for the fault tests: run it exactly like launch/train.py.

NAN_STEPS names the optimizer steps whose loss becomes NaN ("6", "3,4" or "3-" for step 3 onwards) on the
rank NAN_RANK (default 1). The model's outputs, its hidden states and logits, are multiplied by NaN inside its
forward (dstrain's chunked loss starts from the final hidden states), so the loss and the gradients of that rank
become NaN, as they would after a real overflow. It assumes one forward per optimizer step
(gradient accumulation 1, no evaluation); in a resumed run, step 1 is the first step after the checkpoint.
"""

import os

from transformers import LlamaForCausalLM

from dstrain.launch import main


def _nan_steps(spec: str):
    if spec.endswith("-"):
        first = int(spec[:-1])
        return lambda step: step >= first
    steps = {int(step) for step in spec.split(",")}
    return steps.__contains__


def _inject(is_nan_step, rank: int) -> None:
    forward = LlamaForCausalLM.forward
    step = 0

    def forward_with_nan(self, *args, **kwargs):
        nonlocal step
        output = forward(self, *args, **kwargs)
        if self.training:
            step += 1
            if int(os.environ["RANK"]) == rank and is_nan_step(step):
                output.logits = output.logits * float("nan")
                if output.hidden_states is not None:
                    output.hidden_states = tuple(states * float("nan") for states in output.hidden_states)
        return output

    LlamaForCausalLM.forward = forward_with_nan


if __name__ == "__main__":
    _inject(_nan_steps(os.environ["NAN_STEPS"]), int(os.environ.get("NAN_RANK", "1")))
    main()
