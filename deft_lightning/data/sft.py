"""A minimal SFT DataModule over local JSONL files.

Rows are ``{"instruction": str, "input": str (optional), "system": str (optional), "output": str}``. The prompt is
rendered by :class:`~deft_lightning.prompting.Prompter` (the backbone's chat template or a LitGPT prompt style,
the same code evaluation uses) and masked with -100; the response and its EOS are trained; sequences are
right-truncated. Every row is validated and tokenized in ``setup``, before any training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from deft_lightning.prompting import Prompter

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "system")


def read_sft_jsonl(path: Path) -> list[dict[str, str]]:
    """Read and validate SFT rows; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in REQUIRED_FIELDS:
                if field not in row:
                    raise ValueError(f"{where}: missing field '{field}'")
            for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
                if field in row and not isinstance(row[field], str):
                    raise ValueError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
            if not row["output"].strip():
                raise ValueError(f"{where}: field 'output' is empty")
            rows.append({field: row[field] for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) if field in row})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def encode_example(prompter: Prompter, row: dict[str, str], max_seq_length: int) -> dict[str, torch.Tensor]:
    """Prompt + response ids, right-truncated; labels mask the prompt with IGNORE_INDEX."""
    prompt, response = prompter.prompt_ids(row), prompter.response_ids(row["output"])
    input_ids = torch.tensor(prompt + response, dtype=torch.long)[:max_seq_length]
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + response, dtype=torch.long)[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch (labels with IGNORE_INDEX)."""
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "input_ids": pad([ex["input_ids"] for ex in examples], batch_first=True, padding_value=pad_id),
        "labels": pad([ex["labels"] for ex in examples], batch_first=True, padding_value=IGNORE_INDEX),
    }


class SFTJsonData(L.LightningDataModule):
    """Local JSONL SFT data for fits, validation and tests.

    Args:
        train_file, val_file, test_file: JSONL files (``val_file``/``test_file`` optional).
        tokenizer_dir: a directory with ``tokenizer.json`` + ``tokenizer_config.json`` (e.g. a LitGPT checkpoint).
        prompt_style: ``chat_template`` (the tokenizer's own) or a LitGPT prompt style name (``litgpt.prompts``).
        system_prompt: system message for chat templates, unless a row has its own ``system`` field.
        max_seq_length: sequences are right-truncated to this many tokens.
        batch_size: sequences per optimizer step on each device (split into ``model.micro_batch_size``).
        num_workers: dataloader workers.
        seed: shuffling seed.
    """

    def __init__(
        self,
        train_file: Path,
        tokenizer_dir: Path,
        val_file: Path | None = None,
        test_file: Path | None = None,
        prompt_style: str = "alpaca",
        system_prompt: str | None = None,
        max_seq_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1,
    ) -> None:
        super().__init__()
        if max_seq_length < 2:
            raise ValueError(f"data.max_seq_length must be >= 2, got {max_seq_length}")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (Path(tokenizer_dir) / f).is_file()]
        if missing:
            raise FileNotFoundError(f"data.tokenizer_dir '{tokenizer_dir}' lacks {', '.join(missing)}")
        self.prompter = Prompter(tokenizer_dir, prompt_style, system_prompt)
        self.tokenizer = self.prompter.tokenizer
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.datasets: dict[str, list[dict[str, torch.Tensor]]] = {}

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce, special tokens included."""
        processor = self.tokenizer.processor
        if hasattr(processor, "get_vocab_size"):  # HF tokenizers; litgpt's vocab_size leaves added tokens out
            return processor.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.vocab_size

    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in splits:
            if self.files[split] is None and split != "val":
                raise ValueError(f"`{stage}` needs data.{split}_file")
        for split in splits:
            if self.files[split] is not None and split not in self.datasets:
                self.datasets[split], self.rows[split] = self._tokenize(Path(self.files[split]))

    def _tokenize(self, path: Path) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, str]]]:
        rows = read_sft_jsonl(path)
        examples = [encode_example(self.prompter, row, self.max_seq_length) for row in rows]
        # position 0 is never a target after the shift, so count labels from position 1
        keep = [bool((ex["labels"][1:] != IGNORE_INDEX).any()) for ex in examples]
        kept = [ex for ex, k in zip(examples, keep, strict=True) if k]
        if not kept:
            raise ValueError(
                f"{path}: every example's response is truncated away at max_seq_length={self.max_seq_length}"
            )
        if len(kept) < len(examples):
            rank_zero_info(
                f"{path}: dropped {len(examples) - len(kept)} of {len(examples)} examples whose response does not "
                f"fit in max_seq_length={self.max_seq_length}"
            )
        return kept, [row for row, k in zip(rows, keep, strict=True) if k]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
