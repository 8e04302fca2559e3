#!/usr/bin/env python
"""The Hugging Face Trainer side of benchmarks/finetune.py: one LoRA fine-tune, started by that benchmark as
`deepspeed --num_gpus N benchmarks/hf_trainer_finetune.py --settings settings.json`. Not meant to be run by hand.

transformers.Trainer with DeepSpeed at the settings the benchmark passes (the Trainer's documented defaults
for the rest), over samples that dstrain prepared unpacked (input_ids and labels, -100 on the prompt), padded
per batch by DataCollatorForSeq2Seq. Writes into the output directory: the adapter (trainer.save_model) and
timing.json (rank 0), plus batches_rank<N>.json from every rank: the samples and counted tokens of each batch
its data loader produced, in order, which is what step k of that rank trained on.
"""

import argparse
import json
import os
import time
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)

IGNORE_INDEX = -100


class StepClock(TrainerCallback):
    """perf_counter when training begins and at the end of every optimizer step (after the optimizer and the
    scheduler stepped)."""

    def __init__(self):
        self.started, self.stamps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


class CountingCollator:
    """DataCollatorForSeq2Seq unchanged, noting each batch's samples, counted tokens (labels past the first
    position that are not IGNORE_INDEX: what the shifted loss counts), real tokens and positions."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = []

    def __call__(self, features):
        batch = self.collator(features)
        counted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.batches.append({"samples": len(features), "counted_tokens": counted,
                             "real_tokens": int(batch["attention_mask"].sum()),
                             "positions": int(batch["input_ids"].numel())})
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=-1)  # appended by the deepspeed launcher
    settings = json.loads(parser.parse_args().settings.read_text())
    out = Path(settings["output_dir"])
    rank = int(os.environ.get("RANK", "0"))

    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    # Same frozen base dtype as dstrain's bf16 run: DeepSpeed's bf16 mode casts the module to bf16 anyway.
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    model.config.use_cache = False
    lora = settings["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    samples = datasets.load_from_disk(settings["train_samples"]).select_columns(["input_ids", "labels"])

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.pad_token_id = pad_id
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    clock = StepClock()
    arguments = TrainingArguments(output_dir=str(out), report_to="none", save_strategy="no", **settings["arguments"])
    trainer = Trainer(model=model, args=arguments, train_dataset=samples, data_collator=collator, callbacks=[clock])
    result = trainer.train()
    trainer.save_model(str(out / "adapter"))

    (out / f"batches_rank{rank}.json").write_text(json.dumps(collator.batches))
    if rank == 0:
        (out / "timing.json").write_text(json.dumps({
            "train_start": clock.started, "step_end_stamps": clock.stamps,
            "train_runtime": result.metrics["train_runtime"], "final_train_loss": result.training_loss,
            "world_size": arguments.world_size, "deepspeed": trainer.is_deepspeed_enabled}))


if __name__ == "__main__":
    main()
