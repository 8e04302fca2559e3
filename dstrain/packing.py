"""Variable-length samples (instruction or chat data) made into batches: packed into rows of seq_len, or padded.

Packed rows carry `position_ids` that restart at 0 for every sample and no `attention_mask`. From those alone
transformers finds the samples of a row (a new one wherever a position is not the previous one plus 1) and
lets each token attend only within its own sample, under sdpa and eager alike, and flash-attention's varlen
path starts a sequence wherever a position is 0. Passing an attention mask of ones as well switches that
detection off and the samples of a row attend to one another, so packed batches must not get one.

The trailing padding of a row gets positions 0, 1, 2, ... too: it is a sample of its own, which real tokens
cannot attend to (they come before it) and which attends to none of them. Its labels are IGNORE_INDEX.

The loss shifts labels (position t predicts labels[t + 1], dstrain.loss), so the last token of one sample
would predict the first token of the next. The first label of every packed sample is therefore IGNORE_INDEX;
alone, that label was never predicted either, so each sample counts the same tokens packed as alone.

Placement (PackingConfig.strategy), within windows of PackingConfig.window samples (one `datasets.map` batch):
- "greedy": samples in their order, a new row whenever the next one does not fit. Rows hold consecutive
  samples, so the order of the data survives, but every sample that does not fit the space left ends a row
  and wastes that space.
- "best_fit_decreasing": the window's samples longest first, each into the open row it fills most tightly
  (or a new one). Short samples fill the gaps long ones leave, so far fewer rows are padded; samples of a
  row are no longer neighbours in the data (kept in data order within the row). Training shuffles rows
  anyway, so that order rarely matters; for curriculum-like data that is ordered on purpose, use greedy.
Both are deterministic: the same samples and settings give the same rows. Rows never mix windows, so each
window's last row may be short; a larger window wastes less and costs more memory per map batch.
"""

import bisect
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa

from dstrain.data import IGNORE_INDEX


@dataclass(frozen=True)
class PackingConfig:
    # How samples are placed into rows: "greedy" (data order) or "best_fit_decreasing" (less padding).
    strategy: str = "best_fit_decreasing"
    # Samples placed together, as one `datasets.map` batch; rows never hold samples of two windows.
    window: int = 1000


Placement = Callable[[Sequence[int], int], List[List[int]]]


def greedy_rows(lengths: Sequence[int], seq_len: int) -> List[List[int]]:
    """Sample indices per row: consecutive samples, a new row whenever the next does not fit."""
    rows: List[List[int]] = [[]]
    free = seq_len
    for index, length in enumerate(lengths):
        if length > free:
            rows.append([])
            free = seq_len
        rows[-1].append(index)
        free -= length
    return rows if rows[0] else []


def best_fit_decreasing_rows(lengths: Sequence[int], seq_len: int) -> List[List[int]]:
    """Sample indices per row: longest sample first, each into the open row with the least room that fits it."""
    rows: List[List[int]] = []
    open_rows: List[Tuple[int, int]] = []  # (free slots, row number), kept sorted so bisect finds the best fit
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        fit = bisect.bisect_left(open_rows, (length, -1))
        if fit < len(open_rows):
            free, row = open_rows.pop(fit)
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if free > length:
            bisect.insort(open_rows, (free - length, row))
    return [sorted(row) for row in rows]


PLACEMENTS: Dict[str, Placement] = {"greedy": greedy_rows, "best_fit_decreasing": best_fit_decreasing_rows}
# int64 whatever the input's type, as the model's embedding and the loss's targets take them.
PACKED_FEATURES = datasets.Features(
    {name: datasets.List(datasets.Value("int64")) for name in ("input_ids", "labels", "position_ids")}
)


