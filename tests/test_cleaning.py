"""Cleaning, dedup and splits on real `datasets` and real datasketch, with English and Chinese text."""

import json
import random

import datasets
import pytest

from dstrain.cleaning import (
    CleanConfig,
    CleaningReport,
    assign_split,
    clean,
    drop_by_token_count,
    normalize_text,
    split_dataset,
)
from dstrain.errors import ConfigError, DataError

# ~100 Chinese characters; a one-character edit keeps ~0.9 of its 5-character shingles.
CHINESE = (
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习规律，而无需进行明确的编程。"
    "近年来，深度学习在图像识别、语音识别和自然语言处理等领域取得了显著的进展，改变了许多行业的工作方式。"
)
CHINESE_ONE_CHAR_EDIT = CHINESE.replace("显著", "明著")
CHINESE_OTHER = "今天天气很好，我们一起去公园散步吧。公园里有很多花，红的、黄的、白的，非常漂亮。小朋友们在草地上放风筝，老人们在树下下棋聊天。"
ENGLISH = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, "
    "sipping his coffee and wondering whether it will rain before the harvest is done."
)
ENGLISH_ONE_WORD_EDIT = ENGLISH.replace("coffee", "coffees")


def dataset_of(texts, **other_columns):
    return datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts))), **other_columns})


def only(cfg_changes=None, **changes):
    """A config with every optional step off except those given."""
    base = dict(normalize=False, exact_dedup=False, near_dedup=False)
    base.update(cfg_changes or {}, **changes)
    return CleanConfig(**base)


def run_clean(texts, cfg, **other_columns):
    report = CleaningReport()
    return clean(dataset_of(texts, **other_columns), cfg, report), report


def test_normalize_applies_nfkc_and_collapses_whitespace_including_chinese():
    assert normalize_text("  ＡＢＣ１２３\t\n x  ") == "ABC123 x"
    assert normalize_text("机器\u3000学习\n\n是 人工智能") == "机器 学习 是 人工智能"
    # Ligatures and full-width punctuation are compatibility characters too.
    assert normalize_text("ﬁne，好") == "fine,好"


def test_by_default_the_original_text_trains_and_the_normalised_one_only_compares():
    texts = ["line one\n  line two", "line one line two", "ＡＢＣ"]
    kept, report = run_clean(texts, CleanConfig())
    assert kept["text"] == ["line one\n  line two", "ＡＢＣ"]
    assert report.dropped() == {"empty": 0, "exact duplicate": 1}


def test_train_on_normalized_rewrites_the_text_column():
    kept, _ = run_clean(["line one\n  line two", "ＡＢＣ"], CleanConfig(train_on_normalized=True))
    assert kept["text"] == ["line one line two", "ABC"]


def test_empty_and_whitespace_only_samples_are_dropped():
    kept, report = run_clean(["a", "", "   ", "\u3000\n", "b"], only(normalize=True))
    assert kept["id"] == [0, 4]
    assert report.dropped() == {"empty": 3}


def test_character_limits_count_code_points_so_chinese_characters_count_one_each():
    texts = ["短", "中文句子", "a" * 10, "b" * 11, "你好世界你好世界你好"]  # lengths 1, 4, 10, 11, 10
    kept, report = run_clean(texts, only(min_chars=2, max_chars=10))
    assert kept["id"] == [1, 2, 4]
    assert report.dropped() == {"empty": 0, "too short": 1, "too long": 1}


def test_each_regex_counts_its_own_drops_and_a_row_counts_once():
    texts = ["as an AI language model I cannot", "ok", "lorem ipsum", "lorem ipsum as an AI language model", "好"]
    kept, report = run_clean(texts, only(drop_regex=[r"as an AI language model", r"^lorem"]))
    assert kept["text"] == ["ok", "好"]
    dropped = report.dropped()
    # The last text matches both: it counts under the first pattern only.
    assert dropped["regex as an AI language model"] == 2 and dropped["regex ^lorem"] == 1


def test_exact_dedup_keeps_the_first_occurrence_after_normalisation():
    texts = ["你好 世界", "hello", "你好\u3000世界", "ｈｅｌｌｏ", "你好  世界 ", "other"]
    kept, report = run_clean(texts, CleanConfig(), label=["a", "b", "c", "d", "e", "f"])
    assert kept["id"] == [0, 1, 5]
    assert kept["label"] == ["a", "b", "f"]
    assert report.dropped()["exact duplicate"] == 3


