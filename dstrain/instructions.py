"""Instruction and chat data, from records to the rows the trainer reads.

    records -> conversations -> clean -> split -> tokenise with the loss mask -> fit to seq_len -> pack

Each step is a `datasets` map or filter over memory-mapped Arrow files, in one process, and adds what it did to
the data report (dstrain.preparation writes it and caches the result). A record that cannot be read as a
conversation stops everything here, before any training, with its file, line or row, and field.
"""

from typing import Dict, List, Optional, Tuple

import datasets
import numpy as np

from dstrain.chat import chat_template_for, record_format, tokenize_conversation
from dstrain.cleaning import CleaningReport, clean, drop_by_token_count, normalize_text, split_dataset
from dstrain.config import TrainConfig
from dstrain.data import IGNORE_INDEX, pad_id, read_role
from dstrain.errors import DataError
from dstrain.packing import PackingConfig, pack, packing_efficiency
from dstrain.sources import WHERE

_BATCH_SIZE = 1000


def prepare_instruction_data(
    cfg: TrainConfig, tokenizer, fingerprint: str, prompts: Optional[Dict[str, datasets.Dataset]] = None
) -> Tuple[Dict[str, datasets.Dataset], dict, str]:
    """The prepared splits (train, and validation and test where there are such data), the report, and the
    chat template used. `fingerprint` names the cache entries of the intermediate maps. `prompts`, where
    given, receives the validation and test splits' generation prompts, by split name."""
    data = cfg.data
    template = chat_template_for(tokenizer, data.template)
    steps = _Steps(cfg, tokenizer, template, fingerprint)
    report: dict = {"format": data.format, "template": data.template, "splits": {}}
    if data.split:
        conversations, cleaning = steps.clean(steps.conversations(read_role(cfg, "train"), "train"))
        report["cleaning"] = cleaning.to_json()
        named = zip(("train", "validation", "test"), split_dataset(conversations, tuple(data.split)).values())
        splits = {name: (rows, None) for name, rows in named if len(rows)}
    else:
        splits = {}
        for role, files in (("train", data.train_files), ("validation", data.val_files), ("test", data.test_files)):
            if files:
                splits[role] = steps.clean(steps.conversations(read_role(cfg, role), role))
    prepared = {}
    for name, (conversations, cleaning) in splits.items():
        section = {"cleaning": cleaning.to_json()} if cleaning else {}
        prepared[name] = steps.rows(conversations, name, section)
        report["splits"][name] = section
        if name != "train" and prompts is not None:  # what evaluation by generation answers
            prompts[name] = steps.prompts(conversations, name)
    if "train" not in prepared or len(prepared["train"]) == 0:
        raise DataError("no training sample is left after cleaning and the length limits: see the data report above.")
    return prepared, report, template


class _Steps:
    def __init__(self, cfg: TrainConfig, tokenizer, template: str, fingerprint: str):
        self.data = cfg.data
        self.tokenizer = tokenizer
        self.template = template
        self.fingerprint = fingerprint
        self.format = record_format(self.data.format, dict(self.data.fields))
        self.pad_id = pad_id(tokenizer)

    def _named(self, step: str, split: str) -> dict:
        # Our own cache keys: datasets would otherwise try to hash the tokenizer inside each function.
        return {"new_fingerprint": f"{self.fingerprint}-{split}-{step}"[:64], "desc": f"{split}: {step}"}

    def conversations(self, records: datasets.Dataset, split: str) -> datasets.Dataset:
        """Columns `turns` (the canonical conversation), `text` (what cleaning and the split compare) and _where."""
        reader = self.format
        normalize_turns = self.data.clean.normalize and self.data.clean.train_on_normalized

        def convert(batch: dict) -> dict:
            conversations = []
            for values in zip(*batch.values()):
                record = dict(zip(batch, values))
                turns = reader.conversation(record, record[WHERE])
                if normalize_turns:
                    turns = [{"role": turn["role"], "content": normalize_text(turn["content"])} for turn in turns]
                conversations.append(turns)
            texts = ["\n".join(f"{turn['role']}: {turn['content']}" for turn in turns) for turns in conversations]
            return {"turns": conversations, "text": texts, WHERE: batch[WHERE]}

        return records.map(convert, batched=True, batch_size=_BATCH_SIZE, remove_columns=records.column_names,
                           **self._named("read conversations", split))

    def clean(self, conversations: datasets.Dataset) -> Tuple[datasets.Dataset, CleaningReport]:
        report = CleaningReport()
        return clean(conversations, self.data.clean, report), report

    def prompts(self, conversations: datasets.Dataset, split: str) -> datasets.Dataset:
        """Columns `prompt_ids` (the conversation up to its last answer, rendered as generation would: with the
        generation prompt) and `reference` (that answer), one row per conversation, in the split's order."""
        tokenizer, template = self.tokenizer, self.template

        def render(batch: dict) -> dict:
            texts = [tokenizer.apply_chat_template(turns[:-1], chat_template=template, tokenize=False,
                                                   add_generation_prompt=True) for turns in batch["turns"]]
            return {"prompt_ids": tokenizer(texts, add_special_tokens=False)["input_ids"],
                    "reference": [turns[-1]["content"] for turns in batch["turns"]]}

        return conversations.map(render, batched=True, batch_size=_BATCH_SIZE,
                                 remove_columns=conversations.column_names, **self._named("generation prompts", split))

    def rows(self, conversations: datasets.Dataset, split: str, section: dict) -> datasets.Dataset:
        """Tokenised, fitted to seq_len and packed (or left one sample per row); `section` gets the counts."""
        data, tokenizer, template = self.data, self.tokenizer, self.template

        def tokenize(batch: dict) -> dict:
            ids, labels = [], []
            for turns in batch["turns"]:
                sample_ids, sample_labels = tokenize_conversation(
                    tokenizer, template, turns, data.train_on_prompt, data.last_turn_only)
                ids.append(sample_ids)
                labels.append(sample_labels)
            return {"input_ids": ids, "labels": labels, "tokens": [len(sample) for sample in ids]}

        samples = conversations.map(tokenize, batched=True, batch_size=_BATCH_SIZE,
                                    remove_columns=["turns", "text"], **self._named("tokenize", split))
        length_report = CleaningReport()
        samples = drop_by_token_count(samples, "tokens", data.clean.min_tokens, data.clean.max_tokens, length_report)
        samples, truncated = self._fit_to_seq_len(samples, split, length_report)
        samples = _drop_without_counted_tokens(samples, length_report)
        tokens = int(_column(samples, "tokens").sum())
        section.update({"samples": len(samples), "truncated": truncated, "tokens": tokens,
                        "length": length_report.to_json()})
        samples = samples.select_columns(["input_ids", "labels"])
        if data.packing and len(samples):
            samples = pack(samples, data.seq_len, self.pad_id, PackingConfig(data.packing_strategy, data.packing_window))
            section["packing_efficiency"] = round(packing_efficiency(samples), 4)
        section["rows"] = len(samples)
        return samples

    def _fit_to_seq_len(self, samples: datasets.Dataset, split: str,
                        report: CleaningReport) -> Tuple[datasets.Dataset, Dict[str, int]]:
        seq_len = self.data.seq_len
        counts = _column(samples, "tokens")
        too_long = int((counts > seq_len).sum())
        if self.data.too_long == "drop" or not too_long:
            rows_in = len(samples)
            samples = samples.filter(lambda tokens: [count <= seq_len for count in tokens], batched=True,
                                     input_columns=["tokens"], **self._named("drop too long", split))
            report.record(f"seq_len {seq_len:,}", "longer than data.seq_len", rows_in, len(samples))
            return samples, {"kept_the_answer": 0, "cut_the_answer": 0}

        def truncate(batch: dict) -> dict:
            ids, labels, kept_answer = [], [], []
            for sample_ids, sample_labels in zip(batch["input_ids"], batch["labels"]):
                cut_ids, cut_labels, whole = truncated(sample_ids, sample_labels, seq_len)
                ids.append(cut_ids)
                labels.append(cut_labels)
                kept_answer.append(whole)
            return {"input_ids": ids, "labels": labels, "tokens": [len(sample) for sample in ids],
                    "kept_answer": kept_answer}

        samples = samples.map(truncate, batched=True, batch_size=_BATCH_SIZE, **self._named("truncate", split))
        kept = _column(samples, "kept_answer").astype(bool)
        cut = int(((counts > seq_len) & ~kept).sum())
        return samples.remove_columns("kept_answer"), {"kept_the_answer": too_long - cut, "cut_the_answer": cut}


