"""tests/wandb_offline.py reads back what a real wandb (offline mode, no network) wrote: a run, then the same
id resumed, as a requeued training job does."""

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from wandb_offline import BLOCK, find_runs, read_history, read_records, read_run, values

BLOB = 70_000  # a config value longer than two 32 KiB blocks: its record is split into FIRST, MIDDLE, LAST chunks

WRITER = r"""
import json, math, sys, time
started = time.perf_counter()
import wandb
imported = time.perf_counter()
directory = sys.argv[1]
run = wandb.init(mode="offline", dir=directory, project="p", group="g", tags=["a"], name="n",
                 config={"optim": {"lr": 0.001}, "x": 1, "blob": "b" * %(blob)d})
initialized = time.perf_counter()
for step in range(1, 6):  # the first job: steps 1-5, the last one diverged
    run.log({"loss": 10.0 + step if step < 5 else math.nan, "lr": 1e-3 * step, "eval": {"loss": 9.0}}, step=step)
run.finish()
finished = time.perf_counter()
run = wandb.init(id=run.id, resume="allow", mode="offline", dir=directory, project="p")
resumed = time.perf_counter()
for step in (4, 6, 7, 8):  # the requeued job, resumed from a checkpoint at step 3, logs no step 5
    run.log({"loss": float(step), "lr": 1e-3 * step}, step=step)
run.finish()
print(json.dumps({"run_id": run.id, "import_s": imported - started, "init_s": initialized - imported,
                  "finish_s": finished - initialized, "resume_init_s": resumed - finished}))
""" % {"blob": BLOB}


def wandb_env(tmp_path: Path) -> dict:
    """Offline, quiet, and nothing written outside tmp_path; no WANDB_* setting of the caller leaks in."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true",
        WANDB_ERROR_REPORTING="false", WANDB_CONSOLE="off", WANDB__DISABLE_STATS="true",
        **{name: str(tmp_path / "wandb-home" / name.lower()) for name in
           ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")},
    )
    return env


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wandb-offline")
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", WRITER, str(directory)], env=wandb_env(directory),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-4000:]
    info = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"wandb offline: {info}, process {time.perf_counter() - started:.1f}s")
    return directory, info


def test_a_run_reads_back_with_its_settings_config_and_history(offline):
    directory, info = offline
    first = find_runs(directory)[0]
    assert (first.run_id, first.project, first.group, first.tags, first.name) == (info["run_id"], "p", "g", ["a"], "n")
    assert first.config == {"optim": {"lr": 0.001}, "x": 1, "blob": "b" * BLOB}
    assert first.steps == [1, 2, 3, 4, 5]
    expected_loss = {1: 11.0, 2: 12.0, 3: 13.0, 4: 14.0, 5: math.nan}
    assert values(first.history, "loss") == pytest.approx(expected_loss, nan_ok=True)
    assert values(first.history, "eval.loss") == {step: 9.0 for step in range(1, 6)}  # nested keys joined with "."
    assert first.summary["lr"] == pytest.approx(5e-3) and math.isnan(first.summary["loss"])
    assert (first.exit_code, first.complete, first.resumed) == (0, True, False)


def test_an_offline_resume_is_a_second_directory_with_the_same_id(offline):
    directory, info = offline
    run_id = info["run_id"]
    runs = find_runs(directory)
    assert [run.run_id for run in runs] == [run_id, run_id]  # wandb/latest-run is not counted again
    assert [run.path.name for run in runs] == [f"run-{run_id}.wandb"] * 2
    for run in runs:  # a second run of the id within the same second gets a "-1" suffix
        assert re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-1)?", run.path.parent.name)
    assert runs[0].path.parent != runs[1].path.parent
    assert (directory / "wandb" / "latest-run").resolve() == runs[1].path.parent.resolve()
    resumed = runs[1]
    assert resumed.resumed and resumed.start_time > runs[0].start_time
    assert resumed.config == {} and resumed.group == "" and resumed.name == ""  # only what that init was given
    assert resumed.steps == [4, 6, 7, 8]
    assert [run.path for run in find_runs(directory / "wandb", run_id)] == [run.path for run in runs]
    assert find_runs(directory, "other") == []
    assert read_run(resumed.path.parent) == read_run(resumed.path) == resumed


def test_read_history_merges_a_run_and_its_resumption(offline):
    directory, info = offline
    history = read_history(directory, info["run_id"])
    # From step 4 on, only the resumed job counts: the first job's steps 4 and 5 (NaN) are gone, although the
    # resumed job logged no step 5.
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 6, 7, 8]
    assert values(history, "loss") == {1: 11.0, 2: 12.0, 3: 13.0, 4: 4.0, 6: 6.0, 7: 7.0, 8: 8.0}
    assert values(history, "eval.loss") == {1: 9.0, 2: 9.0, 3: 9.0}


def test_damaged_truncated_and_empty_files(offline, tmp_path):
    directory, info = offline
    original = find_runs(directory)[0].path
    data = original.read_bytes()
    assert len(data) > 2 * 32 * 1024

    damaged = tmp_path / "damaged" / original.name
    damaged.parent.mkdir()
    damaged.write_bytes(data[:40_000] + bytes([data[40_000] ^ 1]) + data[40_001:])  # inside the blob
    with pytest.raises(ValueError, match="checksum mismatch in the chunk at byte 32768"):
        read_records(damaged)

    cut = tmp_path / "cut" / original.name  # a writer that stopped mid-record
    cut.parent.mkdir()
    cut.write_bytes(data[:-5])  # inside the last record, the exit record
    run = read_run(cut)
    assert not run.complete and run.exit_code is None and run.config["blob"] == "b" * BLOB
    assert len(run.records) < len(read_records(original)[0])
    cut.write_bytes(data[:BLOCK])  # a block boundary, but the blob's record goes on in the next block
    assert [record.WhichOneof("record_type") for record in read_records(cut)[0]] == ["header"]
    assert read_records(cut)[1] is False

    # What a short run killed with SIGKILL leaves: wandb-core wrote nothing past the file header.
    killed = tmp_path / "offline-run-20260101_000000-abc123" / "run-abc123.wandb"
    killed.parent.mkdir()
    killed.write_bytes(data[:7])
    run = read_run(killed.parent)
    assert (run.run_id, run.history, run.exit_code, run.complete, run.records) == ("abc123", [], None, True, [])


def test_the_reader_agrees_with_wandb_leet_inspect(offline):
    """wandb's own reader (the Go wandb-core, behind `wandb leet inspect --json`) sees the same records."""
    directory, _ = offline
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    command = shutil.which("wandb", path=search)
    for run in find_runs(directory):
        completed = subprocess.run([command, "leet", "inspect", "--json", str(run.path)], env=wandb_env(directory),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, timeout=120)
        if completed.returncode != 0 and "No such command" in completed.stderr:
            pytest.skip("this wandb has no `wandb leet inspect`")
        assert completed.returncode == 0, completed.stderr[-4000:]
        theirs = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
        assert [record["type"] for record in theirs] == [record.WhichOneof("record_type") for record in run.records]
        their_history = [record["history"]["item"] for record in theirs if record["type"] == "history"]
        assert [row["_step"] for row in their_history] == run.steps
        for mine, their in zip(run.history, their_history):  # they write NaN as the string "NaN"
            assert their["loss"] == ("NaN" if math.isnan(mine["loss"]) else mine["loss"])
        their_run = next(record["run"] for record in theirs if record["type"] == "run")
        assert their_run["run_id"] == run.run_id and their_run.get("tags", []) == run.tags

