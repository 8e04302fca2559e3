"""Packed rows and padded micro-batches give every sample the loss and logits it has alone, on a real tiny Llama
under sdpa and eager; the boundary and padding labels never count; packing is deterministic."""

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from dstrain.config import ModelConfig
from dstrain.data import IGNORE_INDEX, counted_tokens, pad_batch
from dstrain.loss import summed_token_loss
from dstrain.model import llama_config
from dstrain.packing import (
    PackingConfig,
    best_fit_decreasing_rows,
    greedy_rows,
    pack,
    packing_efficiency,
)

SEQ_LEN = 64
PAD_ID = 257
# Greedy packs the first three into a row with 13 slots of padding and the next three into a full row.
LENGTHS = [17, 23, 11, 20, 30, 14]
ROWS = [[0, 1, 2], [3, 4, 5]]
GREEDY = PackingConfig(strategy="greedy")
# Sums of ~20 token losses of ~5.5 each in fp32: a few ulps of 100.
EXACT = 5e-5


def _sample(length: int, prompt: int, generator: torch.Generator) -> dict:
    """Random tokens whose first `prompt` labels are masked, like an instruction sample."""
    input_ids = torch.randint(0, 256, (length,), generator=generator).tolist()
    prompt = min(prompt, length)
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * prompt + input_ids[prompt:]}


def _samples():
    generator = torch.Generator().manual_seed(0)
    # The second sample counts its first label alone, so the boundary rule has something to remove.
    return [_sample(length, 0 if i == 1 else 4, generator) for i, length in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def packed():
    return pack(datasets.Dataset.from_dict(_columns(_samples())), SEQ_LEN, PAD_ID, GREEDY)


def _columns(samples):
    return {key: [sample[key] for sample in samples] for key in ("input_ids", "labels")}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        llama_config(ModelConfig()), attn_implementation=request.param, dtype=torch.float32
    )
    assert model.config._attn_implementation == request.param
    return model.eval()


def _row_batch(packed, row: int) -> dict:
    return {key: torch.tensor([packed[row][key]]) for key in ("input_ids", "labels", "position_ids")}


def _spans(row: int):
    """(sample index, first slot, length) of each sample greedy put in `row`, in data order."""
    start = 0
    for index in ROWS[row]:
        yield index, start, LENGTHS[index]
        start += LENGTHS[index]


def _only(labels: torch.Tensor, row: int, start: int, length: int) -> torch.Tensor:
    """`labels` with every position outside one sample's slots ignored."""
    kept = torch.full_like(labels, IGNORE_INDEX)
    kept[row, start : start + length] = labels[row, start : start + length]
    return kept


def _alone(sample: dict) -> dict:
    return {key: torch.tensor([sample[key]]) for key in ("input_ids", "labels")}


def _loss_differences(model, packed, row: int, **extra) -> list:
    samples, batch = _samples(), {**_row_batch(packed, row), **extra}
    differences = []
    with torch.no_grad():
        for index, start, length in _spans(row):
            inside = summed_token_loss(model, {**batch, "labels": _only(batch["labels"], 0, start, length)})
            alone = summed_token_loss(model, _alone(samples[index]))
            differences.append(abs(inside.item() - alone.item()))
    return differences


@pytest.mark.parametrize("row", [0, 1], ids=["with-padding", "full"])
def test_each_packed_sample_has_its_loss_alone(model, packed, row):
    assert max(_loss_differences(model, packed, row)) < EXACT


@pytest.mark.parametrize("row", [0, 1], ids=["with-padding", "full"])
def test_each_packed_sample_has_its_logits_alone(model, packed, row):
    batch, samples = _row_batch(packed, row), _samples()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for index, start, length in _spans(row):
            assert batch["input_ids"][0, start : start + length].tolist() == samples[index]["input_ids"]
            alone = model(input_ids=torch.tensor([samples[index]["input_ids"]])).logits[0]
            assert (logits[start : start + length] - alone).abs().max().item() < 1e-5


def test_an_attention_mask_of_ones_leaks_across_packed_samples(model, packed):
    """The negative control: without packed-sequence detection, later samples see earlier ones."""
    ones = torch.ones(1, SEQ_LEN, dtype=torch.long)
    first, *later = _loss_differences(model, packed, 1, attention_mask=ones)
    assert first < EXACT and min(later) > 1e-3


def test_each_padded_sample_has_its_loss_alone(model):
    samples = _samples()[:3]
    batch = pad_batch(samples, PAD_ID)
    with torch.no_grad():
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            inside = summed_token_loss(model, {**batch, "labels": _only(batch["labels"], row, 0, length)})
            alone = summed_token_loss(model, _alone(sample))
            assert abs(inside.item() - alone.item()) < EXACT
        whole = summed_token_loss(model, batch).item()
        assert whole == pytest.approx(sum(summed_token_loss(model, _alone(s)).item() for s in samples), abs=EXACT)


