#!/usr/bin/env python
"""How fast dstrain.sources.read_records reads alpaca-like records, per format, cold and from the cache.

    python benchmarks/read_records.py                 # 100k records
    python benchmarks/read_records.py --records 1000000

Writes the records (Chinese and English, every 50th line blank) as JSONL, a JSON array, Parquet and CSV into a
temporary directory, with a fresh `datasets` cache, and times read_records on each twice: "cold" parses the
file and writes the arrow cache; "cached" finds it there (the line scan and `_where` are redone).
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from dstrain.sources import SourceSpec, read_records


def alpaca_like(count: int, seed: int = 0):
    rng = random.Random(seed)
    for index in range(count):
        yield {
            "instruction": f"第{index}题：解释这个概念 " + "why " * rng.randint(2, 30),
            "input": "" if rng.random() < 0.6 else "context " * rng.randint(1, 40),
            "output": "答案 " * rng.randint(5, 120),
        }


def write_all(directory: Path, count: int) -> dict:
    records = list(alpaca_like(count))
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    jsonl = directory / "data.jsonl"
    jsonl.write_text("".join(line + ("\n\n" if i % 50 == 49 else "\n") for i, line in enumerate(lines)))
    array = directory / "data.json"
    array.write_text(json.dumps(records, ensure_ascii=False))
    parquet = directory / "data.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    table = pa.Table.from_pylist(records).to_pandas()
    csv = directory / "data.csv"
    table.to_csv(csv, index=False)
    return {"jsonl": jsonl, "json": array, "parquet": parquet, "csv": csv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        datasets.config.HF_DATASETS_CACHE = str(directory / "cache")
        paths = write_all(directory, args.records)
        print(f"{'format':8} {'MB':>7} {'cold s':>7} {'cached s':>9} {'records/s cold':>15}")
        for name, path in paths.items():
            times = []
            for _ in range(2):
                started = time.perf_counter()
                records = read_records(SourceSpec(str(path)))
                times.append(time.perf_counter() - started)
            assert len(records) == args.records, (name, len(records))
            size = path.stat().st_size / 1e6
            print(f"{name:8} {size:7.1f} {times[0]:7.2f} {times[1]:9.2f} {args.records / times[0]:15,.0f}")


if __name__ == "__main__":
    main()
