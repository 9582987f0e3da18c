"""What a user would pick instead of the gate, fitted on the calibration (support) set's cached features.

- stacking: one static non-negative weight per backbone, fitted by cross-entropy (a Super Learner whose base
  learners are the frozen zero-shot backbones, so their cross-validated predictions are their plain predictions);
- linear probe: logistic regression on the concatenated normalised embeddings, starting from and pulled back toward
  the zero-shot heads of the mean of logits;
- Tip-Adapter (Zhang et al. 2022, training-free): a cache of the support embeddings per backbone.

Each is fitted on `Features` alone (no backbone runs) and chooses its hyper-parameters from a small grid by
cross-validation on the support set (`cross_validation_folds`), never on test data. Every grid starts at plain logit
averaging (an infinite penalty, alpha 0) and ties go to the earlier entry, so a baseline keeps averaging unless
cross-validation shows a fitted setting doing better. Deterministic for a seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.gate import combine_logits
from .class_head_fits import HEAD_PENALTIES, HEAD_RANK, head_path
from .folds import Features, cross_validation_folds

STACKING = "stacking (static weights)"
LINEAR_PROBE = "linear probe"
TIP_ADAPTER = "Tip-Adapter"

# Penalty on the squared distance of the weights from equal weights 1/B, strongest first (each fit starts from the
# last); an infinite penalty keeps equal weights, i.e. the mean of logits.
STACKING_PENALTIES = (math.inf, 10.0, 1.0, 0.1, 0.0)
# The probe's L2 penalties (each fit from the last, infinite: the mean of logits) and the most directions of the
# embeddings it corrects in, as for a class head.
PROBE_PENALTIES = HEAD_PENALTIES
PROBE_RANK = HEAD_RANK
# Tip-Adapter's grid, in the paper's style but covering the ranges it searched over all its datasets (beta up to
# 7 on ImageNet, 12-50 on others; alpha up to 3 on ImageNet, 10-50 on others). Alpha 0 is the zero-shot ensemble.
TIP_BETAS = (1.0, 2.0, 3.5, 5.5, 8.0, 12.0)
TIP_ALPHAS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0)
_MAX_ITER = 30  # L-BFGS iterations per stacking fit
_CHUNK = 1024  # query rows per Tip-Adapter affinity block


@dataclass
class Baseline:
    """A fitted baseline: `scores(features)` maps test `Features` to (n, C) scores, reading only their embeddings
    and zero-shot logits. `settings` are the hyper-parameters chosen by cross-validation, `cv_accuracy` the mean
    held-out top-1 of every candidate on the support set."""

    name: str
    settings: dict
    cv_accuracy: dict[str, float]
    num_folds: int
    _score: Callable[[Features], torch.Tensor]

    @torch.no_grad()
    def scores(self, features: Features) -> torch.Tensor:
        return self._score(Features(*features))

    def to_dict(self) -> dict:
        return {"settings": self.settings, "cross_validated_accuracy": self.cv_accuracy, "folds": self.num_folds}


def _number(value: float) -> float | str:
    """A setting as JSON allows it: infinity as the string "inf"."""
    return "inf" if math.isinf(value) else value


def _top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def _choose(
    features: Features,
    folds: list[list[int]],
    candidates: Sequence,
    fit_and_score: Callable[[Features, Features], list[torch.Tensor]],
) -> tuple[int, dict[str, float]]:
    """Index of the candidate with the best mean held-out top-1 (first on ties), and every candidate's mean.

    `fit_and_score(train, val)` returns one (len(val), C) score tensor per candidate, in `candidates` order.
    """
    everything = set(range(len(features.labels)))
    hits = np.zeros((len(folds), len(candidates)))
    for f, fold in enumerate(folds):
        train, val = features.subset(sorted(everything - set(fold))), features.subset(fold)
        hits[f] = [_top1(scores, val.labels) for scores in fit_and_score(train, val)]
    means = hits.mean(0)
    return int(means.argmax()), {str(c): round(float(m), 4) for c, m in zip(candidates, means)}


def _lbfgs(parameters: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
    optimizer = torch.optim.LBFGS(parameters, max_iter=_MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


# Stacking ------------------------------------------------------------------------------------------------------


def _stacking_paths(features: Features, penalties: Sequence[float]) -> list[torch.Tensor]:
    """(B,) softplus weights per penalty, minimising cross-entropy + penalty * ||w - 1/B||^2; the first fit starts
    from equal weights 1/B, each next one from the previous one."""
    num_backbones = features.logits.shape[1]
    uniform = 1.0 / num_backbones
    theta = torch.full((num_backbones,), math.log(math.expm1(uniform)), requires_grad=True)
    fitted = []
    for penalty in penalties:

        def loss(penalty: float = penalty) -> torch.Tensor:
            weights = nn.functional.softplus(theta)
            combined = combine_logits(features.logits, weights)
            return nn.functional.cross_entropy(combined, features.labels) + penalty * (weights - uniform).pow(2).sum()

        if not math.isinf(penalty):
            _lbfgs([theta], loss)
        fitted.append(nn.functional.softplus(theta).detach().clone())
    return fitted


def fit_stacking(support: Features, *, seed: int = 0, num_folds: int = 5) -> Baseline:
    """Static non-negative weight per backbone; the penalty toward equal weights is chosen by cross-validation."""
    support = Features(*support)
    folds = cross_validation_folds(support.labels, num_folds, seed)

    def fit_and_score(train: Features, val: Features) -> list[torch.Tensor]:
        return [combine_logits(val.logits, w) for w in _stacking_paths(train, STACKING_PENALTIES)]

    best, cv_accuracy = _choose(support, folds, STACKING_PENALTIES, fit_and_score)
    weights = _stacking_paths(support, STACKING_PENALTIES[: best + 1])[-1]
    settings = {"penalty": _number(STACKING_PENALTIES[best]), "weights": [round(w, 4) for w in weights.tolist()]}
    return Baseline(
        STACKING,
        settings,
        cv_accuracy,
        len(folds),
        lambda features: combine_logits(features.logits, weights),
    )


# Linear probe --------------------------------------------------------------------------------------------------


def _probe_basis(gate_inputs: torch.Tensor, rank: int, seed: int) -> torch.Tensor | None:
    """(sum d_b, r) orthonormal top right singular vectors of the support embeddings; None when r covers them."""
    if min(gate_inputs.shape) <= rank:
        return None
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random sketch; keep the caller's RNG untouched
        torch.manual_seed(seed)
        _, _, basis = torch.svd_lowrank(gate_inputs, q=rank, niter=2)
    return basis


def _probe_paths(
    train: Features, basis: torch.Tensor | None, penalties: Sequence[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (weight (C, r), bias (C,)) correction per penalty, fitted in order, each from the previous one.

    Scores are mean-of-logits + x @ weight.T + bias with x = gate_inputs @ basis: logistic regression on the
    concatenated embeddings whose heads start at (and an L2 penalty pulls them back to) the mean of logits' heads.
    """
    x = train.gate_inputs if basis is None else train.gate_inputs @ basis  # (n, r)
    return head_path(x, train.logits.mean(1), train.labels, penalties)