def test_pad_batch_rounds_up_and_masks_the_padding():
    samples = _samples()[:3]
    batch = pad_batch(samples, PAD_ID)
    assert batch["input_ids"].shape == (3, 24)  # longest 23, rounded up to a multiple of 8
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        assert batch["input_ids"][row, :length].tolist() == sample["input_ids"]
        assert batch["labels"][row, :length].tolist() == sample["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (24 - length)
        assert set(batch["input_ids"][row, length:].tolist()) <= {PAD_ID}
        assert set(batch["labels"][row, length:].tolist()) <= {IGNORE_INDEX}
    assert pad_batch(samples, PAD_ID, multiple_of=1)["input_ids"].shape == (3, 23)


def test_the_first_token_of_every_packed_sample_is_not_counted(packed):
    samples = _samples()
    for row in (0, 1):
        labels = _row_batch(packed, row)["labels"]
        for index, start, length in _spans(row):
            assert labels[0, start].item() == IGNORE_INDEX
            assert labels[0, start + 1 : start + length].tolist() == samples[index]["labels"][1:]
        # Packed, each sample counts exactly the tokens it counts alone.
        assert counted_tokens({"labels": labels}) == sum(counted_tokens(_alone(samples[i])) for i in ROWS[row])


def test_padding_is_a_sample_of_its_own_that_never_counts(packed):
    row = _row_batch(packed, 0)
    fill = sum(LENGTHS[i] for i in ROWS[0])
    assert row["input_ids"][0, fill:].tolist() == [PAD_ID] * (SEQ_LEN - fill)
    assert row["labels"][0, fill:].tolist() == [IGNORE_INDEX] * (SEQ_LEN - fill)
    assert row["position_ids"][0].tolist() == [p for i in ROWS[0] for p in range(LENGTHS[i])] + list(
        range(SEQ_LEN - fill)
    )


def test_a_packed_micro_batch_trains_on_its_samples_not_its_rows(packed):
    """samples_per_s counts conversations: six in two packed rows (the padding tail is none), three padded rows."""
    from dstrain.step_stats import samples_in

    both = {key: torch.tensor([packed[0][key], packed[1][key]]) for key in ("input_ids", "labels", "position_ids")}
    assert samples_in(both) == len(LENGTHS)
    assert samples_in(_row_batch(packed, 0)) == len(ROWS[0])
    assert samples_in(pad_batch(_samples()[:3], PAD_ID)) == 3


def test_packing_efficiency_counts_the_trailing_padding(packed):
    assert packing_efficiency(packed) == pytest.approx(sum(LENGTHS) / (2 * SEQ_LEN))


def _segments(packed):
    """Every sample of every packed row, as its input_ids, cut where positions restart; padding left out."""
    for row in packed:
        starts = [at for at, position in enumerate(row["position_ids"]) if position == 0] + [SEQ_LEN]
        for start, end in zip(starts, starts[1:]):
            if row["input_ids"][start:end] != [PAD_ID] * (end - start):
                yield row["input_ids"][start:end]


@pytest.mark.parametrize("strategy", ["greedy", "best_fit_decreasing"])
def test_packing_is_deterministic_and_keeps_every_sample_once(strategy):
    generator = torch.Generator().manual_seed(1)
    # At least 4 tokens with 2 masked: every sample counts a label, so none passes for padding.
    lengths = torch.randint(4, SEQ_LEN + 1, (300,), generator=generator).tolist()
    samples = [_sample(n, 2, generator) for n in lengths]
    dataset = datasets.Dataset.from_dict(_columns(samples))
    config = PackingConfig(strategy=strategy, window=128)
    first, second = pack(dataset, SEQ_LEN, PAD_ID, config), pack(dataset, SEQ_LEN, PAD_ID, config)
    assert first.to_dict() == second.to_dict()
    assert all(len(row) == SEQ_LEN for column in first.to_dict().values() for row in column)
    assert sorted(_segments(first)) == sorted(sample["input_ids"] for sample in samples)
    assert packing_efficiency(first) == pytest.approx(sum(lengths) / (len(first) * SEQ_LEN))


def test_the_placements():
    assert greedy_rows([3, 5, 2, 4, 6], 8) == [[0, 1], [2, 3], [4]]
    # Longest first: 6, 5, 4 open rows; 3 fills the row with 3 free, 2 the row with 2 free.
    assert best_fit_decreasing_rows([3, 5, 2, 4, 6], 8) == [[2, 4], [0, 1], [3]]
    assert greedy_rows([], 8) == best_fit_decreasing_rows([], 8) == []


def test_empty_samples_hold_no_slot():
    samples = datasets.Dataset.from_dict({"input_ids": [[], [1, 2], []], "labels": [[], [1, 2], []]})
    packed = pack(samples, 4, PAD_ID)
    assert packed.to_dict() == {
        "input_ids": [[1, 2, PAD_ID, PAD_ID]], "labels": [[IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]],
        "position_ids": [[0, 1, 0, 1]],
    }


@pytest.mark.parametrize(
    "columns, settings, message",
    [
        ({"input_ids": [[1, 2], [1] * 9], "labels": [[1, 2], [1] * 9]}, GREEDY, "sample 1 has 9 tokens"),
        ({"input_ids": [[1, 2, 3]], "labels": [[1, 2]]}, GREEDY, "3 input_ids but 2 labels"),
        ({"input_ids": [[1]]}, GREEDY, "missing \\['labels'\\]"),
        ({"input_ids": [[1]], "labels": [[1]]}, PackingConfig(strategy="first_fit"), "unknown packing strategy"),
    ],
)
def test_pack_refuses_what_it_cannot_pack(columns, settings, message):
    with pytest.raises(ValueError, match=message):
        pack(datasets.Dataset.from_dict(columns), 8, PAD_ID, settings)


def test_pad_batch_refuses_misaligned_labels():
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        pad_batch([{"input_ids": [1, 2], "labels": [1]}], PAD_ID)
