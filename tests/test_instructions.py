"""The instruction-data pipeline in process, on the byte-level tokenizer with the built-in alpaca template and on
SmolLM2's real tokenizer with its own ChatML template: records to the rows the trainer reads."""

import json

import datasets
import pytest
import torch

from dstrain.config import TrainConfig
from dstrain.data import IGNORE_INDEX, BatchPlan, byte_level_tokenizer, collate, pad_batch, pad_id
from dstrain.errors import ConfigError, DataError
from dstrain.instructions import prepare_instruction_data, report_lines, truncated
from dstrain.preparation import data_fingerprint

QUESTIONS = ["Name a primary colour.", "What is 2 + 3?", "Translate 'cat' to French.", "Give a synonym of big.",
             "Spell 'tree' backwards.", "What is the capital of Italy?", "请用一句话介绍长城。", "列出三种水果。"]
ANSWERS = ["Red.", "5.", "Chat.", "Large.", "eert.", "Rome.", "长城是中国古代修建的防御工事。", "苹果、香蕉和橙子。"]


def _alpaca_records(count: int):
    return [{"instruction": f"{QUESTIONS[i % 8]} (#{i})", "input": "Be brief." if i % 3 == 0 else "",
             "output": f"{ANSWERS[i % 8]} ({i})"} for i in range(count)]


def _config(tmp_path, records, **data) -> TrainConfig:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    cfg = TrainConfig()
    cfg.data.name, cfg.data.format, cfg.data.template = "files", "alpaca", "alpaca"
    cfg.data.train_files, cfg.data.seq_len = [str(path)], 512
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _prepare(cfg, tokenizer=None):
    tokenizer = tokenizer or byte_level_tokenizer()
    return prepare_instruction_data(cfg, tokenizer, data_fingerprint(cfg, tokenizer))


def _counted_texts(rows: datasets.Dataset, tokenizer):
    """The counted stretches of every row, decoded (a stretch ends where counting stops or a sample starts)."""
    texts = []
    for row in rows:
        labels = list(row["labels"])
        positions = list(row.get("position_ids", range(len(labels))))
        current = []
        for index, label in enumerate(labels):
            if label == IGNORE_INDEX or positions[index] == 0:
                if current:
                    texts.append(tokenizer.decode(current))
                current = []
            if label != IGNORE_INDEX:
                current.append(label)
        if current:
            texts.append(tokenizer.decode(current))
    return texts


def test_only_the_answers_and_eos_count_in_the_packed_rows(tmp_path):
    splits, report, _ = _prepare(_config(tmp_path, _alpaca_records(40)))
    assert set(splits) == {"train"} and report["splits"]["train"]["samples"] == 40
    train = splits["train"]
    assert len(train) < 40 and "position_ids" in train.column_names  # several samples per packed row
    # The first token of a sample is never counted (nothing before it predicts it), so the first answer byte
    # is counted only when it is not the sample's first token: it never is, the prompt comes first.
    counted = sorted(_counted_texts(train, byte_level_tokenizer()))
    assert counted == sorted(f"{ANSWERS[i % 8]} ({i})</s>" for i in range(40))


def test_smollm2_chatml_counts_answers_and_im_end(tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    records = [{"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": f"{QUESTIONS[i % 8]} (#{i})"},
                             {"role": "assistant", "content": ANSWERS[i % 8]},
                             {"role": "user", "content": "And again?"},
                             {"role": "assistant", "content": f"Again: {ANSWERS[i % 8]}"}]} for i in range(16)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    cfg = _config(tmp_path, [], format="messages", template="auto", train_files=[str(path)], seq_len=512)
    splits, _, template = _prepare(cfg, tokenizer)
    assert template == tokenizer.chat_template
    counted = _counted_texts(splits["train"], tokenizer)
    expected = [f"{answer}<|im_end|>" for i in range(16) for answer in (ANSWERS[i % 8], f"Again: {ANSWERS[i % 8]}")]
    assert sorted(counted) == sorted(expected)
    cfg.data.last_turn_only = True
    last_only = _counted_texts(_prepare(cfg, tokenizer)[0]["train"], tokenizer)
    assert sorted(last_only) == sorted(f"Again: {ANSWERS[i % 8]}<|im_end|>" for i in range(16))


def test_a_malformed_record_stops_preparation_naming_file_index_and_field(tmp_path):
    records = _alpaca_records(5)
    del records[3]["output"]
    with pytest.raises(DataError, match=r"alpaca\.json\[3\]: field 'output' is missing"):
        _prepare(_config(tmp_path, records))


