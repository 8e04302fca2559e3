"""Raw records from local files, `datasets` directories or the Hugging Face Hub, and a weighted mix of sources.

`read_records(spec)` gives a `datasets.Dataset` whose rows are the records as written (columns as in the file),
plus a column `_where` that says where each row came from, for the error messages of every later stage:
"path:LINE" (JSONL, text; lines count from 1, blank lines included), "path[INDEX]" (a JSON array; from 0), and
"path row N" (CSV, Parquet, a datasets directory, the Hub; N is the row's index from 0, the header excluded).

Readers are a registry keyed by format (READERS); "auto" picks one from the extension. The files of a glob
keep the union of their columns (a file that lacks one has None there), and a column of two different types
in two files is refused with both files named.

`mix(...)` caps each source to its first max_rows rows, then up- or down-samples it to round(weight * rows)
rows with a seeded generator, and interleaves all sources in one seeded order.
"""

import contextlib
import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dstrain.config_fields import one_of
from dstrain.errors import ConfigError, DataError
from dstrain.hub import require_hub
from dstrain.registry import Registry

# The column that says where each row came from.
WHERE = "_where"
FORMATS_BY_EXTENSION = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# Any of these files marks a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk.
DATASETS_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# owner/name or name, as the Hub spells dataset names.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Everything a `datasets` loader raises for a file it cannot parse (pandas' and arrow's errors are ValueErrors).
_LOAD_ERRORS = (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, StopIteration)
_LOCAL_INSTEAD = (
    "Give a local file instead (.json, .jsonl, .parquet, .csv, .txt), or a directory written where there is a "
    "network with datasets.load_dataset(NAME, split=SPLIT).save_to_disk(DIR)."
)

Reader = Callable[[str, str], datasets.Dataset]
# Readers by format: each takes (path, split) and returns the records with their `_where` column.
READERS: Registry[Reader] = Registry("format")


@dataclass
class SourceSpec:
    # A file, a glob (/data/part-*.jsonl, read in sorted order), a datasets directory, or a Hub dataset name.
    path: str
    # How to read it (READERS): "auto" from the extension, or json, jsonl, parquet, csv, text, datasets, hub.
    format: str = one_of("auto", registry="dstrain.sources:READERS")
    # The split of a DatasetDict directory or of a Hub dataset (a single Dataset directory has none).
    split: str = "train"
    # In a mix, this source's rows appear about `weight` times as often as those of a weight-1 source.
    weight: float = 1.0
    # Use only the first this many rows of the source (0: all), before weighting.
    max_rows: int = 0
    # The source's name in reports and errors (empty: its path).
    name: str = ""


def source_name(spec: SourceSpec) -> str:
    return spec.name or spec.path


def read_records(spec: SourceSpec) -> datasets.Dataset:
    """The records of one source with a `_where` column. Raises ConfigError for a path, format or split that
    cannot work, DataError (naming file and line or row) for malformed data or a source without records."""
    check_spec(spec)
    paths = matching_paths(spec)
    records = union_of_columns([READERS[spec.format](path, spec.split) for path in paths], paths)
    if len(records) == 0:
        raise DataError(f"{spec.path}: no records (the files are empty or blank). Give a source with data.")
    return records


def check_spec(spec: SourceSpec) -> None:
    name = source_name(spec)
    if not spec.path:
        raise ConfigError(f"source {spec.name!r}: path is empty. Give a file, a glob, a directory or a Hub name.")
    if not (isinstance(spec.weight, (int, float)) and math.isfinite(spec.weight) and spec.weight >= 0):
        raise ConfigError(f"source {name}: weight={spec.weight} must be a number >= 0 (1: each row once).")
    if spec.max_rows < 0:
        raise ConfigError(f"source {name}: max_rows={spec.max_rows} must be >= 0 (0: all rows).")
    READERS[spec.format]  # An unknown format fails here, naming the known ones.


def _is_glob(path: str) -> bool:
    return any(character in path for character in "*?[")


