"""Scorers: one small class per answer format, each turning (model output, reference) into per-sample scores.

Contract (like the objectives'): ``score(output, reference) -> {"extracted": ..., metric: value, ...}`` for one
sample, and ``metrics`` names the per-sample values that are averaged. A benchmark aggregates them over samples
and items (see :mod:`deft_lightning.evaluation.benchmarks`). A new answer format is one subclass.
"""

from __future__ import annotations

import re
from typing import Any

#: ``\boxed{…}`` and ``\fbox{…}`` openers
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (nested braces allowed), or None when there is none or it is unclosed."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start:index].strip()
    return None


class Scorer:
    """Base class: ``metrics`` are the per-sample values in [0, 1] that :meth:`score` returns next to ``extracted``
    (benchmarks report their means in percent)."""

    metrics: tuple[str, ...] = ("correct",)

    def score(self, output: str, reference: Any) -> dict[str, Any]:
        raise NotImplementedError


class MathScorer(Scorer):
    """The final ``\\boxed{}`` answer, judged equivalent to the reference by ``math-verify`` (sympy-based).

    The reference may itself be a solution with a ``\\boxed{}`` answer. An output without one is wrong.
    """

    def __init__(self, timeout_seconds: int = 5) -> None:
        self.timeout_seconds = timeout_seconds

    def score(self, output: str, reference: str) -> dict[str, Any]:
        from math_verify import parse, verify

        answer = extract_boxed(output)
        if answer is None:
            return {"extracted": None, "correct": 0.0}
        gold = extract_boxed(reference) or reference
        parsed_gold = parse(f"${gold}$", parsing_timeout=self.timeout_seconds)
        parsed_answer = parse(f"${answer}$", parsing_timeout=self.timeout_seconds)
        correct = verify(parsed_gold, parsed_answer, timeout_seconds=self.timeout_seconds)
        if not correct and answer.strip() == gold.strip():  # unparsable by sympy but literally equal
            correct = True
        return {"extracted": answer, "correct": float(correct)}


class ChoiceScorer(Scorer):
    """The option letter of a multiple-choice answer, found in outputs like "C", "(C)", "C. Pancreas",
    "The answer is (C).", "Answer: C", "\\boxed{C}" or the option's text alone.

    The reference is ``{"answer": letter, "options": {letter: text}}``.
    """

    def score(self, output: str, reference: dict[str, Any]) -> dict[str, Any]:
        letter = self.extract(output, reference["options"])
        return {"extracted": letter, "correct": float(letter == reference["answer"])}

    @staticmethod
    def extract(output: str, options: dict[str, str]) -> str | None:
        letters = "".join(options)
        text = output.strip()
        patterns = (
            rf"answer\s*(?:is|:)?\s*(?:option\s*)?[(\[*\s]*([{letters}])\b",  # "the answer is (C)", "Answer: C"
            rf"\\boxed\{{\s*([{letters}])\b",
            rf"^[(\[*\s]*([{letters}])(?:[)\].:*,]|\s|$)",  # starts with "C", "(C)", "C." or "C)"
            rf"\(([{letters}])\)",  # "(C)" anywhere
        )
        for pattern in patterns:
            matches = re.findall(pattern, text, flags=re.IGNORECASE if pattern is patterns[0] else 0)
            if matches:
                return matches[-1].upper()
        for letter, option in options.items():  # the option's text alone
            if text.rstrip(".").lower() == option.strip().rstrip(".").lower():
                return letter
        return None


class FigFontScorer(Scorer):
    """The paper's FigFont metrics: exact match (case-sensitive), lowercase exact match, and Jaro-Winkler
    similarity on lowercased, stripped strings (prefix weight 0.1, common prefix up to 4, via rapidfuzz)."""

    metrics = ("exact", "exact_lower", "jaro_winkler")

    def score(self, output: str, reference: str) -> dict[str, Any]:
        from rapidfuzz.distance import JaroWinkler

        prediction, target = output.strip(), reference.strip()
        return {
            "extracted": prediction,
            "exact": float(prediction == target),
            "exact_lower": float(prediction.lower() == target.lower()),
            "jaro_winkler": JaroWinkler.similarity(prediction.lower(), target.lower(), prefix_weight=0.1),
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
