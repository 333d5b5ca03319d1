"""Callbacks that record what a test needs to see from inside a (multi-process) fit, one file per rank."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class GradNormPerRank(L.Callback):
    """Appends each step's ``train/grad_norm`` as this rank computed it to ``<root>/grad_norm.rank<r>``."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        norm = float(trainer.callback_metrics["train/grad_norm"])
        with open(Path(trainer.default_root_dir) / f"grad_norm.rank{trainer.global_rank}", "a") as handle:
            handle.write(f"{trainer.global_step - 1} {norm!r}\n")


class GradientCollectives(L.Callback):
    """Counts the gradient collectives of each step into ``<root>/collectives.rank<r>`` (one line per step):
    DDP's bucket all-reduces (a counting comm hook) and FSDP's reduce-scatters (FSDP2 and FSDP1 call them
    through ``torch.distributed``)."""

    def __init__(self) -> None:
        self.count = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._counting(getattr(dist, name)))

    def _counting(self, collective):
        def counted(*args, **kwargs):
            self.count += 1
            return collective(*args, **kwargs)

        return counted

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self.count += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)

    def on_train_batch_start(self, *args: object) -> None:
        self.count = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        with open(Path(trainer.default_root_dir) / f"collectives.rank{trainer.global_rank}", "a") as handle:
            handle.write(f"{self.count}\n")