def pack(
    samples: datasets.Dataset, seq_len: int, pad_id: int, config: PackingConfig = PackingConfig()
) -> datasets.Dataset:
    """Rows of exactly seq_len `input_ids`, `labels` and `position_ids`, several samples each (module docstring).

    `samples` needs `input_ids` and `labels` of equal length per sample; its other columns are dropped, and so
    are empty samples. Raises ValueError for a sample longer than seq_len (truncate or drop those first), for
    labels of another length, or for bad settings. The result has no format set: `.with_format("torch")`
    gives tensors. Batches of its rows must reach the model without an `attention_mask` (module docstring).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, not {seq_len}")
    if config.window < 1:
        raise ValueError(f"the packing window must hold at least 1 sample, not {config.window}")
    if config.strategy not in PLACEMENTS:
        raise ValueError(f"unknown packing strategy {config.strategy!r}; one of {sorted(PLACEMENTS)}")
    missing = {"input_ids", "labels"} - set(samples.column_names)
    if missing:
        raise ValueError(f"samples to pack need the columns input_ids and labels; missing {sorted(missing)}")
    return samples.with_format("arrow").map(
        _pack_window,
        batched=True,
        batch_size=config.window,
        with_indices=True,
        remove_columns=samples.column_names,
        features=PACKED_FEATURES,
        fn_kwargs={"seq_len": seq_len, "pad_id": pad_id, "strategy": config.strategy},
        desc="pack samples",
    ).with_format(None)


def _pack_window(
    window: pa.Table, indices: List[int], seq_len: int, pad_id: int, strategy: str
) -> Dict[str, np.ndarray]:
    """One window's samples placed into rows and laid out with numpy, without a Python loop over tokens."""
    ids, id_offsets = _values_and_offsets(window.column("input_ids"))
    labels, label_offsets = _values_and_offsets(window.column("labels"))
    lengths = np.diff(id_offsets)
    _check_lengths(lengths, np.diff(label_offsets), indices, seq_len)
    # Empty samples hold no token; left out, they cannot open a row of padding.
    nonempty = np.flatnonzero(lengths > 0)
    rows = PLACEMENTS[strategy](lengths[nonempty].tolist(), seq_len)

    order = nonempty[np.array([index for row in rows for index in row], dtype=np.int64)]
    row_of_sample = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    placed_lengths = lengths[order]
    fill = np.bincount(row_of_sample, weights=placed_lengths, minlength=len(rows)).astype(np.int64)
    # Each placed sample's first slot: its start in the flat stream of placed tokens, moved to its row.
    stream_start = np.cumsum(placed_lengths) - placed_lengths
    row_stream_start = np.cumsum(fill) - fill
    slot_start = row_of_sample * seq_len + stream_start - row_stream_start[row_of_sample]

    position = np.arange(int(placed_lengths.sum())) - np.repeat(stream_start, placed_lengths)
    slots = np.repeat(slot_start, placed_lengths) + position
    packed_ids = np.full(len(rows) * seq_len, pad_id, dtype=np.int64)
    packed_ids[slots] = ids[np.repeat(id_offsets[order], placed_lengths) + position]
    packed_labels = np.full(len(rows) * seq_len, IGNORE_INDEX, dtype=np.int64)
    packed_labels[slots] = labels[np.repeat(label_offsets[order], placed_lengths) + position]
    # The boundary rule: nothing predicts a sample's first token from the sample before it.
    packed_labels[slot_start] = IGNORE_INDEX
    # Padding counts from 0 where the row's samples end: a sample of its own.
    position_ids = (np.arange(seq_len)[None, :] - fill[:, None]).reshape(-1)
    position_ids[slots] = position
    return {
        "input_ids": packed_ids.reshape(-1, seq_len),
        "labels": packed_labels.reshape(-1, seq_len),
        "position_ids": position_ids.reshape(-1, seq_len),
    }


def _values_and_offsets(column: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    """A list column as flat values and offsets: sample i is values[offsets[i]:offsets[i + 1]]."""
    lists = column.combine_chunks()
    return lists.values.to_numpy(zero_copy_only=False), lists.offsets.to_numpy().astype(np.int64)


def _check_lengths(lengths: np.ndarray, label_lengths: np.ndarray, indices: List[int], seq_len: int) -> None:
    mismatched = np.flatnonzero(lengths != label_lengths)
    if mismatched.size:
        at = mismatched[0]
        raise ValueError(
            f"sample {indices[at]} has {lengths[at]} input_ids but {label_lengths[at]} labels; they must align"
        )
    too_long = np.flatnonzero(lengths > seq_len)
    if too_long.size:
        at = too_long[0]
        raise ValueError(
            f"sample {indices[at]} has {lengths[at]} tokens, more than seq_len={seq_len}: "
            f"truncate or drop such samples before packing"
        )


def packing_efficiency(packed: datasets.Dataset) -> float:
    """The fill ratio of packed rows: slots holding sample tokens over all slots.

    A row's trailing padding is its last sample (positions restart at 0) when none of its labels counts. A
    real last sample that counts no label (one token, or all prompt) is taken for padding: it trains nothing.
    """
    real = slots = 0
    for window in packed.with_format("arrow").iter(batch_size=1024):
        positions = _matrix(window.column("position_ids"))
        labels = _matrix(window.column("labels"))
        rows, seq_len = positions.shape
        last_start = seq_len - 1 - np.argmax(positions[:, ::-1] == 0, axis=1)
        in_last = np.arange(seq_len)[None, :] >= last_start[:, None]
        last_counts = ((labels != IGNORE_INDEX) & in_last).any(axis=1)
        padding = np.where(last_counts, 0, seq_len - last_start)
        real += rows * seq_len - int(padding.sum())
        slots += rows * seq_len
    if slots == 0:
        raise ValueError("an empty dataset has no fill ratio")
    return real / slots


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A column of equal-length lists as a (rows, length) array."""
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