def _looks_like_hub_name(path: str) -> bool:
    return (
        not os.path.exists(path)
        and _HUB_NAME.fullmatch(path) is not None
        and Path(path).suffix.lower() not in FORMATS_BY_EXTENSION
    )


def matching_paths(spec: SourceSpec) -> List[str]:
    if spec.format == "hub" or (spec.format == "auto" and _looks_like_hub_name(spec.path)):
        return [spec.path]
    if _is_glob(spec.path):
        matches = sorted(glob.glob(spec.path, recursive=True))
        if not matches:
            raise ConfigError(f"{spec.path}: the pattern matches nothing. Check its directory and pattern.")
        return matches
    if not os.path.exists(spec.path):
        raise ConfigError(
            f"{spec.path} does not exist. Give an existing file, directory or glob "
            f"(relative paths are read from {os.getcwd()})."
        )
    return [spec.path]


@READERS.register("auto")
def read_by_extension(path: str, split: str) -> datasets.Dataset:
    return READERS[detect_format(path)](path, split)


def detect_format(path: str) -> str:
    """The format of a path from its extension, or "datasets" for a save_to_disk directory."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, marker)) for marker in DATASETS_DIR_MARKERS):
            return "datasets"
        raise ConfigError(
            f"{path} is a directory but not one written by save_to_disk (none of {', '.join(DATASETS_DIR_MARKERS)} "
            f"in it). To read the files in it, give a glob such as {os.path.join(path, '*.jsonl')}."
        )
    suffix = Path(path).suffix.lower()
    if suffix in FORMATS_BY_EXTENSION:
        return FORMATS_BY_EXTENSION[suffix]
    if _looks_like_hub_name(path):
        return "hub"
    raise ConfigError(f"{path}: cannot tell its format from the extension {suffix!r}. Set format: {READERS.names()}.")


def _labels(before: str, numbers: Iterable[int], after: str = "") -> pa.Array:
    """`before` + number + `after` for each number, built by arrow (a Python loop costs ~1 s per million)."""
    digits = pa.array(numbers, type=pa.int64()).cast(pa.string())
    return pc.binary_join_element_wise(before, digits, after, "")


def _with_where(records: datasets.Dataset, labels: pa.Array) -> datasets.Dataset:
    # A column of that name from an earlier run (a saved dataset) is replaced by where the row is read now.
    if WHERE in records.column_names:
        records = records.remove_columns(WHERE)
    return records.add_column(WHERE, labels)


def _no_records() -> datasets.Dataset:
    return datasets.Dataset.from_dict({WHERE: []}, features=datasets.Features({WHERE: datasets.Value("string")}))


def _reason(error: BaseException) -> str:
    """The first line of what went wrong, from the error `datasets` wraps around the parser's own."""
    cause = error.__cause__ or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' own log line on a failed load: every failure becomes one DataError instead."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def _load(loader: Callable[[], datasets.Dataset], path: str, fix: str) -> datasets.Dataset:
    try:
        with _quiet_datasets():
            return loader()
    except _LOAD_ERRORS as error:
        raise DataError(f"{path}: cannot be read ({_reason(error)}). {fix}") from None


_JSONL_FIX = "Each line of a JSONL file must be one JSON object (a JSON array of objects belongs in .json)."


@READERS.register("jsonl")
def read_jsonl(path: str, split: str) -> datasets.Dataset:
    line_numbers = _nonblank_line_numbers(path)
    if not line_numbers:
        return _no_records()
    try:
        with _quiet_datasets():
            records = datasets.Dataset.from_json(path)
        records.data.validate(full=True)  # Arrow's JSON reader lets bytes that are not UTF-8 through.
    except _LOAD_ERRORS as error:
        raise _jsonl_error(path, _reason(error)) from None
    # Arrow skips blank lines as the scan does; a count that differs means a line it read differently.
    if len(records) != len(line_numbers):
        raise _jsonl_error(path, f"{len(records)} records from {len(line_numbers)} non-blank lines")
    return _with_where(records, _labels(f"{path}:", line_numbers))


