"""Runs that survive interruption: a fixed run directory, atomic checkpoint files, preemption checkpoints and a
metrics log that stays one continuous step sequence across resumes.

Layout of a run directory (``trainer.default_root_dir``, by default ``runs/<config file name>``)::

    runs/tiny/
      config.yaml          the resolved config of the last launch
      metrics.csv          one row per logged step, continuous across resumes
      checkpoints/
        last.ckpt          the latest state (periodic, end of fit, or on SIGTERM)
        step=N.ckpt        the latest periodic checkpoint
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
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


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption, ``scancel``, Kubernetes), save ``last.ckpt`` at the end of the current step;
    Lightning then stops the fit. The checkpoint is taken where periodic checkpoints are, so it resumes exactly."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if getattr(trainer, "received_sigterm", False):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"SIGTERM: saved {self.path}; resume with --ckpt_path last")


class RandomStates(L.Callback):
    """Saves and restores Python's and torch's RNG states with every checkpoint (sampling, dropout)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = {"python": random.getstate(), "torch": torch.get_rng_state()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            random.setstate(states["python"])
            torch.set_rng_state(states["torch"])


class _ContinuingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv``; this one continues it (same columns first)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


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
    """At the start of training drops the rows of ``metrics.csv`` from the resumed step on (a resumed run trains
    them again; a fresh run starts at 0), so the file holds one row per logged step, with no repeat."""

    def __init__(self, metrics_file: Path) -> None:
        self.metrics_file = Path(metrics_file)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.metrics_file.is_file() or not trainer.is_global_zero:
            return
        with self.metrics_file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(row["step"]) < trainer.global_step]
        if len(kept) == len(rows):
            return
        with self.metrics_file.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        rank_zero_info(f"starting at step {trainer.global_step}: dropped {len(rows) - len(kept)} later log rows")


def existing_checkpoints(directory: Path) -> list[Path]:
    fs = get_filesystem(str(directory))
    return sorted(Path(p) for p in fs.glob(f"{directory}/*.ckpt")) if fs.isdir(str(directory)) else []


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
