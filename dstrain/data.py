"""Tokenizer, data sources, datasets of packed token blocks, and the batches each rank reads.

Documents come from a data source (DATA_SOURCES, selected by data.name), are tokenised, joined with EOS,
concatenated and cut into blocks of `seq_len` tokens through Hugging Face `datasets`, so large corpora are
processed once and memory-mapped from its cache.

A batch is a dict: `input_ids`, and `labels` of the same shape in which IGNORE_INDEX marks positions that do
not count toward the loss (the model predicts labels[t + 1] from the tokens up to t).
"""

import random
from dataclasses import dataclass
from typing import Dict, Iterator, List

import datasets
import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError, DataError
from dstrain.registry import Registry
from dstrain.sources import WHERE, SourceSpec, mix, read_records

BOS, EOS = "<s>", "</s>"
# A label that does not count toward the loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

Batch = Dict[str, torch.Tensor]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus BOS and EOS (258 in all). Needs no training and no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=lambda s: ord(s)))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def build_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerFast:
    source = cfg.data.tokenizer or cfg.model.pretrained
    if source is None:
        return byte_level_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer at {source} has no EOS token, which packing needs between documents")
    return tokenizer


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "builds", "finds", "paints", "carries", "follows", "counts"]
_OBJECTS = ["a red ball", "the green door", "three apples", "a long river", "the tall tree", "two blue boxes"]
_PLACES = ["in the park", "at home", "near the sea", "under the bridge", "on the hill", "in the city"]
_TIMES = ["every morning", "at night", "on sunday", "after school", "in winter", "before lunch"]


def builtin_documents(count: int, seed: int) -> Iterator[str]:
    """Short English-like paragraphs from a small grammar, with sums whose answers the model can learn."""
    rng = random.Random(seed)
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.25:
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                sentences.append(f"{a} plus {b} is {a + b}.")
            else:
                sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
                sentences.append(f"{sentence} {rng.choice(_PLACES)} {rng.choice(_TIMES)}.".capitalize())
        yield " ".join(sentences)


def read_role(cfg: TrainConfig, role: str) -> datasets.Dataset:
    """The records of data.train_files (mixed by data.train_weights and data.train_max_rows), data.val_files
    or data.test_files, with a `_where` column naming each record's file and line or row."""
    data = cfg.data
    paths = {"train": data.train_files, "validation": data.val_files, "test": data.test_files}[role]
    weights = list(data.train_weights) if role == "train" and data.train_weights else [1.0] * len(paths)
    caps = list(data.train_max_rows) if role == "train" and data.train_max_rows else [0] * len(paths)
    specs = [SourceSpec(path=str(path), format=data.reader, split=role, weight=weight, max_rows=cap)
             for path, weight, cap in zip(paths, weights, caps)]
    records = [read_records(spec) for spec in specs]
    # One source taken whole keeps its file order (mix would shuffle it for nothing).
    if len(records) == 1 and weights[0] == 1.0 and not caps[0]:
        return records[0]
    mixed, _ = mix(records, specs, cfg.trainer.seed)
    return mixed


def _text_documents(records: datasets.Dataset, text_field: str) -> datasets.Dataset:
    """The `text_field` column as documents in a column "text", or a DataError naming the first record without
    a string there."""
    column = records.data.column(text_field) if text_field in records.column_names else None
    if column is None or not pa.types.is_string(column.type) or column.null_count:
        bad = 0 if column is None or not pa.types.is_string(column.type) else int(
            np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{records[bad][WHERE]}: no string field {text_field!r}. "
            f"Fix the record, or set data.text_field to the field that holds the text."
        )
    documents = records.select_columns([text_field])
    return documents.rename_column(text_field, "text") if text_field != "text" else documents


class BuiltinSource:
    """Generated English-like text: no download, and the tiny model learns it within the default run."""

    def check(self, cfg: TrainConfig) -> None:
        pass

    def documents(self, cfg: TrainConfig, split: str) -> datasets.Dataset:
        data = cfg.data
        count = data.builtin_train_documents if split == "train" else data.builtin_val_documents
        # Different seeds keep validation documents out of the training stream.
        seed = cfg.trainer.seed if split == "train" else cfg.trainer.seed + 1_000_003
        return datasets.Dataset.from_dict({"text": list(builtin_documents(count, seed))})


class FilesSource:
    """Local files, globs, datasets directories or Hub names (dstrain.sources): data.train_files and the others."""

    def check(self, cfg: TrainConfig) -> None:
        data = cfg.data
        if not data.train_files:
            raise ConfigError("data.name=files needs data.train_files, e.g. data.train_files=[/abs/path/train.jsonl]")
        for key in ("train_weights", "train_max_rows"):
            given = getattr(data, key)
            if given and len(given) != len(data.train_files):
                raise ConfigError(
                    f"data.{key} has {len(given)} entries for {len(data.train_files)} data.train_files: give one per "
                    f"file, in the same order, or none."
                )
        if data.split and data.format == "text":
            raise ConfigError("data.split is for instruction data; with data.format=text give data.val_files instead.")
        if data.split and (data.val_files or data.test_files):
            raise ConfigError(
                "data.split makes the validation and test splits from data.train_files; give either data.split or "
                "data.val_files/data.test_files, not both."
            )
        if cfg.trainer.eval_every and not (data.val_files or len(data.split) > 1 and data.split[1] > 0):
            raise ConfigError(
                "trainer.eval_every is set but there is no validation data. Give data.val_files=[...], or for "
                "instruction data data.split=[0.7,0.2,0.1], or turn evaluation off with trainer.eval_every=0."
            )

    def documents(self, cfg: TrainConfig, split: str) -> datasets.Dataset:
        return _text_documents(read_role(cfg, split), cfg.data.text_field)


