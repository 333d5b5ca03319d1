"""Three steps of ASFT (a frozen reference copy, and LoRA with its base as the reference) and PSFT (a snapshot
refreshed every 2 steps) on a tiny model: ``python tests/anchored_equivalence.py START OUT`` in one process, or under
``torchrun --nproc-per-node 2`` with FSDP2 (each rank takes half of every step's sequences). Rank 0 saves each run's
step losses and full weights to ``OUT/anchored-<ranks>.pt``; tests/test_distributed.py compares them.
``START`` is a checkpoint written by ``python tests/fsdp_equivalence.py --checkpoint START``.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from fsdp_equivalence import Losses
from torch.utils.data import DataLoader

from deft_lightning.lora import LoRA
from deft_lightning.model import DeftModule
from deft_lightning.objectives import ASFT, DFT, PSFT
from deft_lightning.strategies import FSDP2Strategy

STEPS, SEQUENCES = 3, 8


class Halves(L.LightningDataModule):
    """Every step: 8 sequences with uneven prompt masks; rank r of n takes its n-th share."""

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(5)
        share = SEQUENCES // self.trainer.world_size
        rank = self.trainer.global_rank
        steps = []
        for _ in range(STEPS):
            input_ids = torch.randint(0, 320, (SEQUENCES, 20), generator=generator)
            labels = input_ids.clone()
            for row in range(SEQUENCES):
                labels[row, : 3 + 2 * row] = -100
            part = slice(rank * share, (rank + 1) * share)
            steps.append({"input_ids": input_ids[part], "labels": labels[part]})
        return DataLoader(steps, batch_size=None)


def run(start: Path, objective, lora: LoRA | None, strategy) -> dict:
    L.seed_everything(0)
    module = DeftModule(
        objective=objective, checkpoint_dir=start, micro_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lora=lora
    )
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", 1)),
        strategy=strategy,
        max_steps=STEPS,
        log_every_n_steps=1,  # a train/loss every step
        use_distributed_sampler=False,  # each rank its own share of every step, as Halves gives it
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(module, Halves())
    weights = {}
    for name, value in module.model.state_dict().items():
        weights[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
    return {"losses": losses.values, "weights": weights}


def main(start: Path, out_dir: Path) -> None:
    distributed = torch.distributed.is_torchelastic_launched()
    strategy = FSDP2Strategy if distributed else lambda: "auto"
    lora = LoRA(r=4, alpha=8, targets=["query", "value", "head"])
    runs = {"ASFT": (ASFT(kl_weight=1.0), None), "ASFT-LoRA": (ASFT(kl_weight=1.0), lora), "PSFT": (PSFT(0.1, 2), None)}
    if not distributed:  # what ASFT would be without its anchor, to show the anchor acted
        runs |= {"DFT": (DFT(), None), "DFT-LoRA": (DFT(), lora)}
    results = {name: run(start, objective, adapters, strategy()) for name, (objective, adapters) in runs.items()}
    if not distributed or torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / f"anchored-{2 if distributed else 1}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
