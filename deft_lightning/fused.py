"""The fused path: output projection + objective + gradients, chunk by chunk, never holding ``[tokens × vocab]``.

Every objective's logit gradient is ``w · (softmax − onehot)`` with a detached per-token weight ``w``, and the
step's loss scale (``world_size / global token count``) is known before the forward pass. So, for each chunk
of trainable tokens, the forward pass computes the logits ``h Wᵀ``, log p, the statistics the objective
declares, the token losses and weights, and right away the gradients w.r.t. the hidden states and the output
weight (as Liger-Kernel's fused linear cross-entropy does for NLL). Backward only scales the stored gradients.
Three matmuls per chunk, like the materialized path, and memory of one chunk of logits instead of all of them.

Precision is decided here, not inherited from autocast: the matmul inputs are in the *compute dtype* (autocast's
dtype under ``bf16-mixed``, else the inputs' own), every matmul accumulates **and returns** fp32 (fp32-output
GEMMs on CUDA, an upcast elsewhere), so logits, softmax, statistics, losses and the output-weight gradient are
fp32 (fp64 for fp64 inputs); only the logit gradient is rounded to the compute dtype before its two matmuls,
as autocast's backward of a linear layer does.

Objectives whose weights depend on the whole batch (``Objective.batch_dependent``, e.g. ``CayleyReference``'s
batch-mean floor) and models with logit soft-capping take the plain path instead; nothing changes silently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deft_lightning.objectives import Objective
from deft_lightning.statistics import (
    DEFAULT_CHUNK_ELEMENTS,
    NO_STATS,
    STAT_NAMES,
    Needs,
    TokenStats,
    chunk_rows,
    full_precision,
    softmax_chunk,
)

#: a reference model's hidden states ``[N, d]`` at the same positions and its output weight ``[V, d]``
Reference = tuple[Tensor, Tensor]


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul input dtype: autocast's where it is on (as it would run the output head), else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` accumulated and returned in ``out_dtype`` (inputs in a narrower dtype only on CUDA)."""
    return a @ b if a.dtype == out_dtype else torch.mm(a, b, out_dtype=out_dtype)


def _addmm_(accumulator: Tensor, a: Tensor, b: Tensor) -> None:
    """``accumulator += a @ b`` in the accumulator's dtype."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    else:
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)


class _Projection:
    """``h·Wᵀ`` for chunks of rows in the precision the module docstring states, and the same rows of a reference
    model's ``h_ref·W_refᵀ`` where one is given."""

    def __init__(self, hidden: Tensor, weight: Tensor, dtype: torch.dtype, reference: Reference | None) -> None:
        self.dtype = dtype
        self.wide = torch.promote_types(dtype, torch.float32)  # logits, statistics, losses, accumulators
        # CUDA multiplies compute-dtype operands into fp32; elsewhere (no such GEMM) operands rounded to the
        # compute dtype are multiplied in fp32: the same numbers up to summation order
        self.operand = dtype if hidden.is_cuda else self.wide
        self.hidden = hidden
        self.weight = self.cast(weight)  # one cast per call, like autocast's cached weight cast
        self.reference = None if reference is None else (reference[0], self.cast(reference[1]))

    def cast(self, x: Tensor) -> Tensor:
        return x.to(self.dtype).to(self.operand)

    def chunks(self, rows: Tensor, targets: Tensor, needs: Needs, chunk: int):
        """Per chunk of rows: their index, targets, operand rows, log p, softmax (in place on the logits), the
        reference's softmax (likewise; ``None`` without a reference) and the statistics."""
        for start in range(0, rows.numel(), chunk):
            index, y = rows[start : start + chunk], targets[start : start + chunk]
            h = self.cast(self.hidden.index_select(0, index))
            q = None
            if needs.reference:
                hidden_ref, weight_ref = self.reference
                q = _matmul(self.cast(hidden_ref.index_select(0, index)), weight_ref.T, self.wide)
            logp, _, probs, stats = softmax_chunk(_matmul(h, self.weight.T, self.wide), y, needs, q)
            yield index, y, h, logp, probs, q, stats
            del h, probs, q  # free this chunk before the next one is allocated


