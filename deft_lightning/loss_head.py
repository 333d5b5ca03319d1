"""The loss inside the backbone's forward: for one call, the output head's forward is the fused objective pass.

Sharded strategies gather a unit's parameters around its forward: FSDP2 and FSDP1 unshard the GPT's own unit
(embeddings, final norm, head) in its pre-forward hook. Computing the fused loss *inside* that forward — as
Liger-Kernel's fused linear cross-entropy and Lightning's forward redirection do — hands it the whole output
weight, gathered once per micro-batch (never per chunk), and its gradient reaches the sharded parameter through
autograd exactly as the materialized head's would, tied embeddings included. Single-device and DDP runs take the
same path, so there is one code path for every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from litgpt import GPT
from torch import Tensor

from deft_lightning.lora import head_weight


@contextmanager
def head_computes(model: GPT, loss: Callable[[Tensor, Tensor], Tensor]) -> Iterator[None]:
    """Within the block, ``model(input_ids)`` returns ``loss(hidden [B, T, d], head_weight [V, d])`` instead of
    the logits (a LoRA head's merged weight). ``model`` may be wrapped by FSDP (attribute access reaches the GPT)."""
    head = model.lm_head
    if getattr(head, "linear", head).bias is not None or model.config.final_logit_softcapping is not None:
        raise ValueError("the fused loss needs a bias-free head without logit soft-capping; use fused: false")
    head.forward = lambda hidden: loss(hidden, head_weight(head))  # the weight as the forward sees it: unsharded
    try:
        yield
    finally:
        del head.forward
