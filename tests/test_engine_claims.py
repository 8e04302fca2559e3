"""What the README and the config promise about the engine, observed on the real DeepSpeed engine that dstrain's
own `setup` builds (world size 1, no launcher): bf16 really on, CPU offload really on, gradient checkpointing
really recomputing, gradient clipping really clipping, and no weight decay on norms and biases.

Each group of configurations runs once, in its own process (tests/probes/engine_probe.py), because a process group in
the pytest process would outlive the test; the tests below read its observations.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent / "probes" / "engine_probe.py"
REPO = PROBE.parent.parent

SMALL = ("trainer.eval_every=0", "trainer.micro_batch_size=2", "data.seq_len=64")
# The first step trains at optim.lr x 1 / warmup_steps (dstrain.optim.warmup_cosine_schedule).
LR, WEIGHT_DECAY, WARMUP = 0.1, 0.5, 4
FIRST_LR = LR / WARMUP
DECAY = (f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"scheduler.warmup_steps={WARMUP}")
CLIP = 1e-3

# The tiny model's tensors are all below ZeRO-3's default persistence threshold (100,000 elements), which
# would keep every one of them whole on every rank and leave nothing to gather or offload; at 0 every
# parameter is partitioned, as a large model's are.
PARTITIONED = "zero.stage3_param_persistence_threshold=0"

# name: (probe process, checks in order, overrides). Each process builds its cases' engines one after another;
# ZeRO-3 cases, which build their models inside deepspeed.zero.Init, have a process of their own.
CASES = {
    "z0_fp32": ("zero0", "decay,step,engine", (*DECAY, "trainer.gradient_clipping=0")),
    # Two micro-batches per step: the recomputation is counted per micro-batch.
    "z0_fp32_checkpointing": ("zero0", "step,engine", ("trainer.gradient_checkpointing=true",
                              "trainer.gradient_accumulation_steps=2", f"trainer.gradient_clipping={CLIP}")),
    "z0_lora_checkpointing": ("zero0", "step,engine", ("+peft=lora", "trainer.gradient_checkpointing=true")),
    "z0_bf16": ("zero0", "step,engine", ("+precision=bf16",)),
    "z1_bf16": ("zero12", "step,engine", ("+zero=1", "+precision=bf16")),
    "z2_bf16": ("zero12", "step,engine", ("+zero=2", "+precision=bf16")),
    "z2_fp32": ("zero12", "decay,step,engine", ("+zero=2", *DECAY, f"trainer.gradient_clipping={CLIP}")),
    "z2_offload": ("zero12", "step,engine", ("+zero=2_offload",)),
    "z3_bf16": ("zero3", "step,engine", ("+zero=3", "+precision=bf16", PARTITIONED)),
    "z3_offload": ("zero3", "step,engine", ("+zero=3_offload", PARTITIONED)),
    "z3_lora_checkpointing": ("zero3", "step,engine",
                              ("+zero=3", "+peft=lora", "trainer.gradient_checkpointing=true", PARTITIONED)),
}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """observed(name): the probe's observations of that case; each probe process runs once per module."""
    groups = {}

    def get(name: str) -> dict:
        group = CASES[name][0]
        if group not in groups:
            argv = []
            for case, (case_group, checks, overrides) in CASES.items():
                if case_group == group:
                    argv += ["--case", case, checks, *SMALL, *overrides]
            root = tmp_path_factory.mktemp(group)
            # The first run with offload compiles DeepSpeed's CPU Adam (minutes, once per extensions cache).
            completed = subprocess.run(
                [sys.executable, str(PROBE), str(root), *argv], cwd=root, env=_env(), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, timeout=900,
            )
            if completed.returncode != 0:
                pytest.fail(f"probe {group} failed ({completed.returncode}):\n{completed.stdout[-6000:]}")
            groups[group] = json.loads(completed.stdout.strip().splitlines()[-1])
        return groups[group][name]

    return get


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for launcher_variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(launcher_variable, None)
    return env


def every_layer(step: dict, forward: int, backward: int) -> bool:
    """Whether the body of every decoder layer (its attention and its MLP) ran `forward` times in the forward
    pass and `backward` times in the backward pass, per micro-batch. transformers checkpoints a layer's
    `forward`, not its `__call__`, so the recomputation shows in the modules the layer calls, not in hooks on
    the layer itself: those run once either way."""
    per_micro_batch = {"forward": forward * step["micro_batches"], "backward": backward * step["micro_batches"]}
    body = step["body_runs_per_layer"]
    return (
        len(body) == 2 * step["decoder_layers"] > 0
        and all(counts == per_micro_batch for counts in body.values())
        and all(counts == {"forward": step["micro_batches"], "backward": 0}
                for counts in step["calls_per_layer"].values())
    )


