"""``python -m deft_lightning fit|validate|test --config <yaml>``, through LightningCLI."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from deft_lightning.callbacks import FitSummary
from deft_lightning.model import DeftModule


class DeftCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FitSummary, "summary")


def main(args: list[str] | None = None, run: bool = True) -> DeftCLI:
    """Run the CLI; ``run=False`` only builds trainer, model and data (no subcommand in ``args``)."""
    return DeftCLI(
        DeftModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=1,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"precision": "32-true"},
        args=args,
        run=run,
    )