def _nonblank_line_numbers(path: str) -> List[int]:
    with open(path, "rb") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]


def _jsonl_error(path: str, reason: str) -> DataError:
    """The first line that is not a JSON object, else what the loader said."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as error:
                return DataError(f"{path}:{number}: not UTF-8 ({error.reason}). Save the file as UTF-8.")
            except json.JSONDecodeError as error:
                return DataError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}). {_JSONL_FIX}")
            if not isinstance(record, dict):
                return DataError(f"{path}:{number}: a JSON {_json_type(record)}, not an object. {_JSONL_FIX}")
    return DataError(f"{path}: cannot be read as JSON Lines ({reason}). {_JSONL_FIX}")


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


@READERS.register("json")
def read_json_array(path: str, split: str) -> datasets.Dataset:
    count = _json_array_length(path)
    if count == 0:
        return _no_records()
    fix = "Save it as one JSON array of objects."
    records = _load(lambda: datasets.Dataset.from_json(path), path, fix)
    if len(records) != count:
        raise DataError(f"{path}: read {len(records)} records from an array of {count}. {fix}")
    return _with_where(records, _labels(f"{path}[", range(count), "]"))


def _json_array_length(path: str) -> int:
    """Parse the file to check it is one array of objects, naming the first item that is not an object."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            value = json.load(handle)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 ({error.reason}). Save the file as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}). A .json file must be "
            f"one JSON array of objects; for one object per line, name it .jsonl or set format=jsonl."
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"{path}: holds a JSON {_json_type(value)}, not an array of objects. Put the records in [...], "
            f"or for one object per line name the file .jsonl or set format=jsonl."
        )
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(
                f"{path}[{index}]: a JSON {_json_type(item)}, not an object. Every item of the array must be "
                f'an object such as {{"instruction": "...", "output": "..."}}.'
            )
    return len(value)


@READERS.register("text")
def read_text(path: str, split: str) -> datasets.Dataset:
    """One record per non-blank line, in a column `text`."""
    if os.path.getsize(path) == 0:
        return _no_records()  # datasets cannot infer a schema from no lines.
    fix = "A text file must be UTF-8, one record per line."
    lines = _load(lambda: datasets.Dataset.from_text(path), path, fix)
    lines = _with_where(lines, _labels(f"{path}:", range(1, len(lines) + 1)))
    blank = pc.equal(pc.utf8_trim_whitespace(lines.data.column("text")), "")
    return lines.select(np.flatnonzero(~blank.to_numpy()))


