"""The SFT DataModule behind every regime: sources → validated rows → cached token ids → resumable batches.

A regime (strong / intermediate / weak / mixed) is a choice of sources in YAML (``configs/<regime>.yaml``):

.. code-block:: yaml

    data:
      class_path: deft_lightning.data.SFTDataModule
      init_args:
        regime: weak
        train: {class_path: deft_lightning.data.FigFontSource, init_args: {start: 0, count: 40000}}
        tokenizer_dir: checkpoints/SmolLM2-135M-Instruct

Tokenized splits are cached (Arrow, via ``datasets``) under ``cache_dir`` by a key of the source's
fingerprint, the tokenizer files, the prompt settings and ``max_seq_length``, so a second run starts in
seconds. The training loader is a ``torchdata`` ``StatefulDataLoader`` whose position is saved in Lightning
checkpoints in global batches, so a resumed run continues with the exact next global batch, on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from deft_lightning.data.packing import PackedRows, best_fit_decreasing, bin_lengths
from deft_lightning.data.preparation import (
    TEXT_COLUMNS,
    Encoder,
    SplitReport,
    encode_batch,
    tokenize_source,
)
from deft_lightning.data.sources import RowReport, Source
from deft_lightning.data.weighting import WeightedExamples
from deft_lightning.prompting import Prompter, TrainOn
from deft_lightning.tables import format_table

IGNORE_INDEX = -100
CACHE_FORMAT = 4  # bump when the tokenized layout or the encoding rules change


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch (labels with IGNORE_INDEX). Packed rows also carry
    ``position_ids``; a row's padding gets positions from 0 again, an example of its own that no target is in."""
    pad = torch.nn.utils.rnn.pad_sequence
    batch = {
        "input_ids": pad([torch.as_tensor(ex["input_ids"]) for ex in examples], batch_first=True, padding_value=pad_id),
        "labels": pad([torch.as_tensor(ex["labels"]) for ex in examples], batch_first=True, padding_value=IGNORE_INDEX),
    }
    if "token_weights" in examples[0]:
        batch["token_weights"] = pad([ex["token_weights"] for ex in examples], batch_first=True, padding_value=0.0)
    if "position_ids" in examples[0]:
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.stack(
            [torch.cat([ex["position_ids"], torch.arange(width - len(ex["position_ids"]))]) for ex in examples]
        )
    return batch


