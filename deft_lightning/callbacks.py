"""Callbacks: the CLI always attaches FitSummary; the others here are opt-in (`trainer.callbacks`)."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from deft_lightning.evaluation.benchmarks import Benchmark
from deft_lightning.evaluation.run import run_benchmark
from deft_lightning.generation import SamplingConfig, generate
from deft_lightning.tables import format_table, markdown_table, write_atomic


class FitSummary(L.Callback):
    """At the end of a fit, prints a table — steps, time, precision, tokens seen, metrics at the run's first and last
    step; with ``heldout``, a benchmark scored before and after training; with ``predictions > 0``, that many
    greedy answers before and after (of the held-out items, else of training prompts) — and writes the same to the
    run directory: ``summary.json``, ``summary.md`` and ``training_curves.png`` (from ``metrics.csv``, so a resumed
    fit's summary starts at the run's step 0).

    Args:
        enabled: print and write the summary.
        predictions: number of answers to show before and after the fit (0: none).
        max_new_tokens: generation budget for the training-prompt predictions.
        heldout: a benchmark of items the fit does not train on (e.g. ``deft_lightning.evaluation.FigFont`` with
            ``init_args: {start: 40000, limit: 16}``): its metrics and the teacher-forced NLL and p of its
            reference answers, before and after. Single-process fits only (generation needs the whole model).
    """

    def __init__(
        self, enabled: bool = True, predictions: int = 0, max_new_tokens: int = 16, heldout: Benchmark | None = None
    ) -> None:
        self.enabled = enabled
        self.predictions = predictions
        self.max_new_tokens = max_new_tokens
        self.heldout = heldout
        self.precision_reason = ""  # set by the CLI when it chose the precision
        self._items: list | None = None
        self._started = 0.0
        self._resumed_from: int | None = None
        self._first: tuple[int, dict[str, float]] | None = None  # this launch's first step, if there is no log
        self._before: tuple[dict[str, float], list[str]] = ({}, [])

    def _measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, when: str
    ) -> tuple[dict[str, float], list[str]]:
        """Held-out metrics (if any) and the answers to show; ``when`` labels the progress bars."""
        datamodule = trainer.datamodule
        prompter = datamodule.prompter
        if self.heldout is None:
            rows = datamodule.examples("train", self.predictions)
            prompts = [prompter.prompt_ids(row) for row in rows]
            sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, batch_size=len(prompts))
            outputs = pl_module.generate(prompts, prompter.tokenizer.eos_id, sampling)
            return {}, [prompter.decode(samples[0]) for samples in outputs]
        from deft_lightning.analysis.tokens import token_statistics
        from deft_lightning.statistics import NO_STATS

        items = self._heldout_items()
        generator = functools.partial(generate, pl_module.model)
        label = f"held-out {self.heldout.name} {when}"
        metrics, records, _ = run_benchmark(generator, prompter, self.heldout, items, 0, 16, progress=label)
        answers = [{**item.row, "output": str(item.reference)} for item in items]
        block = pl_module.config.block_size
        stats = token_statistics(pl_module.model, prompter, answers, NO_STATS, block, progress=f"{label}: NLL")
        metrics = {"nll": float(-stats.logp.mean()), "p": float(stats.prob.mean()), **metrics}
        return metrics, [record["samples"][0]["output"] for record in records[: self.predictions]]

    def _targets(self, trainer: L.Trainer) -> list[str]:
        if self.heldout is None:
            return [row["output"] for row in trainer.datamodule.examples("train", self.predictions)]
        return [str(item.reference) for item in self._heldout_items()[: self.predictions]]

    def _heldout_items(self) -> list:
        if self._items is None:  # generated once, scored before and after
            self._items = self.heldout.items()
        return self._items

    def _measures(self, trainer: L.Trainer) -> bool:
        # generation runs on one process; a sharded model would need every rank in each forward
        wanted = self.heldout is not None or self.predictions > 0
        return self.enabled and wanted and trainer.world_size == 1 and hasattr(trainer.datamodule, "prompter")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if self._measures(trainer) and trainer.is_global_zero:
            self._before = self._measure(trainer, pl_module, "before training")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed_from = trainer.global_step or None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self._first is None:
            self._first = (trainer.global_step - 1, self._scalars(trainer))

    @staticmethod
    def _scalars(trainer: L.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under distributed strategies: every rank takes part
        if self.enabled and trainer.is_global_zero:
            summary = self.summary(trainer, pl_module, log_dir)
            print(summary_text(summary), flush=True)
            write_summary(summary, Path(trainer.default_root_dir))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> dict[str, Any]:
        """What the fit did, as plain data (``summary.json``)."""
        final = self._scalars(trainer)
        metrics_file = Path(trainer.default_root_dir) / "metrics.csv"
        rows = [row for row in read_metric_rows(metrics_file) if "train/loss" in row]
        if rows:  # the run's log: its step 0 even when this launch resumed
            first, last = rows[0], rows[-1]
        else:  # no metrics.csv (another logger): this launch's steps
            step, values = self._first or (trainer.global_step - 1, final)
            first = {"step": step, **values}
            last = {"step": trainer.global_step - 1, **{k: v for k, v in final.items() if k.startswith("train/")}}
        checkpoint = trainer.checkpoint_callback
        summary: dict[str, Any] = {
            "objective": repr(getattr(pl_module, "objective", "-")),
            "optimizer_steps": trainer.global_step,
            "resumed_from_step": self._resumed_from,
            "skipped_steps": getattr(pl_module, "skipped_steps", 0),
            "tokens_seen": getattr(pl_module, "tokens_seen", None),
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "device": f"{trainer.strategy.root_device.type} × {trainer.world_size}",
            "precision": str(trainer.precision) + (f" ({self.precision_reason})" if self.precision_reason else ""),
            "wall_time_s": round(time.perf_counter() - self._started, 1),
            "log_dir": log_dir,
            "checkpoint": (checkpoint.last_model_path or checkpoint.best_model_path or None) if checkpoint else None,
            "first_step": first,
            "last_step": last,
            "final": {name: value for name, value in sorted(final.items()) if not name.startswith("train/")},
            "heldout": None,
            "predictions": [],
        }
        if self._measures(trainer):
            (before, answers_before), (after, answers_after) = (
                self._before,
                self._measure(trainer, pl_module, "after training"),
            )
            if self.heldout is not None:
                summary["heldout"] = {
                    "benchmark": self.heldout.name,
                    "items": len(self._heldout_items()),
                    "decoding": "greedy",
                    "before": before,
                    "after": after,
                }
            answers = zip(self._targets(trainer), answers_before, answers_after, strict=True)
            summary["predictions"] = [{"target": t, "before": b, "after": a} for t, b, a in answers]
        return summary


def read_metric_rows(path: Path) -> list[dict[str, float]]:
    """``metrics.csv`` as one dict per step, empty cells left out, values as floats (``step`` as an int)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    return [{**row, "step": int(row["step"])} for row in rows if "step" in row]


