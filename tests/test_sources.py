"""Reading records from every local format, globs and datasets directories, their error messages, the Hub when
offline, and mixing sources by weight: real files in tmp_path, real `datasets` and pyarrow."""

import json
import time
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dstrain.errors import ConfigError, DataError
from dstrain.sources import WHERE, SourceSpec, detect_format, mix, read_records

ALPACA = [
    {"instruction": "把这句话翻译成英文", "input": "你好，世界", "output": "Hello, world"},
    {"instruction": "Name a colour", "input": "", "output": "Blue"},
    {"instruction": "写一首短诗", "input": "", "output": "春眠不觉晓"},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The loaders' arrow cache goes to tmp_path, not the user's HF cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _records(dataset):
    return [{key: value for key, value in row.items() if key != WHERE} for row in dataset]


def test_jsonl_rows_know_their_line_despite_blank_lines(tmp_path):
    lines = [json.dumps(ALPACA[0], ensure_ascii=False), "", "   ", json.dumps(ALPACA[1]), "", json.dumps(ALPACA[2])]
    path = _jsonl(tmp_path / "train.jsonl", lines)
    records = read_records(SourceSpec(path))
    assert _records(records) == ALPACA
    assert records[WHERE] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert records.column_names == ["instruction", "input", "output", WHERE]


def test_json_array_rows_are_named_by_index(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, ensure_ascii=False, indent=2), encoding="utf-8")
    records = read_records(SourceSpec(str(path)))
    assert _records(records) == ALPACA
    assert records[WHERE] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]


def test_parquet_rows_are_named_by_row(tmp_path):
    path = str(tmp_path / "chat.parquet")
    messages = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]]
    pq.write_table(pa.table({"messages": messages * 2, "id": [7, 8]}), path)
    records = read_records(SourceSpec(path))
    assert records[0]["messages"] == messages[0] and records["id"] == [7, 8]
    assert records[WHERE] == [f"{path} row 0", f"{path} row 1"]


def test_csv_cells_stay_text_verbatim(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"6 times 7, please",42\n你叫什么？,NA\nempty,\n', encoding="utf-8")
    records = read_records(SourceSpec(str(path)))
    assert records["answer"] == ["42", "NA", ""]
    assert records["question"] == ["6 times 7, please", "你叫什么？", "empty"]
    assert records[WHERE][2] == f"{path} row 2"


def test_text_is_one_record_per_non_blank_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("第一行\r\n\nsecond line\n  \nthird\n", encoding="utf-8")
    records = read_records(SourceSpec(str(path)))
    assert records["text"] == ["第一行", "second line", "third"]
    assert records[WHERE] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_datasets_directory_of_one_dataset_and_of_splits(tmp_path):
    single = str(tmp_path / "single")
    datasets.Dataset.from_list(ALPACA).save_to_disk(single)
    assert _records(read_records(SourceSpec(single))) == ALPACA

    splits = str(tmp_path / "splits")
    dataset = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ALPACA[:2]), test=datasets.Dataset.from_list(ALPACA[2:])
    )
    dataset.save_to_disk(splits)
    assert _records(read_records(SourceSpec(splits))) == ALPACA[:2]
    test = read_records(SourceSpec(splits, split="test"))
    assert _records(test) == ALPACA[2:] and test[WHERE] == [f"{splits}/test row 0"]
    with pytest.raises(ConfigError, match=r"has the splits \['train', 'test'\], not 'validation'"):
        read_records(SourceSpec(splits, split="validation"))


def test_a_saved_where_column_is_replaced_by_where_the_row_is_read_now(tmp_path):
    path = str(tmp_path / "again")
    datasets.Dataset.from_dict({"text": ["a"], WHERE: ["/old/file.jsonl:9"]}).save_to_disk(path)
    assert read_records(SourceSpec(path))[WHERE] == [f"{path} row 0"]


def test_a_glob_reads_files_in_sorted_order_with_the_union_of_columns(tmp_path):
    second = _jsonl(tmp_path / "part-2.jsonl", [json.dumps({"instruction": "b", "output": "B", "source": "web"})])
    first = _jsonl(tmp_path / "part-1.jsonl", [json.dumps({"instruction": "a", "input": "x", "output": "A"})])
    _jsonl(tmp_path / "part-3.jsonl", ["", ""])  # An empty shard adds nothing.
    (tmp_path / "notes.md").write_text("not matched")
    records = read_records(SourceSpec(str(tmp_path / "part-*.jsonl")))
    assert records.column_names == ["instruction", "input", "output", "source", WHERE]
    assert list(records) == [
        {"instruction": "a", "input": "x", "output": "A", "source": None, WHERE: f"{first}:1"},
        {"instruction": "b", "input": None, "output": "B", "source": "web", WHERE: f"{second}:1"},
    ]


