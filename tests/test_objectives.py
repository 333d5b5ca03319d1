"""The paper's identities for every objective, finite differences, numerics and properties over random logits."""

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deft_lightning.objectives import (
    ASFT,
    DEFT,
    DFT,
    EAFT,
    NLL,
    PSFT,
    Cayley,
    CayleyReference,
    Needs,
    Objective,
    OnlyBottomP,
    OnlyTopP,
    Power,
    Prob,
    QLog,
    objective_from_spec,
)
from deft_lightning.statistics import target_log_probs

ALL = [
    NLL(),
    Prob(),
    QLog(0.0),
    QLog(0.3),
    QLog(1.0),
    DFT(),
    EAFT(),
    EAFT(k=5, gamma=2.0),
    Cayley(),
    CayleyReference(),
    DEFT(),
    Power(2.0),
    Power(0.5),
    OnlyTopP(0.3),
    OnlyTopP(0.3, log=True),
    OnlyBottomP(0.3),
    OnlyBottomP(0.3, log=True),
]


def reference_gate(objective: Objective, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each objective's gate written out from REFERENCE.md §1, independently of the implementation."""
    q = torch.softmax(logits.double(), -1)
    p = q.gather(1, targets[:, None]).squeeze(1)
    if isinstance(objective, NLL):
        return torch.ones_like(p)
    if isinstance(objective, Prob | DFT):
        return p
    if isinstance(objective, QLog):
        return p**objective.alpha
    if isinstance(objective, EAFT):
        k = min(objective.k, logits.shape[-1])
        top = logits.double().topk(k, -1).values
        shifted = top - top[:, :1]
        log_q = shifted - torch.log1p(shifted[:, 1:].exp().sum(-1, keepdim=True))  # exact LSE when one dominates
        return (-(log_q.exp() * log_q).sum(-1) / math.log(k)) ** objective.gamma
    if isinstance(objective, Cayley):
        root = torch.sqrt(1 - p)
        return p ** ((1 - root) / (1 + root))  # Eq. 17
    if isinstance(objective, CayleyReference):
        floor = 0.5 * p.mean()
        return p ** (floor + (1 - floor) * p / (2 - p)).clamp(0.001, 1)
    if isinstance(objective, DEFT):
        return p ** (q**2).sum(-1)  # Eq. 20
    if isinstance(objective, Power):  # −p^k
        return objective.k * p**objective.k
    if isinstance(objective, OnlyTopP):
        keep = p < objective.threshold if isinstance(objective, OnlyBottomP) else p >= objective.threshold
        return keep * (torch.ones_like(p) if objective.log else p)
    raise AssertionError(objective)


def logit_grad(objective: Objective, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(logits, targets).sum(), logits)
    return grad


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_gradient_is_gate_times_error(objective):
    """Eq. 6-7: ∂loss/∂z = gate · (softmax − onehot), with the paper's gate for each objective."""
    torch.manual_seed(0)
    logits, targets = torch.randn(32, 40, dtype=torch.float64) * 3, torch.randint(0, 40, (32,))
    error = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets, 40)
    gate = reference_gate(objective, logits, targets)
    torch.testing.assert_close(logit_grad(objective, logits, targets), gate[:, None] * error)
    logp, stats = target_log_probs(logits, targets, objective.needs, ignore_index=None)
    torch.testing.assert_close(objective.weight(logp, stats), gate)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_eq11_target_logit_gradient(alpha):
    """Eq. 11: ∂L_α/∂z_y = −p^α(1 − p)."""
    torch.manual_seed(1)
    logits, targets = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 10, (16,))
    p = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    grad = logit_grad(QLog(alpha), logits, targets).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(grad, -(p**alpha) * (1 - p))


def test_alpha_limits():
    torch.manual_seed(2)
    logits, targets = torch.randn(64, 30, dtype=torch.float64), torch.randint(0, 30, (64,))
    nll = NLL()(logits, targets)
    assert torch.equal(QLog(0.0)(logits, targets), nll)  # α = 0 is NLL exactly
    torch.testing.assert_close(QLog(1e-9)(logits, targets), nll, rtol=1e-7, atol=1e-7)  # continuous limit
    p = torch.softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(QLog(1.0)(logits, targets), 1 - p)  # α = 1 is the linear loss
    torch.testing.assert_close(Prob()(logits, targets), 1 - p)
    torch.testing.assert_close(QLog(0.5)(logits, targets), 2 * (1 - p.sqrt()))  # Hellinger form


