"""``python -m deft_lightning data --config CFG [--rows N] [--split train] [--dump FILE] [fit options]``: what a fit
config trains on, before anything is trained.

Prints N examples of the split as the model sees them — the rendered text, special tokens included, with every
trained token «marked» — and the split table a fit prints (examples, dropped and truncated rows, tokens, the
trainable share, padding) once the split is prepared; before that it reads and encodes only the rows it shows.
``--dump FILE`` prepares the split and writes it in the order a one-process fit trains it: one JSON line per
training row with its optimizer ``step``, ``row`` index, ``input_ids`` and ``labels`` (−100: not trained), and
``position_ids`` for packed rows (``data.packing``). Uses the same preparation and cache as ``fit``; any fit option
(``--data.init_args.max_seq_length 512``) applies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IGNORE_INDEX = -100


def render(tokenizer, input_ids: list[int], labels: list[int], marks: tuple[str, str] = ("«", "»")) -> str:
    """The text of ``input_ids`` with each run of trained tokens (label ≠ −100) between ``marks``."""
    pieces, run, trained = [], [], None
    for token, label in zip(input_ids, labels, strict=True):
        if (label != IGNORE_INDEX) != trained and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"{marks[0]}{text}{marks[1]}" if trained else text)
            run = []
        run.append(token)
        trained = label != IGNORE_INDEX
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        pieces.append(f"{marks[0]}{text}{marks[1]}" if trained else text)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", required=True, help="a fit config (repeatable, like fit's)")
    parser.add_argument("--rows", type=int, default=3, help="examples to print")
    parser.add_argument("--split", choices=["train", "val", "test"], default="train")
    parser.add_argument("--dump", type=Path, help="write the tokenized split in training order as JSONL")
    args, fit_options = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from deft_lightning.cli import main as fit_cli

    configs = [part for config in args.config for part in ("--config", config)]
    cli = fit_cli([*configs, *fit_options], run=False)  # the fit's model, trainer and data, nothing trained
    data = cli.datamodule
    if not hasattr(data, "split"):
        raise ValueError(f"`data` shows an SFTDataModule; the config's data is a {type(data).__name__}")
    if data.sources.get(args.split) is None:
        raise ValueError(f"the data config has no {args.split} source (data.{args.split})")
    tokenizer = data.tokenizer.processor
    marks = ("\x1b[1;32m", "\x1b[0m") if sys.stdout.isatty() else ("«", "»")
    full = args.dump is not None or data.is_prepared(args.split)  # else read and encode only the rows shown
    examples = data.split(args.split) if full else data.preview(args.split, args.rows)
    for index in range(min(args.rows, len(examples))):
        row = examples[index]
        print(f"── {args.split} row {index} ({row['length']} tokens, trained tokens marked)")
        print(render(tokenizer, row["input_ids"], row["labels"], marks))
    if not full:
        print(
            f"\n(the first {len(examples)} rows, read and encoded for this view; `fit` prepares and caches the whole "
            "split, after which this command also prints its table — or add --dump FILE to prepare it now)"
        )
        return
    if args.split == "train" and data.sources.get("val") is not None:
        data.split("val")
    print(f"\n{data.summary()}")
    if args.dump:
        rows, _ = data.training_rows() if args.split == "train" else (data.split(args.split), None)
        batches = data.batch_order() if args.split == "train" else [list(range(len(rows)))]
        args.dump.parent.mkdir(parents=True, exist_ok=True)
        with args.dump.open("w") as handle:
            for step, batch in enumerate(batches):
                for index in batch:
                    row = rows[index]
                    columns = [name for name in ("input_ids", "labels", "position_ids") if name in row]
                    record = {"step": step, "row": index, **{name: _plain(row[name]) for name in columns}}
                    handle.write(json.dumps(record) + "\n")
        print(f"\nwrote {args.dump}: {len(rows)} rows in {len(batches)} steps of the first epoch")


def _plain(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)
