"""A checkpoint writer that stalls half-way through one chosen save, so a test can kill -9 the process there."""

import io
import os
import time

from deft_lightning.checkpointing import AtomicCheckpointIO


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
