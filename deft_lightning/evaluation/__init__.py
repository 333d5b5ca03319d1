"""Evaluation: benchmarks (what to ask), scorers (how to judge), and the ``evaluate`` command (run.py)."""

from deft_lightning.evaluation.benchmarks import Benchmark, Choice, FigFont, Item, Math, pass_at_k
from deft_lightning.evaluation.scorers import ChoiceScorer, FigFontScorer, MathScorer, Scorer, extract_boxed

__all__ = [
    "Benchmark",
    "Choice",
    "ChoiceScorer",
    "FigFont",
    "FigFontScorer",
    "Item",
    "Math",
    "MathScorer",
    "Scorer",
    "extract_boxed",
    "pass_at_k",
]