def test_near_dedup_drops_one_character_chinese_edits_at_threshold_0_8():
    texts = [CHINESE, CHINESE_OTHER, CHINESE_ONE_CHAR_EDIT]
    kept, report = run_clean(texts, CleanConfig(near_dedup=True, near_dedup_threshold=0.8))
    assert kept["id"] == [0, 1]
    assert report.dropped()["near duplicate"] == 1
    (example,) = report.near_duplicate_examples
    assert example.kept == CHINESE[:300] and example.dropped == CHINESE_ONE_CHAR_EDIT
    assert 0.8 <= example.similarity < 1.0


def test_near_dedup_keeps_the_first_and_spares_unrelated_texts():
    texts = ["Short unrelated sample number one.", ENGLISH, "Another sample about cooking pasta.", ENGLISH_ONE_WORD_EDIT]
    kept, report = run_clean(texts, CleanConfig(near_dedup=True))
    assert kept["id"] == [0, 1, 2]
    assert report.dropped()["near duplicate"] == 1


def test_near_dedup_is_off_by_default_and_examples_are_capped():
    variants = [ENGLISH + f" Variant {letter}." for letter in "ABCDEFGH"]
    kept, report = run_clean(variants, CleanConfig())
    assert len(kept) == 8 and "near duplicate" not in report.dropped()
    kept, report = run_clean(variants, CleanConfig(near_dedup=True, report_examples=3))
    assert kept["id"] == [0]
    assert len(report.near_duplicate_examples) == 3
    assert all(example.kept == variants[0] for example in report.near_duplicate_examples)


def test_other_columns_pass_through_untouched_in_order():
    texts = ["b", "a", "b", ""]
    messages = [[{"role": "user", "content": t}] for t in texts]
    kept, _ = run_clean(texts, CleanConfig(), messages=messages, score=[0.5, 1.5, 2.5, 3.5])
    assert kept.column_names == ["text", "id", "messages", "score"]
    assert kept["messages"] == [messages[0], messages[1]]
    assert kept["score"] == [0.5, 1.5]


def test_cleaning_is_deterministic():
    rng = random.Random(0)
    texts = [ENGLISH[: rng.randint(20, len(ENGLISH))] + rng.choice(["", " x", " y"]) for _ in range(300)]
    cfg = CleanConfig(near_dedup=True, min_chars=30)
    first, first_report = run_clean(texts, cfg)
    second, second_report = run_clean(texts, cfg)
    assert first["id"] == second["id"] and first_report.to_json() == second_report.to_json()


def test_report_json_and_lines():
    texts = ["x" * 20] * 3 + ["", "short", "lorem ipsum dolor sit", "y" * 20]
    cfg = CleanConfig(min_chars=6, drop_regex=["lorem"], near_dedup=True)
    kept, report = run_clean(texts, cfg, tokens=[20, 20, 20, 0, 5, 21, 20])
    kept = drop_by_token_count(kept, "tokens", min_tokens=0, max_tokens=19, report=report)
    document = json.loads(json.dumps(report.to_json()))
    assert document["rows_in"] == 7 and document["rows_out"] == 0
    assert document["dropped"] == {
        "empty": 1, "too short": 1, "regex lorem": 1, "exact duplicate": 2, "near duplicate": 0, "too many tokens": 2,
    }
    assert document["steps"][0] == {"name": "empty", "reason": "empty", "rows_in": 7, "rows_out": 6, "dropped": 1}
    assert report.lines() == [
        "empty: 7 -> 6 (1 dropped as empty)",
        "min_chars 6: 6 -> 5 (1 dropped as too short)",
        "drop_regex 'lorem': 5 -> 4 (1 dropped as regex lorem)",
        "exact dedup: 4 -> 2 (2 dropped as exact duplicate)",
        "near dedup (Jaccard >= 0.85): 2 -> 2 (0 dropped as near duplicate)",
        "max_tokens 19: 2 -> 0 (2 dropped as too many tokens)",
        "cleaning: 7 -> 0 rows kept",
    ]


def test_an_empty_dataset_gives_an_empty_dataset_and_a_report():
    kept, report = run_clean([], CleanConfig(near_dedup=True))
    assert len(kept) == 0 and kept.column_names == ["text", "id"]
    assert report.rows_in == 0 and report.rows_out == 0


def test_a_pattern_given_twice_counts_its_drops_once():
    kept, report = run_clean(["spam", "ham"], only(drop_regex=["spam", "spam"]))
    assert kept["text"] == ["ham"]
    assert [step.dropped for step in report.steps] == [0, 1, 0]


