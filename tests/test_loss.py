"""The loss step: the mean over counted tokens of the whole step, whatever the split into micro-batches,
accumulation steps and ranks."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import REPO, _env, launch_ranks
from dstrain.config import ModelConfig
from dstrain.data import IGNORE_INDEX, counted_tokens
from dstrain.loss import step_loss, summed_token_loss
from dstrain.model import llama_config

PROBE = REPO / "tests" / "probes" / "masked_step.py"


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(llama_config(ModelConfig()), dtype=torch.float32)


def _masked_batches():
    torch.manual_seed(1)
    batches = []
    for rows, masked in ((2, 5), (2, 25)):
        input_ids = torch.randint(0, 258, (rows, 32))
        labels = input_ids.clone()
        labels[:, :masked] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def _per_token_mean(model, batches):
    """The reference: every counted position of every batch in one cross-entropy mean."""
    logits, targets = [], []
    for batch in batches:
        logits.append(model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, 258))
        targets.append(batch["labels"][:, 1:].reshape(-1))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE_INDEX)


def test_counted_tokens_skip_the_first_position_and_masked_labels():
    batch = _masked_batches()[0]
    assert counted_tokens(batch) == 2 * (32 - 5)


def test_the_model_own_loss_is_the_summed_loss_over_counted_tokens():
    model = _model()
    batch = _masked_batches()[1]
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert summed_token_loss(model, batch) / counted_tokens(batch) == pytest.approx(own.item(), rel=1e-6)


def test_micro_batches_weigh_by_their_counted_tokens_in_value_and_gradient():
    model, batches = _model(), _masked_batches()
    counted = sum(counted_tokens(batch) for batch in batches)

    losses = [step_loss(model, batch, counted, len(batches)) for batch in batches]
    # DeepSpeed divides each backward by the accumulation steps; the mean does the same here.
    stepped = torch.stack(losses).mean()
    stepped.backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    reference = _per_token_mean(model, batches)
    reference.backward()

    assert stepped.item() == pytest.approx(reference.item(), rel=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        mean_of_means = sum(model(**batch).loss for batch in batches) / len(batches)
    assert abs(mean_of_means.item() - reference.item()) > 1e-3, "the batches are too alike to tell the two apart"


def _probe(tmp_path, name: str, micro_batch_size: int, ranks: int):
    out = tmp_path / f"{name}.pt"
    launcher = launch_ranks(ranks) if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(PROBE), str(out), str(micro_batch_size)], cwd=tmp_path, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    return torch.load(out)


@pytest.mark.slow
def test_an_unevenly_masked_step_is_the_same_however_it_is_split(tmp_path):
    """One micro-batch of 4 on one rank, two accumulated micro-batches of 2, and two ranks of 2 give the same
    loss and the same update of every weight."""
    whole = _probe(tmp_path, "whole", 4, ranks=1)
    accumulated = _probe(tmp_path, "accumulated", 2, ranks=1)
    two_ranks = _probe(tmp_path, "two_ranks", 2, ranks=2)

    for split in (accumulated, two_ranks):
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        for name, update in whole["updates"].items():
            assert update.abs().max() > 0, f"{name} did not train"
            torch.testing.assert_close(split["updates"][name], update, rtol=1e-4, atol=1e-7, msg=name)


def _full_logits_loss(model, batch, virtual_tokens: int = 0):
    """The reference: every position's full-vocabulary logits at once, in fp32, as plain training would."""
    logits = model(input_ids=batch["input_ids"]).logits[:, virtual_tokens:].float()
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _trained_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _peft(kind: str):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if kind == "lora"
              else PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    return get_peft_model(_model(), config)


@pytest.mark.parametrize("kind", ["full", "lora", "prompt"])
@pytest.mark.parametrize("chunks", [1, 5, 200])  # 5 divides no count of positions here; 200 leaves empty chunks
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(kind, chunks):
    model = _model() if kind == "full" else _peft(kind)
    batch = _masked_batches()[1]  # 25 of 32 labels masked per row: 2 x 6 counted positions
    chunked = summed_token_loss(model, batch, chunks=chunks)
    chunked_grads = _trained_grads(model, chunked)
    reference = _full_logits_loss(model, batch, virtual_tokens=3 if kind == "prompt" else 0)
    reference_grads = _trained_grads(model, reference)

    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    assert chunked_grads.keys() == reference_grads.keys() and chunked_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
