"""`dstrain prepare` and what training makes of prepared data: the cache entry and data report it writes, a
training run that reuses them, one-line errors for malformed records, the data fingerprint, resuming on
changed data, and the chat template that every checkpoint and export carries. Real processes, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _env, train
from dstrain.chat import BUILTIN_TEMPLATES
from dstrain.errors import ExitCode

# Byte-level tokenizer (no model.pretrained), which has no chat template of its own: the built-in alpaca one.
ALPACA = ("+data=alpaca", "data.template=alpaca", "data.seq_len=512", "model.max_position_embeddings=512")
# A few steps of a tiny model, no evaluation (data.split still makes validation and test splits).
TINY_RUN = ("scheduler.warmup_steps=1", "trainer.eval_every=0", "trainer.micro_batch_size=4")
UNIQUE_RECORDS = 64
DUPLICATES = 5


def _alpaca_records(answer_suffix: str = "") -> list:
    records = [
        {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}.{answer_suffix}"}
        for a in range(8) for b in range(8)
    ]
    return records + records[:DUPLICATES]


def _write_alpaca(path: Path, answer_suffix: str = "") -> Path:
    path.write_text(json.dumps(_alpaca_records(answer_suffix)))
    return path


def _alpaca_overrides(data_file: Path) -> tuple:
    return (*ALPACA, f"data.train_files=[{data_file}]")


def _prepare(tmp_path: Path, *overrides: str, name: str = "run") -> subprocess.CompletedProcess:
    """`dstrain prepare` with the run.root and run.name that conftest's train() gives the same overrides."""
    command = [sys.executable, "-m", "dstrain", "prepare", *overrides,
               f"run.root={tmp_path / 'outputs'}", f"run.name={name}"]
    return subprocess.run(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300)


class PreparedRun:
    def __init__(self, tmp_path: Path, prepared: subprocess.CompletedProcess, run):
        self.tmp_path = tmp_path
        self.prepared = prepared
        self.run = run
        self.report = json.loads((run.run_dir / "data_report.json").read_text())
        self.checkpoint = run.run_dir / "checkpoints" / "step_00000003"


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory) -> PreparedRun:
    """`dstrain prepare` on an alpaca file with duplicates, then 3 training steps with the same overrides."""
    tmp_path = tmp_path_factory.mktemp("prepare")
    overrides = (*_alpaca_overrides(_write_alpaca(tmp_path / "alpaca.json")), *TINY_RUN, "trainer.max_steps=3")
    prepared = _prepare(tmp_path, *overrides)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr[-6000:]
    run = train(tmp_path, *overrides, ranks=0)
    return PreparedRun(tmp_path, prepared, run)


@pytest.mark.slow
def test_prepare_writes_the_cache_entry_and_the_report(prepared_run):
    output = prepared_run.prepared.stdout
    report = prepared_run.report
    entry = prepared_run.tmp_path / "outputs" / "data_cache" / report["fingerprint"]
    assert (entry / "data_report.json").is_file() and (entry / "train").is_dir()
    assert report["fingerprint"] in output and str(entry) in output
    # The preparation's own log lines reach the console.
    assert "data: all: exact dedup" in output
    cleaning = report["cleaning"]
    assert cleaning["rows_in"] == UNIQUE_RECORDS + DUPLICATES
    assert cleaning["dropped"]["exact duplicate"] == DUPLICATES
    splits = report["splits"]
    assert set(splits) == {"train", "validation", "test"}
    assert sum(section["samples"] for section in splits.values()) == UNIQUE_RECORDS
    assert 0.5 < splits["train"]["packing_efficiency"] <= 1.0
    for name, section in splits.items():
        assert f"{name}: {section['rows']:,} rows" in output


@pytest.mark.slow
def test_training_reuses_the_prepared_data(prepared_run):
    output = prepared_run.run.output
    entry = prepared_run.tmp_path / "outputs" / "data_cache" / prepared_run.report["fingerprint"]
    assert f"prepared data: reusing {entry}" in output
    assert "preparing alpaca data" not in output
    assert sorted(prepared_run.run.losses()) == [1, 2, 3]


@pytest.mark.slow
def test_checkpoint_and_export_carry_the_data_identity_and_chat_template(prepared_run, tmp_path):
    from transformers import AutoTokenizer

    from dstrain.loading import load_trained_model

    checkpoint = prepared_run.checkpoint
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["data"] == {"fingerprint": prepared_run.report["fingerprint"],
                                "chat_template": BUILTIN_TEMPLATES["alpaca"]}
    assert load_trained_model(checkpoint).tokenizer.chat_template == BUILTIN_TEMPLATES["alpaca"]
    exported = subprocess.run([sys.executable, "-m", "dstrain", "export", str(checkpoint), str(tmp_path / "hf")],
                              env=_env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-6000:]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == BUILTIN_TEMPLATES["alpaca"]


