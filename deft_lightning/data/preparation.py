"""Tokenizing a split at any size: rows stream from the source, batches of them are encoded on every core, and the
token ids go to an Arrow file as they come back, so memory stays flat however many rows the split has.

The main process reads and validates rows (a bad row stops everything naming its file, line and field, or is
counted and skipped under ``on_bad_row: skip``) and writes; forked worker processes render and tokenize. Results
are written in the source's order, so the file is the same for any number of workers. A split that fits in one
batch is encoded in the main process (no workers to start).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from deft_lightning.data.sources import OPTIONAL_FIELDS, REQUIRED_FIELDS, RowReport, Source
from deft_lightning.prompting import Prompter, TrainOn

IGNORE_INDEX = -100
#: rows handed to a worker at a time: large enough that pickling and scheduling are noise, small enough that the
#: batches in flight (two per worker) hold a few MiB
BATCH_ROWS = 256
#: text kept next to the token ids, for generation and evaluation prompts (a conversation as JSON)
TEXT_COLUMNS = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "messages")
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("weight", pa.float32()),  # the row's loss weight (1 where the row has none)
        *((name, pa.string()) for name in TEXT_COLUMNS),
    ]
)


@dataclass
class SplitReport:
    """Per-split accounting, printed before training and stored next to the cache."""

    source: str
    examples: int = 0
    conversations: int = 0  # of the examples, how many are multi-turn conversations
    bad_rows_skipped: int = 0
    dropped_truncated: int = 0  # whole response cut away by max_seq_length
    truncated: int = 0  # response partly cut, kept
    tokens: int = 0
    trainable_tokens: int = 0
    seconds: float = 0.0
    from_cache: bool = False


def encode_example(
    prompter: Prompter, row: dict[str, Any], max_seq_length: int, train_on: TrainOn = "all_assistant"
) -> tuple[list[int], list[int], bool]:
    """Token ids right-truncated to ``max_seq_length`` and labels that mask all but the trained tokens: the
    response and its EOS of a single-turn row; the assistant turns (``train_on``) of a conversation.

    Returns ``(input_ids, labels, truncated)``.
    """
    if row.get("messages"):
        input_ids, spans = prompter.conversation_spans(row["messages"], train_on)
        labels = [IGNORE_INDEX] * len(input_ids)
        for tokens in spans:
            labels[tokens.start : tokens.stop] = input_ids[tokens.start : tokens.stop]
        return input_ids[:max_seq_length], labels[:max_seq_length], len(input_ids) > max_seq_length
    prompt, response = prompter.prompt_ids(row), prompter.response_ids(row["output"])
    input_ids = (prompt + response)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_seq_length]
    return input_ids, labels, len(prompt) + len(response) > max_seq_length


@dataclass
class Encoder:
    """How rows become token ids: what a worker needs (inherited when it is forked)."""

    prompter: Prompter
    max_seq_length: int
    train_on: TrainOn


@dataclass
class EncodedBatch:
    """A batch of rows as token ids: the kept rows' ids and labels concatenated, and the batch's accounting."""

    kept: list[int]  # positions in the batch of the rows kept (a row whose every target was cut away is dropped)
    lengths: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None  # per kept row
    texts: dict[str, list[str]] | None = None  # TEXT_COLUMNS of the kept rows
    truncated: int = 0
    trainable: int = 0
    error: tuple[int, str] | None = None  # (position in the batch, message): a row no template could render


def encode_batch(encoder: Encoder, rows: list[dict[str, Any]]) -> EncodedBatch:
    kept, ids, labels, truncated, trainable = [], [], [], 0, 0
    for position, row in enumerate(rows):
        try:
            row_ids, row_labels, row_truncated = encode_example(
                encoder.prompter, row, encoder.max_seq_length, encoder.train_on
            )
        except ValueError as err:
            empty = np.empty(0, dtype=np.int32)
            return EncodedBatch([], empty, empty, empty, error=(position, str(err)))
        row_labels = np.asarray(row_labels, dtype=np.int32)
        targets = int(np.count_nonzero(row_labels[1:] != IGNORE_INDEX))  # position 0 is never a target
        if targets == 0:
            continue
        kept.append(position)
        ids.append(np.asarray(row_ids, dtype=np.int32))
        labels.append(row_labels)
        truncated += row_truncated
        trainable += targets
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    concat = (lambda parts: np.concatenate(parts)) if ids else (lambda parts: np.empty(0, dtype=np.int32))
    texts = [text_columns(rows[position]) for position in kept]
    columns = {name: [text[name] for text in texts] for name in TEXT_COLUMNS}
    weights = np.array([rows[position].get("weight", 1.0) for position in kept], dtype=np.float32)
    return EncodedBatch(kept, lengths, concat(ids), concat(labels), weights, columns, truncated, trainable)


_WORKER_ENCODER: Encoder | None = None  # set in the parent right before the workers are forked


def _encode_in_worker(rows: list[dict[str, Any]]) -> EncodedBatch:
    return encode_batch(_WORKER_ENCODER, rows)


def text_columns(row: dict[str, Any]) -> dict[str, str]:
    import json

    texts = {name: row.get(name, "") for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)}
    return {**texts, "messages": json.dumps(row["messages"]) if row.get("messages") else ""}


def _batches(rows: Iterator[tuple[str, dict[str, Any]]], size: int) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenize_source(
    source: Source,
    encoder: Encoder,
    out: Path,
    read: RowReport,
    on_bad_row: str = "error",
    num_proc: int | None = None,
    label: str = "source",
    progress: bool = True,
) -> SplitReport:
    """Tokenize every row of ``source`` into the Arrow stream file ``out`` (columns :data:`SCHEMA`) with
    ``num_proc`` processes (default: every core this process may use) and return the split's accounting; ``read``
    collects the rows read and the bad rows skipped. ``label`` names the split in messages and the progress bar.

    Raises ``ValueError`` naming the row (file:line) for a bad row or one the template cannot render, and when no
    example is left to train on; ``out`` is then incomplete and the caller discards it.
    """
    started = time.perf_counter()
    report = SplitReport(source=source.name)
    workers = max(1, num_proc or available_cores())
    batches = _batches(source.located_rows(read, on_bad_row), BATCH_ROWS)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    # shown after half a second: nothing for a split prepared (or refused for a bad row) at once
    bar = tqdm(desc=label, unit=" rows", total=source.expected_rows(), disable=not progress, delay=0.5)
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:

        def write(batch: list[tuple[str, dict[str, Any]]], encoded: EncodedBatch) -> None:
            if encoded.error is not None:
                position, message = encoded.error
                raise ValueError(f"{batch[position][0]}: {message}")
            rows = [batch[position][1] for position in encoded.kept]
            offsets = np.zeros(len(rows) + 1, dtype=np.int32)
            np.cumsum(encoded.lengths, out=offsets[1:])
            columns = [
                pa.ListArray.from_arrays(offsets, encoded.input_ids),
                pa.ListArray.from_arrays(offsets, encoded.labels),
                pa.array(encoded.lengths),
                pa.array(encoded.weights),
                *(pa.array(encoded.texts[name], pa.string()) for name in TEXT_COLUMNS),
            ]
            writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
            report.examples += len(rows)
            report.conversations += sum(bool(row.get("messages")) for row in rows)
            report.dropped_truncated += len(batch) - len(rows)
            report.truncated += encoded.truncated
            report.tokens += int(encoded.lengths.sum())
            report.trainable_tokens += encoded.trainable
            bar.update(len(batch))

        if len(head) < 2 or workers == 1 or sys.platform != "linux":  # one batch, or no fork to inherit the encoder
            for batch in batches:
                write(batch, encode_batch(encoder, [row for _, row in batch]))
        else:
            _encode_in_workers(encoder, batches, workers, write)
    bar.close()
    report.bad_rows_skipped = len(read.skipped)
    report.seconds = time.perf_counter() - started
    if not report.examples and not read.read and not read.skipped:
        raise ValueError(f"{label} has no rows (an empty file?)")
    if not report.examples:
        raise ValueError(
            f"{label}: no example has a trainable token "
            f"({report.dropped_truncated} responses truncated away at max_seq_length={encoder.max_seq_length}, "
            f"{report.bad_rows_skipped} bad rows skipped)"
        )
    return report


def _encode_in_workers(encoder: Encoder, batches: Iterator[list], workers: int, write: Any) -> None:
    """Batches encoded by ``workers`` forked processes and written in order, at most two per worker in flight, so
    rows are read only as fast as they are encoded."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append((batch, pool.apply_async(_encode_in_worker, ([row for _, row in batch],))))
                if len(pending) >= 2 * workers:
                    done, result = pending.popleft()
                    write(done, result.get())
            while pending:
                done, result = pending.popleft()
                write(done, result.get())
    finally:
        _WORKER_ENCODER = None
