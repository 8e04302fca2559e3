"""The `data` group of the schema: where the data comes from, how records read as conversations, how they are
cleaned, split, tokenised, cut to length and packed. Part of dstrain.config's TrainConfig (kept apart to keep
each module short); like it, light to import, so that composing a config loads no data library."""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from dstrain.config_fields import check_ranges, in_range, one_of
from dstrain.errors import ConfigError

# Where the cleaning settings live in the schema, for error messages.
CONFIG_KEY = "data.clean"
SPLIT_KEY = "data.split"
SPLIT_NAMES = ("train", "validation", "test")
# The built-in chat templates (dstrain.chat.BUILTIN_TEMPLATES holds their text).
BUILTIN_TEMPLATE_NAMES = ("alpaca", "chatml", "llama-2", "llama-3")


@dataclass
class CleanConfig:
    # Unicode NFKC (full-width letters and digits become ASCII, ligatures are split), then every run of
    # whitespace becomes one space and the ends are stripped. Filters, dedup and splits compare this form.
    normalize: bool = True
    # Also train on the normalised text. Off by default: collapsing whitespace flattens the line breaks of
    # code, lists and dialogue, and NFKC turns Chinese full-width punctuation (，：？) into ASCII.
    train_on_normalized: bool = False
    # Drop samples of fewer characters (code points of the compared text: one per Chinese character); 0: off.
    min_chars: int = in_range(0, at_least=0)
    # Drop samples with more characters; 0: off.
    max_chars: int = in_range(0, at_least=0)
    # Python regular expressions; a sample in which any of them is found (re.search) is dropped.
    drop_regex: List[str] = field(default_factory=list)
    # Drop samples whose normalised text equals an earlier sample's.
    exact_dedup: bool = True
    # Drop samples whose estimated Jaccard similarity to an earlier kept sample reaches the threshold
    # (MinHash signatures indexed by MinHashLSH).
    near_dedup: bool = False
    # Jaccard similarity of the shingle sets at which two samples count as near duplicates.
    near_dedup_threshold: float = in_range(0.85, above=0, at_most=1)
    # MinHash permutations: more estimate the similarity better and cost time and memory in proportion.
    near_dedup_num_perm: int = in_range(128, at_least=16)
    # Length of the character n-grams (shingles) compared by near dedup. Characters rather than words
    # because Chinese and Japanese have no spaces. With 5, two 100-character texts that differ in one
    # character are ~0.90 similar; a one-character change in a 30-character text gives ~0.68.
    shingle_size: int = in_range(5, at_least=1)
    # Near-duplicate pairs (kept text, dropped text, similarity) kept in the data report as examples.
    report_examples: int = in_range(5, at_least=0)
    # Drop samples of fewer tokens (the whole rendered conversation), after tokenisation; 0: off.
    min_tokens: int = in_range(0, at_least=0)
    # Drop samples of more tokens, after tokenisation (before data.too_long applies); 0: off.
    max_tokens: int = in_range(0, at_least=0)

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key: also when the cleaning functions are given a
        CleanConfig of their own (dstrain.cleaning), not one checked with the whole config."""
        check_ranges(self, f"{CONFIG_KEY}.")
        check_limits("chars", self.min_chars, self.max_chars)
        check_limits("tokens", self.min_tokens, self.max_tokens)
        for pattern in self.drop_regex:
            compile_pattern(pattern)


def check_limits(unit: str, low: int, high: int) -> None:
    if low and high and high < low:
        raise ConfigError(f"{CONFIG_KEY}.max_{unit}={high} is below min_{unit}={low}: no sample could pass")


def compile_pattern(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"{CONFIG_KEY}.drop_regex: {pattern!r} is not a valid regular expression ({error})") from None


def check_split_ratios(ratios: Sequence[float], names: Sequence[str] = SPLIT_NAMES) -> None:
    """Refuse ratios that are not 2 or 3 non-negative fractions summing to 1."""
    ratios = list(ratios)
    if len(ratios) not in (2, 3):
        raise ConfigError(f"{SPLIT_KEY}={ratios}: give 2 or 3 ratios (train, validation[, test]), e.g. [0.98,0.01,0.01]")
    if len(ratios) > len(names):
        raise ConfigError(f"{SPLIT_KEY}={ratios}: {len(ratios)} ratios but only the split names {list(names)}")
    if any(not isinstance(r, (int, float)) or r < 0 for r in ratios):
        raise ConfigError(f"{SPLIT_KEY}={ratios}: every ratio must be a number of 0 or more")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"{SPLIT_KEY}={ratios} sums to {sum(ratios):g}; the ratios must sum to 1")


@dataclass
class DataConfig:
    # Where documents come from (dstrain.data.DATA_SOURCES): "builtin" generated text, or "files".
    name: str = one_of("builtin", registry="dstrain.data:DATA_SOURCES")
    # Training sources for name=files: files (.json array, .jsonl, .parquet, .csv, .txt), globs
    # (/data/part-*.jsonl), directories written by datasets' save_to_disk, or Hub dataset names (needs network).
    train_files: List[str] = field(default_factory=list)
    # Mixing several train_files: each one's rows appear about weight times as often as a weight-1 source's
    # (up- or down-sampled with the seed). Empty: 1 for every source; else one weight per train_files entry.
    train_weights: List[float] = in_range([], above=0)
    # Per train_files entry, use only its first this many rows (0: all). Empty: all rows of every source.
    train_max_rows: List[int] = in_range([], at_least=0)
    # Validation sources (needed when trainer.eval_every is set, unless data.split makes a validation split).
    val_files: List[str] = field(default_factory=list)
    # Test sources: prepared and reported with the others, never trained or evaluated on during training.
    test_files: List[str] = field(default_factory=list)
    # How the files are read (dstrain.sources.READERS): "auto" from the extension, or json, jsonl, parquet,
    # csv, text (one record per line), datasets (a save_to_disk directory), hub.
    reader: str = one_of("auto", registry="dstrain.sources:READERS")
    # What a record is: "text" (a document, trained on every token, concatenated and cut into blocks);
    # "alpaca" (instruction/input/output, optional system and history), "sharegpt" (conversations of
    # from/value) or "messages" (OpenAI-style role/content), which train on the answers (dstrain.chat).
    format: str = one_of("text", "text", "alpaca", "sharegpt", "messages")
    # The field that holds a document's text, for format=text (a .txt file's lines are in "text").
    text_field: str = "text"
    # For alpaca/sharegpt/messages: field names that differ from the format's defaults, e.g. {output: response}
    # (alpaca), {conversations: turns, roles: {human: user, bot: assistant}} (sharegpt) or {messages: chat}.
    fields: Dict[str, Any] = field(default_factory=dict)
    # The chat template that renders a conversation: "auto" is the tokenizer's own (it must have one);
    # a built-in for base models without one: alpaca, chatml, llama-2, llama-3. Saved with every checkpoint
    # and export, so generation builds prompts the same way.
    template: str = one_of("auto", "auto", *BUILTIN_TEMPLATE_NAMES)
    # Count every token toward the loss, the prompts too (default: only the answers and their end-of-turn).
    train_on_prompt: bool = False
    # In multi-turn conversations count only the last answer; earlier answers are context (default: all).
    last_turn_only: bool = False
    # Tokens per training sequence.
    seq_len: int = in_range(128, at_least=8)
    # A conversation longer than seq_len: "truncate" drops its oldest tokens so that the last answer stays
    # whole (or, when that answer alone is too long, keeps the first seq_len tokens); "drop" leaves it out.
    # Both are counted in the data report.
    too_long: str = one_of("truncate", "truncate", "drop")
    # Instruction data: put several conversations in each sequence of seq_len (position ids restart per
    # conversation, no attention crosses them). Off: one conversation per row, a micro-batch padded to its
    # longest (a multiple of 8). format=text is always concatenated into full blocks.
    packing: bool = True
    # How conversations are placed into rows: "best_fit_decreasing" (least padding) or "greedy" (data order).
    packing_strategy: str = one_of("best_fit_decreasing", "best_fit_decreasing", "greedy")
    # Conversations placed together (one datasets.map batch); rows never mix windows.
    packing_window: int = in_range(1000, at_least=1)
    # Instruction data: train/validation[/test] ratios, e.g. [0.7,0.2,0.1]; each record's split follows from a
    # hash of its text, so adding data never moves a record. Empty: val_files and test_files are the splits.
    split: List[float] = in_range([], at_least=0, at_most=1)
    # Instruction data: cleaning before tokenisation (every step counted in <run dir>/data_report.json).
    clean: CleanConfig = field(default_factory=CleanConfig)
    # Prepared instruction data is kept here, one directory per data fingerprint (`dstrain prepare` fills it;
    # training reuses it and starts in seconds). On a cluster, a directory every node can read.
    # None: <run.root>/data_cache.
    cache_dir: Optional[str] = None
    # Resuming a checkpoint whose data fingerprint (the inputs' contents, the data settings, the tokenizer)
    # differs from this run's: "refuse" stops with an error; "warn" logs it and resumes.
    changed_on_resume: str = one_of("refuse", "refuse", "warn")
    # A tokenizer directory or hub name. Unset: the pretrained model's tokenizer, else byte-level.
    tokenizer: Optional[str] = None
    # Generated documents for training when name=builtin.
    builtin_train_documents: int = in_range(4000, at_least=1)
    # Generated documents for validation when name=builtin (from a different seed).
    builtin_val_documents: int = in_range(200, at_least=1)
