"""`dstrain eval MODEL`: a trained model's perplexity and generation scores on a split, in one CPU process.

MODEL is a checkpoint (a step_* directory, or checkpoints/best or checkpoints/latest, which name one) or an
exported directory (a full Hugging Face model, or an adapter directory on its base). A checkpoint brings its
run's config, so the data is the run's own (its test split by default, or `--split validation`) and the
layout is the run's: the same rows in the same micro-batches (trainer.micro_batch_size on each of the run's
ranks, at most trainer.eval_batches each), and the model in the precision it trained in (the fp32 masters
rounded as the engine rounded them). On the validation split, perplexity and the generation scores of a
checkpoint are therefore those the run logged at that step. An exported directory has no run config: it needs
`--files` and `--data-format`, and is evaluated in fp32 on one rank's layout.

`--harness TASKS` also runs lm-evaluation-harness on the same model object, offline, with the task YAML files
of `--harness-tasks-dir`.
"""

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError

SPLITS = ("validation", "test")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelToEvaluate:
    """A loaded model, in eval mode, with the config that says which data and layout it is evaluated on."""

    model: torch.nn.Module
    tokenizer: object
    cfg: TrainConfig
    # The ranks whose micro-batch layout perplexity reproduces: the run's world size, 1 for an export.
    world_size: int
    # What the report names: the checkpoint's step, or None for an export.
    step: Optional[int]
    path: Path


def evaluate_model(path: Path, split: str = "test", files: Optional[List[str]] = None,
                   data_format: Optional[str] = None, output: Optional[Path] = None,
                   harness_tasks: Optional[List[str]] = None, harness_tasks_dir: Optional[Path] = None) -> dict:
    """Evaluate, print the table, write the JSON; returns what the JSON holds."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not one of {list(SPLITS)}")
    if harness_tasks and harness_tasks_dir is None:
        raise ConfigError("--harness needs --harness-tasks-dir DIR, the local task YAML files (it runs offline)")
    from dstrain.trainer import silence_library_notices

    silence_library_notices()
    target = load_model_to_evaluate(Path(path), data_format)
    # As in training: with the KV cache on, transformers does not detect packed rows from their position ids,
    # and attention would cross samples. Generation turns the cache on for itself.
    target.model.config.use_cache = False
    rows, prompts, source = evaluation_data(target, split, files)
    results = {"model": str(target.path), "step": target.step, "data": source, "rows": len(rows)}
    metrics = perplexity(target, rows)
    if prompts is not None and len(prompts):
        from dstrain.evaluation import Generation

        generation = Generation(target.cfg.eval, target.cfg.data.seq_len, target.tokenizer, prompts,
                                target.tokenizer.chat_template)
        metrics.update(generation.evaluate(target.model, torch.device("cpu")))
        results["prompts"] = len(generation.prompts)
    results["metrics"] = metrics
    if harness_tasks:
        results["harness"] = run_harness(target, harness_tasks, Path(harness_tasks_dir))
    output = Path(output) if output else target.path / f"eval_{'files' if files else split}.json"
    output.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print_table(results, output)
    return results


def load_model_to_evaluate(path: Path, data_format: Optional[str]) -> ModelToEvaluate:
    from dstrain.loading import locate_model

    location, is_checkpoint = locate_model(path)
    return _checkpoint(location) if is_checkpoint else _exported(location, data_format)


def _checkpoint(checkpoint: Path) -> ModelToEvaluate:
    from dstrain.loading import load_trained_model

    trained = load_trained_model(checkpoint)
    cast_parameters(trained.model, _DTYPES[trained.cfg.precision.dtype])
    return ModelToEvaluate(trained.model, trained.tokenizer, trained.cfg, trained.manifest["world_size"],
                           trained.manifest["step"], checkpoint)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The parameters in the training precision, as DeepSpeed's engine casts them: the 16-bit rounding of the
    fp32 masters, which is what the engine computed with. Buffers stay fp32 as they do there (the rotary
    embedding's frequencies: rounding them too would move the loss by about 1e-3)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)


def _exported(directory: Path, data_format: Optional[str]) -> ModelToEvaluate:
    from dstrain.compose import compose
    from dstrain.loading import load_exported_model

    if data_format is None:
        raise ConfigError(f"{directory} is an exported model, which has no run config to take the data from: give "
                          f"--files F... and --data-format alpaca|sharegpt|messages.")
    model, tokenizer = load_exported_model(directory)
    # Without a run's layout to reproduce: every row, one per micro-batch.
    cfg = compose([f"+data={data_format}", "+model=pretrained", f"model.pretrained={directory}",
                   "trainer.micro_batch_size=1", f"trainer.eval_batches={sys.maxsize}"])
    return ModelToEvaluate(model, tokenizer, cfg, 1, None, directory)


def evaluation_data(target: ModelToEvaluate, split: str, files: Optional[List[str]]):
    """The split's rows (what perplexity reads), its generation prompts (None for plain text), and a label."""
    from dstrain.data import build_tokenizer
    from dstrain.preparation import data_fingerprint, prepare

    cfg = target.cfg
    if files:
        if cfg.data.format == "text":
            raise ConfigError("--files needs instruction data (the run trained on data.format=text)")
        # The files as the test split of the run's own data settings: prepared (and cached) the same way.
        cfg = replace(cfg, data=replace(cfg.data, name="files", split=[], train_files=list(files), train_weights=[],
                                        train_max_rows=[], val_files=[], test_files=list(files)))
        split = "test"
    elif target.step is None:
        raise ConfigError("an exported model has no run data to evaluate on: give --files F...")
    # The tokenizer as training built it: the fingerprint covers its own template, not the one restored.
    tokenizer = build_tokenizer(cfg)
    prepared = prepare(cfg, tokenizer, data_fingerprint(cfg, tokenizer), needs_validation=split == "validation")
    rows = prepared.validation if split == "validation" else prepared.test
    if rows is None or not len(rows):
        raise ConfigError(f"the run's data has no {split} split (data.split={list(cfg.data.split)}): choose "
                          f"--split {'test' if split == 'validation' else 'validation'} or give --files F...")
    source = f"files {', '.join(files)}" if files else f"the run's {split} split"
    return rows, prepared.prompts.get(split), source


