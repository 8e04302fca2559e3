"""Observe the DeepSpeed engine that dstrain's own `setup` builds, in a process of its own (world size 1).

    python tests/engine_probe.py RUN_ROOT --case NAME CHECK[,CHECK...] OVERRIDE... [--case ...]

The config is composed exactly as `launch/train.py OVERRIDE...` would compose it (dstrain.compose), the process
group is dstrain's (init_distributed), and the engine, data and step are dstrain's (setup, train_step). The
checks, run in this order when asked for:

- `decay`: one step on a real batch with zero gradients (`engine.backward(loss * 0)`, `engine.step()`): every
  parameter before and after, as the ratio after/before of each matrix and whether each vector is unchanged.
- `step`: one `train_step` with hooks on each decoder layer and on its attention and MLP (calls in the forward
  and in the backward pass, the dtypes of the parameters the forward uses and of the outputs) and a wrapper around the inner torch
  optimizer's `step` (the global norm of the gradients it applies, which parameters got one).
- `trains`: two `train_step`s (LoRA's A matrices move only once its B matrices have): which parameters
  changed, among those that require grad and those that do not, and the trainer's parameter counts.
- `engine`: what the engine is made of: the optimizers' classes, the module's parameter dtypes, the fp32
  master copies and the optimizer states (dtype, device, which tensors they belong to), the offload flags.

Each case builds its own engine, one after another in this process. The last line of stdout is one JSON
object: each case's name and its observations.
"""

import contextlib
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from dstrain.compose import compose
from dstrain.distributed import init_distributed
from dstrain.loss import step_loss
from dstrain.trainer import setup, train_step

# Where each kind of DeepSpeed optimizer keeps its fp32 master weights (deepspeed 0.19.8).
MASTER_ATTRIBUTES = (
    "single_partition_of_fp32_groups",  # ZeRO 1/2 (stage_1_and_2.py)
    "fp32_partitioned_groups_flat",  # ZeRO-3 (stage3.py)
    "fp32_groups_flat",  # ZeRO-0 fp16/bf16 (fp16/fused_optimizer.py)
    "fp32_groups_flat_partition",  # BF16_Optimizer (bf16_optimizer.py)
)


