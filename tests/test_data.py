"""Tokenizer, packing and the per-rank batch order, in process."""

import json

import pytest
import torch

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError, DataError
from dstrain.data import (
    BatchPlan, build_tokenizer, builtin_documents, byte_level_tokenizer, counted_tokens, packed_blocks,
)


def _files_config(paths, seq_len=16) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.name = "files"
    cfg.data.train_files = [str(path) for path in paths]
    cfg.data.seq_len = seq_len
    return cfg


def test_byte_level_tokenizer_round_trips_any_text():
    tokenizer = byte_level_tokenizer()
    assert len(tokenizer) == 258
    text = "Grüße, 世界! tabs\tand  spaces"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id in (256, 257)


def test_builtin_documents_are_deterministic_per_seed():
    assert list(builtin_documents(5, seed=1)) == list(builtin_documents(5, seed=1))
    assert list(builtin_documents(5, seed=1)) != list(builtin_documents(5, seed=2))


def test_jsonl_documents_are_packed_into_full_blocks_with_eos_between(tmp_path):
    path = tmp_path / "train.jsonl"
    documents = ["first document", "second one", "a third, longer document to fill blocks"]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents) + "\n")
    tokenizer = byte_level_tokenizer()
    blocks = packed_blocks(_files_config([path]), tokenizer, "train")

    stream = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = [stream[i : i + 16] for i in range(0, len(stream) - len(stream) % 16, 16)]
    assert blocks[:]["input_ids"].tolist() == expected


def test_text_files_are_one_document_per_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("line one\n\nline two\n" * 20)
    blocks = packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")
    decoded = byte_level_tokenizer().decode(blocks[:]["input_ids"].flatten().tolist())
    assert decoded.startswith("line one</s>line two</s>line one")


def test_changed_file_is_tokenised_again(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "a" * 40}) + "\n")
    first = packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")
    path.write_text(json.dumps({"text": "b" * 40}) + "\n")
    second = packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")
    assert first[:]["input_ids"].tolist() != second[:]["input_ids"].tolist()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut off\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")


def test_missing_text_field_names_the_field_and_the_fix(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "elsewhere"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: no string field 'text'.*data.text_field"):
        packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        packed_blocks(_files_config([tmp_path / "nope.jsonl"]), byte_level_tokenizer(), "train")


def test_too_little_data_for_one_block_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n")
    with pytest.raises(ConfigError, match="no block of data.seq_len=16"):
        packed_blocks(_files_config([path]), byte_level_tokenizer(), "train")


def test_tokenizer_from_a_pretrained_directory(tmp_path):
    byte_level_tokenizer().save_pretrained(tmp_path)
    cfg = TrainConfig()
    cfg.model.pretrained = str(tmp_path)
    assert build_tokenizer(cfg)("hi")["input_ids"] == byte_level_tokenizer()("hi")["input_ids"]


def _blocks(count: int):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[i] * 4 for i in range(count)]}).with_format("torch")


def _step_blocks(plan: BatchPlan, step: int):
    consumed = (step - 1) * plan.global_batch
    return [int(row[0]) for micro in range(plan.accumulation_steps) for row in plan.micro_batch(consumed, micro)["input_ids"]]


def test_ranks_read_disjoint_shards_that_make_up_the_global_batch():
    blocks = _blocks(50)
    plans = [BatchPlan(blocks, seed=3, micro_batch_size=2, accumulation_steps=2, world_size=2, rank=r) for r in (0, 1)]
    single = BatchPlan(blocks, seed=3, micro_batch_size=8, accumulation_steps=1, world_size=1, rank=0)
    for step in (1, 2, 7):
        per_rank = [_step_blocks(plan, step) for plan in plans]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(_step_blocks(single, step))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    blocks = _blocks(12)
    plan = BatchPlan(blocks, seed=3, micro_batch_size=4, accumulation_steps=1, world_size=1, rank=0)
    epoch0 = [i for step in (1, 2, 3) for i in _step_blocks(plan, step)]
    epoch1 = [i for step in (4, 5, 6) for i in _step_blocks(plan, step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    again = BatchPlan(blocks, seed=3, micro_batch_size=4, accumulation_steps=1, world_size=1, rank=0)
    assert [i for step in (1, 2, 3) for i in _step_blocks(again, step)] == epoch0
    other_seed = BatchPlan(blocks, seed=4, micro_batch_size=4, accumulation_steps=1, world_size=1, rank=0)
    assert [i for step in (1, 2, 3) for i in _step_blocks(other_seed, step)] != epoch0
    assert plan.epoch_of_sample(11) == 0 and plan.epoch_of_sample(12) == 1


def test_fewer_blocks_than_a_global_batch_is_an_error():
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        BatchPlan(_blocks(10), seed=0, micro_batch_size=8, accumulation_steps=1, world_size=2, rank=0)


def test_micro_batches_are_dicts_of_token_tensors_in_which_every_token_counts():
    batch = BatchPlan(_blocks(10), seed=0, micro_batch_size=2, accumulation_steps=1, world_size=1, rank=0).micro_batch(0, 0)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 4)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr(), "masking labels must not touch the inputs"
    assert counted_tokens(batch) == 2 * 3