def _probe_scores(features: Features, basis: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor):
    x = features.gate_inputs if basis is None else features.gate_inputs @ basis
    return torch.addmm(features.logits.mean(1) + bias, x, weight.T)


def fit_linear_probe(support: Features, *, seed: int = 0, num_folds: int = 5) -> Baseline:
    """Zero-shot-anchored logistic regression on the concatenated embeddings; its L2 penalty chosen by CV."""
    support = Features(*support)
    folds = cross_validation_folds(support.labels, num_folds, seed)
    basis = _probe_basis(support.gate_inputs, PROBE_RANK, seed)  # from the support embeddings only, no labels

    def fit_and_score(train: Features, val: Features) -> list[torch.Tensor]:
        return [_probe_scores(val, basis, *fitted) for fitted in _probe_paths(train, basis, PROBE_PENALTIES)]

    best, cv_accuracy = _choose(support, folds, PROBE_PENALTIES, fit_and_score)
    weight, bias = _probe_paths(support, basis, PROBE_PENALTIES[: best + 1])[-1]
    rank = support.gate_inputs.shape[1] if basis is None else basis.shape[1]
    settings = {"penalty": _number(PROBE_PENALTIES[best]), "rank": rank}
    return Baseline(
        LINEAR_PROBE, settings, cv_accuracy, len(folds), lambda features: _probe_scores(features, basis, weight, bias)
    )


# Tip-Adapter ---------------------------------------------------------------------------------------------------