def targets_for(p: torch.Tensor, vocab: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits over `vocab` tokens whose target (id 0) has probability exactly `p` (others uniform)."""
    logits = torch.zeros(len(p), vocab, dtype=torch.float64)
    logits[:, 0] = torch.log(p) - torch.log((1 - p) / (vocab - 1))
    return logits, torch.zeros(len(p), dtype=torch.long)


def test_cayley_focus_index():
    """Eq. 17 = Eq. 19; Prop. 4: α* = p/4 + O(p²), strictly increasing; Cor. 1 limits of the gate."""
    p = torch.linspace(1e-4, 1 - 1e-4, 501, dtype=torch.float64)
    alpha = Cayley().focus(*targets_for(p))
    root = torch.sqrt(1 - p)
    torch.testing.assert_close(alpha, (1 - root) / (1 + root))
    torch.testing.assert_close(alpha, torch.tanh(-torch.log1p(-p) / 4))
    assert (alpha.diff() > 0).all()
    small = torch.tensor([1e-3, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(
        Cayley().focus(*targets_for(small)) / small, torch.full_like(small, 0.25), rtol=1e-3, atol=0
    )
    gate_low = small ** Cayley().focus(*targets_for(small))
    assert (gate_low > 0.997).all()  # p^α* → 1 as p → 0 (NLL-like)
    high = torch.tensor([1 - 1e-6], dtype=torch.float64)
    assert abs((high ** Cayley().focus(*targets_for(high))) / high - 1) < 1e-3  # p^α*/p → 1 as p → 1


def test_deft_focus_index_prop9():
    """Prop. 9: Σ p_v² = p² + (1 − p)²·S_tail with S_tail ∈ [1/(V−1), 1]; α ∈ [1/V, 1]."""
    torch.manual_seed(3)
    vocab = 50
    logits, targets = torch.randn(128, vocab, dtype=torch.float64) * 4, torch.randint(0, vocab, (128,))
    q = torch.softmax(logits, -1)
    p = q.gather(1, targets[:, None]).squeeze(1)
    tail = q.scatter(1, targets[:, None], 0.0) / (1 - p)[:, None]
    s_tail = (tail**2).sum(-1)
    alpha = DEFT().focus(logits, targets)
    torch.testing.assert_close(alpha, p**2 + (1 - p) ** 2 * s_tail)
    assert (s_tail >= 1 / (vocab - 1) - 1e-12).all() and (s_tail <= 1 + 1e-12).all()
    assert (alpha >= 1 / vocab - 1e-12).all() and (alpha <= 1).all()


@pytest.mark.parametrize("eps", [0.2, 0.05, 0.01])
def test_prop10_conflict_suppression(eps):
    """Prop. 10: a confident competitor (p_v* ≥ 1 − ε) forces α ≥ (1 − ε)², so DEFT's signal p^α(1 − p) ≤
    p^{(1−ε)²}(1 − p) → 0 as p → 0, while Cayley's signal → 1."""
    p_target = torch.tensor([1e-2, 1e-4, 1e-6], dtype=torch.float64)
    vocab = 100
    logits = torch.full((3, vocab), -30.0, dtype=torch.float64)
    logits[:, 0] = torch.log(p_target)
    logits[:, 1] = torch.log(1 - eps - p_target).clamp(min=math.log(1 - eps))  # competitor with p ≥ 1 − ε
    logits -= torch.logsumexp(logits, -1, keepdim=True)
    targets = torch.zeros(3, dtype=torch.long)
    q = torch.softmax(logits, -1)
    assert (q[:, 1] >= 1 - eps - 1e-9).all()
    p = q[:, 0]
    assert (DEFT().focus(logits, targets) >= (1 - eps) ** 2 - 1e-12).all()
    signal = -logit_grad(DEFT(), logits, targets)[:, 0]
    assert (signal <= p ** ((1 - eps) ** 2) * (1 - p) + 1e-12).all()
    assert signal[-1] < 1e-4 * 10 ** (6 * (1 - (1 - eps) ** 2))  # vanishes with p
    cayley_signal = -logit_grad(Cayley(), logits, targets)[:, 0]
    assert cayley_signal[-1] > 0.99


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_finite_differences(objective):
    """Central differences of loss(z) with the detached statistics frozen at z₀ match the analytic gradient."""
    torch.manual_seed(4)
    logits, targets = torch.randn(6, 12, dtype=torch.float64) * 2, torch.randint(0, 12, (6,))
    _, frozen = target_log_probs(logits, targets, objective.needs, ignore_index=None)

    def loss(z):
        logp = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
        return objective.token_loss(logp, frozen).sum()

    numeric = torch.zeros_like(logits)
    h = 1e-6
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            step = torch.zeros_like(logits)
            step[i, j] = h
            numeric[i, j] = (loss(logits + step) - loss(logits - step)) / (2 * h)
    torch.testing.assert_close(logit_grad(objective, logits, targets), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("objective", ALL, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite(objective, dtype):
    """p → 0 and p → 1 exactly, logits up to ±1e4, low-precision input: loss and gradient finite, fp32 out."""
    logits = torch.tensor(
        [[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]], dtype=dtype
    )
    targets = torch.tensor([0, 0, 2, 0])
    logits.requires_grad_(True)
    loss = objective(logits, targets)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    assert loss[0] == 0  # p = 1: nothing to learn
    alpha = objective.focus(logits.detach(), targets)
    if alpha is not None:
        assert torch.isfinite(alpha).all() and (alpha >= 0).all() and (alpha <= 1 + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.integers(2, 50_000),
    rows=st.integers(1, 4),
    scale=st.floats(0.01, 50.0),
    seed=st.integers(0, 2**16),
    index=st.integers(0, len(ALL) - 1),
)
def test_property_gate_times_error(vocab, rows, scale, seed, index):
    objective = ALL[index]
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    grad = logit_grad(objective, logits, targets)
    assert torch.isfinite(grad).all()
    error = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets, vocab)
    torch.testing.assert_close(grad, reference_gate(objective, logits, targets)[:, None] * error)
    loss = objective(logits, targets)
    assert torch.isfinite(loss).all() and (loss >= -1e-12).all()


def test_statistics_against_direct_formulas_and_chunking():
    torch.manual_seed(5)
    logits, targets = torch.randn(37, 300) * 3, torch.randint(0, 300, (37,))
    targets[::4] = -100
    needs = Needs(entropy=True, collision=True, top_k=20, correct=True)
    logp, stats = target_log_probs(logits, targets, needs, chunk_elements=300 * 5)  # uneven chunks of 5 rows
    kept = targets != -100
    z, y = logits[kept].double(), targets[kept]
    q = torch.softmax(z, -1)
    close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5, check_dtype=False)  # fp32 vs fp64
    close(logp.double(), q.log().gather(1, y[:, None]).squeeze(1))
    close(stats.entropy.double(), -(q * q.log()).sum(-1))
    close(stats.collision.double(), (q**2).sum(-1))
    top = torch.softmax(z.topk(20, -1).values, -1)
    close(stats.topk_entropy.double(), -(top * top.log()).sum(-1))
    close(stats.correct, (z.argmax(-1) == y).float())

    whole = torch.autograd.grad(target_log_probs(logits.requires_grad_(), targets)[0].sum(), logits)[0]
    chunked = torch.autograd.grad(target_log_probs(logits, targets, chunk_elements=300 * 3)[0].sum(), logits)[0]
    torch.testing.assert_close(whole, chunked)
    assert (whole[~kept] == 0).all()


def test_missing_statistic_says_what_to_declare():
    class Forgetful(Objective):
        def token_loss(self, logp, stats):
            return -stats.collision * logp

    with pytest.raises(AttributeError, match=r"declare it in the objective's `needs`"):
        Forgetful()(torch.randn(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_spec_round_trip(objective):
    rebuilt = objective_from_spec(objective.spec())
    assert type(rebuilt) is type(objective) and repr(rebuilt) == repr(objective)
    torch.manual_seed(6)
    logits, targets = torch.randn(4, 9), torch.randint(0, 9, (4,))
    torch.testing.assert_close(rebuilt(logits, targets), objective(logits, targets))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        QLog(-0.1)
    with pytest.raises(ValueError, match="k must be > 0"):
        Power(0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        OnlyBottomP(1.5)
    with pytest.raises(ValueError, match="epsilon"):
        PSFT(epsilon=1.0)
    with pytest.raises(ValueError, match="kl_weight"):
        ASFT(-1)
    with pytest.raises(ValueError, match="k must be >= 2"):
        EAFT(k=1)


# ---------------------------------------------------------------- anchored objectives: a reference model's logits


def anchored_case(seed: int = 7, rows: int = 24, vocab: int = 30):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    reference = logits + torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 0.7
    return logits, torch.randint(0, vocab, (rows,), generator=generator), reference


def explicit_asft(logits, targets, reference, kl_weight):
    """DFT + λ·KL(π_ref ‖ π_θ) written with torch's own ops (ASFT's code: F.kl_div(log π_θ, π_ref))."""
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    kl = torch.nn.functional.kl_div(logp_all, torch.softmax(reference, -1), reduction="none").sum(-1)
    return -logp.detach().exp() * logp + kl_weight * kl


@pytest.mark.parametrize("kl_weight", [0.0, 0.1, 2.0])
def test_asft_gradient_is_dft_plus_kl_pull_toward_the_reference(kl_weight):
    logits, targets, reference = anchored_case()
    objective = ASFT(kl_weight)
    torch.testing.assert_close(
        objective(logits, targets, reference), explicit_asft(logits, targets, reference, kl_weight)
    )
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(z, targets, reference).sum(), z)
    softmax, onehot = torch.softmax(logits, -1), torch.nn.functional.one_hot(targets, logits.shape[-1])
    p = softmax.gather(1, targets[:, None])
    torch.testing.assert_close(grad, p * (softmax - onehot) + kl_weight * (softmax - torch.softmax(reference, -1)))
    logp, stats = target_log_probs(logits, targets, objective.needs, ignore_index=None, reference=reference)
    _, gate, anchor_gate = objective.loss_and_gates(logp, stats)
    torch.testing.assert_close(gate, p.squeeze(1))
    torch.testing.assert_close(anchor_gate, torch.full_like(gate, kl_weight))


def test_asft_limits_kl_weight_zero_is_dft_and_an_identical_reference_adds_exactly_nothing():
    logits, targets, reference = anchored_case()
    assert torch.equal(ASFT(0.0)(logits, targets, reference), DFT()(logits, targets))
    _, stats = target_log_probs(logits, targets, ASFT.needs, ignore_index=None, reference=logits.clone())
    assert torch.equal(stats.reference_kl, torch.zeros_like(stats.reference_kl))  # not merely ≈ 0
    assert torch.equal(ASFT(0.5)(logits, targets, logits.clone()), DFT()(logits, targets))


def test_psft_gate_is_the_ratio_inside_the_trust_region_and_zero_above():
    logits, targets, reference = anchored_case()
    objective = PSFT(epsilon=0.2)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(z, targets, reference).sum(), z)
    softmax, onehot = torch.softmax(logits, -1), torch.nn.functional.one_hot(targets, logits.shape[-1])
    ratio = (softmax / torch.softmax(reference, -1)).gather(1, targets[:, None]).squeeze(1)
    assert (ratio > 1.2).any() and (ratio <= 1.2).any()  # both sides of the clip are exercised
    gate = torch.where(ratio <= 1.2, ratio, 0)
    torch.testing.assert_close(grad, gate[:, None] * (softmax - onehot))
    torch.testing.assert_close(objective(logits, targets, reference), -torch.minimum(ratio, ratio.clamp(0.8, 1.2)))
    # right after a refresh (π_old = π_θ) the ratio is 1 and PSFT's gradient is NLL's
    (fresh,) = torch.autograd.grad(objective(z, targets, logits.clone()).sum(), z)
    torch.testing.assert_close(fresh, softmax - onehot)


@pytest.mark.parametrize("objective", [ASFT(), ASFT(kl_weight=1.5), PSFT(), PSFT(epsilon=0.05)], ids=repr)
def test_anchored_finite_differences(objective):
    """Central differences of loss(z), the reference and the detached statistics frozen at z₀, match autograd —
    the KL term differentiated for real, not through the gate."""
    logits, targets, reference = anchored_case(seed=8, rows=5, vocab=9)
    _, frozen = target_log_probs(logits, targets, objective.needs, ignore_index=None, reference=reference)
    q = torch.softmax(reference, -1)

    def loss(z):
        logp_all = torch.log_softmax(z, -1)
        kl = (q * (q.log() - logp_all)).sum(-1)
        return objective.token_loss(logp_all.gather(1, targets[:, None]).squeeze(1), frozen.replaced(reference_kl=kl))

    numeric = torch.zeros_like(logits)
    h = 1e-6
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            step = torch.zeros_like(logits)
            step[i, j] = h
            numeric[i, j] = (loss(logits + step).sum() - loss(logits - step).sum()) / (2 * h)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(z, targets, reference).sum(), z)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("objective", [ASFT(), PSFT()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_anchored_extreme_logits_are_finite(objective, dtype):
    """p → 0 and p → 1 exactly under the model and the reference (a token masked to −inf in both): finite, fp32."""
    logits = torch.tensor(
        [[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, -float("inf")]],
        dtype=dtype,
    )
    targets = torch.tensor([0, 0, 2, 0])
    uniform = torch.zeros_like(logits).masked_fill(logits.isinf(), -float("inf"))
    for reference in (logits.clone(), logits.flip(0), uniform):
        z = logits.clone().requires_grad_(True)
        loss = objective(z, targets, reference)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (reference, loss, grad)


def test_anchored_objectives_say_they_need_a_reference():
    with pytest.raises(ValueError, match="reference"):
        ASFT()(torch.randn(3, 5), torch.tensor([0, 1, 2]))
