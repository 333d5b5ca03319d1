"""Faults on purpose: checkpoint writers that stall in one save (for kill -9 there), a NaN step."""

import io
import math
import os
import signal
import time

import lightning as L

from deft_lightning.checkpointing import AtomicCheckpointIO
from deft_lightning.objectives import Objective
from deft_lightning.strategies import FSDP2Strategy


class StallingCheckpointIO(AtomicCheckpointIO):
    """Writes half of the ``stall_at``-th ``last.ckpt`` (to its temporary file) and then hangs."""

    def __init__(self, stall_at: int = 2) -> None:
        super().__init__()
        self.stall_at = stall_at
        self.last_saves = 0

    def write(self, checkpoint, handle) -> None:
        if ".last.ckpt." in os.path.basename(handle.name):
            self.last_saves += 1
        if self.last_saves != self.stall_at or ".last.ckpt." not in os.path.basename(handle.name):
            return super().write(checkpoint, handle)
        buffer = io.BytesIO()
        super().write(checkpoint, buffer)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        handle.flush()
        os.fsync(handle.fileno())
        time.sleep(600)  # the test kills the process here


class NonFiniteAt(L.Callback):
    """Makes the loss of step ``step`` NaN once (its gradient norm is not finite, so the step is skipped)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step
        self._objective = None
        self._done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self._done:
            self._done = True
            self._objective = pl_module.objective
            pl_module.objective = _Poisoned(self._objective)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self._objective is not None:
            pl_module.objective, self._objective = self._objective, None


class _Poisoned(Objective):
    def __init__(self, inner: Objective) -> None:
        self.inner = inner
        self.needs = inner.needs

    def token_loss(self, logp, stats):
        return self.inner.token_loss(logp, stats) * math.nan


class StallingShardedSave(FSDP2Strategy):
    """FSDP2 whose ``stall_at``-th sharded ``last.ckpt`` is written by every rank but hangs before it is published."""

    def __init__(self, stall_at: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stall_at, self.last_saves = stall_at, 0

    def publish(self, staging, path) -> None:
        if path.name == "last.ckpt":
            self.last_saves += 1
            if self.last_saves == self.stall_at:
                (staging.parent / "stalled").touch()
                time.sleep(600)  # the test kills the process group here
        super().publish(staging, path)


class KillAroundSave(AtomicCheckpointIO):
    """SIGKILLs this process right ``after`` (or ``before``) its ``occurrence``-th save of a file named ``name``: a
    kill just after a checkpoint, or between publishing ``step=N.ckpt`` and ``last.ckpt``."""

    def __init__(self, name: str = "last.ckpt", occurrence: int = 1, after: bool = True) -> None:
        super().__init__()
        self.name, self.occurrence, self.after = name, occurrence, after
        self.seen = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        mine = os.path.basename(path) == self.name
        self.seen += mine
        if mine and self.seen == self.occurrence and not self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)
        if mine and self.seen == self.occurrence and self.after:
            os.kill(os.getpid(), signal.SIGKILL)


class SigtermAt(L.Callback):
    """Sends global rank 0's process SIGTERM at the end of step ``step``, as ``kill <pid>`` of the launching process
    would: every rank saves last.ckpt there and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