def _cache_terms(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    num_classes: int,
    embed_dims: Sequence[int],
    logit_scales: Sequence[float],
    betas: Sequence[float],
) -> torch.Tensor:
    """(len(betas), n, C) cache logits averaged over backbones: mean_b (s_b / 100) * exp(-beta (1 - q_b @ k_b.T)) @
    onehot(key_labels). The paper's zero-shot logits are 100 cos, ours s_b cos: s_b / 100 keeps alpha on its scale.
    A class with no key gets no cache term."""
    out = torch.zeros(len(betas), num_classes, len(queries))  # built transposed: one row added per key
    scales = [s / 100.0 / len(embed_dims) for s in logit_scales]
    for q, k, scale in zip(queries.split(list(embed_dims), 1), keys.split(list(embed_dims), 1), scales):
        for start in range(0, len(q), _CHUNK):
            affinity = k @ q[start : start + _CHUNK].T  # (n_keys, chunk) cosines
            for i, beta in enumerate(betas):
                cache = torch.exp(-beta * (1.0 - affinity)).mul_(scale)
                out[i, :, start : start + _CHUNK].index_add_(0, key_labels, cache)
    return out.transpose(1, 2)


def fit_tip_adapter(
    support: Features, embed_dims: Sequence[int], logit_scales: Sequence[float], *, seed: int = 0, num_folds: int = 5
) -> Baseline:
    """Training-free Tip-Adapter over every backbone: mean_b (z_b + alpha * cache_b); alpha, beta chosen by CV."""
    support = Features(*support)
    num_classes = support.logits.shape[-1]
    folds = cross_validation_folds(support.labels, num_folds, seed)
    grid = list(itertools.product(TIP_ALPHAS, TIP_BETAS))

    def fit_and_score(train: Features, val: Features) -> list[torch.Tensor]:
        terms = _cache_terms(
            val.gate_inputs, train.gate_inputs, train.labels, num_classes, embed_dims, logit_scales, TIP_BETAS
        )
        zero_shot = val.logits.mean(1)
        return [zero_shot + alpha * terms[TIP_BETAS.index(beta)] for alpha, beta in grid]

    best, cv_accuracy = _choose(support, folds, [f"alpha={a:g}, beta={b:g}" for a, b in grid], fit_and_score)
    alpha, beta = grid[best]
    keys, key_labels = support.gate_inputs.clone(), support.labels.clone()

    def score(features: Features) -> torch.Tensor:
        term = _cache_terms(features.gate_inputs, keys, key_labels, num_classes, embed_dims, logit_scales, [beta])
        return features.logits.mean(1) + alpha * term[0]

    return Baseline(TIP_ADAPTER, {"alpha": alpha, "beta": beta}, cv_accuracy, len(folds), score)


def fit_baselines(
    support: Features,
    embed_dims: Sequence[int],
    logit_scales: Sequence[float] | None = None,
    *,
    seed: int = 0,
    num_folds: int = 5,
) -> dict[str, Baseline]:
    """Stacking, the linear probe and Tip-Adapter fitted on `support` (cached features of the calibration images),
    by name. `embed_dims` splits `support.gate_inputs` per backbone; `logit_scales` are the backbones' logit scales
    (default 100, OpenAI CLIP's)."""
    support = Features(*(t.detach().float().cpu() if t.is_floating_point() else t.cpu() for t in support))
    if support.gate_inputs.shape[1] != sum(embed_dims):
        raise ValueError(
            f"support.gate_inputs has width {support.gate_inputs.shape[1]} but embed_dims {list(embed_dims)} sum to "
            f"{sum(embed_dims)}; pass the backbones' embedding widths in order."
        )
    logit_scales = [100.0] * len(embed_dims) if logit_scales is None else [float(s) for s in logit_scales]
    if len(logit_scales) != len(embed_dims):
        raise ValueError(f"{len(logit_scales)} logit_scales for {len(embed_dims)} backbones; give one per backbone.")
    fitted = [
        fit_stacking(support, seed=seed, num_folds=num_folds),
        fit_linear_probe(support, seed=seed, num_folds=num_folds),
        fit_tip_adapter(support, embed_dims, logit_scales, seed=seed, num_folds=num_folds),
    ]
    return {baseline.name: baseline for baseline in fitted}


__all__ = [
    "LINEAR_PROBE",
    "STACKING",
    "TIP_ADAPTER",
    "Baseline",
    "fit_baselines",
    "fit_linear_probe",
    "fit_stacking",
    "fit_tip_adapter",
]
