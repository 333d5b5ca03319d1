"""Callbacks: the CLI always attaches FitSummary; the others here are opt-in (`trainer.callbacks`)."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from deft_lightning.evaluation.benchmarks import Benchmark
from deft_lightning.evaluation.run import run_benchmark
from deft_lightning.generation import SamplingConfig, generate
from deft_lightning.tables import format_table

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


class FitSummary(L.Callback):
    """At the end of a fit, prints a table: steps, time, precision, tokens/s, metrics at the first and last step;
    with ``heldout``, a benchmark scored before and after training; with ``predictions > 0``, that many greedy
    answers before and after (of the held-out items, else of training prompts).

    Args:
        enabled: print the summary.
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
        self._first: dict[str, float] = {}
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
        precision = str(trainer.precision) + (f" ({self.precision_reason})" if self.precision_reason else "")
        facts = [
            ("objective", repr(getattr(pl_module, "objective", "-"))),
            ("optimizer steps", str(trainer.global_step)),
            ("skipped steps (non-finite grad)", str(getattr(pl_module, "skipped_steps", 0))),
            ("precision", precision),
            ("wall time", f"{time.perf_counter() - self._started:.1f} s"),
        ]
        if log_dir:
            facts.append(("log dir", log_dir))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and (checkpoint.last_model_path or checkpoint.best_model_path):
            facts.append(("checkpoint", checkpoint.last_model_path or checkpoint.best_model_path))
        sections = ["", "Fit summary", format_table(("", ""), facts)]
        tracked = [name for name in TRACKED if name in last]
        steps = [(n, f"{self._first[n]:.4g}" if n in self._first else "-", f"{last[n]:.4g}") for n in tracked]
        sections += ["", format_table(("metric", "first step", "last step"), steps)]
        others = [(n, f"{v:.4g}") for n, v in sorted(last.items()) if n not in tracked]
        if others:
            sections += ["", format_table(("metric", "final"), others)]
        if self._measures(trainer):
            (before, answers_before), (after, answers_after) = (
                self._before,
                self._measure(trainer, pl_module, "after training"),
            )
            if self.heldout is not None:
                name = f"held-out {self.heldout.name} ({len(self._heldout_items())} items, greedy)"
                rows = [(metric, f"{before[metric]:.4g}", f"{after[metric]:.4g}") for metric in after]
                sections += ["", format_table((name, "before", "after"), rows)]
            answers = zip(self._targets(trainer), answers_before, answers_after, strict=True)
            rows = [(target, repr(b), repr(a)) for target, b, a in answers]
            sections += ["", format_table(("target", "before (greedy)", "after (greedy)"), rows)]
        print("\n".join(sections), flush=True)


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
