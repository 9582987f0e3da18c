"""Fitting on cached features: cross-validation folds, full-batch fits of static weights and of the gate, and the
choice between the gate, static per-backbone weights, plain averaging and the best backbone that calibration makes
from the calibration data alone."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..models.cascade import margins
from ..models.gate import EnsembleGate, combine_logits


class Features(NamedTuple):
    """Cached calibration features; no backbone runs while fitting on them."""

    gate_inputs: torch.Tensor  # (n, sum d_b) concatenated normalised image embeddings
    logits: torch.Tensor  # (n, B, C) per-backbone zero-shot logits
    labels: torch.Tensor  # (n,) class indices

    def subset(self, index) -> Features:
        return Features(*(t[index] for t in self))

    def of_backbones(self, embed_dims: list[int], backbones: list[int]) -> Features:
        """The features of `backbones` alone, in that order: their gate-input columns and their logits."""
        starts = np.cumsum([0, *embed_dims])
        columns = [c for b in backbones for c in range(starts[b], starts[b + 1])]
        return Features(self.gate_inputs[:, columns], self.logits[:, list(backbones)], self.labels)


def cross_validation_folds(labels: torch.Tensor | list[int], num_folds: int = 5, seed: int = 0) -> list[list[int]]:
    """Split example indices into `min(num_folds, n)` folds, stratified by class, that also work at 1 shot.

    Within each class the examples are shuffled and dealt to consecutive folds, each class starting where the
    previous one stopped, so a class with k < num_folds examples lands in k different folds and every fold gets
    about n / num_folds examples.
    The gate does not depend on the labels, so a fold may hold a class that its training part lacks.
    """
    labels = torch.as_tensor(labels).cpu().numpy()
    num_folds = min(num_folds, len(labels))
    if num_folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 labelled examples, got {len(labels)}.")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c)).tolist()
        for rank, index in enumerate(members):
            folds[(offset + rank) % num_folds].append(index)
        offset += len(members)  # the next class starts where this one stopped, keeping folds balanced
    return [sorted(fold) for fold in folds]


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
STATIC_WEIGHTS = "static weights"
GATE = "gate"

# Static weights: softplus(b) per backbone (the gate's output bias, its output weights zero), fitted to convergence
# by full-batch L-BFGS on cross-entropy + penalty * ||weights - 1/B||^2. The penalty is chosen by cross-validation
# among these, strongest first, a factor of about 30 apart; each fit starts from the previous one (inf: equal weights,
# plain averaging).
STATIC_PENALTIES = (math.inf, 1.0, 0.03, 0.001)
# The gate: its hidden layer is set to the principal directions of the calibration embeddings (both signs, so that
# the ReLU passes every projection), and its output layer is fitted by full-batch L-BFGS on cross-entropy +
# penalty * ||output weights||^2 + the static weights' penalty on its output bias. The penalty is chosen by
# cross-validation among these, strongest first, from the static weights (inf: the gate is static weights). The
# weakest reaches further than for static weights: the gate has more to route with when the backbones are right on
# different images.
GATE_PENALTIES = (math.inf, 1.0, 0.03, 0.001, 0.0001)
MAX_ITER = 20  # L-BFGS iterations per fit (each fit starts from the previous penalty's)
# Training on more classes than this keeps, per image, the classes that some backbone ranks high (and its label): the
# others have a negligible probability under any combination. Scoring always uses every class.
TRAIN_CLASSES = 16
# From this many calibration examples on, one held-out quarter replaces k-fold cross-validation: the estimate is
# already precise, and paper-scale calibration (16,000 examples) stays within seconds.
SINGLE_SPLIT_FROM = 2000
PCA_ROWS = 1024  # principal directions are computed on at most this many calibration embeddings
# A candidate replaces a simpler one when right more often out of fold by this many standard errors (McNemar z).
MIN_WIN_Z = 1.0


class OutOfFold(NamedTuple):
    """A fitted combination's answers on the examples cross-validation scored, each from a model fitted without it."""

    index: torch.Tensor  # (m,) the scored examples (all of them with k folds; one quarter with a single split)
    predictions: torch.Tensor  # (m,) class indices
    margins: torch.Tensor  # (m,) top-1 minus top-2 combined logit

    @classmethod
    def of(cls, index: torch.Tensor, logits: torch.Tensor) -> OutOfFold:
        """From (m, C) out-of-fold combined logits of the examples `index`."""
        return cls(index, logits.argmax(-1), margins(logits))