def dtype_name(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def decoder_layers(module):
    return [(name, m) for name, m in module.named_modules() if type(m).__name__ == "LlamaDecoderLayer"]


@contextlib.contextmanager
def observed_inner_step(engine):
    """Wrap the inner torch optimizer's step (the one DeepSpeed wraps, or the engine's own under plain ZeRO-0
    fp32) and record the gradients it is about to apply, at the moment DeepSpeed calls it."""
    inner = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    # ZeRO 1/2 step the inner optimizer once per parameter group (with only that group in param_groups), so
    # the gradients applied in one optimizer step are those of all calls together.
    applied = {"calls": 0, "grad_tensors": 0, "sum_of_squares": 0.0, "abs_max": 0.0, "stepped_twice": 0,
               "grad_norm_by_param": {}}
    seen, grad_dtypes = set(), set()
    inner_step = inner.step

    def observed_step(*args, **kwargs):
        applied["calls"] += 1
        for group in inner.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                applied["stepped_twice"] += id(p) in seen
                seen.add(id(p))
                grad = p.grad.float()
                grad_dtypes.add(dtype_name(p.grad))
                applied["grad_tensors"] += 1
                applied["sum_of_squares"] += torch.linalg.vector_norm(grad, dtype=torch.float64).item() ** 2
                applied["abs_max"] = max(applied["abs_max"], grad.abs().max().item())
                if id(p) in names:
                    applied["grad_norm_by_param"][names[id(p)]] = torch.linalg.vector_norm(grad).item()
        applied["norm"] = applied["sum_of_squares"] ** 0.5
        applied["grad_dtypes"] = sorted(grad_dtypes)
        return inner_step(*args, **kwargs)

    inner.step = observed_step
    try:
        yield applied
    finally:
        inner.step = inner_step


def snapshot(named_parameters, keep=lambda name, p: True) -> dict:
    """fp32 copies of whole parameters (gathered first where ZeRO-3 partitioned them)."""
    import deepspeed

    copies = {}
    for name, p in named_parameters:
        if keep(name, p):
            with deepspeed.zero.GatheredParameters(p) if hasattr(p, "ds_id") else contextlib.nullcontext():
                copies[name] = p.detach().clone().float()
    return copies


def observe_decay(training) -> dict:
    """One optimizer step whose gradients are all zero: AdamW's update is then zero and only decay moves a
    weight (p <- p - lr * wd * p)."""
    engine = training.engine
    lr_before = engine.get_lr()[0]
    before = snapshot(engine.module.named_parameters())
    batch = {key: value.to(training.device) for key, value in training.plan.micro_batch(0, 0).items()}
    loss = step_loss(engine, batch, int(batch["labels"].ne(-100).sum()), 1)
    engine.backward(loss * 0)
    with observed_inner_step(engine) as applied:
        engine.step()
    result = {"lr": lr_before, "global_steps": engine.global_steps, "applied": applied, "matrices": {},
              "vectors": {}}
    for name, after in snapshot(engine.module.named_parameters()).items():
        if before[name].dim() >= 2:
            ratio = after / before[name]
            result["matrices"][name] = {"min": ratio.min().item(), "max": ratio.max().item()}
        else:
            result["vectors"][name] = {"unchanged": bool(torch.equal(after, before[name])),
                                       "max_abs_change": (after - before[name]).abs().max().item()}
    return result


def observe_step(training) -> dict:
    engine = training.engine
    phase = {"now": "forward"}
    calls, param_dtypes, output_dtypes, param_numels = [], set(), set(), {}

    def pre_hook(name):
        def hook(module, args, kwargs=None):
            calls.append({"layer": name, "phase": phase["now"], "grad_enabled": torch.is_grad_enabled()})
        return hook

    def weights_in_use(name):
        # Runs after DeepSpeed's own pre-forward hook (registered earlier), which gathers a ZeRO-3 module's
        # parameters: these are the weights the module is about to compute with.
        def hook(module, args):
            for pname, p in module.named_parameters(recurse=False):
                param_dtypes.add(dtype_name(p))
                param_numels[f"{name}.{pname}"] = max(param_numels.get(f"{name}.{pname}", 0), p.numel())
        return hook

    def post_hook(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        output_dtypes.add(dtype_name(hidden))

    def inner_hook(name, child):
        def hook(module, args):
            inner_calls.append({"layer": name, "child": child, "phase": phase["now"]})
        return hook

    # transformers checkpoints a decoder layer's `forward`, not its `__call__`, so hooks on the layer itself run
    # once; what the backward pass recomputes is the layer's body: its attention and MLP are called again.
    inner_calls = []
    layers = decoder_layers(engine.module)
    handles = []
    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(pre_hook(name)))
        handles.append(layer.register_forward_hook(post_hook))
        for module_name, module in layer.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(weights_in_use(f"{name}.{module_name}")))
        for child in ("self_attn", "mlp"):
            handles.append(getattr(layer, child).register_forward_pre_hook(inner_hook(name, child)))
    logits_dtypes = set()
    for name, module in engine.module.named_modules():
        if name.endswith("lm_head"):
            handles.append(module.register_forward_hook(lambda m, a, out: logits_dtypes.add(dtype_name(out))))

    backward = engine.backward

    def backward_in_phase(loss, *args, **kwargs):
        phase["now"] = "backward"
        try:
            return backward(loss, *args, **kwargs)
        finally:
            phase["now"] = "forward"

    engine.backward = backward_in_phase

    lora_before = snapshot(engine.module.named_parameters(), lambda n, p: "lora_" in n)
    frozen_before = snapshot(engine.module.named_parameters(), lambda n, p: not p.requires_grad)
    batches = [training.plan.micro_batch(0, micro) for micro in range(training.plan.accumulation_steps)]
    engine.train()
    with observed_inner_step(engine) as applied:
        result = train_step(training, batches, False)
    engine.backward = backward
    for handle in handles:
        handle.remove()
    per_layer, body_per_layer = {}, {}
    for call in calls:
        counts = per_layer.setdefault(call["layer"], {"forward": 0, "backward": 0})
        counts[call["phase"]] += 1
    for call in inner_calls:
        counts = body_per_layer.setdefault(f'{call["layer"]}.{call["child"]}', {"forward": 0, "backward": 0})
        counts[call["phase"]] += 1
    params_now = snapshot(engine.module.named_parameters(), lambda n, p: n in lora_before or n in frozen_before)
    return {
        "micro_batches": len(batches),
        "decoder_layers": len(layers),
        "calls_per_layer": per_layer,
        "body_runs_per_layer": body_per_layer,
        "calls": calls,
        "param_dtypes_in_forward": sorted(param_dtypes),
        "param_numel_in_forward": sum(param_numels.values()),
        "layer_param_numel": sum(getattr(p, "ds_numel", p.numel()) for _, layer in layers for p in layer.parameters()),
        "layer_output_dtypes": sorted(output_dtypes),
        "logits_dtypes": sorted(logits_dtypes),
        "returned_grad_norm": result.grad_norm,
        "loss": result.loss,
        "applied": applied,
        "lora_change": {n: (params_now[n] - b).abs().max().item() for n, b in lora_before.items()},
        "frozen_max_change": max(((params_now[n] - b).abs().max().item()
                                  for n, b in frozen_before.items()), default=None),
    }