class _FusedObjectiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        rows: Tensor,
        targets: Tensor,
        token_weights: Tensor | None,
        objective: Objective,
        needs: Needs,
        scale: float,
        chunk: int,
        dtype: torch.dtype,
        reference: Reference | None,
    ):
        projection = _Projection(hidden, weight, dtype, reference)
        wide = projection.wide
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        losses, gates, logps, stats = [], [], [], {name: [] for name in needs.requested()}
        weighted_sum = hidden.new_zeros((), dtype=wide)
        for index, y, h, logp, probs, q, chunk_stats in projection.chunks(rows, targets, needs, chunk):
            stats_chunk = TokenStats(logp, probs.shape[-1], **chunk_stats)
            token_loss, gate, anchor_gate = objective.loss_and_gates(logp, stats_chunk)
            losses.append(token_loss)
            gates.append(gate)
            logps.append(logp)
            for name, value in chunk_stats.items():
                stats[name].append(value)
            factor = scale if token_weights is None else scale * token_weights[index].to(wide)
            weighted_sum += (token_loss * factor).sum()
            gate = gate * factor
            # ∂(Σ factor·loss)/∂z = gate · (softmax − onehot) [+ anchor gate · (softmax − q)], in place on the softmax
            if anchor_gate is not None:  # q − p first: exactly 0 where the reference is the model
                q.sub_(probs).mul_((anchor_gate * factor)[:, None])
            grad_z = probs.mul_(gate[:, None])
            if anchor_gate is not None:
                grad_z.sub_(q)
            grad_z.scatter_add_(1, y[:, None], -gate[:, None])
            grad_z = projection.cast(grad_z)
            grad_hidden.index_copy_(0, index, _matmul(grad_z, projection.weight, wide).to(hidden.dtype))
            _addmm_(grad_weight, grad_z.T, h)
            del h, probs, q, grad_z  # free this chunk before the next one is allocated
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        empty = hidden.new_empty(0, dtype=wide)
        token_loss, gate, logp = (torch.cat(x) if x else empty for x in (losses, gates, logps))
        outputs = [torch.cat(stats[name]) if stats.get(name) else empty for name in STAT_NAMES]
        ctx.mark_non_differentiable(token_loss, gate, logp, *outputs)
        return (weighted_sum, token_loss, gate, logp, *outputs)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # else: no copy of a [V, d] gradient
            grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
        return grad_hidden, grad_weight, *[None] * 9


def _checked_reference(needs: Needs, reference: Reference | None, hidden: Tensor) -> Reference | None:
    if not needs.reference:
        return None
    if reference is None or reference[0].shape != hidden.shape:
        got = None if reference is None else tuple(reference[0].shape)
        raise ValueError(f"needs.reference: expected reference hidden states of shape {tuple(hidden.shape)}, got {got}")
    return reference[0].detach(), reference[1].detach()


def _kept_rows(targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    targets = targets.long()
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


def fused_log_probs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    needs: Needs = NO_STATS,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reference: Reference | None = None,
) -> tuple[Tensor, TokenStats]:
    """Forward only (evaluation): log p and the statistics of the kept rows of ``h·Wᵀ``, chunk by chunk, no
    gradients and no ``[tokens × vocab]`` logits — for any objective, batch-dependent ones included."""
    dtype = compute_dtype(hidden, weight)
    rows, kept = _kept_rows(targets, ignore_index)
    chunk = chunk_rows(weight.shape[0], chunk_elements)
    logps, stats = [], {name: [] for name in needs.requested()}
    with torch.no_grad(), full_precision(hidden.device):
        projection = _Projection(hidden, weight, dtype, _checked_reference(needs, reference, hidden))
        for _index, _y, h, logp, probs, q, chunk_stats in projection.chunks(rows, kept, needs, chunk):
            logps.append(logp)
            for name, value in chunk_stats.items():
                stats[name].append(value)
            del h, probs, q  # free this chunk before the next one is allocated
    empty = hidden.new_empty(0, dtype=projection.wide)
    logp = torch.cat(logps) if logps else empty
    stats = {name: torch.cat(values) if values else empty for name, values in stats.items()}
    return logp, TokenStats(logp, weight.shape[0], **stats)


def fused_objective_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    objective: Objective,
    scale: float,
    needs: Needs | None = None,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reference: Reference | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, TokenStats]:
    """``scale · Σ token_weight · token loss`` of the kept rows, differentiable w.r.t. ``hidden [N, d]`` and
    ``weight [V, d]``.

    Returns the scaled loss sum (call ``backward`` on it) and, detached, the per-token losses, gates, log p and
    statistics of the kept rows (``needs`` adds statistics for logging to the objective's own), in fp32 (fp64
    for fp64 inputs). Under autocast the matmul inputs are in autocast's dtype; see the module docstring.
    ``reference`` (hidden states and head weight of a reference model, detached) is needed by anchored
    objectives; ``token_weights [N]`` (default 1) weight each row's loss.
    """
    if objective.batch_dependent:
        raise ValueError(f"{objective!r} depends on batch-level statistics; use the plain path (fused: false)")
    needs = objective.needs | (needs or Needs())
    rows, kept = _kept_rows(targets, ignore_index)
    chunk = chunk_rows(weight.shape[0], chunk_elements)
    dtype = compute_dtype(hidden, weight)
    reference = _checked_reference(needs, reference, hidden)
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).detach()
    with full_precision(hidden.device):
        loss, token_loss, gate, logp, *stats = _FusedObjectiveLoss.apply(
            hidden, weight, rows, kept, token_weights, objective, needs, scale, chunk, dtype, reference
        )
    computed = dict(zip(STAT_NAMES, stats, strict=True))
    stats = TokenStats(logp, weight.shape[0], **{n: computed[n] for n in needs.requested()})
    return loss, token_loss, gate, logp, stats
