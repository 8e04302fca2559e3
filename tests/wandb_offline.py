"""Read W&B offline runs back, so that tests can check what a run logged without a W&B server.

wandb (0.31) keeps no Python reader for its `.wandb` files (`wandb.sdk.internal.datastore` is gone; the Go
wandb-core reads them, e.g. `wandb leet inspect --json`). This is a small one. Every record is parsed with
wandb's own protobuf class, `wandb.proto.wandb_internal_pb2.Record`.

The file: a 7-byte header (b":W&B", 0xBEE1, version 0), then LevelDB-log framing in 32 KiB blocks: each chunk
has a 7-byte header (checksum, length, type: FULL, or FIRST, MIDDLE..., LAST for a record split across
blocks), and a block's last < 7 bytes are padding. The checksum is zlib's CRC-32 (not LevelDB's masked
CRC-32C) of the type byte and the payload; every chunk is checked.

On disk, `wandb.init(dir=D, mode="offline")` writes D/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb
(local time; a second run of the same id within the same second gets a "-1", "-2", ... suffix), and
D/wandb/latest-run links to the newest. Resuming an id (`wandb.init(id=..., resume="allow")`) offline starts
a new offline-run directory with the same id: its run record has `resume` set (as has any init given resume=,
even of a new id), and its config holds only what that init was given. Nothing ties the pieces together but
the id: `find_runs` orders them, `read_history` merges their rows.

A process killed with SIGKILL leaves only what wandb-core had flushed: a full 32 KiB block, or everything every
x_transaction_log_flush_interval (15 s; env WANDB__TRANSACTION_LOG_FLUSH_INTERVAL=0.2 for tests). A short run
killed within 15 s leaves the file header alone. The row of the last step logged is never there: wandb writes a
step's row only when a later step is logged (or at finish).
"""

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")
FILE_MAGIC = (b":W&B", 0xBEE1, 0)
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def read_records(path: Union[str, Path]) -> Tuple[List[wandb_internal_pb2.Record], bool]:
    """Every record of a .wandb file, in order, and whether the file ends cleanly (not inside a record).

    A checksum that does not match, or an unknown chunk type, raises ValueError."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != FILE_MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:FILE_HEADER.size]!r})")
    records, pending, pos = [], None, FILE_HEADER.size
    while True:
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:
            pos += BLOCK - pos % BLOCK  # padding at the end of a block
        if pos + CHUNK_HEADER.size > len(data):
            return records, pending is None and pos >= len(data)
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        start, pos = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if pos > len(data):
            return records, False  # the writer stopped in the middle of this chunk
        payload = data[start:pos]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {start - CHUNK_HEADER.size}")
        if kind == FULL:
            records.append(_parse(payload))
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += payload
            if kind == LAST:
                records.append(_parse(bytes(pending)))
                pending = None
        else:
            raise ValueError(f"{path}: chunk type {kind} out of place at byte {start - CHUNK_HEADER.size}")


def _parse(payload: bytes) -> wandb_internal_pb2.Record:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    return record


def _key(item) -> str:
    """A config, summary or history item's key; a nested one (logged as {"a": {"b": 1}}) as "a.b"."""
    return item.key or ".".join(item.nested_key)


def _apply(target: Dict[str, Any], updates, removes=()) -> None:
    for item in updates:
        key = _key(item)
        if key != "_wandb" and not key.startswith("_wandb."):  # wandb's own bookkeeping
            target[key] = json.loads(item.value_json)  # json reads wandb's NaN and Infinity
    for item in removes:
        target.pop(_key(item), None)


@dataclass
class OfflineRun:
    """One .wandb file: one wandb.init ... finish (or kill) of a run."""

    path: Path  # the .wandb file
    run_id: str
    project: str = ""
    name: str = ""  # the display name
    group: str = ""
    tags: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)  # top-level keys; values as logged (dicts stay dicts)
    history: List[Dict[str, Any]] = field(default_factory=list)  # one row per history record, with "_step"
    summary: Dict[str, Any] = field(default_factory=dict)
    resumed: bool = False  # the init asked to resume (resume="allow" too): offline, a fresh id looks the same
    start_time: Optional[float] = None  # seconds since the epoch, from the run record
    exit_code: Optional[int] = None  # None: no exit record (the process was killed, or is still running)
    complete: bool = True  # False: the file ends inside a record
    records: List[wandb_internal_pb2.Record] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> List[int]:
        return [row["_step"] for row in self.history]


def read_run(path: Union[str, Path]) -> OfflineRun:
    """An offline-run-* directory, or its run-<id>.wandb file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected one run-<id>.wandb file, found {[f.name for f in files]}")
        path = files[0]
    records, complete = read_records(path)
    run = OfflineRun(path=path, run_id=path.stem[len("run-"):], complete=complete, records=records)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            run.run_id, run.project, run.name, run.group = info.run_id, info.project, info.display_name, info.run_group
            run.tags, run.resumed = list(info.tags), info.resume
            run.start_time = info.start_time.seconds + info.start_time.nanos / 1e9
            _apply(run.config, info.config.update)
            _apply(run.summary, info.summary.update)
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            row: Dict[str, Any] = {}
            _apply(row, record.history.item)
            row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _order(run_file: Path) -> Tuple[str, int]:
    """Creation order of the run directories of one id: the timestamp, then the -N suffix of a same-second one."""
    match = RUN_DIR.match(run_file.parent.name)
    if not match:
        return ("", 0)
    run_id, rest = run_file.stem[len("run-"):], match.group(2)
    suffix = rest[len(run_id) + 1:] if rest.startswith(run_id + "-") else ""
    return match.group(1), int(suffix) if suffix.isdigit() else 0


def find_runs(wandb_dir: Union[str, Path], run_id: Optional[str] = None) -> List[OfflineRun]:
    """Every run under a `wandb` directory (the `dir` given to wandb.init, or its wandb/ subdirectory), oldest
    first; only those of run_id if given. The latest-run link is not counted twice."""
    wandb_dir = Path(wandb_dir)
    if (wandb_dir / "wandb").is_dir():
        wandb_dir = wandb_dir / "wandb"
    pattern = f"run-{run_id}.wandb" if run_id else "run-*.wandb"
    files = [f for f in wandb_dir.glob(f"*run-*/{pattern}") if not f.parent.is_symlink()]
    return [read_run(f) for f in sorted(files, key=_order)]


def read_history(wandb_dir: Union[str, Path], run_id: str) -> List[Dict[str, Any]]:
    """The history of a run across its offline pieces (a run and its resumptions), in step order. A resumed
    piece replaces every row the earlier pieces logged from its first step on, as a run resumed from a
    checkpoint repeats the steps after it."""
    rows: Dict[int, Dict[str, Any]] = {}
    for run in find_runs(wandb_dir, run_id):
        if run.history:
            first = run.history[0]["_step"]
            rows = {step: row for step, row in rows.items() if step < first}
        for row in run.history:
            rows[row["_step"]] = row
    return [rows[step] for step in sorted(rows)]


def values(rows: List[Dict[str, Any]], key: str) -> Dict[int, Any]:
    """{step: value} of one key, over the rows that have it."""
    return {row["_step"]: row[key] for row in rows if key in row}
