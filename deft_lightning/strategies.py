"""Sharding LitGPT models across GPUs: FSDP2 (``fully_shard`` per ``Block``) and Lightning's FSDP1 strategy.

- FSDP2 (also on CPU with gloo): ``strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy,
  init_args: {data_parallel_size: N, tensor_parallel_size: 1}}``; :meth:`DeftModule.configure_model` then calls
  :func:`shard_blocks`.
- FSDP1: ``strategy: {class_path: deft_lightning.strategies.BlockFSDPStrategy}`` (GPU only): Lightning's
  ``FSDPStrategy`` with LitGPT ``Block`` auto-wrap and activation checkpointing preset.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from litgpt.model import Block


def shard_blocks(model: torch.nn.Module, mesh: Any, activation_checkpointing: bool = False) -> None:
    """FSDP2: shard every transformer block, then the rest (embeddings, final norm, head), over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for index, block in enumerate(model.transformer.h):
            model.transformer.h[index] = checkpoint_wrapper(block)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` wrapping and (optionally) checkpointing each LitGPT ``Block``.

    Args:
        activation_checkpointing: recompute blocks in the backward pass (saves activation memory).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``, ...
        state_dict_type: ``sharded`` (one file per rank, fast) or ``full`` (one file, gathered on rank 0).
        kwargs: any other ``FSDPStrategy`` argument.
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "sharded",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )
