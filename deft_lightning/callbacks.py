"""Callbacks the CLI always attaches."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class FitSummary(L.Callback):
    """Prints a table at the end of a fit: steps, tokens, time, throughput and the last logged metrics."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        rows = [
            ("objective", repr(getattr(pl_module, "objective", "-"))),
            ("optimizer steps", str(trainer.global_step)),
            ("skipped steps (non-finite grad)", str(getattr(pl_module, "skipped_steps", 0))),
            ("wall time", f"{time.perf_counter() - self._started:.1f} s"),
        ]
        rows += [(name, f"{value:.4g}") for name, value in sorted(metrics.items())]
        if trainer.log_dir:
            rows.append(("log dir", trainer.log_dir))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and (checkpoint.last_model_path or checkpoint.best_model_path):
            rows.append(("checkpoint", checkpoint.last_model_path or checkpoint.best_model_path))
        width = max(len(name) for name, _ in rows)
        lines = ["", "Fit summary", "-" * (width + 30)] + [f"{n:<{width}}  {v}" for n, v in rows]
        print("\n".join(lines), flush=True)
