"""The `dstrain` command: one subcommand per job around training (training itself is launch/train.py).

    dstrain prepare [OVERRIDE ...]
    dstrain export CHECKPOINT OUTPUT_DIR [--merged] [--format hf|onnx|gguf] [--quantize TYPE]
    dstrain eval MODEL [--split test|validation] [--files F ...] [--output JSON] [--harness TASKS]
    dstrain generate MODEL (--prompt TEXT | --chat) [--int8] [--temperature T] [--top-k K] [--top-p P] ...
    dstrain serve MODEL [--host HOST] [--port PORT] [--queue-size N] [--request-timeout S] [--int8]
    dstrain submit [--dry-run] [OVERRIDE ...]
    dstrain plan [OVERRIDE ...] [--nodes M] [--gpus-per-node N] [--gpu-memory 80GB] [--gpu-type h100]
    dstrain report RUN_DIR

Each subcommand is an `add_<name>_command(subparsers)` that registers its arguments and its handler; the
handler imports what it needs, so `dstrain --help` stays fast. A DstrainError from a handler is printed as
one line, `dstrain: <kind>: ...`, with its exit code (dstrain.errors.ExitCode; 2 for config errors, as
argparse uses for a bad argument).
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from dstrain.errors import DstrainError

PROG = "dstrain"


def add_prepare_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="prepare a run's data into the cache, so that training starts in seconds",
        description=(
            "Compose and check the config from the same overrides as launch/train.py, then read, clean, split, "
            "tokenise and pack the data in this one CPU process, into data.cache_dir/<data fingerprint> "
            "(instruction data) or the datasets cache (data.format=text). Training with the same overrides "
            "reuses it. Writes the data report to <run.root>/<run.name>/data_report.json."
        ),
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE",
        help="Hydra overrides, e.g. +data=alpaca data.train_files=[/data/alpaca.json]",
    )
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    import logging

    import datasets

    from dstrain.checks import validate
    from dstrain.compose import compose
    from dstrain.data import build_tokenizer
    from dstrain.preparation import cache_entry, data_fingerprint, prepare, write_report

    cfg = compose(args.overrides)
    validate(cfg)
    # The preparation logs each step's counts on the "dstrain" logger, as training does (trainer.setup_logging).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for noisy in ("datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # Progress bars help at a terminal; in a job's log they are noise.
        datasets.disable_progress_bars()
    tokenizer = build_tokenizer(cfg)
    fingerprint = data_fingerprint(cfg, tokenizer)
    prepared = prepare(cfg, tokenizer, fingerprint, needs_validation=bool(cfg.trainer.eval_every))
    report = write_report(prepared, Path(cfg.run.root) / cfg.run.name)
    print(f"data fingerprint {fingerprint}")
    if cfg.data.format == "text":
        print("  tokenised into the datasets cache (data.format=text has no cache entry of its own)")
    else:
        print(f"  cache entry: {cache_entry(cfg, fingerprint)}")
    for name, section in prepared.report["splits"].items():
        print(f"  {name}: {section['rows']:,} rows of data.seq_len={cfg.data.seq_len}")
    print(f"  report: {report}")


def add_export_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face directory, ONNX or GGUF",
        description=(
            "Turn a dstrain checkpoint (any ZeRO stage, any precision, full or an adapter) into a Hugging Face "
            "directory that AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load, and "
            "that model.pretrained=OUTPUT_DIR trains on; or into ONNX for ONNX Runtime, or one GGUF file for "
            "llama.cpp, LM Studio and Ollama. Weights are consolidated to fp32 on the CPU; frozen weights come "
            "from model.pretrained as stored."
        ),
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="a checkpoints/step_NNNNNNNN directory, or checkpoints/best (early stopping's best) or "
             "checkpoints/latest, which name one",
    )
    parser.add_argument("output", metavar="OUTPUT_DIR", help="a new (or empty) directory to write")
    parser.add_argument(
        "--merged", action="store_true",
        help="adapters only: also write the full model with the adapter merged in, to OUTPUT_DIR/merged",
    )
    parser.add_argument(
        "--format", default="hf", dest="output_format", metavar="FORMAT",
        help="hf (default): Hugging Face safetensors weights, config and tokenizer; onnx: model.onnx with dynamic "
             "batch and sequence, for ONNX Runtime; gguf: one .gguf file with the tokenizer and chat template, for "
             "llama.cpp, LM Studio and Ollama. onnx and gguf hold the whole model: an adapter is merged in",
    )
    parser.add_argument(
        "--quantize", default=None, metavar="TYPE",
        help="onnx: int8 (onnxruntime dynamic quantisation; default: fp32); gguf: f32, f16 or q8_0 (default f16)",
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> None:
    from dstrain.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.output, merged=args.merged, output_format=args.output_format,
                               quantize=args.quantize)
    print(f"exported {result.contents} of step {result.step} (ZeRO-{result.zero_stage}, trained in {result.dtype}) "
          f"as {result.weights}:")
    for directory in result.directories:
        print(f"  {directory}")


def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="a trained model's perplexity and generation scores (BLEU, ROUGE, exact match) on a split",
        description=(
            "Evaluate a checkpoint (checkpoints/step_*, best or latest) on its run's own data, with the run's "
            "micro-batch layout and precision, so that on the validation split it reports what the run logged at "
            "that step; or an exported directory (full model or adapter) on --files. Greedy answers to the first "
            "eval.max_prompts prompts are scored against the references. Prints a table and writes JSON."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a checkpoint directory or pointer, or an exported directory")
    parser.add_argument("--split", default="test", help="the run's split: test (default) or validation")
    parser.add_argument("--files", nargs="+", metavar="F",
                        help="evaluate on these files instead, in the run's record format (data.format)")
    parser.add_argument("--data-format", metavar="FORMAT",
                        help="exported models only: the record format of --files (alpaca, sharegpt, messages)")
    parser.add_argument("--output", metavar="JSON", help="where to write the results (default: MODEL/eval_<split>.json)")
    parser.add_argument("--harness", metavar="TASKS",
                        help="also run lm-evaluation-harness tasks, comma-separated, offline (needs --harness-tasks-dir)")
    parser.add_argument("--harness-tasks-dir", metavar="DIR", help="a directory of lm-eval task YAML files")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from dstrain.offline_eval import evaluate_model

    tasks = [task for task in (args.harness or "").split(",") if task]
    evaluate_model(args.model, args.split, args.files, args.data_format, args.output, tasks, args.harness_tasks_dir)


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="the most tokens an answer may take (default: 256, or what the context leaves); "
                             "prompt and answer must fit the model's context")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy, the same answer every time; above 0: sampling")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens (default 0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens whose probability reaches P, in (0, 1] (default 1)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1, tokens already there become less likely (default 1: off)")
    parser.add_argument("--stop", nargs="+", default=[], metavar="S",
                        help="end the answer before the first of these strings")
    parser.add_argument("--seed", type=int, help="makes sampling repeatable")


def _add_int8_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8", action="store_true",
                        help="quantise the linear layers to INT8 (PyTorch dynamic quantisation; an adapter is merged "
                             "in first): a faster CPU forward, and answers that may differ a little from fp32's")


def add_generate_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt, or chat, with a trained model, streaming to the terminal",
        description=(
            "Load a checkpoint (checkpoints/step_*, best or latest) or an exported directory on the CPU and stream "
            "its answers. Prompts are rendered with the chat template the run trained with; a model without one "
            "(trained on plain text) continues --prompt as text. Generation uses the KV cache."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a checkpoint directory or pointer, or an exported directory")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", metavar="TEXT", help="answer this one prompt and exit")
    mode.add_argument("--chat", action="store_true",
                      help="a conversation: each line of stdin is a user turn, answered in turn, until end of input")
    parser.add_argument("--system", metavar="TEXT", help="a system turn before the conversation")
    _add_int8_argument(parser)
    _add_sampling_arguments(parser)
    parser.set_defaults(handler=run_generate)


# The flag each option (dstrain.generation.OptionError.field) is given with.
_FLAGS = {"messages": "--chat", "chat": "--chat"}


def run_generate(args: argparse.Namespace) -> None:
    from dstrain.errors import ConfigError
    from dstrain.generation import OptionError, SamplingOptions
    from dstrain.inference import generate_in_terminal

    default_length = SamplingOptions.max_new_tokens
    options = SamplingOptions(max_new_tokens=default_length if args.max_new_tokens is None else args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    try:
        generate_in_terminal(Path(args.model), options, args.prompt, args.system, args.chat,
                             args.max_new_tokens is not None, int8=args.int8)
    except OptionError as error:
        flag = _FLAGS.get(error.field, "--" + error.field.replace("_", "-"))
        raise ConfigError(f"{flag} {error.problem}") from None


def add_serve_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP API for a trained model (FastAPI and uvicorn)",
        description=(
            "Serve a checkpoint or an exported directory at /v1/models, /v1/completions and /v1/chat/completions "
            "(with server-sent-event streaming) and /health. One worker owns the model and answers requests in "
            "turn from a bounded queue: a full queue answers 429, a request that takes longer than "
            "--request-timeout 504."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a checkpoint directory or pointer, or an exported directory")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000)")
    parser.add_argument("--model-name", metavar="NAME", help="the model id that requests name (default: MODEL)")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="requests that may wait for the model; more are answered 429 (default 64)")
    parser.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="a request's limit, waiting included; past it the answer is 504 (default 300)")
    _add_int8_argument(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from dstrain.serve import serve

    serve(Path(args.model), args.host, args.port, args.model_name or args.model, args.queue_size, args.request_timeout,
          int8=args.int8)


def add_submit_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit a training run as a SLURM batch job",
        description=(
            "Compose and check the config from the same overrides as launch/train.py (plus launcher.*: nodes, "
            "gpus_per_node, partition, time, signal, requeue, ...), render launch/slurm/job.sbatch.template and "
            "submit it with sbatch. The run directory is run.root/run.name, or run.root/slurm-<job id> without "
            "run.name; a requeued job resumes there from its newest checkpoint."
        ),
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. +model=7b launcher.nodes=2"
    )
    parser.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> None:
    from dstrain.slurm import submit

    submit(args.overrides, dry_run=args.dry_run)
    if args.dry_run:
        print_submitted_plan(args.overrides)


def print_submitted_plan(overrides: List[str]) -> None:
    """The memory plan of the job the dry run printed, as comments after its script."""
    from dstrain.compose import compose
    from dstrain.model_census import census
    from dstrain.plan_fit import launcher_hardware, report_lines

    cfg = compose(overrides)
    hardware = launcher_hardware(cfg.launcher)
    if hardware is None:
        print("# memory plan: set launcher.gpu_type (a100, h100, ...) to plan against its memory")
        return
    for line in report_lines(cfg, census(cfg), hardware):
        print(f"# {line}")


def add_plan_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="a run's memory per rank, the largest micro-batch that fits and what would make it fit",
        description=(
            "Compose and check the config from the same overrides as launch/train.py, count the model's "
            "parameters on the meta device (nothing large is built) and print the DeepSpeed config, the batch "
            "arithmetic and the memory plan per rank: weights, gradients and optimizer states under the ZeRO "
            "stage, activations, logits, DeepSpeed's buffers, runtime and headroom; then the largest "
            "micro-batch that fits and, for a job that does not fit, the settings that would make it fit. "
            "Without --gpu-type or --gpu-memory on a machine without GPUs it plans CPU ranks sharing this "
            "machine's RAM, --gpus-per-node of them."
        ),
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. +model=7b +zero=3")
    parser.add_argument("--nodes", default="1", metavar="M", help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", default="1", metavar="N",
                        help="ranks per node, one GPU each (CPU ranks without GPUs; default 1)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU: 80GB, 80G, 141GiB")
    parser.add_argument("--gpu-type", metavar="NAME",
                        help="a GPU of dstrain's table (h100, a100, ...): its memory, peak and links")
    parser.add_argument("--peak-tflops", metavar="TFLOPS",
                        help="one rank's dense peak for the forecast, where the table has none (a PCIe card) or on a "
                             "CPU instead of a matmul timed here")
    parser.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    import json

    import torch

    from dstrain.checks import validate
    from dstrain.compose import compose
    from dstrain.deepspeed_config import build_deepspeed_config
    from dstrain.model_census import census
    from dstrain.plan_fit import count_option, gpus, positive_number, report_lines, this_machine

    nodes = count_option(args.nodes, "--nodes")
    ranks_per_node = count_option(args.gpus_per_node, "--gpus-per-node")
    peak_tflops = None if args.peak_tflops is None else positive_number(args.peak_tflops, "--peak-tflops")
    cfg = compose(args.overrides)
    validate(cfg)
    if args.gpu_type or args.gpu_memory:
        hardware = gpus(args.gpu_type, args.gpu_memory, ranks_per_node, nodes)
    elif torch.cuda.is_available():
        memory = f"{torch.cuda.get_device_properties(0).total_memory}B"
        hardware = gpus(torch.cuda.get_device_name(0), memory, ranks_per_node, nodes)
    else:
        hardware = this_machine(ranks_per_node, nodes)
        print(f"no GPU here and no --gpu-type/--gpu-memory: planning {ranks_per_node} CPU rank(s) per node "
              f"(--gpus-per-node) on this machine's RAM")
    world_size = nodes * ranks_per_node
    print(f"DeepSpeed config (world size {world_size}):")
    print(json.dumps(build_deepspeed_config(cfg, world_size), indent=2))
    for line in report_lines(cfg, census(cfg), hardware, peak_tflops):
        print(line)


def add_report_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot a run's metrics file as PNGs",
        description=(
            "Read RUN_DIR/metrics.jsonl or metrics.csv and write loss (with eval_loss), lr, grad_norm and "
            "throughput plots, one PNG each plus summary.png, to RUN_DIR/report. Steps that a resumed run "
            "repeated are taken from the resumed run."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, <run.root>/<run.name>")
    parser.add_argument("--output", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/report)")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> None:
    from dstrain.report import write_report

    for path in write_report(args.run_dir, args.output):
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="dstrain: tools around training runs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_prepare_command(subparsers)
    add_export_command(subparsers)
    add_eval_command(subparsers)
    add_generate_command(subparsers)
    add_serve_command(subparsers)
    add_submit_command(subparsers)
    add_plan_command(subparsers)
    add_report_command(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except DstrainError as error:
        print(f"{PROG}: {error.kind}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