class GlobalBatchSampler(DistributedSampler):
    """Shuffled global batches (``batch_size × num_replicas`` rows per step), each split across the ranks, with a
    resumable position that does not depend on the number of ranks.

    Per epoch: a seeded permutation of the rows cut into global batches. With ``length_grouping`` the permutation
    is first cut into mega-batches of ``group`` global batches, each sorted by length (less padding), and the full
    global batches are shuffled while a partial last one stays last (in the middle it would shift every later batch
    boundary). Rank r takes the r-th contiguous slice of each global batch, so the union of the ranks' batches at
    step k is the batch one process with the global batch size sees at step k, and each rank pads only to its own
    slice's longest row. A partial last batch is padded to a multiple of the ranks by repeating its own indices, so
    every rank takes as many steps.

    The state (epoch, global batches consumed, the global batch's shape) is the same on every rank and for any
    number of ranks: a run resumed on another number of ranks with the same global batch trains exactly the global
    batches an uninterrupted run would, and a changed global batch is refused. A ``DistributedSampler``, so
    Lightning does not wrap it and sets its epoch — relative to the epoch a resume restored: a finished fit
    resumed with a larger ``max_steps`` has Lightning's count one ahead (it closed the epoch the fit stopped in),
    and taking that count would skip the rest of the epoch.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        length_grouping: bool = False,
        group: int = 64,
    ) -> None:
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.group = lengths, batch_size, group
        self.length_grouping = length_grouping
        self._consumed = 0  # global batches of the current epoch handed out
        self._resume_from = 0
        self._epoch_offset: int | None = 0  # this sampler's epoch minus Lightning's

    def set_epoch(self, epoch: int) -> None:
        if self._epoch_offset is None:  # Lightning's first epoch after a resume is the restored one
            self._epoch_offset = self.epoch - epoch
        self.epoch = epoch + self._epoch_offset

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full * self.batch_size + -(-rest // self.num_replicas)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one process with the global batch size, in order."""
        size = self.global_batch_size
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.length_grouping:
            return [permutation[i : i + size] for i in range(0, len(permutation), size)]
        batches = []
        for start in range(0, len(permutation), size * self.group):
            chunk = sorted(permutation[start : start + size * self.group], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        full = [batch for batch in batches if len(batch) == size]
        partial = [batch for batch in batches if len(batch) < size]
        return [full[b] for b in torch.randperm(len(full), generator=generator).tolist()] + partial

    def share(self, batch: list[int]) -> list[int]:
        """This rank's slice of a global batch (a partial batch repeats its own indices to fill every rank)."""
        size = -(-len(batch) // self.num_replicas)
        batch = (batch * self.num_replicas)[: size * self.num_replicas]
        return batch[self.rank * size : (self.rank + 1) * size]

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for one epoch."""
        return [index for batch in self.global_batches(epoch) for index in self.share(batch)]

    def __iter__(self) -> Iterator[int]:
        start, self._resume_from = self._resume_from, 0
        batches = self.global_batches(self.epoch)
        self._consumed = start
        for number, batch in enumerate(batches[start:], start + 1):
            indices = self.share(batch)
            yield from indices[:-1]
            self._consumed = number  # counted as the batch's last index is taken: loaders take whole batches
            yield indices[-1]
        self.epoch, self._consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "global_batches": self._consumed,
            "global_batch_size": self.global_batch_size,
            "per_rank_batch_size": self.batch_size,
            "ranks": self.num_replicas,
            "rows": len(self.lengths),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "global_batches" not in state:  # written before positions were kept in global batches
            rank_zero_warn(
                "the checkpoint's data position predates rank-independent positions: assuming it was written with "
                f"{self.num_replicas} rank(s) and data.batch_size {self.batch_size}, as this run has"
            )
            state = {**state, "global_batches": state.get("yielded", 0) // self.batch_size}
        else:
            check_global_batch(state, self.batch_size, self.num_replicas)
        if "rows" in state and state["rows"] != len(self.lengths):
            rank_zero_warn(
                f"the training set has {len(self.lengths)} rows, the checkpoint's had {state['rows']}: the resumed "
                "run's batches differ from the interrupted run's"
            )
        self.epoch, self._resume_from = state.get("epoch", self.epoch), state["global_batches"]
        self._epoch_offset = None


def check_global_batch(saved: dict[str, int], batch_size: int, ranks: int) -> None:
    """Refuse to resume a data position (:meth:`GlobalBatchSampler.state_dict`) with another global batch: the
    resumed steps would not be the interrupted run's."""
    if saved["global_batch_size"] != batch_size * ranks:
        raise ValueError(
            f"cannot resume: the checkpoint trained global batches of {saved['global_batch_size']} rows "
            f"(data.batch_size {saved['per_rank_batch_size']} × {saved['ranks']} rank(s)), this run's are "
            f"{batch_size * ranks} (data.batch_size {batch_size} × {ranks} rank(s)); keep data.batch_size × devices "
            f"× nodes equal to {saved['global_batch_size']} to resume it, or start a new run (e.g. from an export)"
        )


def saved_data_position(checkpoint: dict[str, Any]) -> dict[str, int] | None:
    """The training sampler's state inside a Lightning checkpoint (wherever the loader nested it), if any."""
    pending = [checkpoint.get("loops")]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "global_batch_size" in node:
                return node
            pending += node.values()
        elif isinstance(node, list | tuple):
            pending += node
    return None


class TrainLoader(StatefulDataLoader):
    """Also reads loader states written before the sampler kept its own position (then a count of this rank's
    samples, which :meth:`GlobalBatchSampler.load_state_dict` converts)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(_with_sampler_states(state_dict))


def _with_sampler_states(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if "samples_yielded" in node and "sampler_state" not in node:
        return {**node, "sampler_state": {"yielded": node["samples_yielded"]}}
    return {key: _with_sampler_states(value) for key, value in node.items()}


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of padded positions when batches are taken from ``order`` and padded to their longest row."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded if padded else 0.0


class SFTDataModule(L.LightningDataModule):
    """SFT data for one regime: any :class:`Source` per split, tokenized once and cached.

    Args:
        train: the training source (``FileSource``, ``HubSource``, ``FigFontSource``, ``ReasoningGymMathSource``,
            ``MixtureSource``, or your own ``Source`` subclass).
        tokenizer_dir: the backbone's tokenizer (a LitGPT checkpoint directory).
        val, test: optional evaluation sources.
        regime: a label for summaries (strong / intermediate / weak / mixed).
        prompt_style: ``chat_template`` or a LitGPT prompt style name.
        system_prompt: default system message for chat templates (rows may carry their own).
        max_seq_length: right-truncation length.
        batch_size: sequences per optimizer step per device (split into ``model.micro_batch_size``).
        num_workers: dataloader workers.
        num_proc: processes that tokenize a split (default: every core this process may use).
        seed: shuffling seed.
        on_bad_row: ``error`` stops at the first malformed row (naming file, line, field and turn); ``skip``
            skips and counts them.
        train_on: for conversation rows, train every assistant turn (``all_assistant``) or only the last one
            (``last_assistant``); system, user and tool turns are never trained.
        length_grouping: batch sequences of similar length together to cut padding.
        packing: train on rows of up to ``max_seq_length`` tokens that each hold several examples (best-fit
            decreasing, :mod:`deft_lightning.data.packing`), positions restarting and attention confined to each
            example; ``batch_size`` then counts packed rows. The loss is the same global token mean. Validation
            and test batches stay unpacked.
        cache_dir: where tokenized splits are cached.
        prompt_weight, response_weight: loss weights of a training example's untrained (prompt, system, user) and
            trained (response, assistant) tokens, times the row's own ``weight`` field where it has one; the loss is
            Σ weight · token loss / Σ weight over the step (:mod:`deft_lightning.data.weighting`). ``prompt_weight
            > 0`` trains the prompt tokens too. Validation and test stay unweighted response-token means.
    """

    def __init__(
        self,
        train: Source,
        tokenizer_dir: Path,
        val: Source | None = None,
        test: Source | None = None,
        regime: str = "custom",
        prompt_style: str = "chat_template",
        system_prompt: str | None = None,
        max_seq_length: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1,
        on_bad_row: Literal["error", "skip"] = "error",
        length_grouping: bool = False,
        cache_dir: Path = Path(".cache/deft_lightning"),
        train_on: TrainOn = "all_assistant",
        num_proc: int | None = None,
        packing: bool = False,
        prompt_weight: float = 0.0,
        response_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.packing = packing
        for name, value in (("prompt_weight", prompt_weight), ("response_weight", response_weight)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"data.{name} must be a finite number >= 0, got {value!r}")
        if prompt_weight == response_weight == 0:
            raise ValueError("data.prompt_weight and data.response_weight are both 0: no token would train")
        self.prompt_weight, self.response_weight = float(prompt_weight), float(response_weight)
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {num_proc}")
        self.num_proc = num_proc
        if max_seq_length < 2:
            raise ValueError(f"data.max_seq_length must be >= 2, got {max_seq_length}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if train_on not in ("all_assistant", "last_assistant"):
            raise ValueError(f"data.train_on must be 'all_assistant' or 'last_assistant', got {train_on!r}")
        self.train_on = train_on
        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(
                f"data.tokenizer_dir '{tokenizer_dir}' does not exist; for the offline default model run "
                "`python -m deft_lightning prepare-model` (or `make model`), else point it at a model's directory"
            )
        missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (Path(tokenizer_dir) / f).is_file()]
        if missing:
            raise FileNotFoundError(f"data.tokenizer_dir '{tokenizer_dir}' lacks {', '.join(missing)}")
        self.sources = {"train": train, "val": val, "test": test}
        self.regime = regime
        self.tokenizer_dir = Path(tokenizer_dir)
        self.prompt_style, self.system_prompt = prompt_style, system_prompt
        self.max_seq_length = max_seq_length
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.on_bad_row, self.length_grouping = on_bad_row, length_grouping
        self.cache_dir = Path(cache_dir)
        self.prompter = Prompter(tokenizer_dir, prompt_style, system_prompt)
        self.tokenizer = self.prompter.tokenizer
        self.datasets: dict = {}
        self._packed: tuple[list[list[int]], list[int]] | None = None  # training bins and their lengths
        self.reports: dict[str, SplitReport] = {}
        self._failed: Exception | None = None  # bad data met in prepare_data, raised in setup

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce, special tokens included."""
        processor = self.tokenizer.processor
        if hasattr(processor, "get_vocab_size"):  # HF tokenizers; litgpt's vocab_size leaves added tokens out
            return processor.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------ preparation

    def prepare_data(self) -> None:
        """Tokenize and cache the splits a run needs, once per node: Lightning calls this on each node's local
        rank 0 and holds the other ranks at a barrier, so they only read the finished cache in :meth:`setup`.

        Bad data is reported from :meth:`setup`, where every rank meets it (the others by preparing the same rows),
        so all ranks stop together instead of waiting at the barrier for a rank that is gone.
        """
        for split in self._splits(self.trainer.state.fn.value):
            if self.sources[split] is not None and split not in self.datasets:
                try:
                    self.datasets[split], self.reports[split] = self._prepare(split)  # setup keeps them
                except (ValueError, OSError) as error:
                    self._failed = error
                    return

    def _splits(self, stage: str) -> tuple[str, ...]:
        return {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())

    def setup(self, stage: str) -> None:
        if self._failed is not None:
            raise self._failed
        splits = self._splits(stage)
        for split in splits:
            if self.sources[split] is None and split != "val":
                raise ValueError(f"`{stage}` needs data.{split}")
        for split in splits:
            if self.sources[split] is not None:
                self.split(split)
        if stage == "fit":
            self.print_summary()

    def split(self, name: str):
        """The tokenized split ``name`` (``train``, ``val``, ``test``) as a fit sees it: prepared once, cached."""
        if name not in self.datasets:
            if self.sources.get(name) is None:
                raise ValueError(f"the data config has no {name} source (data.{name})")
            self.datasets[name], self.reports[name] = self._prepare(name)
        return self.datasets[name]

    def _cache_key(self, source: Source) -> str:
        """Everything that decides the token ids: the tokenizer files (a ``chat_template.jinja`` is read before
        ``tokenizer_config.json``'s template), LitGPT's BOS rule for this directory (it special-cases names such
        as ``SmolLM2*Instruct``), the source's content, the prompt settings, truncation and bad-row handling."""
        digest = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            path = self.tokenizer_dir / name
            digest.update(path.read_bytes() if path.is_file() else b"(none)")
        settings = [
            CACHE_FORMAT,
            source.fingerprint(),
            self.prompt_style,
            self.system_prompt,
            self.max_seq_length,
            self.on_bad_row,
            self.tokenizer.use_bos,
            self.train_on,
        ]
        digest.update(json.dumps(settings).encode())
        return digest.hexdigest()[:20]

    def _cache_path(self, split: str) -> Path:
        return self.cache_dir / f"{split}-{self._cache_key(self.sources[split])}"

    def is_prepared(self, split: str) -> bool:
        """Whether the split's tokens are cached (then :meth:`split` only reads them)."""
        return self.sources.get(split) is not None and (self._cache_path(split) / "report.json").is_file()

    def preview(self, split: str, count: int) -> list[dict[str, Any]]:
        """The first ``count`` examples of a split as a fit would train them (``input_ids``, ``labels``, ``length``),
        read and encoded without preparing the rest of the split."""
        encoder = Encoder(self.prompter, self.max_seq_length, self.train_on)
        examples = []
        for where, row in self.sources[split].located_rows(RowReport(), self.on_bad_row):
            encoded = encode_batch(encoder, [row])
            if encoded.error is not None:
                raise ValueError(f"{where}: {encoded.error[1]}")
            if encoded.kept:
                ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
                examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
            if len(examples) == count:
                break
        return examples

    def _prepare(self, split: str):
        import datasets

        source = self.sources[split]
        path = self._cache_path(split)
        if (path / "report.json").is_file():
            started = time.perf_counter()
            dataset = datasets.Dataset.from_file(str(path / "tokens.arrow"))
            report = SplitReport(**{**json.loads((path / "report.json").read_text()), "from_cache": True})
            report.seconds = time.perf_counter() - started
            return dataset, report

        # a staging folder of this process's own, renamed into place when complete: processes that prepare the
        # same entry at once (ranks without a shared prepare_data, two runs) never touch each other's files
        staging = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        read = RowReport()
        try:
            report = tokenize_source(
                source,
                Encoder(self.prompter, self.max_seq_length, self.train_on),
                staging / "tokens.arrow",
                read,
                self.on_bad_row,
                self.num_proc,
                label=f"{split} source {source.name}",
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for message in read.skipped[:5]:
            rank_zero_info(f"skipped bad row: {message}")
        (staging / "report.json").write_text(json.dumps(asdict(report)))  # written last: marks a complete entry
        if path.is_dir() and not (path / "report.json").is_file():  # an entry of an interrupted older layout
            shutil.rmtree(path, ignore_errors=True)
        try:
            staging.rename(path)
        except OSError:  # another process published the same entry first: use it
            shutil.rmtree(staging, ignore_errors=True)
        return datasets.Dataset.from_file(str(path / "tokens.arrow")), report

    def examples(self, split: str, count: int) -> list[dict[str, Any]]:
        """The first ``count`` kept rows of a prepared split, as prompter rows (for predictions and evaluation)."""
        subset = self.datasets[split].select(range(min(count, len(self.datasets[split]))))
        rows = [{k: v for k, v in row.items() if v} for row in subset.select_columns(list(TEXT_COLUMNS))]
        return [{**row, "messages": json.loads(row["messages"])} if "messages" in row else row for row in rows]

    def print_summary(self) -> None:
        rank_zero_info(f"\n{self.summary()}")

    def summary(self) -> str:
        """The table of every prepared split: examples, conversations, bad/dropped/truncated rows, tokens, the
        trainable share, padding under the training order, preparation time."""
        header = (
            "split",
            "source",
            "examples",
            "chats",
            "bad skipped",
            "dropped",
            "truncated",
            "tokens",
            "trainable",
            "padding",
            "prepared",
        )
        lines = []
        for split, report in self.reports.items():
            lengths = self.training_rows()[1] if split == "train" else self.lengths(split)
            batches = self.batch_order() if split == "train" else [list(range(len(lengths)))]
            order = [index for batch in batches for index in batch]
            lines.append(
                (
                    split,
                    report.source,
                    str(report.examples),
                    str(report.conversations),
                    str(report.bad_rows_skipped),
                    str(report.dropped_truncated),
                    str(report.truncated),
                    f"{report.tokens:,}",
                    f"{report.trainable_tokens / max(1, report.tokens):.1%}",
                    f"{padding_fraction(lengths, order, self.batch_size):.1%}",
                    f"{report.seconds:.2f} s" + (" (cache)" if report.from_cache else ""),
                )
            )
        title = f"Data ({self.regime} regime, max_seq_length={self.max_seq_length})"
        if self.packing and "train" in self.datasets:
            rows, lengths = self.training_rows()
            fill = sum(lengths) / (len(rows) * self.max_seq_length)
            title += f"; packing: {len(self.datasets['train'])} examples in {len(rows)} rows ({fill:.1%} full)"
        return f"{title}\n{format_table(header, lines)}"

    # ------------------------------------------------------------------ loaders

    def lengths(self, split: str) -> list[int]:
        """Token count of every example of a prepared split."""
        return self.datasets[split].data.column("length").to_pylist()

    def training_rows(self) -> tuple[Any, list[int]]:
        """What the training loader indexes, and each item's length: the examples, or with ``packing`` the packed
        rows (:class:`~deft_lightning.data.packing.PackedRows`, computed once per split)."""
        examples = self.datasets["train"].with_format(columns=["input_ids", "labels"])
        if self.weighted():
            examples = WeightedExamples(
                self.datasets["train"].with_format(columns=["input_ids", "labels", "weight"]),
                self.prompt_weight,
                self.response_weight,
            )
        if not self.packing:
            return examples, self.lengths("train")
        if self._packed is None:
            lengths = self.lengths("train")
            bins = best_fit_decreasing(lengths, self.max_seq_length)
            self._packed = (bins, bin_lengths(lengths, bins))
        bins, lengths = self._packed
        return PackedRows(examples, bins), lengths

    def weighted(self) -> bool:
        """Whether training batches carry ``token_weights``: a prompt or response weight other than 0 and 1, or a
        training row with a ``weight`` other than 1."""
        if (self.prompt_weight, self.response_weight) != (0.0, 1.0):
            return True
        import pyarrow.compute as pc

        weights = self.datasets["train"].data.column("weight")
        return len(weights) > 0 and pc.min_max(weights).as_py() != {"min": 1.0, "max": 1.0}

    def batch_order(self) -> list[list[int]]:
        """The training rows (:meth:`training_rows`) of each optimizer step of the first epoch (one process with the
        global batch)."""
        lengths = self.training_rows()[1]
        sampler = GlobalBatchSampler(lengths, self.batch_size, self.seed, length_grouping=self.length_grouping)
        return sampler.global_batches(0)

    def train_dataloader(self) -> StatefulDataLoader:
        rows, lengths = self.training_rows()
        replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = GlobalBatchSampler(
            lengths, self.batch_size, self.seed, replicas, rank, length_grouping=self.length_grouping
        )
        return self._loader(rows, TrainLoader, sampler=sampler)

    def val_dataloader(self) -> StatefulDataLoader | list:
        return self._loader(self._examples("val")) if "val" in self.datasets else []

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self._examples("test"))

    def _examples(self, split: str) -> Any:
        return self.datasets[split].with_format(columns=["input_ids", "labels"])

    def _loader(self, rows: Any, loader: type = StatefulDataLoader, **kwargs) -> StatefulDataLoader:
        return loader(
            rows,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            **kwargs,
        )