def _error_line(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == ExitCode.CONFIG, completed.stdout + completed.stderr[-6000:]
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith("dstrain: data error: "), completed.stderr[-6000:]
    assert "Traceback" not in completed.stderr
    return lines[-1]


def test_a_json_record_without_its_answer_is_named_by_file_index_and_field(tmp_path):
    records = _alpaca_records()[:6]
    del records[3]["output"]
    data_file = tmp_path / "broken.json"
    data_file.write_text(json.dumps(records))
    line = _error_line(_prepare(tmp_path, *_alpaca_overrides(data_file), *TINY_RUN, "trainer.max_steps=3"))
    assert f"{data_file}[3]" in line and "'output'" in line


def test_a_bad_jsonl_line_is_named_by_file_line_and_field(tmp_path):
    lines = [json.dumps(record) for record in _alpaca_records()[:6]]
    lines[4] = json.dumps({"instruction": "Add 1 and 2.", "input": ""})
    data_file = tmp_path / "broken.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    line = _error_line(_prepare(tmp_path, *_alpaca_overrides(data_file), *TINY_RUN, "trainer.max_steps=3"))
    assert f"{data_file}:5" in line and "'output'" in line


def test_a_line_that_is_not_json_is_named_by_file_and_line(tmp_path):
    lines = [json.dumps(record) for record in _alpaca_records()[:6]]
    lines[2] = lines[2][:-10]
    data_file = tmp_path / "truncated.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    line = _error_line(_prepare(tmp_path, *_alpaca_overrides(data_file), *TINY_RUN, "trainer.max_steps=3"))
    assert f"{data_file}:3: not valid JSON" in line


def test_prepare_of_plain_text_tokenises_without_a_cache_entry(tmp_path):
    prepared = _prepare(tmp_path, "data.builtin_train_documents=200", "trainer.eval_every=0")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr[-6000:]
    report = json.loads((tmp_path / "outputs" / "run" / "data_report.json").read_text())
    assert report["format"] == "text" and report["splits"]["train"]["rows"] > 0
    assert not (tmp_path / "outputs" / "data_cache").exists()


def _fingerprint(data_file: Path, *overrides: str) -> str:
    from dstrain.compose import compose
    from dstrain.data import build_tokenizer
    from dstrain.preparation import data_fingerprint

    cfg = compose([*_alpaca_overrides(data_file), *overrides], run_name="fingerprint")
    return data_fingerprint(cfg, build_tokenizer(cfg))


def test_the_fingerprint_follows_the_data_and_the_settings_that_change_rows(tmp_path):
    data_file = _write_alpaca(tmp_path / "alpaca.json")
    original = _fingerprint(data_file)
    assert _fingerprint(data_file) == original
    assert _fingerprint(data_file, "data.seq_len=256") != original
    assert _fingerprint(data_file, "data.template=chatml") != original
    assert _fingerprint(data_file, "data.packing=false") != original
    # Where the cache is, and what a resume does about changed data, change no row.
    assert _fingerprint(data_file, f"data.cache_dir={tmp_path / 'elsewhere'}") == original
    assert _fingerprint(data_file, "data.changed_on_resume=warn") == original
    _write_alpaca(data_file, answer_suffix=" Done.")
    assert _fingerprint(data_file) != original


@pytest.mark.slow
def test_resuming_on_changed_data_refuses_unless_told_to_warn(tmp_path):
    data_file = _write_alpaca(tmp_path / "alpaca.json")
    overrides = (*_alpaca_overrides(data_file), *TINY_RUN)
    train(tmp_path, *overrides, "trainer.max_steps=2", ranks=0)
    _write_alpaca(data_file, answer_suffix=" Done.")

    refused = train(tmp_path, *overrides, "trainer.max_steps=4", ranks=0, check=False)
    assert refused.returncode == ExitCode.CONFIG, refused.output[-6000:]
    assert "trained on other data" in refused.output and "data.changed_on_resume=warn" in refused.output

    resumed = train(tmp_path, *overrides, "trainer.max_steps=4", "data.changed_on_resume=warn", ranks=0)
    assert "resuming anyway (data.changed_on_resume=warn)" in resumed.output
    assert "resumed from" in resumed.output and "step_00000002" in resumed.output
    assert max(resumed.losses()) == 4