KILLED_WRITER = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
import wandb
from wandb_offline import read_run
run = wandb.init(mode="offline", dir=sys.argv[1], project="p", config={"x": 1})
for step in (1, 2, 3):
    run.log({"loss": float(step)}, step=step)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # until wandb-core has flushed steps 1 and 2
    if os.path.getsize(run.settings.sync_file) > 7 and read_run(run.settings.sync_file).steps == [1, 2]:
        print("flushed", flush=True)
        break
    time.sleep(0.1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_killed_with_sigkill(tmp_path):
    """What a SIGKILLed job leaves: what wandb-core flushed (here every 0.2 s), no exit record, and never the last
    step's row, which wandb writes only once a later step (or finish) comes."""
    env = dict(wandb_env(tmp_path), WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.2")
    completed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(Path(__file__).parent)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert completed.returncode == -9 and "flushed" in completed.stdout, completed.stdout + completed.stderr[-4000:]
    time.sleep(0.5)  # wandb-core notices its parent is gone and stops, writing nothing more
    [run] = find_runs(tmp_path)
    assert (run.steps, run.config, run.exit_code, run.complete) == ([1, 2], {"x": 1}, None, True)


def _frame(payloads) -> bytes:
    """A .wandb file written by the LevelDB log rules (a writer independent of wandb-core's)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while first or payload:
            room = BLOCK - len(out) % BLOCK
            if room < 7:  # no room for a chunk header: pad the block with zeros
                out += bytes(room)
                room = BLOCK
            chunk, payload = payload[:room - 7], payload[room - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)  # FULL, FIRST, LAST, MIDDLE
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk
            first = False
    return bytes(out)


def test_a_block_that_ends_in_padding(offline, tmp_path):
    """wandb-core pads a block whose last bytes cannot hold a chunk header; which run hits that is chance."""
    directory, _ = offline
    records, _ = read_records(find_runs(directory)[0].path)
    size = BLOCK - 7 - 7 - 3  # file header, chunk header, payload: 3 bytes left in the first block
    for width in range(size, size - 100, -1):
        filler = wandb_internal_pb2.Record()
        filler.history.item.add(key="filler", value_json=json.dumps("x" * width))
        if filler.ByteSize() == size:
            break
    else:
        pytest.fail(f"no filler record of {size} bytes")
    data = _frame([filler.SerializeToString(), *(record.SerializeToString() for record in records)])
    assert data[BLOCK - 3:BLOCK] == bytes(3)
    path = tmp_path / "run-padded.wandb"
    path.write_bytes(data)
    assert read_records(path) == ([filler, *records], True)