#: the step metrics a summary shows first, in this order (the others follow by name)
TRACKED = (
    "train/loss",
    "train/nll",
    "train/p",
    "train/alpha",
    "train/acc",
    "train/entropy",
    "train/weight",
    "train/tokens_seen",
    "train/tokens_per_s",
    "train/trained_tokens_per_s",
)


def _facts(summary: dict[str, Any]) -> list[tuple[str, str]]:
    facts = [
        ("objective", summary["objective"]),
        ("optimizer steps", str(summary["optimizer_steps"])),
        ("resumed from step", str(summary["resumed_from_step"] or "-")),
        ("skipped steps (non-finite grad)", str(summary["skipped_steps"])),
        ("tokens seen", f"{summary['tokens_seen']:,}" if summary["tokens_seen"] is not None else "-"),
        ("parameters", f"{summary['parameters']:,} ({summary['trainable_parameters']:,} trained)"),
        ("device", summary["device"]),
        ("precision", summary["precision"]),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    return facts + [(name, str(summary[key])) for name, key in (("log dir", "log_dir"), ("checkpoint", "checkpoint"))
                    if summary[key]]  # fmt: skip


def _sections(summary: dict[str, Any]) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
    """The summary's tables: (header, rows)."""
    first, last = summary["first_step"], summary["last_step"]
    names = [n for n in TRACKED if n in last] + sorted(n for n in last if n.startswith("train/") and n not in TRACKED)
    steps = [(n, f"{first[n]:.4g}" if n in first else "-", f"{last[n]:.4g}") for n in names]
    sections = [
        (("", ""), _facts(summary)),
        (("metric", f"first step ({first['step']})", f"last step ({last['step']})"), steps),
    ]
    if summary["final"]:
        sections.append((("metric", "final"), [(n, f"{v:.4g}") for n, v in summary["final"].items()]))
    heldout = summary["heldout"]
    if heldout:
        name = f"held-out {heldout['benchmark']} ({heldout['items']} items, {heldout['decoding']})"
        rows = [(m, f"{heldout['before'][m]:.4g}", f"{heldout['after'][m]:.4g}") for m in heldout["after"]]
        sections.append(((name, "before", "after"), rows))
    if summary["predictions"]:
        rows = [(p["target"], repr(p["before"]), repr(p["after"])) for p in summary["predictions"]]
        sections.append((("target", "before (greedy)", "after (greedy)"), rows))
    return sections


def summary_text(summary: dict[str, Any]) -> str:
    return "\nFit summary\n" + "\n\n".join(format_table(header, rows) for header, rows in _sections(summary))


def write_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """``summary.json``, ``summary.md`` and ``training_curves.png`` in the run directory."""
    plotted = plot_training_curves(read_metric_rows(run_dir / "metrics.csv"), run_dir / "training_curves.png")
    lines = ["# Fit summary", ""]
    for header, rows in _sections(summary):
        lines += [markdown_table(header, rows), ""]
    if plotted:
        lines += ["![training curves](training_curves.png)", ""]
    write_atomic(run_dir / "summary.md", "\n".join(lines))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")


#: the panels of training_curves.png: (title, y label, metrics.csv columns drawn, all of them or the first present)
CURVES = (
    ("objective loss", "loss (mean over trained tokens)", ("train/loss", "val/loss"), "all"),
    ("plain NLL of the targets", "−log p", ("train/nll", "val/nll"), "all"),
    ("mean target probability", "p", ("train/p", "val/p"), "all"),
    ("the objective's α (else Σp², DEFT's α)", "α", ("train/alpha", "train/collision"), "first"),
)


def plot_training_curves(rows: list[dict[str, float]], out: Path) -> bool:
    """The curves of ``metrics.csv`` people look at first, one panel each; False when there is nothing to draw."""
    present = {name for row in rows for name in row}
    if not present & {name for *_, names, _ in CURVES for name in names}:
        return False
    from deft_lightning.analysis.run import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for axis, (title, ylabel, names, which) in zip(axes.flat, CURVES, strict=True):
        drawn = [name for name in names if name in present]
        for name in drawn[:1] if which == "first" else drawn:
            points = [(row["step"], row[name]) for row in rows if name in row]
            axis.plot(*zip(*points, strict=True), "o-" if name.startswith("val/") else "-", label=name, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        if drawn:
            axis.legend(fontsize="small")
    figure.tight_layout()
    write_figure(figure, out)
    plt.close(figure)
    return True


def write_figure(figure: Any, out: Path) -> None:
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, out)


class ExportOnFitEnd(L.Callback):
    """At the end of a fit, writes the trained model to ``<run dir>/final/`` in ``format`` (``litgpt`` or ``hf``;
    see :mod:`deft_lightning.export`), from a checkpoint of the final state. ``--export.format hf`` on the CLI.

    Args:
        format: ``null`` (default: no export), ``litgpt`` or ``hf``.
        dtype: cast the exported weights (``bfloat16``, ``float16``, ``float32``; default: as trained).
    """

    def __init__(self, format: str | None = None, dtype: str | None = None) -> None:
        from deft_lightning.export import DTYPES, FORMATS

        if format is not None and format not in FORMATS:
            raise ValueError(f"export.format must be one of {', '.join(FORMATS)} or null, got '{format}'")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"export.dtype must be one of {', '.join(DTYPES)} or null, got '{dtype}'")
        self.format, self.dtype = format, dtype

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.format is None or trainer.interrupted:
            return
        from deft_lightning.export import export

        run_dir = Path(trainer.default_root_dir)
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(checkpoint)  # the final state, whatever the checkpoint schedule (every rank)
        if trainer.is_global_zero:
            out = export(checkpoint, run_dir / "final", self.format, force=True, dtype=self.dtype)
            print(f"exported the final model ({self.format}) to {out}", flush=True)
        trainer.strategy.barrier("export")


