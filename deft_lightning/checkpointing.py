"""Runs that survive interruption: a fixed run directory, atomic checkpoint files, preemption checkpoints and a
metrics log that stays one continuous step sequence across resumes.

Layout of a run directory (``trainer.default_root_dir``, by default ``runs/<config file name>``)::

    runs/tiny/
      config.yaml          the resolved config of the last launch
      metrics.csv          one row per logged step, continuous across resumes
      checkpoints/
        last.ckpt          the latest state (periodic, end of fit, or on SIGTERM)
        step=N.ckpt        the latest periodic checkpoint

``--ckpt_path last`` resumes from the newest complete one of them (:func:`newest_checkpoint`); each name is
overwritten in place (atomically), never versioned as ``-v1``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs it, then renames it into place:
    a process killed mid-write leaves the previous checkpoint of that name intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as handle:
                self.write(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], handle: Any) -> None:
        torch.save(checkpoint, handle)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the ``checkpoint`` section of a config), which also retires the periodic
    checkpoint a run resumed from once it has published a newer one: Lightning keeps that file forever, one
    full-size copy per resume from a ``step=N.ckpt`` (after a kill between its and ``last.ckpt``'s publication)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` is the final state of a finished fit: Lightning writes it only with a periodic checkpoint,
        so a fit whose ``max_steps`` is not a multiple of ``every_n_train_steps`` ended with an older one (which
        ``export`` and ``--ckpt_path last`` then read)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if previous != current and self.dirpath and Path(previous).absolute().parent == Path(self.dirpath).absolute():
            return True
        return super()._should_remove_checkpoint(trainer, previous, current)


class PreemptionCheckpoint(L.Callback):
    """SIGTERM (preemption, ``scancel``, Kubernetes) or Ctrl-C: finish the current step, save ``last.ckpt`` where
    periodic checkpoints are taken (so it resumes exactly), log the step, stop, and exit with 128 + the signal number
    (143, 130), so a scheduler can tell a stopped run from a finished one. A second Ctrl-C stops at once.

    The handlers only note the signal; at the end of every step the ranks agree on it with one all-reduce, so all of
    them save and stop after the same step whichever of them got it. (Lightning's own SIGTERM handler runs a
    collective inside the handler, which deadlocks when ranks get the signal at different moments, and exits 0.)
    The stop itself is Lightning's: ``received_sigterm`` makes the loop raise its ``SIGTERMException`` once the
    step's metrics are logged."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.received = 0  # the signal number, once one arrived
        self.stopped_by = 0  # the signal the ranks agreed to stop for
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: no more waiting
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        received = self.received
        if trainer.world_size > 1:  # the same decision on every rank, after the same step
            flags = torch.tensor([received], device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(flags, reduce_op="max").item())
        if received and not self.stopped_by:
            self.stopped_by = received
            trainer.save_checkpoint(self.path)
            trainer._signal_connector.received_sigterm = True  # Lightning stops after logging this step
            name = signal.Signals(received).name
            rank_zero_info(f"{name}: saved {self.path} after step {trainer.global_step}; resume with --ckpt_path last")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.stopped_by and isinstance(exception, SystemExit):  # Lightning's SIGTERMException
            exception.code = 128 + self.stopped_by
        self._restore_handlers()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class RandomStates(L.Callback):
    """Saves every rank's Python, torch and CUDA RNG states with each checkpoint and gives each rank its own back
    right before the first resumed step (after the data loader's start, which draws a seed), so dropout masks and
    sampling continue as if the run had not stopped. Resumed on another number of ranks, rank r takes rank r's
    state where there was one, else a stream seeded from rank 0's state and r."""

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if trainer.world_size > 1:  # every rank saves (dump_checkpoint runs on all of them); rank 0's file keeps all
            states: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = {"per_rank": states}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get("rng_states")
        if saved:
            self._to_restore = saved.get("per_rank") or [saved]  # older checkpoints kept rank 0's state only

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        states, self._to_restore = self._to_restore, None
        if states is None:
            return
        rank = trainer.global_rank
        state = states[rank] if rank < len(states) else states[0]
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if rank >= len(states):  # a rank the interrupted run did not have: its own stream, reproducibly
            digest = hashlib.sha256(states[0]["torch"].numpy().tobytes() + str(rank).encode()).digest()
            seed = int.from_bytes(digest[:8], "little") % 2**63
            random.seed(seed)
            torch.manual_seed(seed)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one continues it (same columns first) and
    keeps one row per step: metrics logged again at a step already written (validation after the step's training
    row, a callback's) join that step's row instead of repeating its number."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._written_step: int | None = None  # the step of the file's last row, as this process wrote it

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        if len(self.metrics) > 1 and self.metrics[-2]["step"] == self.metrics[-1]["step"]:
            self.metrics[-2].update(self.metrics.pop())

    def save(self) -> None:
        if not self.metrics:
            return
        step = self.metrics[-1]["step"]
        if self.metrics[0]["step"] == self._written_step and self._fs.isfile(self.metrics_file_path):
            self._record_new_keys()
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                rows = list(csv.DictReader(handle))
            rows[-1].update(self.metrics.pop(0))
            self._write_all(rows + self.metrics)
            self.metrics = []
        else:
            super().save()
        self._written_step = step

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        temporary = f"{self.metrics_file_path}.tmp"
        with self._fs.open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.metrics_file_path)


