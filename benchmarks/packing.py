#!/usr/bin/env python
"""Speed and fill ratio of dstrain.packing.pack on chat-like sample lengths, for each placement strategy.

    python benchmarks/packing.py                          # 100k samples into rows of 2048
    python benchmarks/packing.py --samples 1000000 --seq-len 4096 --window 2000

Lengths are log-normal (median ~270 tokens, mean ~370), capped at seq_len, as in instruction data; the token
ids do not matter to packing. Time is pack() alone, on an in-memory dataset (no cache files to write).
"""

import argparse
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dstrain.packing import PLACEMENTS, PackingConfig, pack, packing_efficiency


def chat_like_samples(count: int, seq_len: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.6, 0.8, count).astype(np.int64), 1, seq_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = pa.array(rng.integers(0, 32000, offsets[-1]))
    column = pa.LargeListArray.from_arrays(pa.array(offsets), tokens)
    return datasets.Dataset(pa.table({"input_ids": column, "labels": column}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--window", type=int, default=PackingConfig.window)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    samples = chat_like_samples(args.samples, args.seq_len, seed=0)
    tokens = pc.sum(pc.list_value_length(samples.with_format("arrow")["input_ids"])).as_py()
    print(f"{args.samples} samples, {tokens / 1e6:.1f}M tokens, seq_len {args.seq_len}, window {args.window}")
    for strategy in PLACEMENTS:
        start = time.perf_counter()
        packed = pack(samples, args.seq_len, pad_id=0, config=PackingConfig(strategy, args.window))
        seconds = time.perf_counter() - start
        print(f"{strategy:>20}: {len(packed)} rows in {seconds:.1f} s, fill ratio {packing_efficiency(packed):.4f}")


if __name__ == "__main__":
    main()