@READERS.register("csv")
def read_csv(path: str, split: str) -> datasets.Dataset:
    """Every cell as the text it holds: no numbers guessed, and "NA" or an empty cell stay text, not None."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        return _no_records()
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise DataError(f"{path} row header: the columns {repeated} appear twice. Give every column its own name.")
    features = datasets.Features({column: datasets.Value("string") for column in header})
    fix = "It must be comma-separated UTF-8 with a header row, quoting cells that hold commas or newlines."
    records = _load(lambda: datasets.Dataset.from_csv(path, features=features, keep_default_na=False), path, fix)
    return _with_where(records, _labels(f"{path} row ", range(len(records))))


@READERS.register("parquet")
def read_parquet(path: str, split: str) -> datasets.Dataset:
    fix = "Write it again (e.g. Dataset.to_parquet or pandas.DataFrame.to_parquet), or give the source it came from."
    records = _load(lambda: datasets.Dataset.from_parquet(path), path, fix)
    return _with_where(records, _labels(f"{path} row ", range(len(records))))


@READERS.register("datasets")
def read_datasets_dir(path: str, split: str) -> datasets.Dataset:
    fix = "Write it with Dataset.save_to_disk or DatasetDict.save_to_disk."
    loaded = _load(lambda: datasets.load_from_disk(path), path, fix)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"{path} has the splits {list(loaded)}, not {split!r}. Set split to one of them.")
        loaded, path = loaded[split], os.path.join(path, split)
    return _with_where(loaded, _labels(f"{path} row ", range(len(loaded))))


@READERS.register("hub")
def read_hub(name: str, split: str) -> datasets.Dataset:
    require_hub(name, _LOCAL_INSTEAD)
    try:
        records = datasets.load_dataset(name, split=split)
    # The Hub's failures come as many types (HTTP, missing repo, missing split); each becomes one line.
    except Exception as error:  # noqa: BLE001
        reason = _reason(error)
        raise ConfigError(f"{name}: the Hub did not give the split {split!r} ({reason}). {_LOCAL_INSTEAD}") from None
    return _with_where(records, _labels(f"{name}:{split} row ", range(len(records))))


def union_of_columns(parts: List[datasets.Dataset], labels: List[str]) -> datasets.Dataset:
    """One dataset with every column of every part (None where a part lacks it), in order of first appearance
    and `_where` last. A column whose type differs between parts is refused, naming both (labels[i] names
    parts[i])."""
    _refuse_type_conflicts(parts, labels)
    with _quiet_datasets():
        combined = datasets.concatenate_datasets(parts)
    columns = list(dict.fromkeys(column for part in parts for column in part.column_names if column != WHERE))
    return combined.select_columns(columns + [WHERE] if WHERE in combined.column_names else columns)


def _refuse_type_conflicts(parts: List[datasets.Dataset], labels: List[str]) -> None:
    first_seen: Dict[str, Tuple[object, str]] = {}
    for part, label in zip(parts, labels, strict=True):
        for column, feature in part.features.items():
            if feature == datasets.Value("null"):
                continue  # A column that is None in every row takes the other parts' type.
            if column not in first_seen:
                first_seen[column] = (feature, label)
            elif first_seen[column][0] != feature:
                other_feature, other_label = first_seen[column]
                raise DataError(
                    f"field {column!r} is {other_feature} in {other_label} but {feature} in {label}. Give it the "
                    f"same type and shape everywhere (e.g. quote numbers), or read them as separate sources."
                )


def mix(
    sources: List[datasets.Dataset], specs: List[SourceSpec], seed: int
) -> Tuple[datasets.Dataset, Dict[str, int]]:
    """Each source capped to its first spec.max_rows rows, then sampled to round(weight * rows) rows (whole
    copies plus a seeded sample without replacement of the rest, so a row appears floor(w) or ceil(w) times),
    all interleaved in one seeded order. Returns the mix and the rows each source contributes, by name."""
    if not sources:
        raise ConfigError("no data sources to mix: give at least one.")
    names = [source_name(spec) for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"the sources {repeated} appear twice. Give each source its own name.")
    for spec in specs:
        check_spec(spec)
    capped = [_first_rows(records, spec.max_rows) for records, spec in zip(sources, specs, strict=True)]
    picks = [
        _weighted_rows(len(records), spec.weight, np.random.default_rng([seed, index]))
        for index, (records, spec) in enumerate(zip(capped, specs))
    ]
    if not sum(len(pick) for pick in picks):
        raise ConfigError(f"the mix of {names} has no rows: every source is empty or has weight 0.")
    offsets = np.cumsum([0] + [len(records) for records in capped[:-1]])
    rows = np.concatenate([pick + offset for pick, offset in zip(picks, offsets)])
    order = np.random.default_rng(seed).permutation(rows)
    mixed = union_of_columns(capped, names).select(order)
    return mixed, {name: len(pick) for name, pick in zip(names, picks)}


def _first_rows(records: datasets.Dataset, max_rows: int) -> datasets.Dataset:
    return records.select(range(min(max_rows, len(records)))) if max_rows else records


def _weighted_rows(count: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    copies, remainder = divmod(round(weight * count), count)
    sample = np.sort(rng.choice(count, size=remainder, replace=False))
    return np.concatenate([np.tile(np.arange(count), copies), sample]).astype(np.int64)
