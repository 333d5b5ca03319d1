"""Packing (``data.packing: true``): several examples per training row, no padding between them.

Examples are placed into rows of at most ``max_seq_length`` tokens by best-fit decreasing, once per prepared split
(deterministic: the same rows on every rank and every resume); the training sampler then shuffles and batches the
packed rows as it does single examples. A packed row carries ``position_ids`` that restart at 0 where each example
begins: the model reads the example boundaries from them (RoPE positions per example, attention that never crosses
an example, :mod:`deft_lightning.packed`). The first label of every example is masked, so the last token of one
example never learns to predict the first of the next; every other target is the unpacked one, and the loss stays
the global token mean over the same targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths`` whose lengths sum to at most ``capacity``: longest first (ties by index),
    each into the open bin with the least room that still fits it, else into a new bin.

    Rooms are integers up to ``capacity``: one Python int is the set of rooms some bin has (bit r), so the best fit
    is its lowest set bit at or above the length — no search over bins, ~1 µs an example.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"packing: example lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable").tolist()
    sizes = lengths.tolist()
    bins_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    rooms = 0
    bins: list[list[int]] = []
    for index in order:
        length = sizes[index]
        fitting = rooms >> length
        if fitting:
            room = length + (fitting & -fitting).bit_length() - 1
            target = bins_with_room[room].pop()
            if not bins_with_room[room]:
                rooms ^= 1 << room
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        room -= length
        if room:
            if not bins_with_room[room]:
                rooms |= 1 << room
            bins_with_room[room].append(target)
    return bins


class PackedRows(torch.utils.data.Dataset):
    """A tokenized split (``input_ids``, ``labels`` per example) read as packed rows: item ``i`` is the examples of
    ``bins[i]`` concatenated, with per-example ``position_ids`` and each example's first label masked."""

    def __init__(self, examples: Any, bins: list[list[int]]) -> None:
        self.examples, self.bins = examples, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """One read of the underlying dataset for every example of a batch's packed rows (``token_weights`` are
        packed alike where the examples carry them)."""
        members = [self.bins[index] for index in indices]
        columns = self.examples[[example for bin_ in members for example in bin_]]  # indexing with a list: columns
        columns = {name: [torch.as_tensor(x) for x in values] for name, values in columns.items()}
        packed, cursor = [], 0
        for bin_ in members:
            parts = slice(cursor, cursor + len(bin_))
            cursor += len(bin_)
            row = {name: torch.cat(values[parts]) for name, values in columns.items()}
            lengths = [len(x) for x in columns["input_ids"][parts]]
            row["labels"][_starts(lengths)] = IGNORE_INDEX
            row["position_ids"] = torch.cat([torch.arange(length) for length in lengths])
            packed.append(row)
        return packed


def _starts(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths[:-1]).tolist()], dtype=torch.long)


def bin_lengths(lengths: Sequence[int], bins: list[list[int]]) -> list[int]:
    return [sum(lengths[index] for index in bin_) for bin_ in bins]
