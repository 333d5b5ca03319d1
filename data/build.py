"""Regenerate every shipped sample under data/: `python data/build.py` (deterministic).

- tiny/      four string tasks + a 320-token byte-level BPE tokenizer (with a ChatML-style chat template), for
             the random-init tiny model
- figfont/   weak regime: FigFont puzzles from reasoning-gym, exactly as the reference generates them
- math/      strong regime sample: word problems with step-by-step solutions ending in \\boxed{}
             (NuminaMath-style columns `problem` / `solution`, read through a `fields:` mapping)
- medical/   intermediate regime sample: multiple-choice questions answered with the option letter
- general/   general instructions (single-turn)
- chat/      multi-turn conversations in the Tulu-3 SFT mixture's layout, mixed with math in the mixed regime
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------- tiny
TINY_TASKS = {
    "Reverse the letters of the word.": lambda w: w[::-1],
    "Write the word in capital letters.": lambda w: w.upper(),
    "Sort the letters of the word alphabetically.": lambda w: "".join(sorted(w)),
    "Repeat the word twice, separated by a space.": lambda w: f"{w} {w}",
}


def tiny_rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        instruction, solve = rng.choice(list(TINY_TASKS.items()))
        rows.append({"instruction": instruction, "input": word, "output": solve(word)})
    return rows


#: ChatML-style turns ending in the tiny tokenizer's EOS, so the tiny model can train on conversations
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tiny() -> None:
    from litgpt.prompts import Alpaca

    from deft_lightning.data.tokenizer import train_byte_level_bpe

    rng = random.Random(1)
    train, val = tiny_rows(512, rng), tiny_rows(64, rng)
    write_jsonl(HERE / "tiny/train.jsonl", train)
    write_jsonl(HERE / "tiny/val.jsonl", val)
    texts = [Alpaca().apply(r["instruction"], input=r["input"]) + r["output"] for r in train]
    train_byte_level_bpe(texts, HERE / "tiny/tokenizer", vocab_size=320)
    (HERE / "tiny/tokenizer/chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)


# ---------------------------------------------------------------- figfont
def build_figfont() -> None:
    from deft_lightning.data.sources import FigFontSource, RowReport

    for name, start, count in (("train.jsonl", 0, 256), ("test.jsonl", 40_000, 64)):
        write_jsonl(HERE / "figfont" / name, list(FigFontSource(start=start, count=count).rows(RowReport())))


# ---------------------------------------------------------------- math
def math_rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    items = ["apples", "pencils", "books", "marbles", "stickers"]
    rows = []
    for _ in range(count):
        item, a, b, price = rng.choice(items), rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            problem = f"Mia has {a} {item} and buys {b} more. How many {item} does she have now?"
            solution = f"Mia starts with {a} {item} and adds {b}, so she has {a} + {b} = {a + b}.\n\\boxed{{{a + b}}}"
        elif kind == 1:
            problem = f"Each of {a} boxes holds {b} {item}. How many {item} are there in total?"
            solution = f"There are {a} boxes of {b} {item}: {a} \\times {b} = {a * b}.\n\\boxed{{{a * b}}}"
        else:
            problem = f"{a} {item} cost ${price} each. How much do they cost together, in dollars?"
            solution = f"The cost is {a} \\times {price} = {a * price} dollars.\n\\boxed{{{a * price}}}"
        rows.append(
            {
                "problem": problem + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
                "solution": solution,
            }
        )
    return rows


# ---------------------------------------------------------------- medical
FACTS = [
    ("Which organ produces insulin?", "Pancreas", ["Liver", "Kidney", "Spleen"]),
    ("Which vitamin deficiency causes scurvy?", "Vitamin C", ["Vitamin A", "Vitamin D", "Vitamin K"]),
    ("Which blood cells carry oxygen?", "Red blood cells", ["Platelets", "Neutrophils", "Lymphocytes"]),
    ("Which bone is the longest in the human body?", "Femur", ["Tibia", "Humerus", "Radius"]),
    (
        "Which chamber of the heart pumps blood into the aorta?",
        "Left ventricle",
        ["Right atrium", "Right ventricle", "Left atrium"],
    ),
    ("Which hormone regulates the sleep-wake cycle?", "Melatonin", ["Insulin", "Cortisol", "Thyroxine"]),
    (
        "Which organism causes tuberculosis?",
        "Mycobacterium tuberculosis",
        ["Staphylococcus aureus", "Escherichia coli", "Streptococcus pneumoniae"],
    ),
    (
        "Which electrolyte disturbance peaks the T waves on an ECG?",
        "Hyperkalemia",
        ["Hyponatremia", "Hypocalcemia", "Hypomagnesemia"],
    ),
    ("Which nerve innervates the diaphragm?", "Phrenic nerve", ["Vagus nerve", "Radial nerve", "Ulnar nerve"]),
    ("Which enzyme does aspirin inhibit?", "Cyclooxygenase", ["Lipase", "Amylase", "Trypsin"]),
    ("Which gland secretes cortisol?", "Adrenal cortex", ["Thyroid", "Pituitary", "Pineal"]),
    ("Which part of the brain coordinates balance?", "Cerebellum", ["Medulla", "Thalamus", "Hypothalamus"]),
]


def medical_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(3):
        for question, answer, distractors in FACTS:
            options = [answer, *distractors]
            rng.shuffle(options)
            letters = "ABCD"
            text = question + "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
            rows.append(
                {
                    "question": text + "\nAnswer with the letter of the correct option.",
                    "answer": letters[options.index(answer)],
                }
            )
    return rows


# ---------------------------------------------------------------- general
WORDS = ["cat", "river", "house", "garden", "window", "cloud", "bridge", "candle"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def general_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for word in WORDS:
        rows.append({"instruction": f"Give the plural of the word '{word}'.", "output": word + "s"})
        rows.append({"instruction": f"How many letters are in the word '{word}'?", "output": str(len(word))})
    for digit, name in enumerate(NUMBERS):
        rows.append({"instruction": f"Write the number {digit} as a word.", "output": name})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- chat
CHAT_SYSTEMS = ["You are a concise assistant.", "You are a patient tutor. Explain briefly, then answer."]
UNITS = [("kilometres", "metres", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000), ("days", "hours", 24)]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow"}


def chat_turns(rng: random.Random) -> list[tuple[str, str]]:
    """2–3 user/assistant exchanges on one small topic, each answer checkable from the question."""
    kind = rng.randrange(4)
    if kind == 0:
        big, small, factor = rng.choice(UNITS)
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return [
            (f"How many {small} are in {a} {big}?", f"{a} {big} are {a} × {factor} = {a * factor} {small}."),
            (f"And in {b} {big}?", f"{b} × {factor} = {b * factor} {small}."),
            ("Which is more?", f"{max(a, b)} {big}, that is {max(a, b) * factor} {small}."),
        ][: rng.randint(2, 3)]
    if kind == 1:
        word = rng.choice(WORDS)
        return [
            (f"Spell the word '{word}' backwards.", word[::-1]),
            ("Now in capital letters.", word[::-1].upper()),
            ("How many letters is that?", f"{len(word)} letters."),
        ][: rng.randint(2, 3)]
    if kind == 2:
        thing, colour = rng.choice(sorted(COLOURS.items()))
        other, other_colour = rng.choice(sorted(COLOURS.items()))
        return [
            (f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {colour}."),
            (f"And {other}?", f"{other[0].upper() + other[1:]} is usually {other_colour}."),
        ]
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    return [
        (f"What is {a} + {b}?", f"{a} + {b} = {a + b}."),
        (f"Multiply that by {c}.", f"{a + b} × {c} = {(a + b) * c}."),
        ("Is the result even?", "Yes, it is even." if (a + b) * c % 2 == 0 else "No, it is odd."),
    ][: rng.randint(2, 3)]


def chat_rows(count: int, rng: random.Random) -> list[dict]:
    """Conversations in the Tulu-3 SFT mixture's layout: ``{id, messages: [{role, content}], source}``."""
    rows = []
    for index in range(count):
        messages = [{"role": "system", "content": rng.choice(CHAT_SYSTEMS)}] if rng.random() < 0.4 else []
        for question, answer in chat_turns(rng):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"chat-{index}", "messages": messages, "source": "deft_lightning/data/build.py"})
    return rows


def main() -> None:
    build_tiny()
    build_figfont()
    rng = random.Random(7)
    write_jsonl(HERE / "math/train.jsonl", math_rows(48, rng))
    write_jsonl(HERE / "math/test.jsonl", math_rows(16, rng))
    write_jsonl(HERE / "medical/train.jsonl", medical_rows(rng))
    write_jsonl(HERE / "general/train.jsonl", general_rows(rng))
    chats = chat_rows(240, random.Random(11))
    write_jsonl(HERE / "chat/train.jsonl", chats[:200])
    write_jsonl(HERE / "chat/val.jsonl", chats[200:])


if __name__ == "__main__":
    main()
