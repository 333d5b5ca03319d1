"""Token-level SFT objectives: NLL, −p, the deformed-log family, DFT, EAFT, Cayley and DEFT.

Contract (one per objective, torchtune-style): :meth:`Objective.token_loss` maps the *differentiable* target
log-probability ``logp = log p_θ(y|c)`` and *detached* statistics (:class:`TokenStats`) to a per-token loss.
Because only ``logp`` carries gradient, every objective's logit gradient is ``w · (softmax − onehot)`` with the
detached weight ``w = −∂loss/∂logp`` (the paper's gate, Eq. 6–7); :meth:`Objective.weight` returns it.
An objective declares the statistics it reads in ``needs``; the machinery computes only those.

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

__all__ = ["DEFT", "DFT", "EAFT", "NLL", "Cayley", "CayleyReference", "Objective", "Prob", "QLog"]
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

    @abstractmethod
    def token_loss(self, logp: Tensor, stats: TokenStats) -> Tensor:
        """Per-token loss ``[N]``, differentiable through ``logp`` only."""

    def focus_index(self, stats: TokenStats) -> Tensor | None:
        """The per-token focus index α (detached) for deformed-log objectives; ``None`` for the others."""
        return None

    def loss_and_weight(self, logp: Tensor, stats: TokenStats) -> tuple[Tensor, Tensor]:
        """Detached per-token loss and gate w = −∂loss/∂logp (the logit gradient is w · (softmax − onehot))."""
        logp = logp.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.token_loss(logp, stats)
            (grad,) = torch.autograd.grad(loss.sum(), logp)
        return loss.detach(), -grad

    def weight(self, logp: Tensor, stats: TokenStats) -> Tensor:
        """Detached per-token gate w = −∂loss/∂logp: the logit gradient is w · (softmax − onehot)."""
        return self.loss_and_weight(logp, stats)[1]

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Reference form on raw tensors: ``logits [N, V]``, ``targets [N]`` → per-token loss ``[N]`` (no masking)."""
        logp, stats = target_log_probs(logits, targets, self.needs, ignore_index=None)
        return self.token_loss(logp, stats)

    def focus(self, logits: Tensor, targets: Tensor) -> Tensor | None:
        """Per-token α on raw tensors, for logging and analysis; ``None`` if the objective has none."""
        with torch.no_grad():
            _, stats = target_log_probs(logits, targets, self.needs, ignore_index=None)
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
