"""Token-level SFT objectives: NLL, −p, the deformed-log family, DFT, EAFT, Cayley, DEFT, the thresholded and power
f(p) of "Beyond log-likelihood", and the reference-anchored ASFT and PSFT.

Contract (one per objective, torchtune-style): :meth:`Objective.token_loss` maps the *differentiable* target
log-probability ``logp = log p_θ(y|c)`` and *detached* statistics (:class:`TokenStats`) to a per-token loss.
Because only ``logp`` carries gradient, every objective's logit gradient is ``w · (softmax − onehot)`` with the
detached weight ``w = −∂loss/∂logp`` (the paper's gate, Eq. 6–7); :meth:`Objective.weight` returns it.
An objective declares the statistics it reads in ``needs``; the machinery computes only those.

Anchored objectives (``needs.reference``) also read a reference model at the same positions: ``reference_logp``
(detached) and ``reference_kl`` = KL(π_ref ‖ π_θ), whose gradient on the logits is (softmax − π_ref); the
gate of that term, ``∂loss/∂kl``, is the second one :meth:`Objective.loss_and_gates` returns. The reference is the
starting weights, refreshed from the trained ones every ``refresh_reference_every`` steps where that is > 0.

Add your own by subclassing :class:`Objective` and naming it by ``class_path`` in YAML (see README).
"""

from __future__ import annotations

import importlib
import inspect
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from deft_lightning.statistics import NO_STATS, Needs, TokenStats, target_log_probs

__all__ = ["ASFT", "DEFT", "DFT", "EAFT", "NLL", "PSFT", "Cayley", "CayleyReference", "Objective", "Prob", "QLog"]
__all__ += ["OnlyBottomP", "OnlyTopP", "Power"]
__all__ += ["Needs", "TokenStats", "deformed_log_loss"]


class _DeformedLog(torch.autograd.Function):
    """L = −expm1(α·log p)/α with ∂L/∂log p = −exp(α·log p) computed directly: autograd's ``expm1`` backward
    forms exp(x) as expm1(x) + 1, which is exactly 0 once p^α is below the dtype's resolution near 1 (≈ 6e-8 in
    fp32), and DEFT's confident conflicts have gates far smaller than that. α is a constant (the paper's sg)."""

    @staticmethod
    def forward(ctx, logp: Tensor, alpha: Tensor) -> Tensor:
        scaled = alpha * logp
        ctx.save_for_backward(scaled)
        is_zero = alpha == 0
        return torch.where(is_zero, -logp, -torch.expm1(scaled) / torch.where(is_zero, 1, alpha))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scaled,) = ctx.saved_tensors
        return -grad * torch.exp(scaled), None


def deformed_log_loss(logp: Tensor, alpha: Tensor | float) -> Tensor:
    """Eq. 10: L_α(p) = (1 − p^α)/α = −expm1(α·log p)/α, and exactly −log p where α = 0.

    Its gradient is ∂L/∂z_y = −p^α(1 − p) (Eq. 11): gate p^α, to full relative precision however small, times
    error (1 − p). ``alpha`` (a float or per-token tensor) gets no gradient.
    """
    alpha = torch.as_tensor(alpha, dtype=logp.dtype, device=logp.device).detach()
    return _DeformedLog.apply(logp, alpha.expand_as(logp))


