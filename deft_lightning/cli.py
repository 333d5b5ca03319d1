"""``python -m deft_lightning fit|validate|test --config <yaml>``, through LightningCLI.

Every fit gets a fixed run directory (``trainer.default_root_dir``, by default ``runs/<config file name>``)
holding ``metrics.csv``, ``config.yaml`` and ``checkpoints/`` (see :mod:`deft_lightning.checkpointing`), so a
second launch finds the first one's checkpoints:

- ``--ckpt_path last``  resume from the newest complete checkpoint (normally ``checkpoints/last.ckpt``); an error
  if there is none;
- ``--ckpt_path auto``  resume if there is one, else start fresh;
- no ``--ckpt_path``    start fresh; an error if the run directory already has checkpoints (nothing is
  overwritten — resume, or choose another ``--trainer.default_root_dir``).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from deft_lightning.callbacks import ExportOnFitEnd, FitSummary, PlainProgress, step_progress_bar
from deft_lightning.checkpointing import (
    AtomicCheckpointIO,
    ContinuousMetricsLog,
    PreemptionCheckpoint,
    RandomStates,
    RunCheckpoint,
    RunLogger,
    check_resumable,
    existing_checkpoints,
    newest_checkpoint,
    read_metadata,
)
from deft_lightning.data.module import check_global_batch, saved_data_position
from deft_lightning.errors import CommandError
from deft_lightning.loading import sharded_layout
from deft_lightning.model import DeftModule
from deft_lightning.prepare_model import CheckpointError
from deft_lightning.strategies import BlockFSDPStrategy, FSDP2Strategy, remove_unpublished


def resolve_precision(accelerator: Any, cuda_available: bool, bf16_supported: bool) -> tuple[str, str]:
    """The precision a config that leaves ``trainer.precision`` out gets, and why: ``bf16-mixed`` on a CUDA GPU
    with bf16, else ``32-true`` (bf16 on CPUs is ~25× slower; fp16 needs loss scaling, which the module lacks)."""
    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and cuda_available
    if on_gpu and bf16_supported:
        return "bf16-mixed", "chosen: a CUDA GPU with bf16"
    if on_gpu:
        return "32-true", "chosen: this GPU has no bf16 (fp16 would need loss scaling)"
    return "32-true", "chosen: CPU (bf16 is far slower there)"


#: Lightning and library notices a user cannot act on: the device and seed lines Lightning prints before any input
#: is checked (so a bad input's `error:` line stands alone), LightningCLI's own `args` warning (we pass argv through),
#: the litlogger advertisement, torchdata's and Lightning's deprecations of their own internals, the 13-line code
#: sample ModelCheckpoint prints under manual optimization (our checkpoints are taken after the update on purpose:
#: that is what a resume continues from) and Lightning's note that `weights_only` was left out.
NOISE = (
    "Seed set to",  # printed before any input is checked; the seed is in config.yaml
    "TPU available",
    "HPU available",
    "GPU available",  # the fit summary names the device
    "exists and is not empty",  # ModelCheckpoint on a resume: our run directory is meant to hold its checkpoints
    "LightningCLI's args parameter",
    "try installing [litlogger]",
    "'set_vital' is deprecated",
    "isinstance(treespec, LeafSpec)",
    "Using ModelCheckpoint with manual optimization",
    "`weights_only` was not set",
)


class _WithoutNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in NOISE)


def silence_noise() -> None:
    for text in NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    # a logger's filter sees only records logged on it, not its children's: each logger that prints one is named
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
                 "lightning.fabric.utilities.seed", "lightning.fabric.utilities.rank_zero"):  # fmt: skip
        logging.getLogger(name).addFilter(_WithoutNoise())


class OneLineErrors(LightningArgumentParser):
    """LightningCLI's parsers, but a rejected option or config is one ``error:`` line (raised as CommandError)
    instead of ~100 lines of usage, with the likely fix; options are never abbreviated (``--trainer.max_step`` was
    silently ``max_steps``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise OptionError(one_line(message, [o for o in self._option_string_actions if o.startswith("--")]))


class OptionError(argparse.ArgumentError, CommandError):
    """A rejected option: an ``ArgumentError`` where jsonargparse tries alternatives (union types), a one-line
    ``error:`` (a CommandError) where it reaches the user."""

    def __init__(self, message: str) -> None:
        argparse.ArgumentError.__init__(self, None, message)


def one_line(message: str, options: list[str]) -> str:
    """jsonargparse's multi-line report as one sentence: where, what, and the fix."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines() if line.strip()]
    key_match = re.match(r'Parser key "([^"]+)":?(.*)', lines[0]) if lines else None
    key = key_match.group(1) if key_match else None
    skip = ("Does not validate against", "Subtypes:", "Errors:", "Given value type:", "Expected a <class 'NoneType'>")
    details = [
        line for line in lines[1:] if not line.startswith(skip) and not line.startswith("Expected a config path")
    ]
    given = next((line.split(":", 1)[1].strip() for line in details if line.startswith("Given value:")), None)
    details = [line for line in details if not line.startswith("Given value:")]
    if key == "model.objective":
        return objective_error(given or "", " ".join(details))
    text = " ".join(details) or (key_match.group(2).strip() if key_match else message.strip())
    unknown = re.search(r"Unrecognized arguments: (--?[\w.\-]+)", text)
    if unknown and key is None:  # nested sections (model.lora) get theirs from their own parser of this class
        name = unknown.group(1).split("=")[0]
        guess = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        return f"unknown option {name}; {f'did you mean {guess[0]}?' if guess else 'see --help for the options'}"
    return f"--{key}: {text}" if key else text


def objective_error(given: str, details: str) -> str:
    from deft_lightning import objectives

    known = ", ".join(
        sorted(
            (
                name
                for name in objectives.__all__
                if isinstance(getattr(objectives, name), type) and name not in ("Objective", "Needs", "TokenStats")
            ),
            key=str.lower,
        )
    )
    nested = re.match(r"NestedArg\(key='([^']+)'", given)
    if nested:
        return (
            f"--model.objective.{nested.group(1)}: the objective in use takes no argument '{nested.group(1)}' "
            f"(choose the objective first, e.g. --model.objective QLog --model.objective.alpha 0.3)"
        )
    missing = re.search(r"No module named '([^']+)'", details)
    if missing:
        return (
            f"--model.objective {given}: no module named '{missing.group(1)}' — the directory holding "
            f"{missing.group(1).split('.')[0]}.py must be importable: run with PYTHONPATH=<that directory>"
        )
    return f"--model.objective {given} is not an objective; use one of {known} (−p is Prob), or a class_path of yours"


class DeftCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # a class's own refusal, wrapped by jsonargparse in its union report
            if "Does not validate against" not in str(err):
                raise
            raise CommandError(one_line(str(err), [])) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FitSummary, "summary")
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step={step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.enable_version_counter": False,  # overwrite in place: a resume never writes -v1 copies
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
        if isinstance(config.get("val_check_interval"), int) and config.get("check_val_every_n_epoch") == 1:
            config["check_val_every_n_epoch"] = None  # every N optimizer steps across epochs, whatever the data size
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
            if sys.stdout.isatty():
                callbacks.append(step_progress_bar())
            else:  # a redirected log would show the bar only at the end
                config["enable_progress_bar"] = False
                callbacks.append(PlainProgress())
        if config.get("logger") in (None, True):  # validate/test log apart: the fit's metrics.csv stays the fit's
            config["logger"] = RunLogger(root if self.subcommand in (None, "fit") else root / self.subcommand)
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
        try:
            return super()._instantiate_trainer(config, callbacks)
        except MisconfigurationException as err:
            if "No supported gpu backend found" not in str(err):
                raise
            raise CommandError(
                f"trainer.accelerator={config.get('accelerator')} asks for GPUs and this machine has none (configs/"
                "fsdp.yaml is written for 8); to try the same strategy on the CPU add --trainer.accelerator cpu "
                "--trainer.devices 2 --trainer.precision 32-true"
            ) from None

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs it; a fit that fails before its first step leaves no run directory it created behind."""
        run_dir = self.run_dir()
        existed = run_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            untouched = self.trainer.global_step == 0 and not existing_checkpoints(run_dir / "checkpoints")
            if subcommand == "fit" and not existed and untouched and self.trainer.is_global_zero:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def before_fit(self) -> None:
        checkpoints = self.run_dir() / "checkpoints"
        settings = self.config_init[self.subcommand]
        if settings.get("ckpt_path") in ("last", "auto"):
            newest = newest_checkpoint(checkpoints)
            last = checkpoints / "last.ckpt"
            if newest is None and last.exists():
                check_resumable(last)  # says what is wrong with it
            if newest is None and settings["ckpt_path"] == "last":
                raise CommandError(
                    f"--ckpt_path last: no {last} to resume from (nor any other checkpoint beside it); start the run "
                    "without --ckpt_path, or use --ckpt_path auto to resume only if a checkpoint exists"
                )
            if newest is not None and newest.name != last.name:
                rank_zero_info(f"resuming from {newest}: it holds more steps than {last}")
            settings["ckpt_path"] = str(newest) if newest is not None else None
        elif (
            settings.get("ckpt_path") is None and self.trainer.checkpoint_callback and existing_checkpoints(checkpoints)
        ):
            raise CommandError(
                f"{checkpoints} already holds checkpoints of an earlier run; resume it with --ckpt_path last "
                "(or --ckpt_path auto), or start a new run with --trainer.default_root_dir <new dir>"
            )
        if settings.get("weights_only") is None:
            settings["weights_only"] = True  # our checkpoints hold plain data only (objectives as class_path dicts)
        remove_unpublished(checkpoints)
        self.model.check_run(self.trainer, self.datamodule)  # before any data is prepared or weight is read
        if settings.get("ckpt_path"):
            self._check_resume(Path(settings["ckpt_path"]))

    def _check_resume(self, path: Path) -> None:
        """The checkpoint is whole, this strategy can load it, and its data position fits this run."""
        check_resumable(path)
        strategy = self.trainer.strategy
        if path.is_dir():
            layout = sharded_layout(path)
            wanted = {"fsdp2": FSDP2Strategy, "fsdp1": BlockFSDPStrategy}[layout]
            if not isinstance(strategy, FSDPStrategy if layout == "fsdp1" else ModelParallelStrategy):
                raise CheckpointError(
                    f"'{path}' is a sharded checkpoint written by {layout.upper()}; resume it with --trainer.strategy "
                    f'\'{{"class_path": "{wanted.__module__}.{wanted.__name__}"}}\' (on any number of devices), or '
                    f"turn it into one file with `python -m deft_lightning export {path} --out DIR --format litgpt` "
                    "and start a new run from DIR (model.checkpoint_dir)"
                )
        position = saved_data_position(read_metadata(path))
        batch_size = getattr(self.datamodule, "batch_size", None)
        if position is not None and batch_size is not None:
            check_global_batch(position, batch_size, self.trainer.world_size)


def main(args: list[str] | None = None, run: bool = True) -> DeftCLI:
    """Run the CLI; ``run=False`` only builds trainer, model and data (no subcommand in ``args``)."""
    silence_noise()
    return DeftCLI(
        DeftModule,
        L.LightningDataModule,
        parser_class=OneLineErrors,
        subclass_mode_data=True,
        seed_everything_default=1,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # precision None: chosen by device (resolve_precision); the fit summary counts the parameters instead of
        # Lightning's table (its MeanMetric rows and "Total FLOPs: 0" say nothing about the model)
        trainer_defaults={"precision": None, "enable_model_summary": False},
        args=None if args == sys.argv[1:] else args,  # the same list: LightningCLI reads it itself, without a warning
        run=run,
    )
