"""The GPT's forward over packed rows (:mod:`deft_lightning.data.packing`): several examples per row, told apart by
``position_ids`` that restart at 0 where each example begins.

For the duration of one call, :func:`packed_positions` makes ``model(input_ids)`` run LitGPT's own forward (no KV
cache) with two changes: RoPE takes each token's position within its example, and attention is causal *within*
each example (a block-diagonal document mask through ``scaled_dot_product_attention``), so an example's logits are
what they would be in a row of its own. The call goes through the module as always, so the hooks of FSDP1, FSDP2
and DDP run around it, and the fused loss head (:mod:`deft_lightning.loss_head`) still replaces the output head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from litgpt import GPT, Config
from litgpt.model import do_softcapping
from torch import Tensor


def packing_unsupported(config: Config) -> str | None:
    """Why litgpt's attention cannot take a document mask for this model, if it cannot."""
    if config.sliding_window_size is not None:
        return "sliding-window attention (litgpt replaces the attention mask with the window's)"
    if config.attention_logit_softcapping is not None:
        return "attention-logit soft-capping (litgpt adds the mask to the scores as numbers)"
    return None


def document_mask(position_ids: Tensor) -> Tensor:
    """``[B, 1, T, T]`` bool: query t may attend key s iff s ≤ t and both belong to the same example (an example
    starts where its position is 0)."""
    documents = (position_ids == 0).cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def packed_forward(model: GPT, input_ids: Tensor, position_ids: Tensor) -> Tensor:
    """``GPT.forward(input_ids)`` of litgpt 0.5 with RoPE at ``position_ids`` and the document mask."""
    config = model.config
    if (reason := packing_unsupported(config)) is not None:
        raise ValueError(f"data.packing: {config.name} uses {reason}; train it with data.packing: false")
    cos, sin = model.cos[position_ids], model.sin[position_ids]  # [B, T, rope_n_elem]
    mask = document_mask(position_ids)
    x = model.transformer.wte(input_ids)
    if config.scale_embeddings:
        x = x * torch.tensor(config.n_embd**0.5, dtype=x.dtype)
    for index, block in enumerate(model.transformer.h):
        if config.rope_indices is not None:
            x = block(x, cos[..., config.rope_indices[index]], sin[..., config.rope_indices[index]], mask)
        else:
            x = block(x, cos, sin, mask)
    logits = model.lm_head(model.transformer.ln_f(x))
    if config.final_logit_softcapping is not None:
        logits = do_softcapping(logits, thresh=config.final_logit_softcapping)
    return logits


@contextmanager
def packed_positions(model: GPT, position_ids: Tensor | None) -> Iterator[None]:
    """Within the block, ``model(input_ids)`` is :func:`packed_forward` at ``position_ids`` (nothing changes when
    they are ``None``: an unpacked batch). ``model`` may be sharded by FSDP2 (hooks around the GPT's own forward) or
    wrapped by FSDP1, whose forward gathers the parameters and then calls the wrapped GPT's: the GPT's is replaced."""
    if position_ids is None:
        yield
        return
    gpt = getattr(model, "_fsdp_wrapped_module", model)
    gpt.forward = lambda input_ids: packed_forward(gpt, input_ids, position_ids)
    try:
        yield
    finally:
        del gpt.forward