def step_progress_bar() -> L.Callback:
    """Lightning's default progress bar, without the "Epoch 0/-2" that a fit bounded by max_steps shows."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    if not _RICH_AVAILABLE:
        return TQDMProgressBar()

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                return super()._get_train_description(current_epoch)
            return f"Epoch {current_epoch} (step limit {self.trainer.max_steps})"

    return StepProgressBar()


class PlainProgress(L.Callback):
    """Progress as plain lines, for output that is not a terminal (SLURM logs, nohup, CI), where a progress bar
    shows only when the fit ends: step, loss, tokens/s, elapsed time and the time left, at the first step, at every
    tenth of the fit and at least every ``every_s`` seconds. The CLI uses it instead of a bar when stdout is not a
    terminal.

    Args:
        every_s: the longest silence, in seconds.
    """

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._started = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step, total, now = (
            trainer.global_step,
            trainer.max_steps if trainer.max_steps > 0 else None,
            time.perf_counter(),
        )
        tenth = max(1, total // 10) if total else None
        due = step == self._first_step + 1 or step == total or (tenth and step % tenth == 0)
        if not trainer.is_global_zero or not (due or now - self._last >= self.every_s):
            return
        self._last = now
        logged = trainer.callback_metrics
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if "train/loss" in logged:
            parts.append(f"loss {float(logged['train/loss']):.4g}")
        if "train/tokens_per_s" in logged:
            parts.append(f"{float(logged['train/tokens_per_s']):,.0f} tokens/s")
        elapsed = now - self._started
        parts.append(f"{_duration(elapsed)} elapsed")
        if total and step > self._first_step:
            parts.append(f"ETA {_duration(elapsed / (step - self._first_step) * (total - step))}")
        print(" · ".join(parts), flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


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


def _synchronize(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":  # kernels run asynchronously: time them to completion
        torch.cuda.synchronize()


class StepStats(L.Callback):
    """Each rank writes its median step time after ``warmup`` steps, the trained tokens per second and positions
    per step over those steps, and its peak resident memory (the whole process) to ``<out>.rank<r>.json`` when
    training ends, for side-by-side fits (``bench fit``, ``bench data``)."""

    def __init__(self, out: str, warmup: int = 2) -> None:
        self.out, self.warmup = out, warmup
        self.times: list[float] = []
        self.trained: list[int] = []
        self.positions: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        _synchronize(trainer)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args) -> None:
        _synchronize(trainer)
        self.times.append(time.perf_counter() - self._started)
        self.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.positions.append(batch["input_ids"].numel())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import resource
        import statistics

        measured = slice(self.warmup, None) if len(self.times) > self.warmup else slice(None)
        result = {
            "step_s": statistics.median(self.times[measured]),
            "trained_tokens_per_s": sum(self.trained[measured]) / sum(self.times[measured]),
            "positions_per_step": statistics.mean(self.positions[measured]),
            "trained_per_step": statistics.mean(self.trained[measured]),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


class BenchmarkValidation(L.Callback):
    """Every ``every_n_steps`` optimizer steps, generates answers for the first ``limit`` items of each
    benchmark with the model being trained and logs their metrics as ``eval/<benchmark>/<metric>``.

    Prompts are rendered by the datamodule's prompter (the training prompt format). Runs on global rank 0 on
    an unsharded model (single device or DDP); under FSDP it is skipped with a warning.

    Args:
        benchmarks: e.g. ``deft_lightning.evaluation.FigFont`` with ``init_args: {start: 44000}``.
        every_n_steps: how often to evaluate.
        limit: items per benchmark (a small validation subset).
        batch_size: sequences generated together.
        seed: sampling seed (as in ``evaluate``).
    """

    def __init__(
        self,
        benchmarks: list[Benchmark],
        every_n_steps: int = 100,
        limit: int = 32,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1 or limit < 1:
            raise ValueError(f"BenchmarkValidation: every_n_steps and limit must be >= 1, got {every_n_steps}, {limit}")
        self.benchmarks, self.every_n_steps, self.limit = benchmarks, every_n_steps, limit
        self.batch_size, self.seed = batch_size, seed
        self.items: dict[str, list] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # bad benchmark files fail here, before training starts
            self.items = {b.name: b.items()[: self.limit] for b in self.benchmarks}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps or not self.items:
            return
        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            rank_zero_warn("BenchmarkValidation is skipped under sharded strategies (generation needs the full model)")
            self.items = {}
            return
        if not trainer.is_global_zero:
            return
        logged = {}
        for benchmark in self.benchmarks:
            metrics, _, throughput = run_benchmark(
                functools.partial(generate, pl_module.model),
                trainer.datamodule.prompter,
                benchmark,
                self.items[benchmark.name],
                self.seed,
                self.batch_size,
            )
            for name, value in {**metrics, "tokens_per_s": throughput["tokens_per_s"]}.items():
                logged[f"eval/{benchmark.name}/{name}"] = value
        # straight to the loggers at this step (self.log from a callback lands in a later step's row)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})


class TokenHistograms(L.Callback):
    """Every ``every_n_steps`` steps, histograms of a random sample of the step's trainable tokens — target
    probability ``p``, entropy, ``collision`` (Σp², DEFT's α), the objective's own ``alpha`` if it has one, and
    the gate ``weight`` — appended to ``<run dir>/token_histograms.csv`` (step, quantity, bin_left, bin_right,
    fraction). ``analyze trajectory`` draws them. The sample is rank 0's tokens; rows past a resumed step are
    dropped on resume.

    Args:
        every_n_steps: how often (in optimizer steps, counted like the ``step`` column of metrics.csv).
        sample_size: tokens sampled per histogram step.
        bins: bins per histogram; p, Σp², α and weight span [0, 1] (values above land in the last bin),
            entropy spans [0, ln V].
    """

    QUANTITIES = ("p", "collision", "alpha", "weight", "entropy")

    def __init__(self, every_n_steps: int = 10, sample_size: int = 4096, bins: int = 20) -> None:
        if every_n_steps < 1 or sample_size < 1 or bins < 1:
            raise ValueError("TokenHistograms: every_n_steps, sample_size and bins must be >= 1")
        self.every_n_steps, self.sample_size, self.bins = every_n_steps, sample_size, bins

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "token_histograms.csv"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        if trainer.is_global_zero and path.is_file():  # a resumed run: keep the rows of steps already done
            lines = path.read_text().splitlines(keepends=True)
            kept = [lines[0], *(line for line in lines[1:] if int(line.split(",", 1)[0]) < trainer.global_step)]
            path.write_text("".join(kept))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        due = trainer.global_step % self.every_n_steps == 0
        pl_module.token_sample_size = self.sample_size if due else 0
        pl_module.token_sample = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        sample, pl_module.token_sample = pl_module.token_sample, None
        if sample is None or not trainer.is_global_zero:
            return
        step = trainer.global_step - 1  # the step this batch was (metrics.csv's numbering)
        vocab = pl_module.config.padded_vocab_size
        rows = []
        for quantity in self.QUANTITIES:
            if quantity not in sample:
                continue
            top = math.log(vocab) if quantity == "entropy" else 1.0
            values = sample[quantity].clamp(0, top)
            counts = torch.histc(values, bins=self.bins, min=0, max=top)
            edges = torch.linspace(0, top, self.bins + 1)
            fractions = counts / counts.sum()
            rows += [
                f"{step},{quantity},{edges[i]:.6g},{edges[i + 1]:.6g},{fractions[i]:.6g}\n" for i in range(self.bins)
            ]
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            if handle.tell() == 0:
                handle.write("step,quantity,bin_left,bin_right,fraction\n")
            handle.writelines(rows)