def test_truncation_keeps_the_last_answer_or_else_the_start():
    ids = list(range(10))
    labels = [IGNORE_INDEX] * 6 + [6, 7, 8, 9]
    assert truncated(ids, labels, 6) == (ids[-6:], labels[-6:], True)
    assert truncated(ids, labels, 3) == (ids[:3], labels[:3], False)
    two_answers = [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert truncated(ids, two_answers, 4) == (ids[-4:], two_answers[-4:], True)  # the last answer is [9]
    assert truncated(ids, labels, 10) == (ids, labels, True)


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_samples_longer_than_seq_len_are_truncated_or_dropped_and_counted(tmp_path, too_long):
    records = _alpaca_records(20)
    for record in records[:5]:
        record["input"] = "context " * 50  # 400 bytes more than the others: over seq_len=512
    splits, report, _ = _prepare(_config(tmp_path, records, too_long=too_long, packing=False))
    section = report["splits"]["train"]
    lengths = [len(row) for row in splits["train"]["input_ids"]]
    assert max(lengths) <= 512
    if too_long == "drop":
        assert section["samples"] == 15 and section["length"]["dropped"]["longer than data.seq_len"] == 5
    else:
        assert section["samples"] == 20 and section["truncated"] == {"kept_the_answer": 5, "cut_the_answer": 0}
        assert any("5 keeping the last answer whole" in line for line in report_lines(report))


def test_the_split_is_by_content_so_adding_records_moves_none(tmp_path):
    counts = {name: section["samples"] for name, section in
              _prepare(_config(tmp_path, _alpaca_records(200), split=[0.7, 0.2, 0.1]))[1]["splits"].items()}
    assert sum(counts.values()) == 200 and 120 < counts["train"] < 160 and 10 < counts["test"] < 30, counts
    small = _split_texts(tmp_path, _alpaca_records(200))
    large = _split_texts(tmp_path, _alpaca_records(400))
    for name in small:
        assert small[name] <= large[name], name


def _split_texts(tmp_path, records):
    tokenizer = byte_level_tokenizer()
    splits, _, _ = _prepare(_config(tmp_path, records, split=[0.7, 0.2, 0.1], packing=False))
    return {name: {tokenizer.decode(ids) for ids in rows["input_ids"]} for name, rows in splits.items()}


def test_cleaning_drops_duplicates_before_the_split_and_reports_them(tmp_path):
    records = _alpaca_records(30)
    records += [dict(records[4]), dict(records[7], output=records[7]["output"] + "  ")]  # exact after normalising
    _, report, _ = _prepare(_config(tmp_path, records, split=[0.8, 0.2]))
    assert report["cleaning"]["rows_in"] == 32 and report["cleaning"]["dropped"]["exact duplicate"] == 2


def test_sources_mix_by_weight_and_row_cap(tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in _alpaca_records(10)))
    two.write_text("".join(json.dumps(dict(r, output=r["output"] + " (two)")) + "\n" for r in _alpaca_records(40)))
    cfg = _config(tmp_path, [], train_files=[str(one), str(two)], train_weights=[2.0, 1.0], train_max_rows=[0, 20])
    cfg.data.clean.exact_dedup = False  # weight 2 repeats every row of the first source
    _, report, _ = _prepare(cfg)
    assert report["splits"]["train"]["samples"] == 2 * 10 + 20


def test_unpacked_rows_pad_each_micro_batch_to_a_multiple_of_8(tmp_path):
    tokenizer = byte_level_tokenizer()
    splits, _, _ = _prepare(_config(tmp_path, _alpaca_records(16), packing=False))
    rows = splits["train"].with_format("torch")
    plan = BatchPlan(rows, seed=0, micro_batch_size=4, accumulation_steps=1, world_size=1, rank=0,
                     pad_id=pad_id(tokenizer))
    batch = plan.micro_batch(0, 0)
    assert batch["input_ids"].shape[1] % 8 == 0 and set(batch) == {"input_ids", "labels", "attention_mask"}
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["input_ids"][~real] == tokenizer.eos_token_id).all()


def test_packed_rows_reach_the_model_with_position_ids_and_no_attention_mask(tmp_path):
    splits, _, _ = _prepare(_config(tmp_path, _alpaca_records(16)))
    batch = collate(splits["train"].with_format("torch")[:2], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 512) and batch["position_ids"].dtype == torch.int64


def test_train_on_prompt_with_last_turn_only_is_refused(tmp_path):
    cfg = _config(tmp_path, _alpaca_records(10), train_on_prompt=True, last_turn_only=True)
    with pytest.raises(ConfigError, match="contradict"):
        _prepare(cfg)


ALPACA_FILES = ("+data=alpaca", "data.train_files=[/data/alpaca.json]")


@pytest.mark.parametrize("overrides, message", [
    ((*ALPACA_FILES, "data.train_on_prompt=true", "data.last_turn_only=true"), "contradict each other"),
    (("data.format=alpaca",), r"data.format=alpaca reads records from files, but data.name=builtin"),
    ((*ALPACA_FILES, "data.val_files=[/data/val.json]"), "either data.split or data.val_files"),
    ((*ALPACA_FILES, "data.split=[0.5,0.4]"), "sums to 0.9"),
    ((*ALPACA_FILES, "data.train_weights=[1,2]"), "data.train_weights has 2 entries for 1 data.train_files"),
    ((*ALPACA_FILES, "data.split=[1.0,0.0]"), "no validation data"),
    (("+data=files", "data.train_files=[/data/t.jsonl]", "data.split=[0.9,0.1]"), "data.split is for instruction"),
    ((*ALPACA_FILES, "data.template=chatml2"), r"data.template='chatml2' is not one of"),
    ((*ALPACA_FILES, "data.too_long=cut"), r"data.too_long='cut' is not one of"),
])
def test_impossible_data_settings_are_refused_before_any_file_is_read(overrides, message):
    from dstrain.checks import validate
    from dstrain.compose import compose

    cfg = compose([*overrides, "model.max_position_embeddings=512"], run_name="checks")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_tokens_a_step_reports_leave_out_the_padding_of_unpacked_batches():
    from dstrain.step_stats import tokens_in

    padded = pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert padded["input_ids"].numel() == 16 and tokens_in(padded) == 4
    packed = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
    assert tokens_in(packed) == 16