def test_a_glob_may_mix_formats(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "from jsonl"})])
    (tmp_path / "b.txt").write_text("from text\n")
    assert read_records(SourceSpec(str(tmp_path / "*")))["text"] == ["from jsonl", "from text"]


def test_a_field_of_two_types_in_two_files_names_both(tmp_path):
    one = _jsonl(tmp_path / "1.jsonl", ['{"output": "four"}'])
    two = _jsonl(tmp_path / "2.jsonl", ['{"output": 4}'])
    with pytest.raises(DataError, match=rf"'output' is .*string.* in {one} but .*int64.* in {two}"):
        read_records(SourceSpec(str(tmp_path / "*.jsonl")))


def test_the_format_can_be_given_instead_of_detected(tmp_path):
    path = _jsonl(tmp_path / "records.data", [json.dumps(ALPACA[1])])
    with pytest.raises(ConfigError, match=r"cannot tell its format from the extension '.data'"):
        read_records(SourceSpec(path))
    assert _records(read_records(SourceSpec(path, format="jsonl"))) == [ALPACA[1]]
    with pytest.raises(ConfigError, match=r"format='xml' is not one of"):
        read_records(SourceSpec(path, format="xml"))


def test_formats_by_extension():
    assert [detect_format(f"/d/x{ext}") for ext in (".json", ".JSONL", ".parquet", ".csv", ".txt")] == [
        "json", "jsonl", "parquet", "csv", "text",
    ]
    assert detect_format("tatsu-lab/alpaca") == "hub"


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("broken.jsonl", ['{"a": 1}', "", '{"a": 2'], r"broken.jsonl:3: not valid JSON \(Expecting ',' delimiter"),
        ("list.jsonl", ['{"a": 1}', "[1, 2]"], r"list.jsonl:2: a JSON array, not an object. Each line of a JSONL"),
        ("string.jsonl", ['{"a": 1}', '"just text"'], r"string.jsonl:2: a JSON string, not an object"),
        ("pretty.jsonl", ["{", '  "a": 1', "}"], r"pretty.jsonl:1: not valid JSON"),
    ],
)
def test_malformed_jsonl_names_the_line_and_the_fix(tmp_path, name, lines, message):
    path = _jsonl(tmp_path / name, lines)
    with pytest.raises(DataError, match=message) as error:
        read_records(SourceSpec(path))
    assert "one JSON object" in str(error.value) and "\n" not in str(error.value)


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"a": "ok"}\n{"a": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 .*Save the file as UTF-8"):
        read_records(SourceSpec(str(path)))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"instruction": "a"}', r"holds a JSON object, not an array of objects.*set format=jsonl"),
        ('{"a": 1}\n{"a": 2}\n', r"bad.json:2: not valid JSON \(Extra data.*set format=jsonl"),
        ('[{"a": 1}, "text", {"a": 2}]', r"bad.json\[1\]: a JSON string, not an object"),
        ('[{"a": 1},\n {"a": 2,}]', r"bad.json:2: not valid JSON"),
    ],
)
def test_malformed_json_names_the_item_or_line_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_records(SourceSpec(str(path)))


