"""Tokenizer, data sources, datasets of packed token blocks, and the batches each rank reads.

Documents come from a data source (DATA_SOURCES, selected by data.name), are tokenised, joined with EOS,
concatenated and cut into blocks of `seq_len` tokens through Hugging Face `datasets`, so large corpora are
processed once and memory-mapped from its cache.

A batch is a dict: `input_ids`, and `labels` of the same shape in which IGNORE_INDEX marks positions that do
not count toward the loss (the model predicts labels[t + 1] from the tokens up to t).
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dstrain.config import TrainConfig
from dstrain.errors import ConfigError, DataError
from dstrain.registry import Registry

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


def _documents_from_files(paths: List[str], file_format: str, text_field: str, fingerprint: str):
    """Yield {"text": ...} for every document, naming the file and line of anything malformed."""
    del fingerprint  # Only part of the arguments so that the datasets cache notices changed files.
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if file_format == "text":
                    yield {"text": line.rstrip("\n")}
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}:{line_number}: not valid JSON ({error.msg}). "
                        f"Each line of a JSONL file must be one JSON object."
                    ) from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{line_number}: no string field {text_field!r}. "
                        f"Fix the line, or set data.text_field to the field that holds the text."
                    )
                yield {"text": text}


def _file_fingerprint(paths: List[str]) -> str:
    parts = []
    for path in paths:
        stat = Path(path).stat()
        parts.append(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


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
    """Local text or JSONL files: data.train_files and data.val_files, read as data.format says."""

    def check(self, cfg: TrainConfig) -> None:
        data = cfg.data
        if not data.train_files:
            raise ConfigError("data.name=files needs data.train_files, e.g. data.train_files=[/abs/path/train.jsonl]")
        if cfg.trainer.eval_every and not data.val_files:
            raise ConfigError(
                "trainer.eval_every is set but data.val_files is empty. Give data.val_files=[...] "
                "or turn evaluation off with trainer.eval_every=0."
            )

    def documents(self, cfg: TrainConfig, split: str) -> datasets.Dataset:
        data = cfg.data
        paths = list(data.train_files if split == "train" else data.val_files)
        for path in paths:
            if not Path(path).is_file():
                raise ConfigError(f"data.{split}_files: {path} does not exist. Give absolute paths to existing files.")
        try:
            return datasets.Dataset.from_generator(
                _documents_from_files,
                gen_kwargs={
                    "paths": paths,
                    "file_format": data.format,
                    "text_field": data.text_field,
                    "fingerprint": _file_fingerprint(paths),
                },
            )
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, DataError):
                raise error.__cause__ from None
            raise


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
        return causal_lm_batch(self.blocks[indices]["input_ids"])


def eval_batches(blocks: datasets.Dataset, micro_batch_size: int, world_size: int, rank: int, limit: int):
    """Fixed validation micro-batches for this rank. Every rank gets the same count, which ZeRO-3's
    collectives in the forward pass need."""
    per_rank = min(limit, len(blocks) // (micro_batch_size * world_size))
    for batch in range(per_rank):
        first = (batch * world_size + rank) * micro_batch_size
        yield causal_lm_batch(blocks[first : first + micro_batch_size]["input_ids"])


def causal_lm_batch(input_ids: torch.Tensor) -> Batch:
    """Plain text: every token counts."""
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def counted_tokens(batch: Batch) -> int:
    """Positions whose next token counts toward the loss: the first token is never predicted."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