DATA_SOURCES: Registry = Registry("data.name")
DATA_SOURCES.register("builtin")(BuiltinSource())
DATA_SOURCES.register("files")(FilesSource())


def packed_blocks(cfg: TrainConfig, tokenizer, split: str) -> datasets.Dataset:
    """Blocks of exactly seq_len token ids. The tail that does not fill a block is dropped."""
    seq_len = cfg.data.seq_len
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def pack(batch):
        stream = [token for doc in batch["ids"] for token in doc]
        usable = len(stream) - len(stream) % seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    documents = DATA_SOURCES[cfg.data.name].documents(cfg, split)
    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenize")
    blocks = tokenized.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], desc="pack")
    if len(blocks) == 0:
        raise ConfigError(f"the {split} data gives no block of data.seq_len={seq_len} tokens. Add data or lower it.")
    return blocks.with_format("torch")


@dataclass
class BatchPlan:
    """Which blocks each rank reads at each step.

    Each epoch is a seeded permutation of all blocks, and the run reads the epochs one after another as a
    single stream. An optimizer step takes the next global_batch blocks of that stream, wherever the epoch
    boundaries fall, and each micro-batch of each rank takes its own slice of them. The blocks of a step
    therefore depend only on the seed and the samples consumed before it, not on how the global batch is
    split into ranks, micro-batches and accumulation steps, and the position to resume from, on any number
    of ranks, is just the number of samples consumed.
    """

    blocks: datasets.Dataset
    seed: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    rank: int
    # Fills unpacked instruction rows up to the micro-batch's longest (dstrain.packing.pad_batch).
    pad_id: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    def __post_init__(self):
        if len(self.blocks) < self.global_batch:
            raise ConfigError(
                f"the training data has {len(self.blocks)} blocks, fewer than one global batch of "
                f"{self.global_batch}. Add data or lower trainer.micro_batch_size."
            )
        self._epoch, self._order = None, None

    def _order_for_epoch(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.blocks), generator=generator)
        return self._order

    def epoch_of_sample(self, sample: int) -> int:
        return sample // len(self.blocks)

    def micro_batch(self, samples_consumed: int, micro_step: int) -> Batch:
        """This rank's blocks for one micro-batch of the step that starts after samples_consumed."""
        blocks_per_epoch = len(self.blocks)
        first = samples_consumed + (micro_step * self.world_size + self.rank) * self.micro_batch_size
        positions = range(first, first + self.micro_batch_size)
        indices = [int(self._order_for_epoch(p // blocks_per_epoch)[p % blocks_per_epoch]) for p in positions]
        return collate(self.blocks[indices], self.pad_id)


def eval_batches(blocks: datasets.Dataset, micro_batch_size: int, world_size: int, rank: int, limit: int,
                 pad_id: int = 0):
    """Fixed validation micro-batches for this rank. Every rank gets the same count, which ZeRO-3's
    collectives in the forward pass need."""
    per_rank = min(limit, len(blocks) // (micro_batch_size * world_size))
    for batch in range(per_rank):
        first = (batch * world_size + rank) * micro_batch_size
        yield collate(blocks[first : first + micro_batch_size], pad_id)


def collate(rows: Dict[str, object], pad_id: int) -> Batch:
    """One micro-batch from the rows of a prepared dataset, whichever kind it is: text blocks (every token
    counts), packed instruction rows (labels and position_ids, and no attention_mask: dstrain.packing), or
    unpacked instruction samples (padded here)."""
    if "labels" not in rows:
        return causal_lm_batch(rows["input_ids"])
    if "position_ids" in rows:
        return {key: rows[key] for key in ("input_ids", "labels", "position_ids")}
    return pad_batch([{"input_ids": ids, "labels": labels} for ids, labels in zip(rows["input_ids"], rows["labels"])],
                     pad_id)


def pad_id(tokenizer) -> int:
    """The id that fills unused positions: the tokenizer's padding token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def causal_lm_batch(input_ids: torch.Tensor) -> Batch:
    """Plain text: every token counts."""
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def counted_tokens(batch: Batch) -> int:
    """Positions whose next token counts toward the loss: the first token is never predicted."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pad_batch(samples: List[dict], pad_id: int, multiple_of: int = 8) -> Dict[str, torch.Tensor]:
    """One unpacked micro-batch: `input_ids` padded on the right with pad_id to the longest sample rounded up to
    a multiple of `multiple_of`, `labels` IGNORE_INDEX on the padding, `attention_mask` 1 on real tokens.

    Right padding with the causal mask means real tokens never see padding, and positions need no shift.
    Raises ValueError for no samples, multiple_of below 1 or a sample whose labels differ in length.
    """
    if not samples:
        raise ValueError("pad_batch needs at least one sample")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be at least 1, not {multiple_of}")
    rows = [(torch.as_tensor(s["input_ids"]), torch.as_tensor(s["labels"])) for s in samples]
    for number, (ids, labels) in enumerate(rows):
        if ids.shape != labels.shape:
            raise ValueError(f"sample {number} has {len(ids)} input_ids but {len(labels)} labels; they must align")
    width = -(-max(len(ids) for ids, _ in rows) // multiple_of) * multiple_of
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for number, (ids, labels) in enumerate(rows):
        batch["input_ids"][number, : len(ids)] = ids
        batch["labels"][number, : len(ids)] = labels
        batch["attention_mask"][number, : len(ids)] = 1
    return batch