def masters_cover_the_model(engine: dict) -> bool:
    """Every parameter has an fp32 master copy (world size 1: the partitions are the whole model) and the
    inner optimizer's states belong to those copies."""
    masters = [tensor for tensors in engine["masters"].values() for tensor in tensors]
    return (
        bool(masters)
        and {tensor["dtype"] for tensor in masters} == {"float32"}
        and sum(tensor["numel"] for tensor in masters) == engine["module_numel"]
        and engine["state_count"] > 0
        and engine["state_keys_are_masters"] == [True]
        and engine["state_tensor_dtypes"] == ["float32"]
    )


# ------------------------------------------------------------------------------------------------ 1. bf16


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z0_bf16", "z1_bf16", "z2_bf16", "z3_bf16"])
def test_bf16_runs_the_forward_in_bf16_and_keeps_fp32_masters(observed, case):
    seen = observed(case)
    step, engine = seen["step"], seen["engine"]
    # The weights the decoder layers compute with, at the moment each module runs: every one of them, whole
    # (gathered, under ZeRO-3).
    assert step["param_dtypes_in_forward"] == ["bfloat16"]
    assert step["param_numel_in_forward"] == step["layer_param_numel"] > 0
    assert engine["module_param_dtypes"] == ["bfloat16"]
    # Activations: every decoder layer's output, and the logits.
    assert step["layer_output_dtypes"] == ["bfloat16"]
    assert step["logits_dtypes"] == ["bfloat16"]
    # The optimizer steps fp32 masters, not the bf16 weights, with fp32 states and fp32 gradients.
    assert masters_cover_the_model(engine), engine
    assert engine["state_keys_are_module_params"] == [False]
    if engine["zero_stage"] == 3:
        # Every weight is partitioned and released between forwards, so the forward above had to gather it.
        assert engine["released_at_rest"] == engine["module_param_count"] > 0
    assert step["applied"]["calls"] >= 1 and step["applied"]["grad_dtypes"] == ["float32"]
    assert math.isfinite(step["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z0_fp32", "z2_fp32", "z2_offload", "z3_offload"])
def test_fp32_is_fp32_throughout(observed, case):
    seen = observed(case)
    step, engine = seen["step"], seen["engine"]
    assert step["param_dtypes_in_forward"] == ["float32"]
    assert step["param_numel_in_forward"] == step["layer_param_numel"] > 0
    assert engine["module_param_dtypes"] == ["float32"]
    assert step["layer_output_dtypes"] == ["float32"]
    assert step["logits_dtypes"] == ["float32"]
    assert engine["state_tensor_dtypes"] == ["float32"]
    assert step["applied"]["grad_dtypes"] == ["float32"]


# --------------------------------------------------------------------------------------------- 2. offload


@pytest.mark.slow
def test_zero_2_offload_steps_with_deepspeeds_cpu_adam_on_the_fp32_partitions(observed):
    offload, plain = observed("z2_offload")["engine"], observed("z2_fp32")["engine"]
    assert offload["zero_stage"] == plain["zero_stage"] == 2
    assert offload["optimizer"] == plain["optimizer"] == "DeepSpeedZeroOptimizer"
    # What offload changes: the ZeRO optimizer's offload path and DeepSpeed's CPU Adam as the inner optimizer.
    assert offload["cpu_offload"] is True and offload["engine_zero_cpu_offload"] is True
    assert offload["inner_is_cpu_adam"] is True and offload["inner_optimizer"] == "DeepSpeedCPUAdam"
    assert plain["cpu_offload"] is False and plain["engine_zero_cpu_offload"] is False
    assert plain["inner_is_cpu_adam"] is False
    assert offload["offload_pin_memory"] is True
    # The step ran through it: the CPU Adam stepped every fp32 partition once.
    assert observed("z2_offload")["step"]["applied"]["calls"] >= 1
    assert observed("z2_offload")["step"]["applied"]["stepped_twice"] == 0
    # The CPU Adam's states (exp_avg, exp_avg_sq) are those of the fp32 partitions, in host memory.
    assert masters_cover_the_model(offload), offload
    assert offload["state_tensor_devices"] == ["cpu"]
    assert set(offload["masters"]) == {"single_partition_of_fp32_groups"}
    assert {t["device"] for t in offload["masters"]["single_partition_of_fp32_groups"]} == {"cpu"}


@pytest.mark.slow
def test_zero_3_offload_puts_parameters_and_optimizer_on_the_cpu(observed):
    offload, plain = observed("z3_offload")["engine"], observed("z3_bf16")["engine"]
    assert offload["zero_stage"] == plain["zero_stage"] == 3
    assert offload["offload_optimizer"] is True and offload["offload_param"] is True
    assert offload["param_offload_device"] == "cpu"
    assert offload["engine_zero_cpu_offload"] is True and offload["engine_zero_offload_param"] is True
    assert offload["inner_is_cpu_adam"] is True and offload["offload_pin_memory"] is True
    assert observed("z3_offload")["step"]["applied"]["calls"] >= 1
    # Parameters partitioned and released between forwards (to the CPU, with offload_param).
    assert offload["released_at_rest"] == offload["module_param_count"] > 0
    assert plain["offload_optimizer"] is False and plain["offload_param"] is False
    assert plain["param_offload_device"] != "cpu" and plain["inner_is_cpu_adam"] is False
    assert masters_cover_the_model(offload), offload
    assert offload["state_tensor_devices"] == ["cpu"]
    assert set(offload["masters"]) == {"fp32_partitioned_groups_flat"}
    assert {t["device"] for t in offload["masters"]["fp32_partitioned_groups_flat"]} == {"cpu"}


