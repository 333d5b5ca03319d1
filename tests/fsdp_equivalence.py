"""Run under ``torchrun --nproc-per-node 2``: 3 FSDP2 steps of a tiny model for every (objective, tied head,
fused) combination, in one pair of processes; rank 0 saves each run's step losses and full weights to OUT_DIR.

``python tests/fsdp_equivalence.py --checkpoint DIR`` writes the starting checkpoint first: embeddings of std 0.02
with an equal head (litgpt's N(0, 1) embeddings, tied, put p ≈ e⁻²⁹ on every target, where DEFT's gates are
~1e-20 and AdamW's normalization of ~1e-7 gradients amplifies summation-order roundoff into visible steps).
tests/test_distributed.py compares fused with plain runs.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from deft_lightning.model import DeftModule
from deft_lightning.objectives import DEFT, EAFT, NLL
from deft_lightning.strategies import FSDP2Strategy

# no biases: attention is invariant to the key bias, whose zero gradient AdamW would turn into roundoff-driven steps
TINY = {
    "name": "t",
    "block_size": 64,
    "vocab_size": 320,
    "padded_vocab_size": 320,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "bias": False,
}
STEPS = 3


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Per-rank batches of 4 sequences with uneven numbers of trainable tokens (one rank's 2nd step has none)."""
    generator = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(STEPS):
        input_ids = torch.randint(0, 320, (4, 24), generator=generator)
        labels = input_ids.clone()
        labels[:, : 4 + 3 * rank] = -100
        if rank == 1 and step == 1:
            labels[:] = -100  # a rank without a trainable token must not hang the collectives
        out.append({"input_ids": input_ids, "labels": labels})
    return out


class PerRank(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(batches(self.trainer.global_rank), batch_size=None)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.values.append(float(trainer.callback_metrics["train/loss"]))


def write_checkpoint(directory: Path) -> None:
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    config = Config(**TINY)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.02)
        model.lm_head.weight.copy_(model.transformer.wte.weight)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "lit_model.pth")
    save_config(config, directory)


def run(checkpoint: Path, objective, tied: bool, fused: bool, checkpointing: bool) -> dict:
    L.seed_everything(0)
    module = DeftModule(
        objective=objective,
        checkpoint_dir=checkpoint,
        micro_batch_size=2,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        fused=fused,
        tie_embeddings=tied,
        activation_checkpointing=checkpointing,
    )
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(module, PerRank())
    weights = {name: param.full_tensor().detach().clone() for name, param in module.model.state_dict().items()}
    assert tied == (module.model.lm_head.weight is module.model.transformer.wte.weight)
    return {"losses": losses.values, "weights": weights}


def main(checkpoint: Path, out_dir: Path) -> None:
    results = {}
    for objective in (NLL(), DEFT(), EAFT()):
        for tied in (False, True):
            for fused in (True, False):
                name = f"{type(objective).__name__}-{'tied' if tied else 'untied'}-{'fused' if fused else 'plain'}"
                results[name] = run(checkpoint, objective, tied, fused, checkpointing=False)
    results["DEFT-untied-fused-checkpointed"] = run(checkpoint, DEFT(), False, True, checkpointing=True)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_dir / "results.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--checkpoint":
        write_checkpoint(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
