"""Fitting on cached features: cross-validation folds, the gate's training loop, and the choice between the gate,
static per-backbone weights, plain averaging and the best backbone that calibration makes from the calibration data
alone."""

from __future__ import annotations

import copy
import math
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


def _combined(gate: EnsembleGate, features: Features, static: bool = False) -> torch.Tensor:
    """(n, C) combined logits; `static` uses the gate's output bias alone: one weight per backbone for every image."""
    weights = gate.activate(gate.fc2.bias).expand(len(features.labels), -1) if static else gate(features.gate_inputs)
    return combine_logits(features.logits, weights)


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
STATIC_WEIGHTS = "static weights"
GATE = "gate"

# The gate's fitting settings. The training length is chosen by cross-validation among STEP_CHOICES (AdamW from the
# averaging initialisation: fewer steps stay closer to plain averaging); the learning rate, weight decay and batch
# size are fixed.
STEP_CHOICES = (10, 25, 50, 100, 200, 400, 800)
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
BATCH_SIZE = 128
# From this many calibration examples on, one held-out quarter replaces k-fold cross-validation, and the gate trained
# on the other three quarters is kept as it is: the estimate is already precise, and paper-scale calibration (16,000
# examples) stays within seconds.
SINGLE_SPLIT_FROM = 2000
# The training path stops when the held-out cross-entropy has risen at this many checkpoints in a row.
PATIENCE = 2


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

    `cv_loss` is each candidate's mean cross-entropy on the held-out examples, which the choice compares;
    `cv_accuracy` and `cv_spread` are the mean and standard deviation over folds of its top-1 there. Everything is
    out of fold: the gate, the static weights and the best backbone are chosen and trained without the examples they
    are scored on (plain averaging has nothing to fit), and the untrained candidates' confidence (an inverse
    temperature) too.
    """

    chosen: str  # GATE, STATIC_WEIGHTS, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_loss: dict[str, float]
    cv_accuracy: dict[str, float]
    cv_spread: dict[str, float]
    num_folds: int  # folds whose held-out part was scored (1: a single held-out quarter)
    settings: dict = field(default_factory=dict)  # the gate's fitting settings, when the gate was chosen
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples
    # The chosen candidate's answers out of fold, from which the cascade fits its stopping rule.
    out_of_fold: OutOfFold | None = field(default=None, repr=False, compare=False)


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        gate.fc2.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13; a softmax weight of ~e-30
        gate.fc2.bias[backbone] = math.log(math.e - 1) if gate.combination == "softplus" else 0.0


def _train(
    gate: EnsembleGate, train: Features, steps: int, *, seed: int, static: bool = False, on_checkpoint=None
) -> None:
    """AdamW on cross-entropy of the combined logits, from the averaging initialisation, for `steps` steps or until
    `on_checkpoint(step)` (called at each of `STEP_CHOICES`, gate in eval mode) returns True. `static` trains the
    output bias alone (the hidden layer then has no effect: the output weights stay zero)."""
    torch.manual_seed(seed)
    gate.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    parameters = [gate.fc2.bias] if static else list(gate.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    n = len(train.labels)
    for step in range(1, steps + 1):
        gate.train()
        batch = train.subset(torch.randperm(n, generator=generator)[:BATCH_SIZE]) if n > BATCH_SIZE else train
        loss = nn.functional.cross_entropy(_combined(gate, batch, static), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gate.eval()
        if on_checkpoint is not None and step in STEP_CHOICES and on_checkpoint(step):
            break


def _beats(gain: torch.Tensor) -> bool:
    """Whether a per-example gain of a challenger over the incumbent (the incumbent's held-out cross-entropy minus
    the challenger's, on the same examples) is positive by more than one standard error: a guard against choosing
    the more complex model on noise."""
    return bool(gain.mean() > gain.std(correction=0) / math.sqrt(len(gain)))


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


@dataclass
class _Path:
    """Out-of-fold results of one kind of training at every training length that all folds reached."""

    predictions: dict[int, torch.Tensor]  # steps -> (n,) answers on the held-out examples
    margins: dict[int, torch.Tensor]  # steps -> (n,) their top-1 minus top-2 combined logits
    losses: dict[int, torch.Tensor]  # steps -> (n,) held-out cross-entropy
    states: dict[int, dict]  # steps -> gate state (single split only)
    reached: list[int]

    def best_steps(self, scored: torch.Tensor) -> int:
        """The length with the lowest out-of-fold cross-entropy (ties: the shortest)."""
        return min(self.reached, key=lambda steps: float(self.losses[steps][scored].mean()))


def _cross_validate(
    gate: EnsembleGate, features: Features, folds: list[list[int]], *, seed: int, static: bool, keep_states: bool
) -> _Path:
    """Train on each fold's training part, scoring its held-out part at every length in `STEP_CHOICES`; a fold's
    path stops once its held-out cross-entropy keeps rising, and later folds stop where it did."""
    n, device = len(features.labels), features.labels.device
    path = _Path(
        {s: torch.zeros(n, dtype=torch.long, device=device) for s in STEP_CHOICES},
        {s: torch.zeros(n, device=device) for s in STEP_CHOICES},
        {s: torch.zeros(n, device=device) for s in STEP_CHOICES},
        {},
        [],
    )
    last_step = STEP_CHOICES[-1]
    everything = set(range(n))
    for fold in folds:
        train, val = features.subset(sorted(everything - set(fold))), features.subset(fold)
        fold_losses: list[float] = []

        @torch.no_grad()
        def checkpoint(step: int, fold=fold, val=val, fold_losses=fold_losses) -> bool:
            logits = _combined(gate, val, static)
            path.predictions[step][fold], path.margins[step][fold] = logits.argmax(-1), margins(logits)
            path.losses[step][fold] = nn.functional.cross_entropy(logits, val.labels, reduction="none")
            fold_losses.append(float(path.losses[step][fold].mean()))
            if keep_states:
                path.states[step] = copy.deepcopy(gate.state_dict())
            recent = fold_losses[-PATIENCE - 1 :]
            return len(recent) > PATIENCE and all(a < b for a, b in zip(recent, recent[1:]))

        _train(gate, train, last_step, seed=seed, static=static, on_checkpoint=checkpoint)
        last_step = min(last_step, STEP_CHOICES[len(fold_losses) - 1])
    path.reached = [s for s in STEP_CHOICES if s <= last_step]
    return path


def fit_choice(
    gate: EnsembleGate, features: Features, chosen: str, steps: int, best_backbone: int, *, seed: int
) -> None:
    """Set `gate` to the `chosen` candidate fitted on all of `features`: trained for `steps` (static weights or the
    gate), routing every image to `best_backbone`, or plain averaging."""
    if chosen in (STATIC_WEIGHTS, GATE):
        _train(gate, features, steps, seed=seed, static=chosen == STATIC_WEIGHTS)
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best_backbone)
    else:
        gate.reset_parameters()
    gate.eval()


def fit_calibrated_gate(gate: EnsembleGate, features: Features, *, seed: int = 0, num_folds: int = 5) -> GateChoice:
    """Fit `gate` in place on `features`, keeping a simpler combination when the gate does not help.

    The candidates, from the simplest to the richest:
    1. plain logit averaging (the gate's starting point);
    2. the best single backbone (on all the examples);
    3. static weights: one learned weight per backbone, the same for every image (the gate's output bias alone);
    4. the gate, whose weights depend on the image.
    Each is scored by its cross-entropy on held-out examples, out of fold. Static weights and the gate are trained
    on each fold's training part and scored on its held-out part at every training length in `STEP_CHOICES`, the
    length with the lowest out-of-fold cross-entropy chosen, then refitted on all examples for that length. The
    best backbone is chosen on each fold's training part; averaging and the best backbone are scored at an inverse
    temperature fitted there. Each candidate in turn replaces the one kept so far only when its cross-entropy is
    lower on the same examples by more than one standard error of the paired difference. Cross-entropy rather than
    top-1 because a few calibration images give top-1 too few distinct values to tell candidates apart. From
    `SINGLE_SPLIT_FROM` examples on, one held-out quarter is scored and the model trained on the other three
    quarters is kept. At 1 shot a held-out example's class is missing from its fold's training part, so the trained
    candidates' estimates are pessimistic there. The chosen candidate's out-of-fold answers come back in
    `GateChoice.out_of_fold` (the cascade fits its stopping rule on them).
    """
    features = Features(*features)
    labels = features.labels
    n = len(labels)
    single_split = n >= SINGLE_SPLIT_FROM
    folds = cross_validation_folds(labels, 4 if single_split else num_folds, seed)[: 1 if single_split else None]
    scored = torch.tensor(sorted(i for fold in folds for i in fold), device=labels.device)
    single_correct = features.logits.argmax(-1) == labels[:, None]  # (n, B)
    best = int(single_correct.float().mean(0).argmax())
    mean_logits = features.logits.mean(1)  # (n, C)
    # The untrained candidates, out of fold: the best backbone is chosen on each fold's training part, and both are
    # scored at an inverse temperature fitted there (it changes none of their answers), so that the comparison with
    # the trained candidates, whose scale is learnt, is about what they rank rather than how confident they are.
    best_out_of_fold = torch.empty_like(mean_logits)
    losses = {name: torch.zeros(n, device=labels.device) for name in (MEAN_OF_LOGITS, BEST_BACKBONE)}
    everything = set(range(n))
    for fold in folds:
        train = sorted(everything - set(fold))
        train_best = int(single_correct[train].float().mean(0).argmax())
        best_out_of_fold[fold] = features.logits[fold, train_best]
        for name, logits in ((MEAN_OF_LOGITS, mean_logits), (BEST_BACKBONE, features.logits[:, train_best])):
            scale = _fit_inverse_temperature(logits[train], labels[train])
            losses[name][fold] = nn.functional.cross_entropy(scale * logits[fold], labels[fold], reduction="none")
    out_of_fold = {
        MEAN_OF_LOGITS: OutOfFold.of(scored, mean_logits[scored]),
        BEST_BACKBONE: OutOfFold.of(scored, best_out_of_fold[scored]),
    }
    paths, steps = {}, {}
    for name, static in ((STATIC_WEIGHTS, True), (GATE, False)):
        paths[name] = _cross_validate(gate, features, folds, seed=seed, static=static, keep_states=single_split)
        steps[name] = paths[name].best_steps(scored)
        path = paths[name]
        out_of_fold[name] = OutOfFold(scored, path.predictions[steps[name]][scored], path.margins[steps[name]][scored])
        losses[name] = path.losses[steps[name]]
    chosen = MEAN_OF_LOGITS
    for name in (BEST_BACKBONE, STATIC_WEIGHTS, GATE):
        if _beats(losses[chosen][scored] - losses[name][scored]):
            chosen = name
    correct = {name: torch.zeros(n, dtype=torch.bool, device=labels.device) for name in out_of_fold}
    for name, answers in out_of_fold.items():
        correct[name][scored] = answers.predictions == labels[scored]
    fold_accuracy = {name: [float(hits[fold].float().mean()) for fold in folds] for name, hits in correct.items()}

    settings = {}
    if chosen in paths:
        settings = {"steps": steps[chosen], "lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH_SIZE}
    if chosen in paths and single_split:  # trained on three quarters of the examples, kept as scored
        gate.load_state_dict(paths[chosen].states[steps[chosen]])
        gate.eval()
        settings["trained_on"] = f"{n - len(folds[0])} of {n} examples"
    else:
        fit_choice(gate, features, chosen, steps.get(chosen, 0), best, seed=seed)
    return GateChoice(
        chosen=chosen,
        cv_loss={name: float(losses[name][scored].mean()) for name in out_of_fold},
        cv_accuracy={name: float(np.mean(values)) for name, values in fold_accuracy.items()},
        cv_spread={name: float(np.std(values)) for name, values in fold_accuracy.items()},
        num_folds=len(folds),
        settings=settings,
        best_backbone=best,
        out_of_fold=out_of_fold[chosen],
    )


__all__ = [
    "BEST_BACKBONE",
    "Features",
    "BATCH_SIZE",
    "GATE",
    "GateChoice",
    "LEARNING_RATE",
    "MEAN_OF_LOGITS",
    "OutOfFold",
    "STATIC_WEIGHTS",
    "STEP_CHOICES",
    "WEIGHT_DECAY",
    "cross_validation_folds",
    "fit_calibrated_gate",
    "fit_choice",
    "set_best_backbone",
]
