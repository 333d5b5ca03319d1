"""Benchmarks: which items, how to prompt and sample for them, how to score and aggregate (REFERENCE.md §5).

A :class:`Benchmark` yields :class:`Item` s (a prompt row for the shared :class:`~deft_lightning.prompting.Prompter`
and a reference answer), names its suite (the table it is printed in), its sampling settings and its
:class:`~deft_lightning.evaluation.scorers.Scorer`. Benchmarks are plain classes, so YAML names them by
``class_path`` and a user adds one by subclassing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deft_lightning.data.sources import (
    BOXED_INSTRUCTION,
    FIGFONT_SYSTEM_PROMPT,
    BadRowError,
    FigFontSource,
    FileSource,
    RowReport,
    Source,
)
from deft_lightning.evaluation.scorers import ChoiceScorer, FigFontScorer, MathScorer, Scorer, SimilarityScorer
from deft_lightning.generation import SamplingConfig


@dataclass
class Item:
    id: str
    row: dict[str, str]  # instruction / input / system, as the prompter reads them
    reference: Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Benchmark:
    """Base class.

    Args:
        name: the column name in result tables.
        suite: the table this benchmark is printed in.
        limit: evaluate only the first ``limit`` items.
        max_new_tokens, temperature, top_p, num_samples: how answers are generated.
    """

    scorer: Scorer
    #: where the items come from; its fingerprint is part of the benchmark's identity
    source: Source
    #: aggregated metrics shown in tables; the first one is the benchmark's headline (the suite average's)
    table_metrics: tuple[str, ...]

    def __init__(
        self,
        name: str,
        suite: str,
        limit: int | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        num_samples: int,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"benchmark '{name}': limit must be >= 1, got {limit}")
        self.name, self.suite, self.limit = name, suite, limit
        self.max_new_tokens, self.temperature, self.top_p, self.num_samples = (
            max_new_tokens,
            temperature,
            top_p,
            num_samples,
        )

    def sampling(self, batch_size: int) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.num_samples, batch_size)

    def items(self) -> list[Item]:
        items = []
        for index, item in enumerate(self._items()):
            if self.limit is not None and index >= self.limit:
                break
            items.append(item)
        if not items:
            raise ValueError(f"benchmark '{self.name}' has no items")
        return items

    def _items(self) -> Iterator[Item]:
        raise NotImplementedError

    def aggregate(self, scores: list[list[dict[str, Any]]]) -> dict[str, float]:
        """Per-metric mean over items of the mean over each item's samples (every sample counts), in percent."""
        return {
            self._metric_name(metric): 100 * _mean([_mean([s[metric] for s in samples]) for samples in scores])
            for metric in self.scorer.metrics
        }

    def _metric_name(self, metric: str) -> str:
        return metric

    def spec(self) -> dict[str, Any]:
        """Everything that decides this benchmark's generations and scores (for result reuse)."""
        settings = {k: v for k, v in vars(self).items() if k not in ("scorer", "source")}
        return {"class": type(self).__name__, **settings, "source": self.source.fingerprint()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class FigFont(Benchmark):
    """The weak regime's test: FigFont items ``start .. start+count`` (40,000–44,999 is the paper's test split),
    greedy, at most 5 new tokens; exact match, lowercase exact match and Jaro-Winkler × 100 (the headline)."""

    scorer = FigFontScorer()
    table_metrics = ("jaro_winkler", "exact", "exact_lower")

    def __init__(
        self,
        start: int = 40_000,
        count: int = 5_000,
        seed: int = 42,
        system: str = FIGFONT_SYSTEM_PROMPT,
        name: str = "FigFont",
        suite: str = "figfont",
        limit: int | None = None,
        max_new_tokens: int = 5,
    ) -> None:
        super().__init__(name, suite, limit, max_new_tokens, temperature=0.0, top_p=1.0, num_samples=1)
        self.source = FigFontSource(start, count if limit is None else min(count, limit), seed, system)

    def _items(self) -> Iterator[Item]:
        for index, row in enumerate(self.source.rows(RowReport())):
            yield Item(f"{self.source.start + index}", row, row["output"])


class Math(Benchmark):
    """A math benchmark judged on the final ``\\boxed{}`` answer with math-verify.

    ``n`` samples per problem (paper: 16 at temperature 1.0, top-p 1.0, 4096 new tokens); reports
    **Average@n** — the accuracy over all n samples, not over the first one — and unbiased pass@k.

    Args:
        source: rows whose ``instruction`` is the problem and ``output`` the answer (or a solution with a
            ``\\boxed{}`` answer): a local file (``FileSource`` with ``fields``), a hub dataset
            (``HubSource``, e.g. ``HuggingFaceH4/MATH-500`` with ``fields: {instruction: problem}``)
            or the offline ``ReasoningGymMathSource``.
        instruction: appended to each problem that does not already contain it.
        pass_k: the k of pass@k (each ≤ num_samples); default 1 and the powers of two up to num_samples.
        extraction: how the final answer is read (:class:`~deft_lightning.evaluation.scorers.MathScorer`):
            ``boxed`` (only a closed final ``\\boxed{}``) or ``reference`` (the reference harness's rules, with
            the last number when there is no box — how the paper's numbers were read).
    """

    def __init__(
        self,
        name: str,
        source: Source,
        instruction: str = BOXED_INSTRUCTION,
        suite: str = "math",
        limit: int | None = None,
        num_samples: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 4096,
        pass_k: list[int] | None = None,
        extraction: Literal["boxed", "reference"] = "boxed",
    ) -> None:
        super().__init__(name, suite, limit, max_new_tokens, temperature, top_p, num_samples)
        self.source, self.instruction = source, instruction
        self.extraction = extraction
        self.scorer = MathScorer(extraction)
        self.pass_k = pass_k or [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= num_samples]
        if any(not 1 <= k <= num_samples for k in self.pass_k):
            raise ValueError(f"benchmark '{name}': pass_k {self.pass_k} must lie in [1, num_samples={num_samples}]")
        self.table_metrics = (f"avg@{num_samples}",)

    def _items(self) -> Iterator[Item]:
        for index, row in enumerate(self.source.rows(RowReport())):
            if self.instruction and self.instruction not in row["instruction"]:
                row = {**row, "instruction": f"{row['instruction']}\n{self.instruction}"}
            yield Item(str(index), row, row["output"])

    def _metric_name(self, metric: str) -> str:
        return f"avg@{self.num_samples}"

    def aggregate(self, scores: list[list[dict[str, Any]]]) -> dict[str, float]:
        metrics = super().aggregate(scores)
        for k in self.pass_k:
            metrics[f"pass@{k}"] = 100 * _mean(
                [pass_at_k(len(s), int(sum(x["correct"] for x in s)), k) for s in scores]
            )
        return metrics


#: the answer letters of multiple-choice options, in order
LETTERS = "ABCDEFGHIJ"


def choice_item(raw: dict[str, Any], layout: str, where: str) -> tuple[str, dict[str, str], str]:
    """``(question, {letter: option}, answer letter)`` from a record in a common MCQ layout.

    Layouts: ``medqa`` (question, options {letter: text}, answer_idx), ``medmcqa`` (question, opa–opd,
    cop 0–3), ``pubmedqa`` (question/QUESTION, context/CONTEXTS, final_decision yes|no|maybe) and ``plain``
    (question with the options written in it as "A. …" lines, answer letter). ``auto`` picks by the keys.
    """
    if layout == "auto":
        if "options" in raw:
            layout = "medqa"
        elif "opa" in raw:
            layout = "medmcqa"
        elif "final_decision" in raw:
            layout = "pubmedqa"
        else:
            layout = "plain"
    try:
        if layout == "medqa":
            options = raw["options"]
            if isinstance(options, list):  # [{"key": "A", "value": ...}] in some exports
                options = {o["key"]: o["value"] for o in options}
            return raw["question"], {str(k): str(v) for k, v in options.items()}, str(raw["answer_idx"]).strip()
        if layout == "medmcqa":
            options = {letter: str(raw[f"op{letter.lower()}"]) for letter in "ABCD"}
            return raw["question"], options, LETTERS[int(raw["cop"])]
        if layout == "pubmedqa":
            context = raw.get("context", raw.get("CONTEXTS", ""))
            context = context.get("contexts", context) if isinstance(context, dict) else context
            context = "\n".join(context) if isinstance(context, list) else str(context)
            question = raw.get("question", raw.get("QUESTION"))
            answer = {"yes": "A", "no": "B", "maybe": "C"}[str(raw["final_decision"]).strip().lower()]
            return f"{context}\n\n{question}".strip(), {"A": "yes", "B": "no", "C": "maybe"}, answer
        if layout == "plain":
            options = dict(re.findall(r"^\s*([A-J])[.)]\s*(.+?)\s*$", raw["question"], flags=re.MULTILINE))
            return raw["question"], options, str(raw["answer"]).strip()
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise BadRowError(f"{where}: not a '{layout}' multiple-choice record ({type(err).__name__}: {err})") from None
    raise ValueError(f"unknown multiple-choice layout '{layout}' (auto, medqa, medmcqa, pubmedqa, plain)")


class Choice(Benchmark):
    """A multiple-choice benchmark from a local file (e.g. MedQA, MedMCQA, PubMedQA exports): greedy decoding,
    the option letter extracted from the output, accuracy.

    Args:
        path: a JSONL/JSON/Parquet file (or a directory of them).
        layout: the records' layout (see :func:`choice_item`).
        instruction: appended to the question and its options.
    """

    scorer = ChoiceScorer()
    table_metrics = ("accuracy",)

    def __init__(
        self,
        name: str,
        path: Path,
        layout: str = "auto",
        instruction: str = "Answer with the letter of the correct option.",
        suite: str = "medical",
        limit: int | None = None,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__(name, suite, limit, max_new_tokens, temperature=0.0, top_p=1.0, num_samples=1)
        self.source, self.layout, self.instruction = FileSource(Path(path), limit=limit), layout, instruction

    def _items(self) -> Iterator[Item]:
        for index, (where, raw) in enumerate(self.source.records()):
            if isinstance(raw, BadRowError):
                raise raw
            if not isinstance(raw, dict):
                raise BadRowError(f"{where}: expected an object, got {type(raw).__name__}")
            question, options, answer = choice_item(raw, self.layout, where)
            if answer not in options:
                raise BadRowError(f"{where}: answer '{answer}' is not one of the options {sorted(options)}")
            listed = all(re.search(rf"^\s*{letter}[.)]", question, re.MULTILINE) for letter in options)
            body = question if listed else question + "".join(f"\n{k}. {v}" for k, v in options.items())
            instruction = body if self.instruction in body else f"{body}\n{self.instruction}"
            yield Item(str(index), {"instruction": instruction}, {"answer": answer, "options": options})

    def _metric_name(self, metric: str) -> str:
        return "accuracy"


class Continuation(Benchmark):
    """Greedy continuations compared with reference texts by similarity — e.g. retention: how much of the base
    model's own behaviour (its continuations on held-out prompts, ``SelfDistilledSource``) survives fine-tuning.

    Args:
        source: rows whose ``output`` is the reference continuation.
    """

    scorer = SimilarityScorer()
    table_metrics = ("similarity", "exact")

    def __init__(
        self, name: str, source: Source, suite: str = "continuation", limit: int | None = None, max_new_tokens: int = 48
    ) -> None:
        super().__init__(name, suite, limit, max_new_tokens, temperature=0.0, top_p=1.0, num_samples=1)
        self.source = source

    def _items(self) -> Iterator[Item]:
        for index, row in enumerate(self.source.rows(RowReport())):
            yield Item(str(index), row, row["output"])