def perplexity(target: ModelToEvaluate, rows) -> Dict[str, float]:
    """As the run's Perplexity evaluator: each rank's micro-batches summed, then the ranks' sums in rank order."""
    from dstrain.data import eval_batches, pad_id
    from dstrain.evaluation import Perplexity

    trainer, ranks = target.cfg.trainer, target.world_size
    if len(rows) < trainer.micro_batch_size * ranks:
        raise ConfigError(f"the split has {len(rows)} rows, fewer than one micro-batch on each of the run's "
                          f"{ranks} ranks (trainer.micro_batch_size={trainer.micro_batch_size})")
    sums = [Perplexity.summed(target.model, eval_batches(rows, trainer.micro_batch_size, ranks, rank,
                                                         trainer.eval_batches, pad_id(target.tokenizer)),
                              torch.device("cpu")) for rank in range(ranks)]
    return Perplexity.metrics(sum(float(loss) for loss, _ in sums), sum(count for _, count in sums))


def run_harness(target: ModelToEvaluate, tasks: List[str], tasks_dir: Path) -> dict:
    """lm-evaluation-harness on the model object, with only the local task files: nothing is downloaded."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks_dir.is_dir():
        raise ConfigError(f"--harness-tasks-dir {tasks_dir} is not a directory of lm-eval task YAML files")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--harness: no task {unknown[0]!r} in {tasks_dir} (found: {sorted(manager.all_tasks)})")
    model = target.model
    if hasattr(model, "merge_and_unload"):  # HFLM takes a transformers model; the metrics above are done with it
        model = model.merge_and_unload()
    harness_model = HFLM(pretrained=model, tokenizer=target.tokenizer, batch_size=1)
    results = simple_evaluate(model=harness_model, tasks=list(tasks), task_manager=manager, log_samples=False,
                              bootstrap_iters=0)
    return {task: {key: value for key, value in metrics.items() if _is_number(value)}
            for task, metrics in results["results"].items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def print_table(results: dict, output: Path) -> None:
    step = f"step {results['step']} of " if results["step"] is not None else ""
    print(f"{step}{results['model']} on {results['data']}: {results['rows']} rows"
          + (f", {results['prompts']} prompts" if "prompts" in results else ""))
    rows = [(name, value) for name, value in results["metrics"].items()]
    for task, metrics in results.get("harness", {}).items():
        rows += [(f"{task}/{name}", value) for name, value in metrics.items()]
    width = max(len(name) for name, _ in rows)
    print(f"  {'metric':<{width}}  value")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.10g}")
    print(f"wrote {output}")
