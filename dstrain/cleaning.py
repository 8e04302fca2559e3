"""Cleaning of sample texts before tokenisation, and the deterministic train/validation/test split.

`clean` normalises the `text` column, then drops, in this order: empty samples, those outside the character
limits, those matching a pattern, exact duplicates and (optionally) near duplicates. Every drop keeps the first
occurrence and the order of the rows, so the same input always gives the same output, and a CleaningReport
counts what each step dropped. Columns other than `text` pass through untouched.

`split_dataset` puts each sample in a split chosen by a hash of its normalised text alone, so adding data never
moves an existing sample to another split, and identical texts always share a split.
"""

import hashlib
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np
from datasketch import MinHash, MinHashLSH

from dstrain.data_config import SPLIT_NAMES, CleanConfig, check_limits, check_split_ratios, compile_pattern
from dstrain.errors import DataError

TEXT_COLUMN = "text"
# The text that the filters and dedup compare, kept apart so that the text column can keep what trains.
_KEY_COLUMN = "__dstrain_clean_key__"
_BATCH_SIZE = 1000
# Each text in the report's near-duplicate examples is cut to this many characters, to keep the JSON small.
_EXAMPLE_CHARS = 300
_MINHASH_SEED = 1


@dataclass
class CleaningStep:
    # What the step does, with its setting: "exact dedup", "max_chars 4,096".
    name: str
    # Why its rows were dropped: "empty", "too short", "regex <pattern>", "exact duplicate"...
    reason: str
    rows_in: int
    rows_out: int

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


@dataclass
class NearDuplicate:
    kept: str
    dropped: str
    # MinHash's estimate of the Jaccard similarity of their shingle sets.
    similarity: float


