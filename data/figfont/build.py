"""Regenerate the small FigFont set shipped for the quickstart: `python data/figfont/build.py` (needs reasoning-gym).

Items come from reasoning-gym exactly as the reference generates them (REFERENCE.md §3): indices from 0 are
training items, indices from 40,000 test items. The full regime DataModule generates any range on the fly.
"""

import json
from pathlib import Path

import reasoning_gym

HERE = Path(__file__).parent
SYSTEM_PROMPT = (
    "You are an expert at decoding Figlet Font ASCII art. Read the art and answer with the word it spells, "
    "in uppercase letters, and nothing else."
)


def rows(start: int, count: int) -> list[dict[str, str]]:
    dataset = reasoning_gym.create_dataset(
        "figlet_font", size=10, seed=42, min_word_len=2, max_word_len=5, space_letters=True
    )
    items = (dataset[index] for index in range(start, start + count))
    return [{"system": SYSTEM_PROMPT, "instruction": item["question"], "output": item["answer"]} for item in items]


def main() -> None:
    for name, start, count in (("train.jsonl", 0, 256), ("test.jsonl", 40_000, 64)):
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows(start, count)))


if __name__ == "__main__":
    main()