def observe_training(training) -> dict:
    from dstrain.model import parameter_counts

    engine = training.engine
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    before = snapshot(engine.module.named_parameters())
    engine.train()
    losses = []
    for step in range(2):
        samples = step * training.plan.global_batch
        batches = [training.plan.micro_batch(samples, micro) for micro in range(training.plan.accumulation_steps)]
        losses.append(train_step(training, batches, False).loss)
    after = snapshot(engine.module.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    total, trainable_count = parameter_counts(engine.module)
    return {
        "losses": losses,
        "trainable": sorted(trainable),
        "trainable_unchanged": sorted(trainable - changed),
        "frozen_changed": sorted(changed - trainable),
        "counts": {"total": total, "trainable": trainable_count},
    }


def describe(tensors) -> list:
    return [{"dtype": dtype_name(t), "device": str(t.device), "numel": t.numel()} for t in tensors]


def observe_engine(training) -> dict:
    engine = training.engine
    optimizer, inner = engine.optimizer, engine.basic_optimizer
    module_params = list(engine.module.parameters())
    module_ids = {id(p) for p in module_params}
    inner_params = [p for group in inner.param_groups for p in group["params"]]
    masters = {}
    for attribute in MASTER_ATTRIBUTES:
        value = getattr(optimizer, attribute, None)
        if isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
            masters[attribute] = value
    master_ids = {id(t) for tensors in masters.values() for t in tensors}
    states = list(inner.state.items())
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return {
        "optimizer": type(optimizer).__name__,
        "inner_optimizer": type(inner).__name__,
        "inner_is_cpu_adam": isinstance(inner, DeepSpeedCPUAdam),
        "zero_stage": engine.zero_optimization_stage(),
        "engine_zero_cpu_offload": bool(engine.zero_cpu_offload()),
        "engine_zero_offload_param": bool(getattr(engine, "zero_offload_param", lambda: None)() or False),
        "cpu_offload": getattr(optimizer, "cpu_offload", None),
        "offload_optimizer": getattr(optimizer, "offload_optimizer", None),
        "offload_param": getattr(optimizer, "offload_param", None),
        "offload_pin_memory": getattr(optimizer, "cpu_offload_pin_memory",
                                      getattr(optimizer, "offload_optimizer_pin_memory", None)),
        "param_offload_device": str(getattr(getattr(optimizer, "parameter_offload", None), "offload_device", None)),
        # ZeRO-3: parameters that are partitioned and released between forwards (no whole copy held).
        "released_at_rest": sum(hasattr(p, "ds_id") and p.numel() == 0 for p in module_params),
        "module_param_count": len(module_params),
        "module_numel": sum(getattr(p, "ds_numel", p.numel()) for p in module_params),
        "module_param_dtypes": sorted({dtype_name(p) for p in module_params}),
        "inner_param_dtypes": sorted({dtype_name(p) for p in inner_params}),
        "inner_params_are_module_params": sorted({id(p) in module_ids for p in inner_params}),
        "inner_params_are_masters": sorted({id(p) in master_ids for p in inner_params}),
        "masters": {attribute: describe(tensors) for attribute, tensors in masters.items()},
        "state_count": len(states),
        "state_keys_are_masters": sorted({id(key) in master_ids for key, _ in states}),
        "state_keys_are_module_params": sorted({id(key) in module_ids for key, _ in states}),
        "state_tensor_dtypes": sorted({dtype_name(v) for _, s in states for k, v in s.items()
                                       if isinstance(v, torch.Tensor) and v.dim() > 0}),
        "state_tensor_devices": sorted({str(v.device) for _, s in states for v in s.values()
                                        if isinstance(v, torch.Tensor) and v.dim() > 0}),
    }


def probe(root: Path, checks, overrides) -> dict:
    started = time.perf_counter()
    cfg = compose([*overrides, f"run.root={root}"], run_name="probe")
    rank, world_size = init_distributed(timedelta(seconds=cfg.trainer.collective_timeout_s))
    training = setup(cfg, root / "probe", rank, world_size)
    observations = {"overrides": list(overrides)}
    for check in checks:
        observations[check] = {"decay": observe_decay, "step": observe_step, "trains": observe_training,
                               "engine": observe_engine}[check](training)
    training.metrics.close()
    training.engine.destroy()
    observations["seconds"] = time.perf_counter() - started
    return observations


def cases(argv):
    """`--case NAME CHECKS OVERRIDE... --case ...` as (name, checks, overrides)."""
    groups, current = [], None
    for arg in argv:
        if arg == "--case":
            current = []
            groups.append(current)
        else:
            current.append(arg)
    return [(group[0], group[1].split(","), group[2:]) for group in groups]


def main(argv) -> None:
    """Each case builds its own engine from scratch, one after another in this process (one process group),
    which saves the imports' start-up time per case."""
    root = Path(argv[0])
    observations = {name: probe(root / name, checks, overrides) for name, checks, overrides in cases(argv[1:])}
    print(json.dumps(observations, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
