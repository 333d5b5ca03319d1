"""Data parallelism for LitGPT backbones: what each strategy needs beyond Lightning's own.

- DDP (``strategy: ddp``): nothing; :class:`~deft_lightning.model.DeftModule` skips the gradient all-reduce on all
  but the last micro-batch of a step.
- FSDP2: :class:`FSDP2Strategy` (Lightning's ``ModelParallelStrategy`` for data parallelism only; also on CPU with
  gloo). ``DeftModule.configure_model`` calls :func:`shard_blocks`: ``fully_shard`` on every ``Block``, then on
  the GPT (embeddings, final norm, head).
- FSDP1: :class:`BlockFSDPStrategy` (Lightning's ``FSDPStrategy``; also on CPU with gloo): every ``Block`` is a
  unit and **the GPT is the root unit**, so backward runs outside any FSDP forward — Lightning runs
  ``training_step`` inside the wrapped module's forward, where FSDP1 cannot run backward (Lightning #19626).

Under every one of them the fused loss runs inside the GPT's forward (:mod:`deft_lightning.loss_head`), gradients
are clipped by their global norm (:func:`clip_grad_norm`), ``bf16-mixed`` reduces gradients in fp32,
``model.activation_checkpointing`` recomputes blocks, and sharded checkpoints are published atomically
(:class:`AtomicShardedSaves`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from litgpt import GPT
from litgpt.model import Block
from torch import Tensor


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each ``Block`` keeps only its input and recomputes the rest in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


def shard_blocks(model: GPT, mesh: Any) -> None:
    """FSDP2: shard every transformer block, then the rest (embeddings, final norm, head), over ``mesh``.

    ``bf16-mixed`` keeps fp32 parameters (autocast computes in bf16), so gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> Tensor:
    """Clip ``model``'s gradients by their global norm across ranks and return that norm (equal on every rank).

    FSDP1 keeps a rank's shard in each ``param.grad``, so ``torch.nn.utils.clip_grad_norm_`` would see only a part:
    its root unit's own method reduces across ranks. FSDP2's sharded gradients are DTensors, whose norm is global.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel):
        return model.clip_grad_norm_(max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def publish_directory(staging: Path, path: Path) -> None:
    """Make ``path`` a symlink to the complete directory ``staging`` in one atomic rename, then delete what it
    pointed to before and anything a killed save left beside it."""
    link = path.with_name(f".{path.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(staging.name)  # relative: the run directory can move
    if path.exists() and not path.is_symlink():  # a checkpoint of an earlier layout: replaced once, not atomically
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(link, path)
    for stale in path.parent.glob(f".{path.name}.*"):
        if stale != staging and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def remove_unpublished(directory: Path) -> None:
    """Delete the hidden staging directories of sharded saves that a kill left unpublished (no checkpoint name
    links to them); a later save of the same name would, but a run may not save that name again."""
    if not directory.is_dir():
        return
    published = {path.resolve() for path in directory.iterdir() if path.is_symlink()}
    for path in directory.glob(".*.ckpt.*"):
        if path.is_dir() and not path.is_symlink() and path.resolve() not in published:
            shutil.rmtree(path, ignore_errors=True)


class AtomicShardedSaves:
    """For strategies whose sharded saves write a directory from every rank, in place and bypassing
    ``CheckpointIO``: write into a hidden directory beside the target, then :func:`publish_directory` (rank 0), so a
    process killed mid-save leaves the previous checkpoint of that name complete, as single-file saves do."""

    def saves_directories(self) -> bool:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self.saves_directories():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.{self.broadcast(uuid.uuid4().hex[:12])}")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("checkpoint written")
        if self.global_rank == 0:
            self.publish(staging, path)
        self.barrier("checkpoint published")
        return None

    def publish(self, staging: Path, path: Path) -> None:
        publish_directory(staging, path)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if path.is_symlink():
            if self.global_rank == 0:
                target = path.resolve()
                path.unlink()
                shutil.rmtree(target, ignore_errors=True)
            return
        super().remove_checkpoint(filepath)


class FSDP2Strategy(AtomicShardedSaves, ModelParallelStrategy):
    """FSDP2 data parallelism over every process (``ModelParallelStrategy`` with tensor parallelism 1).

    Args:
        save_distributed_checkpoint: ``True`` writes one shard per rank into a directory (fast, published
            atomically); ``False`` gathers a single file on rank 0.
        kwargs: any other ``ModelParallelStrategy`` argument (``process_group_backend``, ``timeout``).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # Lightning's "auto" means num_nodes
        super().setup_environment()

    def saves_directories(self) -> bool:
        return self._save_distributed_checkpoint


class BlockFSDPStrategy(AtomicShardedSaves, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with every LitGPT ``Block`` a unit and the GPT (``<module>.model``) the root.

    Runs on CPU (gloo) as well as GPU. ``bf16-mixed`` keeps fp32 parameters and reduces gradients in fp32
    (Lightning's default would all-gather and reduce in bf16); pass ``mixed_precision`` to choose otherwise.

    Args:
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``, ...
        state_dict_type: ``sharded`` (one shard per rank, published atomically) or ``full`` (one file on rank 0).
        kwargs: any other ``FSDPStrategy`` argument.
    """

    def __init__(self, sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "sharded", **kwargs: Any) -> None:
        super().__init__(
            auto_wrap_policy={Block}, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs
        )

    def saves_directories(self) -> bool:
        return self._state_dict_type == "sharded"

    @property
    def mixed_precision_config(self) -> Any:
        if self.mixed_precision is None and self.precision_plugin.precision == "bf16-mixed":
            return None  # fp32 parameters, gradients and reduction; autocast computes in bf16
        return super().mixed_precision_config

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device
        from torch.distributed.fsdp import FullyShardedDataParallel

        backbone = getattr(model, "model", None)
        if not isinstance(backbone, GPT):
            raise TypeError(f"BlockFSDPStrategy shards a LitGPT GPT at `.model`; {type(model).__name__} has none")
        device = self.root_device
        model.model = FullyShardedDataParallel(
            backbone,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device if device.type == "cpu" else device.index,  # Lightning passes None on CPU
            **self.kwargs,
        )
        if getattr(model, "hparams", {}).get("activation_checkpointing"):
            checkpoint_blocks(model.model)  # after wrapping: FSDP(CheckpointWrapper(Block)), as torch advises
        _move_torchmetrics_to_device(model, device)
        return model


def sharded(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
