"""Full-batch fits of a handful of parameters on cached logits: the inverse temperature at which an untrained
candidate is scored, and static weights (one per backbone) along a path of penalties. On a few hundred images each
fit costs more in overhead than in arithmetic, and calibration makes dozens of them (per fold, and per prefix of the
backbones for a cascade), so their gradients are given in closed form."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..models.gate import EnsembleGate, combine_logits

MAX_ITER = 20  # L-BFGS iterations per fit (each fit starts from the previous penalty's)


def fit_inverse_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The t > 0 that minimises the cross-entropy of t * logits ((n, C), (n,)): it changes no answer, only how
    confident the answers are.

    The cross-entropy is convex in t, with slope mean_i(E_p[z_i] - z_i,label) and curvature mean_i Var_p(z_i) under
    p = softmax(t * z_i). Where its minimum lies inside [e^-10, e^10], Newton's method finds it in a few steps, kept
    inside a shrinking bracket of it (a geometric bisection where a step would leave it), in about a tenth of L-BFGS's
    time. Where it does not (every answer right: the cross-entropy falls as t grows without end), the scale is where
    L-BFGS on log t stops (`fit_log_temperature_lbfgs`)."""
    rows = torch.arange(len(labels), device=logits.device)
    label_logits = logits[rows, labels]

    def slope_and_curvature(t: float) -> tuple[float, float]:
        probs = (t * logits).softmax(-1)
        expected = (probs * logits).sum(-1)
        variance = (probs * logits.square()).sum(-1) - expected.square()
        return float((expected - label_logits).mean()), float(variance.clamp_min(0).mean())

    low, high = math.exp(-10), math.exp(10)
    if slope_and_curvature(low)[0] >= 0 or slope_and_curvature(high)[0] <= 0:
        return fit_log_temperature_lbfgs(logits, labels)
    t = 1.0
    for _ in range(100):
        slope, curvature = slope_and_curvature(t)
        if abs(slope) * t <= 1e-7:  # L-BFGS's tolerance on the gradient in log t
            break
        low, high = (t, high) if slope < 0 else (low, t)
        step = t - slope / curvature if curvature > 0 else low
        t = step if low < step < high else math.sqrt(low * high)
        if high / low < 1 + 1e-7:
            break
    return t


def fit_log_temperature_lbfgs(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """`fit_inverse_temperature` by L-BFGS on log t from t = 1, clamped to [e^-10, e^10]: where the minimum is not
    inside, the scale where its tolerances stop."""
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits * log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(-10, 10).exp())


def lbfgs_with_gradient(
    parameter: torch.Tensor,
    loss_and_gradient: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    max_iter: int = MAX_ITER,
    tolerance_grad: float = 1e-5,
    tolerance_change: float = 1e-6,
):
    """Full-batch L-BFGS (at most `max_iter` iterations, strong Wolfe line search) on `parameter`, updated in place;
    `loss_and_gradient()` gives the loss at its current value and the gradient in it."""
    optimizer = torch.optim.LBFGS(
        [parameter],
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss, parameter.grad = loss_and_gradient()
        return loss

    optimizer.step(closure)


def static_loss_and_gradient(
    gate: EnsembleGate, bias: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of (n, B, C) `logits` combined under the static weights of output bias `bias` ((B,)), plus
    `penalty` * ||weights - 1/B||^2, and its (B,) gradient in `bias`, in closed form: on these small problems
    autograd's bookkeeping costs more than the loss itself. d cross-entropy / d w_b = mean_i sum_c (p_ic - y_ic) z_ibc,
    then through the activation's Jacobian."""
    weights = gate.activate(bias)
    rows = torch.arange(len(labels), device=logits.device)
    log_probs = combine_logits(logits, weights.expand(len(labels), -1)).log_softmax(-1)  # (n, C)
    loss = -log_probs[rows, labels].mean() + penalty * (weights - 1.0 / len(bias)).pow(2).sum()
    residual = log_probs.exp_()  # p - one_hot(label): n times the cross-entropy's gradient in the combined logits
    residual[rows, labels] -= 1
    by_weight = (logits @ residual[:, :, None]).squeeze(-1).mean(0) + 2 * penalty * (weights - 1.0 / len(bias))
    if gate.combination == "softplus":  # d softplus(b) / db = sigmoid(b), elementwise
        return loss, by_weight * torch.sigmoid(bias)
    return loss, weights * (by_weight - (weights * by_weight).sum())  # softmax's Jacobian, diag(w) - w w^T


def static_path(gate: EnsembleGate, logits: torch.Tensor, labels: torch.Tensor, penalties: Sequence[float]):
    """(B,) output biases of static weights fitted on (n, B, C) logits, one per penalty, strongest first, each fit
    starting from the previous one; an infinite penalty keeps equal weights (the gate's initial bias)."""
    bias = torch.full((logits.shape[1],), gate.averaging_bias, device=logits.device)
    fitted = []
    for penalty in penalties:
        if not math.isinf(penalty):
            lbfgs_with_gradient(
                bias, lambda penalty=penalty: static_loss_and_gradient(gate, bias, logits, labels, penalty)
            )
        fitted.append(bias.clone())
    return fitted


def static_logits(gate: EnsembleGate, bias: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(n, C) combined logits of (n, B, C) `logits` under the static weights of output bias `bias`."""
    return combine_logits(logits, gate.activate(bias).expand(len(logits), -1))


__all__ = [
    "MAX_ITER",
    "fit_inverse_temperature",
    "fit_log_temperature_lbfgs",
    "lbfgs_with_gradient",
    "static_logits",
    "static_loss_and_gradient",
    "static_path",
]
