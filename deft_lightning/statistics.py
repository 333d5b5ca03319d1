"""Target log-probabilities and detached softmax statistics, computed chunk by chunk.

Every objective in this project has logit gradient ``w · (softmax(z) − onehot(y))`` with a detached per-token
weight ``w`` (REFERENCE.md §1). So the only differentiable quantity the machinery has to provide is the target
log-probability ``log p = z_y − LSE(z)``; everything else an objective looks at (p, entropy, Σp², top-k
entropy) is a detached statistic. :func:`target_log_probs` computes log p and exactly the statistics asked
for, in fp32 (or wider) whatever the logits' dtype, over chunks of rows so that no more than one chunk of
``[rows × vocab]`` fp32 temporaries exists at a time — in the forward and in the backward pass.

Anchored objectives also look at a *reference* model's distribution q at the same positions (``Needs(reference=
True)``): the detached ``reference_logp`` = log q_y, and ``reference_kl`` = KL(q ‖ softmax(z)), the one statistic
that carries gradient (∂KL/∂z = softmax(z) − q), computed from two chunks of logits side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: fp32 elements per chunk of logits (256 MiB); rows per chunk = this // vocabulary size. Smaller chunks make
#: skinny matmuls: with Qwen's 151,936-token vocabulary, 110-row chunks (64 MiB) made the fused loss step 1.25×
#: slower on CPU than 441-row chunks (256 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**26

STAT_NAMES = ("entropy", "collision", "topk_entropy", "correct", "reference_logp", "reference_kl")


@dataclass(frozen=True)
class Needs:
    """Which detached statistics to compute besides log p (which is always there)."""

    entropy: bool = False  # Shannon entropy of softmax(z), nats
    collision: bool = False  # Σ_v p_v² = exp(−Rényi-2 entropy)
    top_k: int = 0  # > 0: entropy of the softmax over the k largest logits
    correct: bool = False  # argmax(z) == y, for token accuracy
    reference: bool = False  # log q_y and KL(q ‖ p) against a reference model's distribution q

    def __or__(self, other: Needs) -> Needs:
        if self.top_k and other.top_k and self.top_k != other.top_k:
            raise ValueError(f"conflicting top-k entropy requests: k={self.top_k} and k={other.top_k}")
        return Needs(
            entropy=self.entropy or other.entropy,
            collision=self.collision or other.collision,
            top_k=self.top_k or other.top_k,
            correct=self.correct or other.correct,
            reference=self.reference or other.reference,
        )

    def requested(self) -> tuple[str, ...]:
        reference = (self.reference, self.reference)
        flags = (self.entropy, self.collision, self.top_k > 0, self.correct, *reference)
        return tuple(name for name, flag in zip(STAT_NAMES, flags, strict=True) if flag)


NO_STATS = Needs()


class TokenStats:
    """Detached per-token statistics of the predictive distribution, each a ``[N]`` tensor (``reference_kl``
    excepted: it carries the gradient of KL(q ‖ p), see the module docstring).

    Reading a statistic that was not computed raises an error that says to declare it in ``Objective.needs``.
    """

    def __init__(self, logp: Tensor, vocab_size: int, **computed: Tensor) -> None:
        self.logp = logp.detach()
        self.vocab_size = vocab_size
        self._computed = computed

    @property
    def prob(self) -> Tensor:
        """Target probability p = exp(log p)."""
        return self.logp.exp()

    def replaced(self, **values: Tensor) -> TokenStats:
        """The same statistics with some of them replaced."""
        return TokenStats(self.logp, self.vocab_size, **{**self._computed, **values})

    def __contains__(self, name: str) -> bool:
        return name in self._computed

    def __getattr__(self, name: str) -> Tensor:
        computed = self.__dict__.get("_computed", {})
        if name in computed:
            return computed[name]
        if name in STAT_NAMES:
            example = {"topk_entropy": "top_k=20", "reference_logp": "reference=True", "reference_kl": "reference=True"}
            raise AttributeError(
                f"statistic '{name}' was not computed; declare it in the objective's `needs` "
                f"(e.g. needs = Needs({example.get(name, name + '=True')}))"
            )
        raise AttributeError(name)


def chunk_rows(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // vocab_size)


def full_precision(device: torch.device):
    """Autocast off: statistics and the fused pass choose their dtypes explicitly (autocast would run the
    collision ``bmm`` and the head matmuls in bf16 under ``bf16-mixed``)."""
    return torch.autocast(device.type, enabled=False)


#: entropy is summed over slices of a chunk's rows so that its ``p·log p`` temporary is at most 1/8 of a chunk
ENTROPY_SLICES = 8


def topk_entropy(z: Tensor, k: int) -> Tensor:
    """Entropy of the softmax over each row's k largest logits, to full relative precision when one dominates.

    With x = top-k logits minus their maximum and s = Σ_{i>1} e^{x_i}: H = log1p(s) − Σ_{i>1} e^{x_i}·x_i / (1 + s)
    (the naive −Σ q log q loses the first term once 1 − q_max is below the dtype's resolution); a logit of −inf
    contributes 0·(−inf) = 0.
    """
    top = z.topk(min(k, z.shape[-1]), dim=-1).values
    rest = top[:, 1:] - top[:, :1]
    mass = rest.exp()
    spread = mass.sum(-1)
    weighted = torch.where(mass > 0, mass * rest, 0).sum(-1)
    return torch.log1p(spread) - weighted / (1 + spread)


def _row_lse(z: Tensor) -> Tensor:
    """Log-sum-exp of each row, over slices of rows (its temporary is ``1/ENTROPY_SLICES`` of the chunk)."""
    step = max(1, -(-z.shape[0] // ENTROPY_SLICES))
    return torch.cat([torch.logsumexp(part, -1) for part in z.split(step)])


def _softmax_(z: Tensor) -> tuple[Tensor, Tensor]:
    """``z`` → softmax(z) in place with one exp pass; returns the row maxima and log Σ exp(z − max) (``[rows, 1]``).
    The model's and the reference's softmax both come from here: for equal logits they are equal bit for bit."""
    peak = z.amax(-1, keepdim=True)
    z.sub_(peak).exp_()
    total = z.sum(-1, keepdim=True)
    z.div_(total)
    return peak, total.log()


def _anchor_chunk(z: Tensor, reference: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log q_y and KL(q ‖ p); turns ``reference`` into q **in place**.

    KL = Σ_v q_v·((z_ref − z)_v − (LSE_ref − LSE)) is formed from logit differences, so two identical models give
    exactly 0, and a token with q_v = 0 contributes 0 whatever its logits (−inf included).
    """
    lse, lse_ref = _row_lse(z), _row_lse(reference)
    offset = (lse_ref - lse)[:, None]
    step = max(1, -(-z.shape[0] // ENTROPY_SLICES))
    kl = []
    for z_part, ref_part, lse_part, offset_part in zip(
        z.split(step), reference.split(step), lse_ref[:, None].split(step), offset.split(step), strict=True
    ):
        q = (ref_part - lse_part).exp()
        kl.append(torch.where(q > 0, q * (ref_part - z_part - offset_part), 0).sum(-1))
    target = reference.gather(1, targets[:, None])
    peak, log_total = _softmax_(reference)
    return (target - peak - log_total).squeeze(1), torch.cat(kl)  # log q_y as log p_y is formed


def softmax_chunk(
    z: Tensor, targets: Tensor, needs: Needs, reference: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Turn a chunk of fp32 (or fp64) logits ``z [rows, V]`` into its softmax **in place**, with one exp pass.

    Returns ``log p`` of the targets, the log-sum-exp, the softmax (``z``'s storage) and the requested statistics,
    all in ``z``'s dtype whatever autocast says; the only other ``[rows × V]``-sized temporary is a slice of
    ``1/ENTROPY_SLICES`` of the chunk on steps that ask for the entropy. With ``needs.reference``, ``reference``
    holds the reference model's logits for the same rows and becomes its softmax q, in place.
    """
    with full_precision(z.device):
        stats = {}
        if needs.reference:
            if reference is None:
                raise ValueError("statistics of a reference model were requested but no reference logits were given")
            stats["reference_logp"], stats["reference_kl"] = _anchor_chunk(z, reference, targets)
        if needs.top_k:
            stats["topk_entropy"] = topk_entropy(z, needs.top_k)
        target = z.gather(1, targets[:, None])
        if needs.correct:  # a target tied with the maximum is correct, wherever the tie is
            stats["correct"] = (target == z.amax(-1, keepdim=True)).squeeze(1).to(z.dtype)
        peak, log_total = _softmax_(z)
        probs = z
        if needs.entropy:
            step = max(1, -(-probs.shape[0] // ENTROPY_SLICES))
            stats["entropy"] = torch.cat([torch.special.entr(part).sum(-1) for part in probs.split(step)])
        if needs.collision:  # Σ p² = exp(−Rényi-2 entropy), from the softmax at hand, no temporary
            stats["collision"] = torch.bmm(probs[:, None, :], probs[:, :, None]).flatten()
        return (target - peak - log_total).squeeze(1), (peak + log_total).squeeze(1), probs, stats


class _TargetLogProb(torch.autograd.Function):
    """log p_y = z_y − LSE(z) for selected rows, with statistics; backward (onehot − softmax)·g_logp, plus
    (softmax − q)·g_kl for the KL to a reference, chunked."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor, needs: Needs, chunk: int, reference: Tensor | None):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        n = rows.numel()
        logp = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty_like(logp)
        stats: dict[str, list[Tensor]] = {}
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            z = logits.index_select(0, rows[start:stop]).to(dtype)
            z_ref = reference.index_select(0, rows[start:stop]).to(dtype) if needs.reference else None
            t = targets[start:stop]
            logp[start:stop], lse[start:stop], probs, chunk_stats = softmax_chunk(z, t, needs, z_ref)
            for name, value in chunk_stats.items():
                stats.setdefault(name, []).append(value)
            del z, z_ref, probs  # free this chunk before the next one is allocated
        ctx.save_for_backward(logits, rows, targets, lse, reference if needs.reference else None)
        ctx.chunk = chunk
        outputs = [torch.cat(stats[name]) if name in stats else logp.new_empty(0) for name in STAT_NAMES]
        ctx.mark_non_differentiable(
            *[out for name, out in zip(STAT_NAMES, outputs, strict=True) if name != "reference_kl"]
        )
        return (logp, *outputs)

    @staticmethod
    def backward(ctx, grad_logp: Tensor, *grad_stats: Tensor):
        logits, rows, targets, lse, reference = ctx.saved_tensors
        grad_kl = grad_stats[STAT_NAMES.index("reference_kl")] if reference is not None else None
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk):
            stop = min(start + ctx.chunk, rows.numel())
            index = rows[start:stop]
            g = grad_logp[start:stop, None]
            grad = logits.index_select(0, index).to(lse.dtype)
            grad.sub_(lse[start:stop, None]).exp_()  # softmax, in place: one [rows × V] buffer per chunk
            if grad_kl is None:
                grad.mul_(-g)
            else:  # ∂/∂z of g_kl·KL(q ‖ p) is g_kl·(p − q); q − p first: exactly 0 where the reference is the model
                q = reference.index_select(0, index).to(lse.dtype)
                peak, log_total = _softmax_(q.clone())  # the reference's LSE as the forward formed the model's
                q = q.sub_(peak + log_total).exp_().sub_(grad).mul_(grad_kl[start:stop, None])
                grad.mul_(-g).sub_(q)
                del q
            grad.scatter_add_(1, targets[start:stop, None], g)
            grad_logits.index_copy_(0, index, grad.to(logits.dtype))
            del grad
        return grad_logits, None, None, None, None, None


def target_log_probs(
    logits: Tensor,
    targets: Tensor,
    needs: Needs = NO_STATS,
    ignore_index: int | None = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    reference: Tensor | None = None,
) -> tuple[Tensor, TokenStats]:
    """Differentiable target log-probabilities and detached statistics of the rows whose target is kept.

    Args:
        logits: ``[N, V]`` in any float dtype (computation is in fp32, or fp64 for fp64 input).
        targets: ``[N]`` token ids; rows whose target equals ``ignore_index`` are left out.
        needs: the statistics to compute besides log p.
        ignore_index: target value to drop; ``None`` keeps every row.
        chunk_elements: fp32 elements per chunk of logits.
        reference: ``[N, V]`` logits of a reference model at the same positions, for ``needs.reference``.

    Returns:
        ``log p`` of shape ``[n_kept]`` (gradient w.r.t. ``logits``) and the :class:`TokenStats` of the same rows.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        shapes = f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"expected logits [N, V] and targets [N], got {shapes}")
    targets = targets.long()
    if ignore_index is None:
        rows = torch.arange(targets.numel(), device=targets.device)
    else:
        rows = (targets != ignore_index).nonzero().squeeze(1)
    kept = targets.index_select(0, rows)
    if needs.reference and (reference is None or reference.shape != logits.shape):
        got = None if reference is None else tuple(reference.shape)
        raise ValueError(f"needs.reference: expected reference logits of shape {tuple(logits.shape)}, got {got}")
    chunk = chunk_rows(logits.shape[-1], chunk_elements)
    logp, *stats = _TargetLogProb.apply(
        logits, rows, kept, needs, chunk, reference.detach() if needs.reference else None
    )
    computed = dict(zip(STAT_NAMES, stats, strict=True))
    return logp, TokenStats(logp, logits.shape[-1], **{name: computed[name] for name in needs.requested()})