def test_unreadable_parquet_and_bad_csv_name_the_file_and_the_fix(tmp_path):
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=rf"{parquet}: cannot be read \(ArrowInvalid: .*\)\. Write it again"):
        read_records(SourceSpec(str(parquet)))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("q,a\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=rf"{ragged}: cannot be read \(.*line 3.*\)\. It must be comma-separated"):
        read_records(SourceSpec(str(ragged)))
    twice = tmp_path / "twice.csv"
    twice.write_text("q,q\n1,2\n")
    with pytest.raises(DataError, match=r"the columns \['q'\] appear twice"):
        read_records(SourceSpec(str(twice)))


def test_missing_paths_and_plain_directories_say_what_to_give(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing.jsonl does not exist"):
        read_records(SourceSpec(str(tmp_path / "nothing.jsonl")))
    with pytest.raises(ConfigError, match=r"part-\*.jsonl: the pattern matches nothing"):
        read_records(SourceSpec(str(tmp_path / "part-*.jsonl")))
    with pytest.raises(ConfigError, match=rf"{tmp_path} is a directory but not one written by save_to_disk.*/\*.jsonl"):
        read_records(SourceSpec(str(tmp_path)))
    empty = _jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match=r"empty.jsonl: no records"):
        read_records(SourceSpec(empty))


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_hub_name_offline_is_one_line_at_once(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        read_records(SourceSpec("tatsu-lab/alpaca"))
    assert time.monotonic() - started < 1
    message = str(error.value)
    assert "\n" not in message
    assert "tatsu-lab/alpaca is not a local path" in message and f"{variable}=1" in message
    assert "Give a local file instead" in message and "save_to_disk" in message


def test_an_unreachable_hub_is_one_line_within_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # The discard port: nothing listens there.
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"the Hugging Face Hub \(http://127.0.0.1:9\) cannot be reached") as error:
        read_records(SourceSpec("some-org/some-data", format="hub"))
    assert time.monotonic() - started < 5 and "\n" not in str(error.value)


def _numbered(count, label="f"):
    return datasets.Dataset.from_dict({"n": list(range(count)), WHERE: [f"{label}:{i + 1}" for i in range(count)]})


def test_weights_scale_each_source_and_the_counts_report_it():
    specs = [SourceSpec("big", weight=0.5), SourceSpec("small", weight=2.5)]
    mixed, counts = mix([_numbered(10, "big"), _numbered(4, "small")], specs, seed=3)
    assert counts == {"big": 5, "small": 10} and len(mixed) == 15
    big_rows = Counter(where for where in mixed[WHERE] if where.startswith("big:"))
    small_rows = Counter(where for where in mixed[WHERE] if where.startswith("small:"))
    # Half of big's rows once each; every row of small twice, and a seeded two of them a third time.
    assert len(big_rows) == 5 and set(big_rows.values()) == {1}
    assert len(small_rows) == 4 and sorted(small_rows.values()) == [2, 2, 3, 3]


def test_a_whole_weight_repeats_every_row_exactly():
    mixed, counts = mix([_numbered(6)], [SourceSpec("only", weight=3)], seed=0)
    assert counts == {"only": 18} and Counter(mixed["n"]) == {n: 3 for n in range(6)}


def test_caps_take_the_first_rows_before_weighting():
    mixed, counts = mix([_numbered(100)], [SourceSpec("capped", max_rows=7, weight=2)], seed=0)
    assert counts == {"capped": 14} and sorted(set(mixed["n"])) == list(range(7))


def test_a_mix_is_the_same_for_a_seed_and_differs_across_seeds():
    sources = [_numbered(50, "a"), _numbered(30, "b")]
    specs = [SourceSpec("a", weight=0.3), SourceSpec("b", weight=1.7, max_rows=20)]
    first, counts = mix(sources, specs, seed=11)
    again, _ = mix(sources, specs, seed=11)
    other, _ = mix(sources, specs, seed=12)
    assert counts == {"a": 15, "b": 34}
    assert list(first) == list(again) and list(first) != list(other)


def test_a_mix_keeps_the_union_of_columns_and_interleaves_sources(tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "嗨"}]})] * 20)
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [json.dumps(ALPACA[0], ensure_ascii=False)] * 20)
    specs = [SourceSpec(chat, name="chat"), SourceSpec(alpaca, name="alpaca")]
    mixed, counts = mix([read_records(spec) for spec in specs], specs, seed=5)
    assert counts == {"chat": 20, "alpaca": 20}
    assert mixed.column_names == ["messages", "instruction", "input", "output", WHERE]
    sources_in_order = ["chat" if row["messages"] else "alpaca" for row in mixed]
    assert sources_in_order != sorted(sources_in_order) and sources_in_order != sorted(sources_in_order, reverse=True)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([SourceSpec("a", weight=-1)], r"source a: weight=-1 must be a number >= 0"),
        ([SourceSpec("a", weight=float("nan"))], r"source a: weight=nan"),
        ([SourceSpec("a", max_rows=-2)], r"source a: max_rows=-2 must be >= 0"),
        ([SourceSpec("a", weight=0)], r"the mix of \['a'\] has no rows"),
        ([SourceSpec("x", name="a"), SourceSpec("y", name="a")], r"the sources \['a'\] appear twice"),
    ],
)
def test_mix_refuses_settings_that_cannot_work(specs, message):
    with pytest.raises(ConfigError, match=message):
        mix([_numbered(3) for _ in specs], specs, seed=0)
