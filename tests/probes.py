"""Callbacks that record what a test needs to see from inside a (multi-process) fit, one file per rank."""

from __future__ import annotations

import hashlib
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


class RowsPerStep(L.Callback):
    """Appends ``<step> <hash>,<hash>,...`` of the rows this rank trains at each step to ``<root>/rows.rank<r>`` (a
    row's hash covers its tokens and labels, padding stripped), to compare which rows runs trained when."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args) -> None:
        hashes = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            while labels and labels[-1] == -100 and ids[-1] == 0:
                ids, labels = ids[:-1], labels[:-1]
            hashes.append(hashlib.sha1(repr((ids, labels)).encode()).hexdigest()[:12])
        with open(Path(trainer.default_root_dir) / f"rows.rank{trainer.global_rank}", "a") as handle:
            handle.write(f"{trainer.global_step} {','.join(hashes)}\n")


def rows_per_step(run_dir: Path) -> dict[int, list[str]]:
    """Step → the sorted hashes of every row any rank trained at that step (the last record of a step wins)."""
    steps: dict[int, dict[int, list[str]]] = {}
    for path in sorted(run_dir.glob("rows.rank*")):
        rank = int(path.name.removeprefix("rows.rank"))
        for line in path.read_text().splitlines():
            step, hashes = line.split(" ")
            steps.setdefault(int(step), {})[rank] = hashes.split(",")
    return {step: sorted(h for hashes in ranks.values() for h in hashes) for step, ranks in sorted(steps.items())}
