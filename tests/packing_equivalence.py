"""One optimizer step of a tiny model, packed and unpacked, on the same 16 examples, for NLL and DEFT through the fused
path with 2 micro-batches per rank: ``python tests/packing_equivalence.py START OUT`` in one process, or under
``torchrun --nproc-per-node 2`` with DDP and with FSDP2 (each rank takes 8 of the examples). Rank 0 saves each
run's step loss and full gradients to ``OUT/results-<ranks>.pt``; tests/test_distributed.py compares them.
``START`` is a checkpoint written by ``python tests/fsdp_equivalence.py --checkpoint START``.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from fsdp_equivalence import Losses
from test_packing import examples, packed_batch
from torch.utils.data import DataLoader

from deft_lightning.data.module import collate
from deft_lightning.model import DeftModule
from deft_lightning.objectives import DEFT, NLL
from deft_lightning.strategies import FSDP2Strategy

EXAMPLES = 16


class Gradients(L.Callback):
    """The full gradient of every parameter right before the optimizer step (gathered from FSDP2's shards)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.values = {}
        for name, parameter in pl_module.model.named_parameters():
            grad = parameter.grad
            self.values[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


class OneBatch(L.LightningDataModule):
    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed = packed

    def train_dataloader(self) -> DataLoader:
        share = EXAMPLES // self.trainer.world_size
        rank = self.trainer.global_rank
        rows = examples(EXAMPLES, seed=11)[rank * share : (rank + 1) * share]
        return DataLoader([packed_batch(rows) if self.packed else collate(rows)], batch_size=None)


def run(start: Path, objective, packed: bool, strategy) -> dict:
    L.seed_everything(0)
    module = DeftModule(
        objective=objective, checkpoint_dir=start, micro_batch_size=2, gradient_clip=0.0, warmup_ratio=0.0
    )
    gradients, losses = Gradients(), Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", 1)),
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[gradients, losses],
    )
    trainer.fit(module, OneBatch(packed))
    return {"loss": losses.values[0], "gradients": gradients.values}


def main(start: Path, out_dir: Path) -> None:
    distributed = torch.distributed.is_torchelastic_launched()
    strategies = {"ddp": lambda: "ddp", "fsdp2": FSDP2Strategy} if distributed else {"single": lambda: "auto"}
    results = {}
    for name, strategy in strategies.items():
        for objective in (NLL(), DEFT()):
            for packed in (False, True):
                key = f"{name}-{type(objective).__name__}-{'packed' if packed else 'padded'}"
                results[key] = run(start, objective, packed, strategy())
    if not distributed or torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / f"results-{2 if distributed else 1}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
