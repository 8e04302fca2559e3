"""The data a run trains on, prepared once and reused: what `dstrain prepare` and the trainer's setup share.

The data fingerprint hashes everything the prepared rows depend on: the contents of every input file, the
data settings, the seed that mixes sources, and the tokenizer (its vocabulary, merges and the chat template).
It goes into every checkpoint's manifest, so a resumed run can tell that it would read other data.

Instruction data is prepared into `<data.cache_dir>/<fingerprint>/` (each split saved with `save_to_disk`,
the validation and test splits' generation prompts as `<split>_prompts`, plus the report and the chat
template); training memory-maps it and starts in seconds. Whoever finds no
cache entry prepares one and renames it into place whole, so a crashed or concurrent preparation never
leaves a half-written entry. Plain text (data.format=text) is tokenised and cut into blocks by
dstrain.data.packed_blocks, which the `datasets` cache keeps.
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import datasets

from dstrain.config import TrainConfig
from dstrain.data import packed_blocks
from dstrain.errors import ConfigError
from dstrain.sources import SourceSpec, matching_paths

log = logging.getLogger("dstrain")

REPORT = "data_report.json"
TEMPLATE = "chat_template.jinja"
# Part of every fingerprint: bump it when preparation changes what it makes of the same inputs.
PREPARATION_VERSION = 2
# Settings that do not change the prepared rows.
_NOT_IN_FINGERPRINT = ("cache_dir", "changed_on_resume", "tokenizer", "builtin_train_documents",
                       "builtin_val_documents")


@dataclass
class PreparedData:
    """What training reads: rows of input_ids (and labels, position_ids for instruction data), torch format."""

    train: datasets.Dataset
    # None when the run does not evaluate.
    validation: Optional[datasets.Dataset]
    fingerprint: str
    # The rendered chat template of instruction data, None for plain text.
    chat_template: Optional[str]
    report: dict
    # Instruction data only: the rows of the test split, where there is one (`dstrain eval` reads it).
    test: Optional[datasets.Dataset] = None
    # Instruction data only: each evaluated split's generation prompts (prompt_ids, reference), by split name.
    prompts: Dict[str, datasets.Dataset] = field(default_factory=dict)


def data_fingerprint(cfg: TrainConfig, tokenizer) -> str:
    digest = hashlib.sha256()
    settings = {key: value for key, value in asdict(cfg.data).items() if key not in _NOT_IN_FINGERPRINT}
    if cfg.data.name == "builtin":
        settings["documents"] = [cfg.data.builtin_train_documents, cfg.data.builtin_val_documents]
    digest.update(json.dumps([PREPARATION_VERSION, settings, cfg.trainer.seed], sort_keys=True).encode())
    digest.update(_tokenizer_identity(tokenizer))
    for path in _input_files(cfg):
        digest.update(path.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _tokenizer_identity(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    return hashlib.sha256(f"{vocabulary}\0{template}\0{tokenizer.eos_token}\0{tokenizer.bos_token}".encode()).digest()


def _input_files(cfg: TrainConfig):
    """Every local file the sources read, in a fixed order; Hub names are hashed by name only (settings)."""
    data = cfg.data
    if data.name != "files":
        return
    for path in [*data.train_files, *data.val_files, *data.test_files]:
        spec = SourceSpec(path=str(path), format=data.reader)
        for match in matching_paths(spec):
            if os.path.isdir(match):
                yield from sorted(str(file) for file in Path(match).rglob("*") if file.is_file())
            elif os.path.exists(match):
                yield match


def prepare(cfg: TrainConfig, tokenizer, fingerprint: str, needs_validation: bool) -> PreparedData:
    """The data of this config, from the cache where it is there, else prepared now (and cached)."""
    if cfg.data.format == "text":
        train = packed_blocks(cfg, tokenizer, "train")
        validation = packed_blocks(cfg, tokenizer, "validation") if needs_validation else None
        report = {"format": "text", "splits": {"train": {"rows": len(train)}}}
        if validation is not None:
            report["splits"]["validation"] = {"rows": len(validation)}
        return PreparedData(train, validation, fingerprint, None, dict(report, fingerprint=fingerprint))
    entry = cache_entry(cfg, fingerprint)
    if not (entry / REPORT).is_file():
        _prepare_into(entry, cfg, tokenizer, fingerprint)
    else:
        log.info("prepared data: reusing %s", entry)
    report = json.loads((entry / REPORT).read_text())
    splits = {name: datasets.load_from_disk(str(entry / name)).with_format("torch") for name in report["splits"]}
    if needs_validation and "validation" not in splits:
        raise ConfigError("trainer.eval_every is set, but the prepared data has no validation split: give "
                          "data.val_files, or a data.split with a validation ratio above 0.")
    validation = splits.get("validation") if needs_validation else None
    prompts = {name: datasets.load_from_disk(str(entry / prompts_name(name))) for name in report["splits"]
               if name != "train"}
    return PreparedData(splits["train"], validation, fingerprint, (entry / TEMPLATE).read_text(), report,
                        splits.get("test"), prompts)


def prompts_name(split: str) -> str:
    """The prepared dataset of a split's generation prompts, next to the split's rows."""
    return f"{split}_prompts"


def cache_entry(cfg: TrainConfig, fingerprint: str) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.run.root) / "data_cache") / fingerprint


def _prepare_into(entry: Path, cfg: TrainConfig, tokenizer, fingerprint: str) -> None:
    # Imported here: plain-text runs never load the chat, cleaning and packing stack.
    from dstrain.instructions import prepare_instruction_data, report_lines

    log.info("preparing %s data into %s", cfg.data.format, entry)
    prompts: Dict[str, datasets.Dataset] = {}
    splits, report, template = prepare_instruction_data(cfg, tokenizer, fingerprint, prompts)
    report["fingerprint"] = fingerprint
    for line in report_lines(report):
        log.info("data: %s", line)
    staging = entry.parent / f".{entry.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, rows in splits.items():
        rows.save_to_disk(str(staging / name))
    for name, split_prompts in prompts.items():
        split_prompts.save_to_disk(str(staging / prompts_name(name)))
    (staging / TEMPLATE).write_text(template)
    (staging / REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    try:
        os.rename(staging, entry)
    except OSError:  # Another process renamed the same entry into place first: theirs is the same data.
        shutil.rmtree(staging, ignore_errors=True)


def write_report(prepared: PreparedData, run_dir: Path) -> Path:
    path = Path(run_dir) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prepared.report, indent=1, ensure_ascii=False))
    return path