class RunLogger(CSVLogger):
    """``metrics.csv`` directly in the run directory, written every step and continued across resumes."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class ContinuousMetricsLog(L.Callback):
    """Keeps ``metrics.csv`` one row per logged step across resumes, with no gap and no repeat.

    At the start of a fit it drops the rows from the resumed step on (a resumed run trains them again; a fresh
    run starts at 0). A checkpoint taken at the end of a step (periodic, preemption) is written before Lightning
    logs that step's row, so the row travels in the checkpoint and is written on resume if a kill lost it.
    """

    def __init__(self, metrics_file: Path) -> None:
        self.metrics_file = Path(metrics_file)
        self._resumed = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        connector = trainer._logger_connector
        if trainer.training and progress.processed > progress.completed and connector.should_update_logs:
            metrics = {name: float(value) for name, value in connector.metrics["log"].items()}
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning will log the row as
            checkpoint["pending_metrics_row"] = {"step": step, "epoch": trainer.current_epoch, "metrics": metrics}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # also when nothing is left to train (no on_train_start then); the step comes from the checkpoint
        self._resumed = True
        self._continue_from(trainer, checkpoint.get("global_step", 0), checkpoint.get("pending_metrics_row"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._resumed:  # a fresh run starts at step 0
            self._continue_from(trainer, 0, None)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # a row's step is the optimizer step. Lightning logs its own batch counter, which a resume from the end of
        # a fit at a validation step advances once more (the skipped validation counts as a batch)
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def _continue_from(self, trainer: L.Trainer, step: int, pending: dict[str, Any] | None) -> None:
        if not trainer.is_global_zero:
            return
        fields, rows = self._read()
        kept = [row for row in rows if not row.get("step") or int(row["step"]) < step]
        if len(kept) != len(rows):
            self._write(fields, kept)
            rank_zero_info(f"starting at step {step}: dropped {len(rows) - len(kept)} later log rows")
        if pending and pending["step"] < step and str(pending["step"]) not in {row["step"] for row in kept}:
            for logger in trainer.loggers:  # the row a kill right after the checkpoint lost
                logger.log_metrics({**pending["metrics"], "epoch": pending["epoch"]}, step=pending["step"])
                logger.save()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.metrics_file.is_file():
            return [], []
        with self.metrics_file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)

    def _write(self, fields: list[str], rows: list[dict[str, str]]) -> None:
        with self.metrics_file.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def existing_checkpoints(directory: Path) -> list[Path]:
    fs = get_filesystem(str(directory))
    return sorted(Path(p) for p in fs.glob(f"{directory}/*.ckpt")) if fs.isdir(str(directory)) else []


def read_metadata(path: Path) -> dict[str, Any]:
    """A fit checkpoint's contents without reading its tensors (memory-mapped; a sharded one's ``meta.pt``)."""
    target = Path(path) / "meta.pt" if Path(path).is_dir() else Path(path)
    return torch.load(target, map_location="cpu", mmap=True, weights_only=True)


def newest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint of ``directory`` with the most optimizer steps, ``last.ckpt`` on a tie.

    Usually ``last.ckpt``; but a kill between publishing ``step=N.ckpt`` and ``last.ckpt`` leaves the newer state in
    the former, and resuming from the older one would train those steps again."""
    from deft_lightning.prepare_model import CheckpointError

    candidates = []
    for path in existing_checkpoints(directory):
        try:
            check_resumable(path)
            step = int(read_metadata(path)["global_step"])
        except (CheckpointError, OSError, RuntimeError, KeyError):
            continue  # incomplete or unreadable: not a candidate
        candidates.append(((step, path.name == "last.ckpt"), path))
    return max(candidates, key=lambda candidate: candidate[0])[1] if candidates else None


def check_resumable(path: Path) -> None:
    """Fail fast, with a message, when the checkpoint to resume from is missing, truncated or not a checkpoint."""
    import zipfile

    from deft_lightning.prepare_model import CheckpointError

    if path.is_dir():  # sharded: Lightning's metadata plus torch.distributed.checkpoint's index
        missing = [name for name in ("meta.pt", ".metadata") if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"'{path}' is not a complete sharded checkpoint (no {', '.join(missing)})")
        return
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path: '{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format; a truncated file has no central directory
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"'{path}' is truncated or corrupt ({err}); resume from another checkpoint with --ckpt_path <file> "
            f"(e.g. the periodic step=N.ckpt beside it) or start a new run with --trainer.default_root_dir"
        ) from None