@dataclass
class CleaningReport:
    """What cleaning did: one step per enabled filter, in the order applied. One report may gather the
    steps of clean() and of drop_by_token_count() on the same data."""

    rows_in: Optional[int] = None
    rows_out: Optional[int] = None
    steps: List[CleaningStep] = field(default_factory=list)
    near_duplicate_examples: List[NearDuplicate] = field(default_factory=list)

    def record(self, name: str, reason: str, rows_in: int, rows_out: int) -> None:
        if self.rows_in is None:
            self.rows_in = rows_in
        self.steps.append(CleaningStep(name, reason, rows_in, rows_out))
        self.rows_out = rows_out

    def dropped(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for step in self.steps:
            counts[step.reason] = counts.get(step.reason, 0) + step.dropped
        return counts

    def to_json(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": self.dropped(),
            "steps": [dict(asdict(step), dropped=step.dropped) for step in self.steps],
            "near_duplicate_examples": [asdict(example) for example in self.near_duplicate_examples],
        }

    def lines(self) -> List[str]:
        lines = [f"{s.name}: {s.rows_in:,} -> {s.rows_out:,} ({s.dropped:,} dropped as {s.reason})" for s in self.steps]
        if self.rows_in is not None:
            lines.append(f"cleaning: {self.rows_in:,} -> {self.rows_out:,} rows kept")
        return lines


def normalize_text(text: str) -> str:
    """NFKC, every run of whitespace (Unicode's, so also ideographic spaces) made one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


# A filter step: its report name, its drop reason, and a test of (row index, comparison text) that is True
# to drop the row. Dedup tests remember what they have seen, so they must see the rows in order.
_Step = Tuple[str, str, Callable[[int, str], bool]]


def clean(dataset: datasets.Dataset, cfg: CleanConfig, report: CleaningReport) -> datasets.Dataset:
    """The rows that pass every enabled step, in their original order, with the report filled in.
    Raises ConfigError for bad settings and DataError for a missing or non-string text."""
    cfg.check()
    keyed = _with_comparison_text(dataset, cfg)
    near_duplicates = _NearDuplicates(cfg) if cfg.near_dedup else None
    steps = _steps(cfg, near_duplicates)
    kept_rows, drops = _scan(keyed, steps)
    remaining = len(keyed)
    for step, (name, reason, _) in enumerate(steps):
        report.record(name, reason, remaining, remaining - drops[step])
        remaining -= drops[step]
    if near_duplicates is not None:
        report.near_duplicate_examples.extend(near_duplicates.examples(keyed))
    return keyed.select(kept_rows).remove_columns(_KEY_COLUMN)


def _steps(cfg: CleanConfig, near_duplicates: Optional["_NearDuplicates"]) -> List[_Step]:
    # Empty samples teach nothing and break templates, so this step is always on.
    steps: List[_Step] = [("empty", "empty", lambda row, text: not text or text.isspace())]
    if cfg.min_chars:
        steps.append((f"min_chars {cfg.min_chars:,}", "too short", lambda row, text: len(text) < cfg.min_chars))
    if cfg.max_chars:
        steps.append((f"max_chars {cfg.max_chars:,}", "too long", lambda row, text: len(text) > cfg.max_chars))
    for pattern in cfg.drop_regex:
        compiled = compile_pattern(pattern)
        steps.append((f"drop_regex {pattern!r}", f"regex {pattern}", lambda row, text, p=compiled: bool(p.search(text))))
    if cfg.exact_dedup:
        steps.append(("exact dedup", "exact duplicate", _ExactDuplicates()))
    if near_duplicates is not None:
        steps.append((f"near dedup (Jaccard >= {cfg.near_dedup_threshold})", "near duplicate", near_duplicates))
    return steps


def _with_comparison_text(dataset: datasets.Dataset, cfg: CleanConfig) -> datasets.Dataset:
    """The dataset with the text the steps compare in _KEY_COLUMN (and in the text column too, when the
    normalised text is what trains)."""
    _require_column(dataset, TEXT_COLUMN, "Build it from each sample's turns before cleaning.")

    def add_key(batch: dict, indices: List[int]) -> dict:
        texts = batch[TEXT_COLUMN]
        for row, text in zip(indices, texts):
            if not isinstance(text, str):
                raise DataError(
                    f"row {row}: field {TEXT_COLUMN!r} is {type(text).__name__}, not a string. "
                    f"Fix or remove that sample, or give it an empty text to have it dropped."
                )
        keys = [normalize_text(text) for text in texts] if cfg.normalize else texts
        if cfg.normalize and cfg.train_on_normalized:
            return {_KEY_COLUMN: keys, TEXT_COLUMN: keys}
        return {_KEY_COLUMN: keys}

    if len(dataset) == 0:  # map() does not call add_key at all then, so the column would be missing.
        return dataset.add_column(_KEY_COLUMN, [])
    return dataset.map(add_key, batched=True, batch_size=_BATCH_SIZE, with_indices=True, desc="normalize")


def _scan(keyed: datasets.Dataset, steps: List[_Step]) -> Tuple[List[int], Counter]:
    """The rows kept, and the rows dropped by each step (by its index), in one ordered pass: each row is
    dropped by the first step that rejects it, and later steps (the dedup memories among them) never see it."""
    kept_rows: List[int] = []
    drops: Counter = Counter()
    for row, text in enumerate(_column(keyed, _KEY_COLUMN)):
        for step, (_, _, rejects) in enumerate(steps):
            if rejects(row, text):
                drops[step] += 1
                break
        else:
            kept_rows.append(row)
    return kept_rows, drops


def _require_column(dataset: datasets.Dataset, column: str, fix: str) -> None:
    if column not in dataset.column_names:
        raise DataError(f"the dataset has no {column!r} column (it has {dataset.column_names}). {fix}")


def _column(dataset: datasets.Dataset, column: str) -> Iterator:
    """One column's values in row order, a batch at a time, so large datasets are not loaded at once."""
    for batch in dataset.select_columns([column]).iter(batch_size=_BATCH_SIZE):
        yield from batch[column]


class _ExactDuplicates:
    """Rejects a text seen before. Keeps 16-byte digests rather than the texts, to bound memory."""

    def __init__(self):
        self._seen = set()

    def __call__(self, row: int, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


# Odd 64-bit multiplier (FNV-1a 64's prime) of the polynomial hash of character n-grams.
_NGRAM_MULTIPLIER = np.uint64(0x100000001B3)


def character_ngram_hashes(text: str, size: int) -> List[int]:
    """A 32-bit hash of every character n-gram of `text` (the whole text when shorter than `size`),
    computed in numpy at once rather than hashing each n-gram in Python, which was twice as slow."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    size = max(1, min(size, len(codes)))
    count = len(codes) - size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(size):  # Wrapping uint64 arithmetic is the intended modulus 2**64.
        hashes = hashes * _NGRAM_MULTIPLIER + codes[offset : offset + count]
    return (hashes >> np.uint64(32)).tolist()


class _NearDuplicates:
    """Rejects a text whose estimated Jaccard similarity to an earlier KEPT text reaches the threshold.
    Only kept texts enter the index, so a chain of small edits is judged against the texts that stay."""

    def __init__(self, cfg: CleanConfig):
        self._threshold = cfg.near_dedup_threshold
        self._num_perm = cfg.near_dedup_num_perm
        self._shingle_size = cfg.shingle_size
        self._max_examples = cfg.report_examples
        # LSH only proposes candidates; each is checked against the threshold with its signature.
        self._index = MinHashLSH(threshold=self._threshold, num_perm=self._num_perm)
        # Made once: datasketch otherwise draws the permutations again for every MinHash.
        self._permutations = MinHash(num_perm=self._num_perm, seed=_MINHASH_SEED).permutations
        self._signatures: Dict[int, np.ndarray] = {}
        self._pairs: List[Tuple[int, int, float]] = []

    def _minhash(self, text: str) -> MinHash:
        # The n-grams arrive already hashed, so datasketch's hash function is the identity.
        minhash = MinHash(num_perm=self._num_perm, hashfunc=int, permutations=self._permutations, scheme="affine32")
        minhash.update_batch(character_ngram_hashes(text, self._shingle_size))
        return minhash

    def __call__(self, row: int, text: str) -> bool:
        minhash = self._minhash(text)
        similarities = {kept: float(np.mean(self._signatures[kept] == minhash.hashvalues))
                        for kept in self._index.query(minhash)}
        # The most similar earlier text, the earliest on a tie, so that the result does not depend on set order.
        match = max(similarities, key=lambda kept: (similarities[kept], -kept), default=None)
        if match is not None and similarities[match] >= self._threshold:
            if len(self._pairs) < self._max_examples:
                self._pairs.append((match, row, similarities[match]))
            return True
        self._index.insert(row, minhash, check_duplication=False)
        self._signatures[row] = minhash.hashvalues
        return False

    def examples(self, keyed: datasets.Dataset) -> List[NearDuplicate]:
        """The first pairs found, with the texts that train, cut to _EXAMPLE_CHARS."""
        def excerpt(row: int) -> str:
            return keyed[row][TEXT_COLUMN][:_EXAMPLE_CHARS]

        return [NearDuplicate(excerpt(kept), excerpt(dropped), round(sim, 4)) for kept, dropped, sim in self._pairs]


def drop_by_token_count(
    dataset: datasets.Dataset, counts_column: str, min_tokens: int, max_tokens: int, report: CleaningReport
) -> datasets.Dataset:
    """The rows whose token count in `counts_column` lies within [min_tokens, max_tokens] (0: no limit),
    in order, recorded in `report` as "too few tokens" and "too many tokens"."""
    check_limits("tokens", min_tokens, max_tokens)
    _require_column(dataset, counts_column, "Count each sample's tokens into it before filtering on them.")
    limits = [
        (min_tokens, f"min_tokens {min_tokens:,}", "too few tokens", lambda count: count >= min_tokens),
        (max_tokens, f"max_tokens {max_tokens:,}", "too many tokens", lambda count: count <= max_tokens),
    ]
    for limit, name, reason, passes in limits:
        if not limit:
            continue
        rows_in = len(dataset)
        dataset = dataset.filter(
            lambda counts: [passes(count) for count in counts],
            batched=True, batch_size=_BATCH_SIZE, input_columns=[counts_column], desc=name,
        )
        report.record(name, reason, rows_in, len(dataset))
    return dataset


def _split_position(key: str) -> float:
    """Where the normalised key falls in [0, 1): the first 8 bytes of its SHA-1, as a fraction of 2**64."""
    digest = hashlib.sha1(normalize_text(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_of(position: float, ratios: Sequence[float], names: Sequence[str]) -> str:
    upper = 0.0
    for ratio, name in zip(ratios, names):
        upper += ratio
        if position < upper:
            return name
    # Rounding can leave the sum a hair under 1: the position past it belongs to the last non-empty split.
    return [name for ratio, name in zip(ratios, names) if ratio > 0][-1]


def assign_split(key: str, ratios: Tuple[float, ...], names: Sequence[str] = SPLIT_NAMES) -> str:
    """The split of a sample, from a hash of its normalised key alone: the same key always gets the same
    split, whatever other data there is. Changing the ratios does move samples. Raises ConfigError."""
    check_split_ratios(ratios, names)
    return _split_of(_split_position(key), ratios, names)


def split_dataset(
    dataset: datasets.Dataset, ratios: Tuple[float, ...], key_column: str = TEXT_COLUMN,
    names: Sequence[str] = SPLIT_NAMES,
) -> Dict[str, datasets.Dataset]:
    """One dataset per split name (empty where its ratio is 0), each keeping the rows' original order.
    Raises ConfigError for bad ratios and DataError for a missing key column."""
    check_split_ratios(ratios, names)
    _require_column(dataset, key_column, "Split on one of the columns it has.")
    rows: Dict[str, List[int]] = {name: [] for name in names[: len(ratios)]}
    for row, key in enumerate(_column(dataset, key_column)):
        rows[_split_of(_split_position(str(key)), ratios, names)].append(row)
    return {name: dataset.select(indices) for name, indices in rows.items()}