def _column(samples: datasets.Dataset, name: str) -> np.ndarray:
    if not len(samples):
        return np.zeros(0, dtype=np.int64)
    return samples.with_format("arrow", columns=[name])[:].column(name).to_numpy()


def truncated(ids: List[int], labels: List[int], seq_len: int) -> Tuple[List[int], List[int], bool]:
    """A sample cut to seq_len tokens, and whether its last answer stayed whole. The oldest tokens go first
    (the system prompt and earlier turns), so the last answer and what leads to it stay; when that answer alone
    does not fit, the first seq_len tokens stay (the prompt and the answer's start)."""
    if len(ids) <= seq_len:
        return ids, labels, True
    counted = np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
    if not counted.size:
        return ids[:seq_len], labels[:seq_len], False
    # The last answer: the last run of counted positions.
    gaps = np.flatnonzero(np.diff(counted) > 1)
    answer_start = int(counted[gaps[-1] + 1]) if gaps.size else int(counted[0])
    if len(ids) - answer_start <= seq_len:
        return ids[-seq_len:], labels[-seq_len:], True
    return ids[:seq_len], labels[:seq_len], False


def _drop_without_counted_tokens(samples: datasets.Dataset, report: CleaningReport) -> datasets.Dataset:
    """Samples with no position that counts (the first token is never predicted) train nothing."""
    rows_in = len(samples)
    samples = samples.filter(
        lambda labels: [any(label != IGNORE_INDEX for label in sample[1:]) for sample in labels],
        batched=True, input_columns=["labels"], desc="drop samples with nothing to learn",
    )
    report.record("counted tokens", "no counted token", rows_in, len(samples))
    return samples


def report_lines(report: dict) -> List[str]:
    """One log line per step of the data report."""
    lines = []
    for step in report.get("cleaning", {}).get("steps", []):
        lines.append(_step_line("all", step))
    for name, section in report.get("splits", {}).items():
        for step in section.get("cleaning", {}).get("steps", []) + section.get("length", {}).get("steps", []):
            lines.append(_step_line(name, step))
        truncated: Optional[dict] = section.get("truncated")
        if truncated and sum(truncated.values()):
            lines.append(f"{name}: truncated to data.seq_len: {truncated['kept_the_answer']:,} keeping the last "
                         f"answer whole, {truncated['cut_the_answer']:,} cutting it")
        efficiency = f", {section['packing_efficiency']:.1%} of each row filled" if "packing_efficiency" in section else ""
        lines.append(f"{name}: {section['samples']:,} samples, {section['tokens']:,} tokens in "
                     f"{section['rows']:,} rows{efficiency}")
    return lines


def _step_line(split: str, step: dict) -> str:
    return (f"{split}: {step['name']}: {step['rows_in']:,} -> {step['rows_out']:,} "
            f"({step['dropped']:,} dropped as {step['reason']})")