@dataclass
class GateChoice:
    """What `fit_calibrated_gate` chose and why.

    `cv_loss` is each candidate's mean cross-entropy on the held-out examples; `cv_accuracy` and `cv_spread` are
    the mean and standard deviation over folds of its top-1 there; the choice compares top-1, then cross-entropy.
    Everything is out of fold: the gate, the static weights (and their penalties) and the best backbone are chosen
    and fitted without the examples they are scored on (plain averaging has nothing to fit), and the untrained
    candidates' confidence (an inverse temperature) too.
    """

    chosen: str  # GATE, STATIC_WEIGHTS, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_loss: dict[str, float]
    cv_accuracy: dict[str, float]
    cv_spread: dict[str, float]
    num_folds: int  # folds whose held-out part was scored (1: a single held-out quarter)
    settings: dict = field(default_factory=dict)  # the chosen candidate's fitting settings, when it was fitted
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples
    # The chosen candidate's answers out of fold, from which the cascade fits its stopping rule.
    out_of_fold: OutOfFold | None = field(default=None, repr=False, compare=False)


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        gate.fc2.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13; a softmax weight of ~e-30
        gate.fc2.bias[backbone] = math.log(math.e - 1) if gate.combination == "softplus" else 0.0


def _fit_inverse_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The t > 0 that minimises the cross-entropy of t * logits ((n, C), (n,)): it changes no answer, only how
    confident the answers are."""
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


def _lbfgs(parameters: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
    optimizer = torch.optim.LBFGS(
        parameters, max_iter=MAX_ITER, tolerance_grad=1e-5, tolerance_change=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)


def _principal_layer(gate_inputs: torch.Tensor, hidden_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A hidden layer (weight (H, D), bias (H,)) whose units are ReLU(+-p_j) for the projections p_j of the centred
    embeddings on their top H // 2 principal directions (fewer when the embeddings span fewer), scaled so that the
    first has unit spread; unused units are zero. Label-free: computed once from all calibration embeddings."""
    x = gate_inputs.float()
    if len(x) > PCA_ROWS:  # a fixed random subset: the directions of the embeddings, not of these examples
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:PCA_ROWS].to(x.device)]
    mean = x.mean(0)
    rank = min(hidden_size // 2, len(x) - 1, x.shape[1])
    weight = torch.zeros(hidden_size, x.shape[1], device=x.device)
    if rank > 0:
        with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random sketch; keep the caller's RNG as it is
            torch.manual_seed(seed)
            _, spread, directions = torch.svd_lowrank(x - mean, q=min(rank + 8, *x.shape), niter=2)
        spread, directions = spread[:rank], directions[:, :rank]  # (r,), (D, r)
        keep = spread > 1e-4 * spread[0]  # directions the embeddings actually span
        scaled = (directions[:, keep] / (spread[0] / math.sqrt(len(x)))).T  # (r', D)
        weight[: 2 * len(scaled)] = torch.cat([scaled, -scaled])
    return weight, -weight @ mean


def _training_view(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, B, C) logits and (n,) labels to train on: when large, each image's `TRAIN_CLASSES` classes with the best
    probability under some backbone (its own label among them), as (n, B, K) logits and (n,) positions in them."""
    if logits.shape[-1] <= TRAIN_CLASSES:
        return logits, labels
    best_probability = logits.log_softmax(-1).amax(1)  # (n, C)
    best_probability[torch.arange(len(labels)), labels] = math.inf  # the label is always kept
    kept = best_probability.topk(TRAIN_CLASSES, dim=-1).indices  # (n, K), the label first
    return logits.gather(2, kept[:, None].expand(-1, logits.shape[1], -1)), torch.zeros_like(labels)


@dataclass
class _Fit:
    """One fitted static-weights or gate combination: output-layer scores = bias + hidden @ weight.T."""

    weight: torch.Tensor | None  # (B, H); None for static weights
    bias: torch.Tensor  # (B,)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) hidden units -> (n, B) output-layer scores."""
        if self.weight is None:
            return self.bias.expand(len(hidden), -1)
        return torch.addmm(self.bias, hidden, self.weight.T)


def _fit_path(
    gate: EnsembleGate,
    hidden: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    penalties: Sequence[float],
    start: _Fit,
    bias_penalty: float | None = None,
) -> list[_Fit]:
    """One fit per penalty, strongest first, each from the previous one (the first from `start`); an infinite
    penalty keeps `start`. Static weights (`bias_penalty` None): the output bias alone, penalised toward equal
    weights. The gate: output weights (penalised) and bias (penalised by `bias_penalty` toward equal weights)."""
    uniform = 1.0 / logits.shape[1]
    bias = start.bias.clone().requires_grad_(True)
    weight = None if bias_penalty is None else torch.zeros(logits.shape[1], hidden.shape[1], device=hidden.device)
    if weight is not None and start.weight is not None:
        weight = start.weight.clone()
    if weight is not None:
        weight.requires_grad_(True)
    fitted = []
    gate.train()  # softmax rather than hard routing while fitting
    for penalty in penalties:
        if not math.isinf(penalty):

            def loss(penalty: float = penalty) -> torch.Tensor:
                current = _Fit(weight, bias)
                weights = gate.activate(current.scores(hidden))  # (n, B)
                fit = nn.functional.cross_entropy(combine_logits(logits, weights), labels)
                static = gate.activate(bias) - uniform
                if weight is None:
                    return fit + penalty * static.pow(2).sum()
                return fit + penalty * weight.pow(2).sum() + bias_penalty * static.pow(2).sum()

            _lbfgs([bias] if weight is None else [weight, bias], loss)
        fitted.append(_Fit(None if weight is None else weight.detach().clone(), bias.detach().clone()))
    gate.eval()
    return fitted


@torch.no_grad()
def _held_out(gate: EnsembleGate, fit: _Fit, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(n, C) combined logits of a fitted combination, as the deployed gate computes them (eval mode)."""
    return combine_logits(logits, gate.activate(fit.scores(hidden)))


def _pick(correct: torch.Tensor, losses: torch.Tensor) -> int:
    """Index of the row of (m, n) out-of-fold hits and losses with the most hits; ties: the lowest loss, then the
    first (the simplest, as grids go from the strongest penalty)."""
    hits = correct.float().sum(1)
    tied = torch.nonzero(hits == hits.max()).flatten()
    return int(tied[losses[tied].mean(1).argmin()])


def _beats(
    correct: torch.Tensor,
    incumbent_correct: torch.Tensor,
    loss: torch.Tensor,
    incumbent_loss: torch.Tensor,
    nests: bool,
) -> bool:
    """Whether a challenger beats the incumbent on the same held-out examples ((n,) hits and losses each).

    By top-1: right more often, by more than `MIN_WIN_Z` standard errors of the count of images they disagree on (a
    McNemar z): one image more out of twenty is not evidence. Otherwise, for a fitted combination that contains the
    incumbent (`nests`: static weights and the gate contain plain averaging, the gate contains static weights), by
    cross-entropy: lower by more than one standard error of the paired difference while right at least as often, as
    a richer model is judged by its likelihood as well as its answers. The best backbone, one discrete pick that drops
    the other backbones, is judged by its answers alone: its cross-entropy, from the few images a single backbone
    gets wrong, says little about the images it has not seen.
    """
    wins = int((correct & ~incumbent_correct).sum())
    losses = int((incumbent_correct & ~correct).sum())
    if wins > losses and (wins - losses) / math.sqrt(wins + losses) > MIN_WIN_Z:
        return True
    if wins < losses or not nests:
        return False
    gain = incumbent_loss - loss
    return bool(gain.mean() > gain.std(correction=0) / math.sqrt(len(gain)))


def fit_calibrated_gate(gate: EnsembleGate, features: Features, *, seed: int = 0, num_folds: int = 5) -> GateChoice:
    """Fit `gate` in place on `features`, keeping a simpler combination when the gate does not help.

    The candidates, from the simplest to the richest:
    1. plain logit averaging (the gate's starting point);
    2. the best single backbone (on all the examples);
    3. static weights: one weight per backbone, the same for every image (the gate's output bias alone);
    4. the gate, whose weights depend on the image: its hidden layer holds the principal directions of the
       calibration embeddings (label-free), its output layer is fitted.
    Static weights and the gate are fitted to convergence (full-batch L-BFGS), each along a path of penalties from
    the strongest; cross-validation chooses the penalty (the most out-of-fold hits, ties by cross-entropy). The best
    backbone is chosen on each fold's training part; averaging and the best backbone are scored at an inverse
    temperature fitted there. Each candidate in turn replaces the one kept so far when it is right more often out of
    fold by more than one standard error (a McNemar z above `MIN_WIN_Z`), or else when its out-of-fold
    cross-entropy is lower by more than one standard error of the paired difference and it is right at least as
    often (static weights and the gate, which contain plain averaging and one another; the best backbone needs the
    top-1 evidence). The chosen candidate is refitted on all the examples. From `SINGLE_SPLIT_FROM`
    examples on, one held-out quarter is scored instead of k folds. The chosen candidate's out-of-fold answers come
    back in `GateChoice.out_of_fold` (the cascade fits its stopping rule on them).
    """
    features = Features(*features)
    labels, device = features.labels, features.labels.device
    n = len(labels)
    single_split = n >= SINGLE_SPLIT_FROM
    folds = cross_validation_folds(labels, 4 if single_split else num_folds, seed)[: 1 if single_split else None]
    scored = torch.tensor(sorted(i for fold in folds for i in fold), device=device)
    trains = [sorted(set(range(n)) - set(fold)) for fold in folds]
    single_correct = features.logits.argmax(-1) == labels[:, None]  # (n, B)
    best = int(single_correct.float().mean(0).argmax())
    mean_logits = features.logits.mean(1)  # (n, C)
    scored_labels, num_classes = labels[scored], features.logits.shape[-1]
    row = torch.full((n,), -1, dtype=torch.long, device=device)  # example -> its row among the scored ones
    row[scored] = torch.arange(len(scored), device=device)
    # The classes to train on, per image, once for all folds (every class unless there are many).
    view_logits, view_labels = _training_view(features.logits, labels)

    # Out-of-fold (m, C) combined logits of the m scored examples per candidate (and per penalty for the fitted ones).
    # The untrained candidates' cross-entropy is taken at an inverse temperature fitted on the training part (it
    # changes none of their answers), so that it compares with the fitted candidates' learnt scale.
    held_out = {name: mean_logits.new_zeros(len(scored), num_classes) for name in (MEAN_OF_LOGITS, BEST_BACKBONE)}
    losses = {name: torch.zeros(len(scored), device=device) for name in held_out}
    for fold, train in zip(folds, trains):
        train_best = int(single_correct[train].float().mean(0).argmax())
        for name, logits, view in (
            (MEAN_OF_LOGITS, mean_logits, view_logits.mean(1)),
            (BEST_BACKBONE, features.logits[:, train_best], view_logits[:, train_best]),
        ):
            held_out[name][row[fold]] = logits[fold]
            scale = _fit_inverse_temperature(view[train], view_labels[train])
            losses[name][row[fold]] = nn.functional.cross_entropy(scale * logits[fold], labels[fold], reduction="none")

    with torch.no_grad():
        fc1_weight, fc1_bias = _principal_layer(features.gate_inputs, gate.fc1.out_features, seed)
        hidden = torch.relu(torch.addmm(fc1_bias, features.gate_inputs.float(), fc1_weight.T))  # (n, H)
    gate.reset_parameters()
    equal = _Fit(None, gate.fc2.bias.detach().clone())

    def cross_validate(penalties: Sequence[float], starts: list[_Fit], bias_penalty: float | None = None):
        """(P, m, C) out-of-fold logits of the scored examples per penalty, and each fold's path (one fit per
        penalty)."""
        out, paths = mean_logits.new_zeros(len(penalties), len(scored), num_classes), []
        for fold, train, start in zip(folds, trains, starts):
            fit_on = (hidden[train], view_logits[train], view_labels[train])
            paths.append(_fit_path(gate, *fit_on, penalties, start, bias_penalty))
            for p, fit in enumerate(paths[-1]):
                out[p, row[fold]] = _held_out(gate, fit, hidden[fold], features.logits[fold])
        return out, paths

    def choose(out: torch.Tensor) -> int:
        correct = out.argmax(-1) == scored_labels
        loss = torch.stack([nn.functional.cross_entropy(o, scored_labels, reduction="none") for o in out])
        return _pick(correct, loss)

    static_out, static_paths = cross_validate(STATIC_PENALTIES, [equal] * len(folds))
    static_index = choose(static_out)
    static_penalty = STATIC_PENALTIES[static_index]
    bias_penalty = min(static_penalty, 100.0)  # the gate's bias is held to equal weights as strongly (inf: firmly)
    # Each fold's gate path starts from that fold's static weights at the chosen penalty.
    gate_out, _ = cross_validate(GATE_PENALTIES, [path[static_index] for path in static_paths], bias_penalty)
    gate_index = choose(gate_out)
    held_out[STATIC_WEIGHTS], held_out[GATE] = static_out[static_index], gate_out[gate_index]

    correct = {name: logits.argmax(-1) == scored_labels for name, logits in held_out.items()}
    for name in (STATIC_WEIGHTS, GATE):
        losses[name] = nn.functional.cross_entropy(held_out[name], scored_labels, reduction="none")
    chosen = MEAN_OF_LOGITS
    # At the infinite penalty static weights are plain averaging and the gate is static weights: no challenger.
    fitted = [name for name, index in ((STATIC_WEIGHTS, static_index), (GATE, gate_index)) if index > 0]
    for name in (BEST_BACKBONE, *fitted):
        nests = name in (STATIC_WEIGHTS, GATE)
        if _beats(correct[name], correct[chosen], losses[name], losses[chosen], nests):
            chosen = name

    settings: dict = {}
    with torch.random.fork_rng(devices=[]):  # the unused hidden layer too is the same for a seed
        torch.manual_seed(seed)
        gate.reset_parameters()
    if chosen in (STATIC_WEIGHTS, GATE):
        logits, train_labels = view_logits, view_labels
        fit = _fit_path(gate, hidden, logits, train_labels, STATIC_PENALTIES[: static_index + 1], equal)[-1]
        settings = {"optimizer": "L-BFGS", "penalty": static_penalty}
        if chosen == GATE:
            fit = _fit_path(gate, hidden, logits, train_labels, GATE_PENALTIES[: gate_index + 1], fit, bias_penalty)[-1]
            settings |= {
                "gate_penalty": GATE_PENALTIES[gate_index],
                "principal_directions": int(fc1_weight.any(1).sum()) // 2,
            }
            with torch.no_grad():
                gate.fc1.weight.copy_(fc1_weight)
                gate.fc1.bias.copy_(fc1_bias)
                gate.fc2.weight.copy_(fit.weight)
        with torch.no_grad():
            gate.fc2.bias.copy_(fit.bias)
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best)
    gate.eval()
    fold_accuracy = {name: [float(hits[row[fold]].float().mean()) for fold in folds] for name, hits in correct.items()}
    return GateChoice(
        chosen=chosen,
        cv_loss={name: float(loss.mean()) for name, loss in losses.items()},
        cv_accuracy={name: float(np.mean(values)) for name, values in fold_accuracy.items()},
        cv_spread={name: float(np.std(values)) for name, values in fold_accuracy.items()},
        num_folds=len(folds),
        settings=settings,
        best_backbone=best,
        out_of_fold=OutOfFold.of(scored, held_out[chosen]),
    )


__all__ = [
    "BEST_BACKBONE",
    "Features",
    "GATE",
    "GATE_PENALTIES",
    "GateChoice",
    "MEAN_OF_LOGITS",
    "OutOfFold",
    "STATIC_PENALTIES",
    "STATIC_WEIGHTS",
    "cross_validation_folds",
    "fit_calibrated_gate",
    "set_best_backbone",
]