class Objective(ABC):
    """A per-token loss ``token_loss(logp, stats)``; see the module docstring for the contract."""

    needs: Needs = NO_STATS
    #: True when a token's loss depends on other tokens' statistics (then the fused path cannot chunk it)
    batch_dependent: bool = False
    #: > 0: copy the trained weights into the reference model every this many optimizer steps (``needs.reference``)
    refresh_reference_every: int = 0

    @abstractmethod
    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        """Per-token loss ``[N]``, differentiable through ``logp`` only."""

    def focus_index(self, stats: TokenStats) -> Tensor | None:
        """The per-token focus index α (detached) for deformed-log objectives; ``None`` for the others."""
        return None

    def loss_and_gates(self, logp: Tensor, stats: TokenStats) -> tuple[Tensor, Tensor, Tensor | None]:
        """Detached per-token loss, gate w = −∂loss/∂logp and, for anchored objectives, the KL term's gate
        ∂loss/∂kl: the logit gradient is w · (softmax − onehot) + ∂loss/∂kl · (softmax − π_ref)."""
        logp = logp.detach().requires_grad_(True)
        inputs = [logp]
        if "reference_kl" in stats:
            kl = stats.reference_kl.detach().requires_grad_(True)
            stats = stats.replaced(reference_kl=kl)
            inputs.append(kl)
        with torch.enable_grad():
            loss = self.token_loss(logp, stats)
            grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
        return loss.detach(), -grads[0], grads[1] if len(grads) > 1 else None

    def weight(self, logp: Tensor, stats: TokenStats) -> Tensor:
        """Detached per-token gate w = −∂loss/∂logp: the logit gradient is w · (softmax − onehot) (+ the KL term's)."""
        return self.loss_and_gates(logp, stats)[1]

    def __call__(self, logits: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor:
        """Reference form on raw tensors: ``logits [N, V]``, ``targets [N]`` (and a reference model's logits for
        anchored objectives) → per-token loss ``[N]`` (no masking)."""
        logp, stats = target_log_probs(logits, targets, self.needs, ignore_index=None, reference=reference)
        return self.token_loss(logp, stats)

    def focus(self, logits: Tensor, targets: Tensor, reference: Tensor | None = None) -> Tensor | None:
        """Per-token α on raw tensors, for logging and analysis; ``None`` if the objective has none."""
        with torch.no_grad():
            _, stats = target_log_probs(logits, targets, self.needs, ignore_index=None, reference=reference)
        return self.focus_index(stats)

    def init_args(self) -> dict[str, Any]:
        """Constructor arguments, read back from attributes of the same names (sklearn's ``get_params`` rule)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "args", "kwargs")]
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise AttributeError(f"{type(self).__name__} must store its constructor arguments {missing} as attributes")
        return {n: getattr(self, n) for n in names}

    def spec(self) -> dict[str, Any]:
        """Plain ``class_path``/``init_args`` form, for hparams and checkpoints."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.init_args().items())})"


def canonical_objective_name(name: str) -> str:
    """Objective names compare with ASCII and Unicode minus alike: ``-p`` is ``−p``."""
    return name.replace("\u2212", "-").strip()


def named_in(names: Any, name: str) -> str:
    """``name`` as spelled among ``names`` (a grid's or config's objectives), ASCII minus accepted; else as given."""
    return next((known for known in names if canonical_objective_name(known) == canonical_objective_name(name)), name)


def ascii_objective_arguments(argv: list[str]) -> list[str]:
    """``--objectives NLL -p`` as typed: argparse would take ``-p`` for an option, so in that list it is ``−p``."""
    rewritten, listing = [], False
    for arg in argv:
        if arg.startswith("--"):
            listing = arg == "--objectives"
        elif listing and arg == "-p":
            arg = "\u2212p"
        rewritten.append(arg)
    return rewritten


def objective_from_spec(spec: Objective | dict[str, Any]) -> Objective:
    """Build an objective from its ``class_path``/``init_args`` form (as stored in hparams)."""
    if isinstance(spec, Objective):
        return spec
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name or __name__), class_name)
    return cls(**spec.get("init_args", {}))


class NLL(Objective):
    """−log p. Gate 1: every token pulls with its full error."""

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return -logp


class Prob(Objective):
    """The paper's "−p": 1 − p (Eq. 10 at α = 1). Gate p."""

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return deformed_log_loss(logp, 1.0)


