"""Callbacks the CLI always attaches."""

from __future__ import annotations

import json
import time

import lightning as L
import torch

from deft_lightning.generation import SamplingConfig

#: metrics shown at the first and the last step
TRACKED = (
    "train/loss",
    "train/nll",
    "train/p",
    "train/alpha",
    "train/weight",
    "train/tokens_per_s",
    "train/trained_tokens_per_s",
)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


class FitSummary(L.Callback):
    """At the end of a fit, prints a table: steps, time, tokens/s, metrics at the first and last step, and —
    with ``predictions > 0`` — greedy predictions for that many training prompts before and after training.

    Args:
        enabled: print the summary.
        predictions: number of training examples to decode before and after the fit (0: none).
        max_new_tokens: generation budget for those predictions.
    """

    def __init__(self, enabled: bool = True, predictions: int = 0, max_new_tokens: int = 16) -> None:
        self.enabled = enabled
        self.predictions = predictions
        self.max_new_tokens = max_new_tokens
        self._started = 0.0
        self._first: dict[str, float] = {}
        self._before: list[str] = []

    def _predict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        datamodule = trainer.datamodule
        rows = datamodule.examples("train", self.predictions)
        prompter = datamodule.prompter
        prompts = [prompter.prompt_ids(row) for row in rows]
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, batch_size=len(prompts))
        outputs = pl_module.generate(prompts, prompter.tokenizer.eos_id, sampling)
        return [prompter.decode(samples[0]) for samples in outputs]

    def _wants_predictions(self, trainer: L.Trainer) -> bool:
        # generation runs on one process; a sharded model would need every rank in each forward
        single = trainer.world_size == 1
        return self.enabled and self.predictions > 0 and single and hasattr(trainer.datamodule, "examples")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if self._wants_predictions(trainer) and trainer.is_global_zero:
            self._before = self._predict(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if not self._first and trainer.global_step >= 1:
            self._first = self._scalars(trainer)

    @staticmethod
    def _scalars(trainer: L.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under distributed strategies: every rank takes part
        if self.enabled and trainer.is_global_zero:
            self._print(trainer, pl_module, log_dir)

    def _print(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> None:
        last = self._scalars(trainer)
        facts = [
            ("objective", repr(getattr(pl_module, "objective", "-"))),
            ("optimizer steps", str(trainer.global_step)),
            ("skipped steps (non-finite grad)", str(getattr(pl_module, "skipped_steps", 0))),
            ("wall time", f"{time.perf_counter() - self._started:.1f} s"),
        ]
        if log_dir:
            facts.append(("log dir", log_dir))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and (checkpoint.last_model_path or checkpoint.best_model_path):
            facts.append(("checkpoint", checkpoint.last_model_path or checkpoint.best_model_path))
        sections = ["", "Fit summary", _table(("", ""), facts)]
        tracked = [name for name in TRACKED if name in last]
        steps = [(n, f"{self._first[n]:.4g}" if n in self._first else "-", f"{last[n]:.4g}") for n in tracked]
        sections += ["", _table(("metric", "first step", "last step"), steps)]
        others = [(n, f"{v:.4g}") for n, v in sorted(last.items()) if n not in tracked]
        if others:
            sections += ["", _table(("metric", "final"), others)]
        if self._wants_predictions(trainer):
            after = self._predict(trainer, pl_module)
            targets = [row["output"] for row in trainer.datamodule.examples("train", self.predictions)]
            rows = [(t, repr(b), repr(a)) for t, b, a in zip(targets, self._before, after, strict=True)]
            sections += ["", _table(("target", "before (greedy)", "after (greedy)"), rows)]
        print("\n".join(sections), flush=True)


class TrainingThroughput(L.Callback):
    """Prints ``{"tokens": non-padding tokens trained on, "seconds": training wall time}`` as JSON when training
    ends (first step included), for throughput comparisons with other trainers (``bench litgpt``)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens, self.started = 0, time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args: object
    ) -> None:
        labels = batch["labels"]
        positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
        self.tokens += int(((labels != -100) * positions).amax(dim=1).sum())  # a row ends after its last target

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(json.dumps({"tokens": self.tokens, "seconds": time.perf_counter() - self.started}), flush=True)
