"""Scorers: one small class per answer format, each turning (model output, reference) into per-sample scores.

Contract (like the objectives'): ``score(output, reference) -> {"extracted": ..., metric: value, ...}`` for one
sample, and ``metrics`` names the per-sample values that are averaged. A benchmark aggregates them over samples
and items (see :mod:`deft_lightning.evaluation.benchmarks`). A new answer format is one subclass.
"""

from __future__ import annotations

import re
from typing import Any, Literal

#: ``\boxed{…}`` and ``\fbox{…}`` openers
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing(text: str, start: int) -> int | None:
    """Index of the brace that closes the one opened just before ``start`` (nested braces allowed), or None."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (nested braces allowed); None when there is none or when the last one is
    unclosed (a cut-off final answer is no answer, not the box before it)."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    end = _closing(text, starts[-1])
    return None if end is None else text[starts[-1] : end].strip()


def extract_reference_answer(text: str) -> str:
    """The final answer as the reference's evaluation harness reads it (Qwen2.5-Math ``parser.extract_answer``):
    after the last "boxed", its braced content (to the end of the text when unclosed) or, for ``\\boxed 5``, the
    text up to the next ``$``; else what follows the last "he answer is" / "final answer is"; else the last
    number. Empty when there is none."""
    if "boxed" in text:
        tail = text.split("boxed")[-1]
        answer = tail[1 : _closing(tail, 1)] if tail.startswith("{") else tail.split("$")[0]
    elif "he answer is" in text:
        answer = text.split("he answer is")[-1]
    elif "final answer is" in text:
        answer = text.split("final answer is")[-1]
    else:
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = re.sub(r"\n\s*", "", answer).strip()
    return answer.removeprefix(":").removesuffix(".").removesuffix("/").strip()


class Scorer:
    """Base class: ``metrics`` are the per-sample values in [0, 1] that :meth:`score` returns next to ``extracted``
    (benchmarks report their means in percent)."""

    metrics: tuple[str, ...] = ("correct",)

    def score(self, output: str, reference: Any) -> dict[str, Any]:
        raise NotImplementedError


class MathScorer(Scorer):
    """The final answer, judged equivalent to the reference by ``math-verify`` (sympy-based).

    Args:
        extraction: ``boxed`` (default): the last ``\\boxed{}``; an output without one, or whose last box is cut
            off, is wrong. ``reference``: the reference harness's rules (:func:`extract_reference_answer`:
            ``\\boxed 5``, "the answer is", the last number when there is no box) — how the paper's numbers read.
        timeout_seconds: per parse and per comparison.

    The reference answer may itself be a solution with a ``\\boxed{}`` answer.
    """

    def __init__(self, extraction: Literal["boxed", "reference"] = "boxed", timeout_seconds: int = 5) -> None:
        if extraction not in ("boxed", "reference"):
            raise ValueError(f"MathScorer extraction must be 'boxed' or 'reference', got {extraction!r}")
        self.extraction, self.timeout_seconds = extraction, timeout_seconds

    def score(self, output: str, reference: str) -> dict[str, Any]:
        from math_verify import parse, verify

        answer = extract_boxed(output) if self.extraction == "boxed" else extract_reference_answer(output) or None
        if answer is None:
            return {"extracted": None, "correct": 0.0}
        gold = (extract_boxed(reference) or reference).strip().strip("$")  # OlympiadBench's answers are "$…$"
        parsed_gold = parse(f"${gold}$", parsing_timeout=self.timeout_seconds)
        parsed_answer = parse(f"${answer}$", parsing_timeout=self.timeout_seconds)
        correct = verify(parsed_gold, parsed_answer, timeout_seconds=self.timeout_seconds)
        if not correct and answer.strip() == gold.strip():  # unparsable by sympy but literally equal
            correct = True
        return {"extracted": answer, "correct": float(correct)}


class ChoiceScorer(Scorer):
    """The option letter of a multiple-choice answer; the first rule that finds one decides:

    1. the last ``\\boxed{X}`` (the reference's medical prompt asks for one);
    2. the letter after the last "answer is" / "answer:" ("option", parentheses and bold allowed);
    3. the last letter standing alone — "(C)", "C.", "Option C", "choose B", "**C**" — where a capital "A" or "I"
       read as article or pronoun ("A vitamin…", "I would…", "I'm…") does not count;
    4. the option whose text is mentioned last.

    The reference is ``{"answer": letter, "options": {letter: text}}``.
    """

    def score(self, output: str, reference: dict[str, Any]) -> dict[str, Any]:
        letter = self.extract(output, reference["options"])
        return {"extracted": letter, "correct": float(letter == reference["answer"])}

    @staticmethod
    def extract(output: str, options: dict[str, str]) -> str | None:
        letters = "".join(options)
        text = output.strip()
        boxed = re.findall(rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?([{letters}])(?![A-Za-z])", text)
        if boxed:
            return boxed[-1]
        stated = re.findall(
            rf"answer\s*(?:is|:)\s*(?:option\s*)?[(\[*\s]*([{letters}])(?![A-Za-z])", text, flags=re.IGNORECASE
        )
        stated = [letter for letter in stated if letter.isupper() or letter not in "ai"]  # "is a …": an article
        if stated:
            return stated[-1].upper()
        alone = [
            match.group(1)
            for match in re.finditer(rf"(?<![A-Za-z0-9'])\(?([{letters}])\)?(?![A-Za-z0-9])", text)
            if match.group(0).startswith("(") or not _article_or_pronoun(match.group(1), text[match.end() :])
        ]
        if alone:
            return alone[-1]
        mentioned = {}
        for letter, option in options.items():
            name = re.escape(option.strip().rstrip(".").lower())
            ends = [m.end() for m in re.finditer(rf"(?<!\w){name}(?!\w)", text.lower())] if name else []
            if ends:
                mentioned[letter] = ends[-1]
        return max(mentioned, key=mentioned.get) if mentioned else None


def _article_or_pronoun(letter: str, rest: str) -> bool:
    """Whether a capital "A" or "I" followed by ``rest`` reads as a word: "A vitamin", "I would", "I'm"."""
    return letter in "AI" and (re.match(r"\s+[a-z]", rest) is not None or rest.startswith("'"))


class FigFontScorer(Scorer):
    """The paper's FigFont metrics as the reference computes them (``evaluations/figfont/main.py``): ``exact``
    (the raw output equals the answer), ``exact_lower`` (the same, lowercased) and ``jaro_winkler``: the Jaro
    similarity of the lowercased, stripped strings plus the Winkler prefix bonus (common prefix up to 4, weight
    0.1), **always** — the paper's number. ``jaro_winkler_textbook`` is rapidfuzz's Jaro-Winkler, which adds the
    bonus only above a Jaro similarity of 0.7 ("AB" vs "AC": 0.667 there, 0.700 in the reference)."""

    metrics = ("exact", "exact_lower", "jaro_winkler", "jaro_winkler_textbook")

    def score(self, output: str, reference: str) -> dict[str, Any]:
        from rapidfuzz.distance import Jaro, JaroWinkler

        prediction, target = output.lower().strip(), reference.lower().strip()
        jaro = Jaro.similarity(prediction, target) if prediction and target else float(prediction == target)
        prefix = 0
        while prefix < min(4, len(prediction), len(target)) and prediction[prefix] == target[prefix]:
            prefix += 1
        return {
            "extracted": output.strip(),
            "exact": float(output == reference),
            "exact_lower": float(output.lower() == reference.lower()),
            "jaro_winkler": jaro + prefix * 0.1 * (1 - jaro),
            "jaro_winkler_textbook": JaroWinkler.similarity(prediction, target, prefix_weight=0.1),
        }


class SimilarityScorer(Scorer):
    """How close a free-text output is to the reference: rapidfuzz's normalized Indel similarity
    (``fuzz.ratio`` / 100) of the stripped strings, and exact match."""

    metrics = ("similarity", "exact")

    def score(self, output: str, reference: str) -> dict[str, Any]:
        from rapidfuzz import fuzz

        prediction, target = output.strip(), reference.strip()
        return {
            "extracted": prediction,
            "similarity": fuzz.ratio(prediction, target) / 100,
            "exact": float(prediction == target),
        }
