"""`dstrain export`: checkpoints from real 2-rank training, exported by the real command, and checked against
what the trained engine itself measured: the exported model must give the eval loss the run logged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STANDARD_RUN, _env, lora_run, train

# Both the shared STANDARD_RUN and lora_run evaluate 2 batches after their last step.
EVAL_BATCHES = 2
STANDARD_STEPS, STANDARD_MICRO_BATCH = 24, 32
LORA_STEPS, LORA_MICRO_BATCH = 12, 8
# bf16 forward passes in this process and in the trained engine's ranks (other thread counts) need not sum
# in the same order.
BF16_REL = 1e-3


def _dstrain_command() -> list:
    """The installed `dstrain` script, found next to this Python first (a virtualenv need not be activated)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("dstrain", path=search)
    assert script, "the dstrain command is not installed: pip install -e ."
    return [script]


def _export(*args, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dstrain"] if module else _dstrain_command()
    return subprocess.run(
        [*command, "export", *map(str, args)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=300,
    )


def _export_ok(*args) -> subprocess.CompletedProcess:
    completed = _export(*args)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-6000:]
    return completed


def _checkpoint(step: int) -> Path:
    return Path("checkpoints") / f"step_{step:08d}"


def _logged_final_eval_loss(run, step: int) -> float:
    rows = [row for row in run.metrics() if "eval_loss" in row]
    assert rows and rows[-1]["step"] == step, rows
    return rows[-1]["eval_loss"]


def _eval_loss_like_the_trainer(model, tokenizer, micro_batch_size: int, pretrained=None, world_size: int = 2) -> float:
    """The trainer's evaluation: the loss per predicted token over every rank's eval batches, computed here
    with the model's own (mean) loss."""
    from dstrain.config import TrainConfig
    from dstrain.data import eval_batches, packed_blocks

    cfg = TrainConfig()
    cfg.model.pretrained = pretrained
    cfg.trainer.eval_batches = EVAL_BATCHES
    val_blocks = packed_blocks(cfg, tokenizer, "validation")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rank in range(world_size):
            batches = list(eval_batches(val_blocks, micro_batch_size, world_size, rank, EVAL_BATCHES))
            assert len(batches) == EVAL_BATCHES
            for batch in batches:
                predicted = batch["input_ids"][:, 1:].numel()
                total += model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item() * predicted
                tokens += predicted
    return total / tokens


def _first_training_batch(tokenizer, pretrained):
    from dstrain.config import TrainConfig
    from dstrain.data import BatchPlan, packed_blocks

    cfg = TrainConfig()
    cfg.model.pretrained = str(pretrained)
    blocks = packed_blocks(cfg, tokenizer, "train")
    return BatchPlan(blocks, cfg.trainer.seed, cfg.trainer.micro_batch_size, 1, 1, 0).micro_batch(0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", ["0", "1", "2", "3"])
def test_exported_model_gives_the_trained_engines_eval_loss(tmp_path, shared_run, zero, precision):
    """Every ZeRO stage and precision, from the shared runs test_training checks. A bf16 engine evaluated with
    its bf16 weights: the exported model, cast to bf16 as DeepSpeed casts the module, must give that loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = shared_run(*STANDARD_RUN, f"+zero={zero}", f"+precision={precision}")
    out = tmp_path / "exported"
    completed = _export_ok(run.run_dir / _checkpoint(STANDARD_STEPS), out)
    assert f"exported the model of step {STANDARD_STEPS} (ZeRO-{zero}, trained in {precision})" in completed.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".exported*")), "the staging directory is left behind"

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache, "an exported model generates with the KV cache"
    logged = _logged_final_eval_loss(run, STANDARD_STEPS)
    if precision == "bf16":
        evaluated = _eval_loss_like_the_trainer(model.to(torch.bfloat16), tokenizer, STANDARD_MICRO_BATCH)
        assert evaluated == pytest.approx(logged, rel=BF16_REL)
        return
    assert _eval_loss_like_the_trainer(model, tokenizer, STANDARD_MICRO_BATCH) == pytest.approx(logged, rel=1e-5)
    if zero != "0":
        return

    # Once, from ZeRO-0 (every stage's export is the same kind of directory, its weights checked above): the
    # directory is a pretrained model for dstrain too, step 1's loss being the exported model's own loss.
    again = train(
        tmp_path, f"model.pretrained={out}", "trainer.max_steps=2", "scheduler.warmup_steps=1",
        "trainer.eval_every=0", "trainer.save_every=0", ranks=0, name="from_export",
    )
    input_ids = _first_training_batch(tokenizer, out)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss.item()
    assert again.losses()[1] == pytest.approx(expected, rel=1e-5)

    # Exporting over a finished export is refused, and leaves it alone.
    repeated = _export(run.run_dir / _checkpoint(STANDARD_STEPS), out)
    assert repeated.returncode == 2
    assert f"dstrain: config error: the output directory {out} already exists and is not empty" in repeated.stderr
    assert "Traceback" not in repeated.stderr
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_export_writes_a_usable_adapter_and_merged_model(tmp_path, shared_run, tiny_pretrained_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = shared_run(*lora_run(tiny_pretrained_dir))
    out = tmp_path / "exported"
    completed = _export_ok(run.run_dir / _checkpoint(LORA_STEPS), out, "--merged")
    assert "exported the adapter of step 12 (ZeRO-3, trained in fp32)" in completed.stdout

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_pretrained_dir)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter, "the adapter holds no tensors"
    for name, tensor in adapter.items():
        assert tensor.numel() > 0, f"{name} is empty: {tensor.shape}"
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert len(lora_b) == 2 * 7, sorted(lora_b)  # 2 layers x 7 target projections
    for name, tensor in lora_b.items():
        assert tensor.abs().max() > 0, f"{name} is still zero: the adapter never trained"

    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not list((out / "merged").glob("adapter_*")), "the merged model is a plain model"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out / "merged").get_vocab() == tokenizer.get_vocab()

    input_ids = _first_training_batch(tokenizer, tiny_pretrained_dir)["input_ids"]
    with torch.no_grad():
        adapter_logits = with_adapter(input_ids=input_ids).logits
        merged_logits = merged(input_ids=input_ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)

    logged = _logged_final_eval_loss(run, LORA_STEPS)
    pretrained = str(tiny_pretrained_dir)
    evaluated = _eval_loss_like_the_trainer(with_adapter, tokenizer, LORA_MICRO_BATCH, pretrained)
    assert evaluated == pytest.approx(logged, rel=1e-5)
    evaluated = _eval_loss_like_the_trainer(merged, tokenizer, LORA_MICRO_BATCH, pretrained)
    assert evaluated == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
def test_export_of_something_that_is_not_a_checkpoint_is_refused(tmp_path):
    not_a_checkpoint = tmp_path / "run"
    not_a_checkpoint.mkdir()
    out = tmp_path / "exported"
    completed = _export(not_a_checkpoint, out, module=True)
    assert completed.returncode == 2, completed.stderr[-4000:]
    assert completed.stderr.strip().splitlines() == [
        f"dstrain: checkpoint error: {not_a_checkpoint} is not a complete dstrain checkpoint (no manifest.json). "
        f"Give a checkpoints/step_* directory that has one."
    ]
    assert not out.exists()

    missing = _export(tmp_path / "nowhere", out, module=True)
    assert missing.returncode == 2
    assert "is not a complete dstrain checkpoint (no manifest.json)" in missing.stderr

    usage = _export(not_a_checkpoint, module=True)
    assert usage.returncode == 2
    assert "the following arguments are required: OUTPUT_DIR" in usage.stderr


def test_the_config_comes_back_from_a_manifest_and_an_unknown_key_is_named():
    from dataclasses import asdict

    from dstrain.config import TrainConfig, flatten
    from dstrain.errors import CheckpointError
    from dstrain.loading import train_config_from_manifest

    cfg = TrainConfig()
    cfg.logger.wandb.tags = ["a"]
    cfg.model.hidden_size = 128
    cfg.run.name = "resolved-at-training"
    assert train_config_from_manifest({"config": flatten(asdict(cfg))}) == cfg
    with pytest.raises(CheckpointError, match=r"has model\.bogus, which this version of dstrain does not know"):
        train_config_from_manifest({"config": {**flatten(asdict(cfg)), "model.bogus": 1}})
