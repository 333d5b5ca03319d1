"""``python -m deft_lightning fit|validate|test --config <yaml>``, through LightningCLI.

Every fit gets a fixed run directory (``trainer.default_root_dir``, by default ``runs/<config file name>``)
holding ``metrics.csv``, ``config.yaml`` and ``checkpoints/`` (see :mod:`deft_lightning.checkpointing`), so a
second launch finds the first one's checkpoints:

- ``--ckpt_path last``  resume from ``checkpoints/last.ckpt``; an error if there is none;
- ``--ckpt_path auto``  resume if ``last.ckpt`` exists, else start fresh;
- no ``--ckpt_path``    start fresh; an error if the run directory already has checkpoints (nothing is
  overwritten — resume, or choose another ``--trainer.default_root_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from deft_lightning.callbacks import ExportOnFitEnd, FitSummary, step_progress_bar
from deft_lightning.checkpointing import (
    AtomicCheckpointIO,
    ContinuousMetricsLog,
    PreemptionCheckpoint,
    RandomStates,
    RunLogger,
    check_resumable,
    existing_checkpoints,
)
from deft_lightning.errors import CommandError
from deft_lightning.model import DeftModule


def resolve_precision(accelerator: Any, cuda_available: bool, bf16_supported: bool) -> tuple[str, str]:
    """The precision a config that leaves ``trainer.precision`` out gets, and why: ``bf16-mixed`` on a CUDA GPU
    with bf16, else ``32-true`` (bf16 on CPUs is ~25× slower; fp16 needs loss scaling, which the module lacks)."""
    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and cuda_available
    if on_gpu and bf16_supported:
        return "bf16-mixed", "chosen: a CUDA GPU with bf16"
    if on_gpu:
        return "32-true", "chosen: this GPU has no bf16 (fp16 would need loss scaling)"
    return "32-true", "chosen: CPU (bf16 is far slower there)"


class DeftCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FitSummary, "summary")
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step={step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
            }
        )

    def run_dir(self) -> Path:
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("default_root_dir"):
            return Path(trainer["default_root_dir"])
        configs = self._get(self.config, "config", default=None) or []
        name = Path(str(configs[-1])).stem if configs else "default"
        return Path("runs") / name

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        root = self.run_dir()
        config["default_root_dir"] = str(root)
        if config.get("precision") is None:  # left out of the config: by device
            import torch

            cuda = torch.cuda.is_available()
            config["precision"], reason = resolve_precision(
                config.get("accelerator", "auto"), cuda, cuda and torch.cuda.is_bf16_supported()
            )
            for callback in callbacks:
                if isinstance(callback, FitSummary):
                    callback.precision_reason = reason
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(step_progress_bar())
        if config.get("logger") in (None, True):
            config["logger"] = RunLogger(root)
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        checkpoints = root / "checkpoints"
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        else:
            for callback in callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = str(checkpoints)
            callbacks += [PreemptionCheckpoint(checkpoints / "last.ckpt"), RandomStates()]
        callbacks.append(ContinuousMetricsLog(root / "metrics.csv"))
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        checkpoints = self.run_dir() / "checkpoints"
        settings = self.config_init[self.subcommand]
        last = checkpoints / "last.ckpt"
        if settings.get("ckpt_path") == "auto":
            settings["ckpt_path"] = str(last) if last.exists() else None  # a directory when sharded
        elif settings.get("ckpt_path") == "last":
            if not last.exists():
                raise CommandError(
                    f"--ckpt_path last: no {last} to resume from; start the run without --ckpt_path, "
                    "or use --ckpt_path auto to resume only if a checkpoint exists"
                )
            settings["ckpt_path"] = str(last)
        elif (
            settings.get("ckpt_path") is None and self.trainer.checkpoint_callback and existing_checkpoints(checkpoints)
        ):
            raise CommandError(
                f"{checkpoints} already holds checkpoints of an earlier run; resume it with --ckpt_path last "
                "(or --ckpt_path auto), or start a new run with --trainer.default_root_dir <new dir>"
            )
        if settings.get("ckpt_path"):
            check_resumable(Path(settings["ckpt_path"]))


def main(args: list[str] | None = None, run: bool = True) -> DeftCLI:
    """Run the CLI; ``run=False`` only builds trainer, model and data (no subcommand in ``args``)."""
    return DeftCLI(
        DeftModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=1,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"precision": None},  # None: chosen by device (resolve_precision)
        args=args,
        run=run,
    )