class QLog(Objective):
    """Deformed log / GCE with a constant α (Eq. 10): (1 − p^α)/α. α = 0 is NLL, α = 1 is −p. Gate p^α."""

    def __init__(self, alpha: float = 0.5) -> None:
        if not alpha >= 0:
            raise ValueError(f"QLog alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return deformed_log_loss(logp, self.alpha)

    def focus_index(self, stats: TokenStats) -> Tensor:
        return torch.full_like(stats.logp, self.alpha)


class DFT(Objective):
    """Dynamic Fine-Tuning (Wu et al.): −sg(p)·log p. Gate p."""

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return -stats.prob * logp


class EAFT(Objective):
    """Entropy-Adaptive FT (Diao et al.): −sg(w)·log p, w = (H_k / ln k)^γ, H_k the top-k softmax entropy."""

    def __init__(self, k: int = 20, gamma: float = 1.0) -> None:
        if k < 2:
            raise ValueError(f"EAFT k must be >= 2, got {k}")
        self.k = k
        self.gamma = gamma
        self.needs = Needs(top_k=k)

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        max_entropy = math.log(min(self.k, stats.vocab_size))  # H_k of a uniform top-k softmax
        weight = (stats.topk_entropy / max_entropy).clamp(0, 1) ** self.gamma
        return -weight * logp


class Cayley(Objective):
    """Eq. 17/19: deformed log with α = sg(α*(p)), α*(p) = (1 − √(1−p))/(1 + √(1−p)) = tanh(−ln(1−p)/4)."""

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return deformed_log_loss(logp, self.focus_index(stats))

    def focus_index(self, stats: TokenStats) -> Tensor:
        error_surprisal = -torch.log(-torch.expm1(stats.logp))  # −ln(1 − p), exact near p = 1
        return torch.tanh(error_surprisal / 4)


class CayleyReference(Objective):
    """The public code's "Cayley_Trans" (REFERENCE.md §2), not Eq. 17: α_loc = p/(2 − p), floor
    f = ½·mean(p) over the tokens it is given (a micro-batch's response tokens), α = clamp(f + (1 − f)·α_loc,
    0.001, 1), detached."""

    batch_dependent = True

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return deformed_log_loss(logp, self.focus_index(stats))

    def focus_index(self, stats: TokenStats) -> Tensor:
        p = stats.prob
        floor = 0.5 * p.mean()
        return (floor + (1 - floor) * p / (2 - p)).clamp(0.001, 1.0)


class DEFT(Objective):
    """Eq. 20: deformed log with α = sg(Σ_v p_v²), the collision probability (exp of −Rényi-2 entropy)."""

    needs = Needs(collision=True)

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return deformed_log_loss(logp, stats.collision)

    def focus_index(self, stats: TokenStats) -> Tensor:
        return stats.collision


class Power(Objective):
    """ "Beyond log-likelihood" (Li et al., arXiv 2510.00526) −p^k, written 1 − p^k so that it is 0 at p = 1:
    k·QLog(k) (Eq. 10), gate k·p^k. k = 1 is −p."""

    def __init__(self, k: float = 2.0) -> None:
        if not k > 0:
            raise ValueError(f"Power k must be > 0, got {k}")
        self.k = k

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return self.k * deformed_log_loss(logp, self.k)


def _thresholded(logp: Tensor, keep: Tensor, log: bool) -> Tensor:
    """1 − p (or −log p) on the kept tokens, 0 on the others; the mask is detached."""
    loss = -logp if log else deformed_log_loss(logp, 1.0)
    return torch.where(keep, loss, 0)


class OnlyTopP(Objective):
    """The DEFT / "Beyond log-likelihood" reference code's ``OnlyTopP-t``: −p on the tokens with sg(p) ≥ t only
    (``log: true``: −log p, ``OnlyTopLogP``). Gate p (or 1) where kept, 0 elsewhere."""

    def __init__(self, threshold: float = 0.5, log: bool = False) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"{type(self).__name__} threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.log = log

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return _thresholded(logp, stats.prob >= self.threshold, self.log)


class OnlyBottomP(OnlyTopP):
    """``OnlyBottomP-t``: −p (``log: true``: −log p) on the tokens with sg(p) < t only."""

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return _thresholded(logp, stats.prob < self.threshold, self.log)


class ASFT(Objective):
    """Anchored SFT (Zhu et al., arXiv 2509.23753): DFT + λ·KL(π_ref ‖ π_θ) per token, π_ref the frozen starting
    weights (a LoRA fit's base, adapters off). Logit gradient p·(softmax − onehot) + λ·(softmax − π_ref)."""

    needs = Needs(reference=True)

    def __init__(self, kl_weight: float = 0.1) -> None:
        if not kl_weight >= 0:
            raise ValueError(f"ASFT kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        return -stats.prob * logp + self.kl_weight * stats.reference_kl


class PSFT(Objective):
    """Proximal SFT (Zhu et al., arXiv 2508.17784): PPO's clipped surrogate with advantage 1,
    −min(r, clip(r, 1 − ε, 1 + ε)), r = π_θ(y)/π_old(y), π_old the weights of ``refresh_every`` steps ago at most
    (a snapshot refreshed every K steps). Gate r where r ≤ 1 + ε, 0 above: a token already pushed past the trust
    region stops pulling until the next refresh. Right after a refresh r = 1, the NLL gradient."""

    needs = Needs(reference=True)

    def __init__(self, epsilon: float = 0.2, refresh_every: int = 4) -> None:
        if not 0 < epsilon < 1 or refresh_every < 1:
            raise ValueError(f"PSFT needs 0 < epsilon < 1 and refresh_every >= 1, got {epsilon}, {refresh_every}")
        self.epsilon = epsilon
        self.refresh_every = refresh_every
        self.refresh_reference_every = refresh_every

    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        log_ratio = logp - stats.reference_logp
        log_ratio = torch.where(torch.isnan(log_ratio), 0, log_ratio)  # p = π_old = 0: ratio 1
        # with a positive advantage only the upper clip binds: −min(r, clip(r, 1−ε, 1+ε)) = −min(r, 1+ε)
        return -log_ratio.clamp(max=math.log1p(self.epsilon)).exp()
