"""Regenerate the tiny offline SFT set and its tokenizer: `python data/tiny/build.py`.

Four string tasks a 2-layer model learns in a few hundred steps; deterministic for a given seed.
"""

import json
import random
from pathlib import Path

from deft_lightning.data.tokenizer import train_byte_level_bpe

HERE = Path(__file__).parent
TASKS = {
    "Reverse the letters of the word.": lambda w, rng: w[::-1],
    "Write the word in capital letters.": lambda w, rng: w.upper(),
    "Sort the letters of the word alphabetically.": lambda w, rng: "".join(sorted(w)),
    "Repeat the word twice, separated by a space.": lambda w, rng: f"{w} {w}",
}


def make_rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        instruction, solve = rng.choice(list(TASKS.items()))
        rows.append({"instruction": instruction, "input": word, "output": solve(word, rng)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(1)
    train, val = make_rows(512, rng), make_rows(64, rng)
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "val.jsonl", val)
    from litgpt.prompts import Alpaca

    texts = [Alpaca().apply(r["instruction"], input=r["input"]) + r["output"] for r in train]
    train_byte_level_bpe(texts, HERE / "tokenizer", vocab_size=320)


if __name__ == "__main__":
    main()
