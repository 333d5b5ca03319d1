"""Evaluation: benchmarks (what to ask), scorers (how to judge), and the ``evaluate`` command (run.py)."""

from deft_lightning.evaluation.benchmarks import Benchmark, Choice, Continuation, FigFont, Item, Math, pass_at_k
from deft_lightning.evaluation.scorers import (
    ChoiceScorer,
    FigFontScorer,
    MathScorer,
    Scorer,
    SimilarityScorer,
    extract_boxed,
)

__all__ = [
    "Benchmark",
    "Choice",
    "ChoiceScorer",
    "Continuation",
    "FigFont",
    "FigFontScorer",
    "Item",
    "Math",
    "MathScorer",
    "Scorer",
    "SimilarityScorer",
    "extract_boxed",
    "pass_at_k",
]