def test_lines_use_thousands_separators():
    report = CleaningReport()
    report.record("exact dedup", "exact duplicate", 1000, 950)
    assert report.lines()[0] == "exact dedup: 1,000 -> 950 (50 dropped as exact duplicate)"


def test_drop_by_token_count_applies_both_limits():
    dataset = dataset_of(["a", "b", "c", "d"], n_tokens=[3, 10, 50, 100])
    report = CleaningReport()
    kept = drop_by_token_count(dataset, "n_tokens", min_tokens=5, max_tokens=60, report=report)
    assert kept["id"] == [1, 2]
    assert report.dropped() == {"too few tokens": 1, "too many tokens": 1}
    assert drop_by_token_count(dataset, "n_tokens", 0, 0, CleaningReport())["id"] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(drop_regex=["(unclosed"]), "drop_regex"),
        (dict(min_chars=10, max_chars=5), "max_chars"),
        (dict(min_chars=-1), "min_chars"),
        (dict(near_dedup_threshold=0.0), "near_dedup_threshold"),
        (dict(shingle_size=0), "shingle_size"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=f"data.clean.{key}"):
        clean(dataset_of(["a"]), CleanConfig(**changes), CleaningReport())


def test_bad_data_is_refused_naming_the_row_and_field():
    with pytest.raises(DataError, match="no 'text' column"):
        clean(datasets.Dataset.from_dict({"prompt": ["a"]}), CleanConfig(), CleaningReport())
    with pytest.raises(DataError, match="row 1: field 'text' is NoneType"):
        clean(datasets.Dataset.from_dict({"text": ["a", None]}), CleanConfig(), CleaningReport())
    with pytest.raises(DataError, match="no 'n_tokens' column"):
        drop_by_token_count(dataset_of(["a"]), "n_tokens", 1, 2, CleaningReport())


def test_assign_split_is_deterministic_and_ignores_whitespace_and_width():
    ratios = (0.5, 0.3, 0.2)
    assert all(assign_split(f"key {i}", ratios) == assign_split(f"key {i}", ratios) for i in range(100))
    assert assign_split("你好\u3000世界", ratios) == assign_split("  你好 世界", ratios)
    assert assign_split("ＡＢＣ", ratios) == assign_split("ABC", ratios)


def test_split_proportions_on_ten_thousand_keys():
    keys = [f"sample {i}" for i in range(10_000)]
    counts = {"train": 0, "validation": 0, "test": 0}
    for key in keys:
        counts[assign_split(key, (0.8, 0.15, 0.05))] += 1
    assert abs(counts["train"] - 8000) < 200 and abs(counts["validation"] - 1500) < 150
    assert abs(counts["test"] - 500) < 100


def test_adding_data_never_moves_existing_records():
    ratios = (0.9, 0.05, 0.05)
    old = dataset_of([f"old record {i}" for i in range(2000)])
    before = {name: set(split["text"]) for name, split in split_dataset(old, ratios).items()}
    grown = datasets.concatenate_datasets([dataset_of([f"new record {i}" for i in range(3000)]), old])
    after = {name: set(split["text"]) for name, split in split_dataset(grown, ratios).items()}
    for name in before:
        assert before[name] <= after[name]
        assert not (after[name] & set(old["text"])) - before[name]


def test_split_dataset_partitions_the_rows_in_order_and_carries_columns():
    dataset = dataset_of([f"text {i}" for i in range(500)], label=[i % 7 for i in range(500)])
    splits = split_dataset(dataset, (0.7, 0.3))
    assert list(splits) == ["train", "validation"]
    ids = [list(splits[name]["id"]) for name in splits]
    assert all(row_ids == sorted(row_ids) for row_ids in ids)
    assert sorted(ids[0] + ids[1]) == list(range(500))
    assert splits["validation"]["label"] == [i % 7 for i in splits["validation"]["id"]]
    assert len(split_dataset(dataset, (1.0, 0.0, 0.0))["test"]) == 0


@pytest.mark.parametrize("ratios", [(1.0,), (0.5, 0.2, 0.2, 0.1), (0.9, 0.2), (1.1, -0.1), (0.5, 0.4)])
def test_bad_ratios_are_refused(ratios):
    with pytest.raises(ConfigError, match="data.split"):
        assign_split("key", ratios)
    with pytest.raises(ConfigError, match="data.split"):
        split_dataset(dataset_of(["a"]), ratios)
