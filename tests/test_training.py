"""Real multi-rank training on CPU: DeepSpeed engines in separate processes, talking over gloo."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import STANDARD_RUN, train

SHORT = ("trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", "trainer.save_every=0")


def _assert_learns(losses: dict, steps: int):
    assert sorted(losses) == list(range(1, steps + 1))
    values = [losses[step] for step in sorted(losses)]
    assert all(math.isfinite(value) for value in values)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < 0.95 * first, f"loss did not fall: {values}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", ["0", "1", "2", "3"])
def test_two_ranks_train_with_every_zero_stage_and_precision(shared_run, zero, precision):
    run = shared_run(*STANDARD_RUN, f"+zero={zero}", f"+precision={precision}")
    _assert_learns(run.losses(), 24)
    assert "global batch: 64 sequences" in run.output
    assert run.output.count("run directory:") == 1, "only rank 0 reports"
    assert (run.run_dir / "checkpoints" / "step_00000024" / "manifest.json").is_file()
    if zero == "3":
        assert "ZeRO-3: 21 of 21 parameter tensors partitioned as they were built" in run.output


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["2_offload", "3_offload"])
def test_offload_presets_train(tmp_path, zero):
    run = train(tmp_path, f"+zero={zero}", *SHORT)
    _assert_learns(run.losses(), 12)


@pytest.mark.slow
def test_zero0_and_zero3_give_the_same_losses_in_fp32(shared_run):
    zero0 = shared_run(*STANDARD_RUN, "+zero=0", "+precision=fp32").losses()
    zero3 = shared_run(*STANDARD_RUN, "+zero=3", "+precision=fp32").losses()
    assert zero0.keys() == zero3.keys()
    for step in zero0:
        assert zero3[step] == pytest.approx(zero0[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path):
    accumulated = train(
        tmp_path, "+zero=2", *SHORT, "trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=2",
        name="accumulated",
    )
    single = train(tmp_path, "+zero=2", *SHORT, "trainer.micro_batch_size=4", name="single")
    assert "micro-batch 2 x accumulation 2 x 2 ranks" in accumulated.output
    for step, loss in single.losses().items():
        assert accumulated.losses()[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_lora_under_zero3_with_gradient_checkpointing(tmp_path, tiny_pretrained_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = train(
        tmp_path, f"model.pretrained={tiny_pretrained_dir}", "+peft=lora", "+zero=3",
        "trainer.gradient_checkpointing=true", "optim.lr=1e-2", *SHORT,
    )
    assert re.search(r"parameters, [\d,]+ trainable", run.output)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run.run_dir / "checkpoints"), tag="step_00000012")
    original = load_file(tiny_pretrained_dir / "model.safetensors")

    lora_b = {name: tensor for name, tensor in trained.items() if "lora_B" in name}
    assert len(lora_b) == 2 * 7, sorted(lora_b)  # 2 layers x 7 target projections
    for name, tensor in lora_b.items():
        assert tensor.numel() > 0 and tensor.abs().max() > 0, f"{name} never trained"

    base = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor
        for name, tensor in trained.items()
        if "lora_" not in name
    }
    assert base.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), f"frozen weight {name} changed"


@pytest.mark.slow
def test_default_run_learns_saves_and_resumes(tmp_path):
    """`deepspeed launch/train.py` exactly as a new user types it, then a longer run that picks it up."""
    from conftest import TRAIN, _env
    import subprocess

    completed = subprocess.run(
        ["deepspeed", str(TRAIN)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    run_dir = tmp_path / "outputs" / "default"
    assert (run_dir / "checkpoints" / "step_00000200" / "manifest.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "parameters" in completed.stdout and "eval_perplexity" in completed.stdout

    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(losses) == 200
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert evals[-1] < evals[0]


@pytest.mark.slow
def test_resume_auto_continues_from_the_saved_step(tmp_path):
    first = train(tmp_path, "trainer.max_steps=20", "trainer.save_every=10", "trainer.eval_every=0", name="resumed")
    second = train(
        tmp_path, "trainer.max_steps=30", "trainer.save_every=10", "trainer.eval_every=0", "trainer.resume=auto",
        name="resumed",
    )
    assert "resumed from" in second.output and "at step 20" in second.output
    steps = [row["step"] for row in second.metrics() if "loss" in row]
    assert steps == list(range(1, 31)), "the second run must continue at step 21, not start over"
    assert (first.run_dir / "checkpoints" / "step_00000030" / "manifest.json").is_file()

    again = train(tmp_path, "trainer.max_steps=30", "trainer.save_every=10", "trainer.eval_every=0", name="resumed")
    assert "at step 30" in again.output and "done: step 30 of 30" in again.output, "a finished run stays finished"


@pytest.mark.slow
def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path):
    train(tmp_path, "trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0", name="kept")
    again = train(
        tmp_path, "trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=0",
        "trainer.resume=never", name="kept", check=False,
    )
    assert again.returncode != 0
    assert "already holds checkpoints" in again.output and "trainer.resume=auto" in again.output


@pytest.mark.slow
def test_pretrained_directory_loads_and_trains(tmp_path, tiny_pretrained_dir):
    """Weights, tokenizer and data order all come through: step 1's loss equals the saved model's own loss
    on the first batch, computed here without dstrain's trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dstrain.config import TrainConfig
    from dstrain.data import BatchPlan, packed_blocks

    run = train(tmp_path, f"model.pretrained={tiny_pretrained_dir}", *SHORT, ranks=0)
    losses = run.losses()
    _assert_learns(losses, 12)

    cfg = TrainConfig()
    cfg.model.pretrained = str(tiny_pretrained_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained_dir)
    plan = BatchPlan(packed_blocks(cfg, tokenizer, "train"), cfg.trainer.seed, cfg.trainer.micro_batch_size, 1, 1, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_pretrained_dir, dtype=torch.float32)
    input_ids = plan.micro_batch(0, 0)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss.item()
    assert losses[1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_checkpoint_from_another_model_is_refused(tmp_path):
    train(tmp_path, *SHORT, name="shape")
    wider = train(tmp_path, *SHORT, "model.hidden_size=128", "trainer.resume=auto", name="shape", check=False)
    assert wider.returncode != 0
    assert "is from another model" in wider.output
    assert "[258, 64] in the checkpoint but [258, 128] in this model" in wider.output


@pytest.mark.slow
def test_trains_on_local_jsonl_files(tmp_path):
    import json

    from dstrain.data import builtin_documents

    for split, count, seed in (("train", 600, 1), ("val", 60, 2)):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for text in builtin_documents(count, seed):
                handle.write(json.dumps({"id": seed, "body": text}) + "\n")
    run = train(
        tmp_path, "+data=files", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
        f"data.val_files=[{tmp_path / 'val.jsonl'}]", "data.text_field=body", "data.seq_len=64",
        "trainer.max_steps=12", "scheduler.warmup_steps=2", "trainer.eval_every=6", "trainer.eval_batches=2",
    )
    _assert_learns(run.losses(), 12)
    assert len([row for row in run.metrics() if "eval_loss" in row]) == 2


@pytest.mark.slow
def test_malformed_data_line_stops_the_run_with_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a fine line"}\n{"text": oops}\n')
    run = train(
        tmp_path, "+data=files", f"data.train_files=[{data}]", "trainer.eval_every=0", *SHORT[:2], check=False,
    )
    assert run.returncode != 0
    assert f"dstrain: data error: {data}:2: not valid JSON" in run.output


# Per-step losses of the shared matrix runs (STANDARD_RUN, +zero=2) as dstrain trained them before batches
# became dicts with labels and the loss a sum over counted tokens (commit abeeb02, this machine). Plain text
# counts every token, so the per-token mean must reproduce them bit for bit.
LOSSES_BEFORE_THE_LOSS_STEP = {
    "fp32": [5.585334062576294, 5.472186088562012, 5.311819553375244, 5.187955617904663, 5.083409786224365,
             4.996175527572632, 4.920519828796387, 4.844524145126343, 4.766032457351685, 4.6965460777282715,
             4.620702028274536, 4.55220365524292, 4.49271821975708, 4.438019275665283, 4.38756251335144,
             4.3435022830963135, 4.312376976013184, 4.277552127838135, 4.2591118812561035, 4.23515510559082,
             4.21935772895813, 4.203160285949707, 4.183105707168579, 4.176376104354858],
    "bf16": [5.585426568984985, 5.4740149974823, 5.313582897186279, 5.190142869949341, 5.085685729980469,
             4.996525049209595, 4.920985460281372, 4.8452794551849365, 4.767150640487671, 4.697762727737427,
             4.622577667236328, 4.554826021194458, 4.4959611892700195, 4.441624402999878, 4.391587495803833,
             4.347817420959473, 4.3146748542785645, 4.277927875518799, 4.260083436965942, 4.236288070678711,
             4.220374822616577, 4.204298973083496, 4.184406995773315, 4.177905559539795],
}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_text_losses_are_the_ones_before_the_per_token_loss(shared_run, precision):
    losses = shared_run(*STANDARD_RUN, "+zero=2", f"+precision={precision}").losses()
    assert [losses[step] for step in sorted(losses)] == LOSSES_BEFORE_THE_LOSS_STEP[precision]