# ---------------------------------------------------------------------------------- 3. gradient checkpointing


@pytest.mark.slow
def test_without_checkpointing_each_decoder_layer_runs_once(observed):
    step = observed("z0_fp32")["step"]
    assert every_layer(step, forward=1, backward=0), step["body_runs_per_layer"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z0_fp32_checkpointing", "z0_lora_checkpointing", "z3_lora_checkpointing"])
def test_checkpointing_recomputes_each_decoder_layer_in_the_backward_pass(observed, case):
    step = observed(case)["step"]
    assert step["micro_batches"] == (2 if case == "z0_fp32_checkpointing" else 1)
    assert every_layer(step, forward=1, backward=1), step["body_runs_per_layer"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z0_lora_checkpointing", "z3_lora_checkpointing"])
def test_lora_adapters_train_under_checkpointing(observed, case):
    step = observed(case)["step"]
    lora_b = {name: change for name, change in step["lora_change"].items() if "lora_B" in name}
    # Every target module of every layer (7 x 2 with the tiny model), each B weight moved by its first step.
    assert len(lora_b) == 14, sorted(step["lora_change"])
    assert all(change > 0 for change in lora_b.values()), lora_b
    # The base weights are frozen and stay as they were.
    assert step["frozen_max_change"] == 0.0
    if case.startswith("z0"):
        # Plain ZeRO-0: the inner optimizer steps the module's own parameters, so their gradients are visible.
        grads = {name: norm for name, norm in step["applied"]["grad_norm_by_param"].items() if "lora_B" in name}
        assert len(grads) == 14 and all(norm > 0 for norm in grads.values()), grads


# ------------------------------------------------------------------------------------- 4. gradient clipping


@pytest.mark.slow
@pytest.mark.parametrize("case, limit", [
    ("z0_fp32_checkpointing", CLIP), ("z2_fp32", CLIP),
    # trainer.gradient_clipping's default, 1.0, under bf16 and ZeRO-3.
    ("z0_bf16", 1.0), ("z1_bf16", 1.0), ("z2_bf16", 1.0), ("z3_bf16", 1.0), ("z2_offload", 1.0), ("z3_offload", 1.0),
])
def test_clipping_bounds_the_applied_gradient_norm(observed, case, limit):
    step = observed(case)["step"]
    applied = step["applied"]
    assert applied["calls"] >= 1 and applied["stepped_twice"] == 0
    # The norm that train_step returns (and the metrics log) is the one before clipping...
    assert step["returned_grad_norm"] > 2 * limit
    # ...and the gradient the optimizer applies was scaled down to the limit: not above it, and not zeroed.
    assert applied["norm"] <= limit * (1 + 1e-5), applied["norm"]
    assert applied["norm"] >= limit * 0.99, applied["norm"]


@pytest.mark.slow
def test_without_clipping_the_applied_gradient_is_the_raw_one(observed):
    step = observed("z0_fp32")["step"]
    assert step["returned_grad_norm"] > 100 * CLIP
    assert step["applied"]["norm"] == pytest.approx(step["returned_grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------------- 5. weight decay


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z0_fp32", "z2_fp32"])
def test_weight_decay_shrinks_matrices_and_leaves_norms_alone(observed, case):
    decay = observed(case)["decay"]
    assert decay["lr"] == pytest.approx(FIRST_LR, rel=1e-12)
    assert decay["global_steps"] == 1
    # The gradients really were zero when the optimizer stepped: AdamW's own update was zero.
    assert decay["applied"]["calls"] >= 1 and decay["applied"]["abs_max"] == 0.0
    factor = 1 - FIRST_LR * WEIGHT_DECAY
    matrices, vectors = decay["matrices"], decay["vectors"]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(matrices) and len(matrices) == 16
    for name, ratio in matrices.items():
        # after / before, element by element; float32 rounding of the product and of the ratio
        assert abs(ratio["min"] - factor) <= 4e-7 and abs(ratio["max"] - factor) <= 4e-7, (name, ratio, factor)
    # Two norms per layer and the final norm (the tiny Llama has no biases); bit for bit unchanged.
    assert len(vectors) == 5 and all("norm" in name for name in vectors), sorted(vectors)
    assert all(vector["unchanged"] for vector in vectors.values()), vectors
