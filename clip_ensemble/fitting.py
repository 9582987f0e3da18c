"""Fitting on cached features: cross-validation folds, the gate's training loop, and the choice between the gate,
plain averaging and the best backbone that calibration makes from the calibration data alone."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .gate import EnsembleGate, combine_logits


class Features(NamedTuple):
    """Cached calibration features; no backbone runs while fitting on them."""

    gate_inputs: torch.Tensor  # (n, sum d_b) concatenated normalised image embeddings
    logits: torch.Tensor  # (n, B, C) per-backbone zero-shot logits
    labels: torch.Tensor  # (n,) class indices

    def subset(self, index) -> Features:
        return Features(*(t[index] for t in self))


def cross_validation_folds(labels: torch.Tensor | list[int], num_folds: int = 5, seed: int = 0) -> list[list[int]]:
    """Split example indices into `min(num_folds, n)` folds, stratified by class, that also work at 1 shot.

    Within each class the examples are shuffled and dealt to consecutive folds from a random starting fold, so a
    class with k < num_folds examples lands in k different folds and every fold gets about n / num_folds examples.
    The gate does not depend on the labels, so a fold may hold a class that its training part lacks.
    """
    labels = torch.as_tensor(labels).tolist()
    num_folds = min(num_folds, len(labels))
    if num_folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 labelled examples, got {len(labels)}.")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    offset = 0
    for c in sorted(set(labels)):
        members = rng.permutation([i for i, label in enumerate(labels) if label == c]).tolist()
        for rank, index in enumerate(members):
            folds[(offset + rank) % num_folds].append(index)
        offset += len(members)  # the next class starts where this one stopped, keeping folds balanced
    return [sorted(fold) for fold in folds]


def _loss(gate: nn.Module, features: Features) -> torch.Tensor:
    return nn.functional.cross_entropy(combine_logits(features.logits, gate(features.gate_inputs)), features.labels)


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
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


@dataclass
class GateChoice:
    """What `fit_calibrated_gate` chose and why.

    `cv_accuracy` and `cv_spread` are the mean and standard deviation over folds of each candidate's top-1 on the
    folds' held-out examples: out-of-fold for the gate (trained without them); plain averaging has nothing to fit;
    the best backbone is chosen once on all calibration examples.
    """

    chosen: str  # GATE, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_accuracy: dict[str, float]
    cv_spread: dict[str, float]
    num_folds: int  # folds whose held-out part was scored (1: a single held-out quarter)
    settings: dict = field(default_factory=dict)  # the gate's fitting settings, when the gate was chosen
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        gate.fc2.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13; a softmax weight of ~e-30
        gate.fc2.bias[backbone] = math.log(math.e - 1) if gate.combination == "softplus" else 0.0


def _train(gate: EnsembleGate, train: Features, steps: int, *, seed: int, on_checkpoint=None) -> None:
    """AdamW on cross-entropy of the combined logits, from the averaging initialisation, for `steps` steps or until
    `on_checkpoint(step)` (called at each of `STEP_CHOICES`, gate in eval mode) returns True."""
    torch.manual_seed(seed)
    gate.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    n = len(train.labels)
    for step in range(1, steps + 1):
        gate.train()
        batch = train.subset(torch.randperm(n, generator=generator)[:BATCH_SIZE]) if n > BATCH_SIZE else train
        loss = _loss(gate, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gate.eval()
        if on_checkpoint is not None and step in STEP_CHOICES and on_checkpoint(step):
            break


def _beats(challenger: torch.Tensor, incumbent: torch.Tensor) -> bool:
    """Whether `challenger` is right more often than `incumbent` on the same examples by more than one standard
    error of the paired difference (a guard against choosing the more complex model on noise)."""
    difference = challenger.float() - incumbent.float()
    return bool(difference.mean() > difference.std(correction=0) / math.sqrt(len(difference)))


def fit_calibrated_gate(gate: EnsembleGate, features: Features, *, seed: int = 0, num_folds: int = 5) -> GateChoice:
    """Fit `gate` in place on `features`, keeping plain averaging or the best backbone when the gate does not help.

    1. Plain logit averaging (the gate's starting point) is the default. The best single backbone on all the
       calibration examples replaces it when it is right more often by more than one standard error.
    2. The gate is trained on each fold's training part and scored on its held-out part at every training length in
       `STEP_CHOICES` (a fold's path stops once its held-out cross-entropy keeps rising); the length with the lowest
       out-of-fold cross-entropy is chosen.
    3. The gate, refitted on all examples for that length, is kept only when its out-of-fold predictions beat the
       choice of step 1 by more than one standard error; otherwise the gate is set to that choice. From
       `SINGLE_SPLIT_FROM` examples on, one held-out quarter is scored and the gate trained on the rest is kept.
    At 1 shot a held-out example's class is missing from its fold's training part, so the gate's estimate is
    pessimistic there: the gate is then kept only when it helps on classes it has not seen.
    """
    features = Features(*features)
    labels = features.labels
    n = len(labels)
    single_split = n >= SINGLE_SPLIT_FROM
    folds = cross_validation_folds(labels, 4 if single_split else num_folds, seed)[: 1 if single_split else None]
    single_correct = features.logits.argmax(-1) == labels[:, None]  # (n, B)
    mean_correct = features.logits.mean(1).argmax(-1) == labels  # (n,)
    best = int(single_correct.float().mean(0).argmax())
    incumbent = BEST_BACKBONE if _beats(single_correct[:, best], mean_correct) else MEAN_OF_LOGITS

    # Out-of-fold correctness and cross-entropy of the gate at every training length (until the path stops).
    scored = torch.tensor(sorted(i for fold in folds for i in fold))
    correct = {steps: torch.zeros(n, dtype=torch.bool) for steps in STEP_CHOICES}
    losses = {steps: torch.zeros(n) for steps in STEP_CHOICES}
    states = {}  # step -> gate state, kept for the single split
    last_step = STEP_CHOICES[-1]  # the longest length that every fold reached
    everything = set(range(n))
    for fold in folds:
        train, val = features.subset(sorted(everything - set(fold))), features.subset(fold)
        path: list[float] = []

        @torch.no_grad()
        def checkpoint(step: int, fold=fold, val=val, path=path) -> bool:
            logits = combine_logits(val.logits, gate(val.gate_inputs))
            correct[step][fold] = logits.argmax(-1) == val.labels
            losses[step][fold] = nn.functional.cross_entropy(logits, val.labels, reduction="none")
            path.append(float(losses[step][fold].mean()))
            if single_split:
                states[step] = copy.deepcopy(gate.state_dict())
            rising = len(path) > PATIENCE and all(a < b for a, b in zip(path[-PATIENCE - 1 :], path[-PATIENCE:]))
            return rising

        _train(gate, train, last_step, seed=seed, on_checkpoint=checkpoint)
        last_step = min(last_step, STEP_CHOICES[len(path) - 1])
    reached = [s for s in STEP_CHOICES if s <= last_step]
    steps = min(reached, key=lambda s: float(losses[s][scored].mean()))  # ties: the shortest
    candidates = {
        GATE: correct[steps],
        MEAN_OF_LOGITS: mean_correct,
        BEST_BACKBONE: single_correct[:, best],
    }
    fold_accuracy = {name: [float(hits[fold].float().mean()) for fold in folds] for name, hits in candidates.items()}
    chosen = GATE if _beats(correct[steps][scored], candidates[incumbent][scored]) else incumbent

    settings = {}
    if chosen == GATE:
        settings = {"steps": steps, "lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH_SIZE}
        if single_split:  # trained on three quarters of the examples, kept as scored
            gate.load_state_dict(states[steps])
            settings["trained_on"] = f"{n - len(folds[0])} of {n} examples"
        else:
            _train(gate, features, steps, seed=seed)
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best)
    else:
        gate.reset_parameters()
    gate.eval()
    return GateChoice(
        chosen=chosen,
        cv_accuracy={name: float(np.mean(values)) for name, values in fold_accuracy.items()},
        cv_spread={name: float(np.std(values)) for name, values in fold_accuracy.items()},
        num_folds=len(folds),
        settings=settings,
        best_backbone=best,
    )


__all__ = [
    "BEST_BACKBONE",
    "Features",
    "BATCH_SIZE",
    "GATE",
    "GateChoice",
    "LEARNING_RATE",
    "MEAN_OF_LOGITS",
    "STEP_CHOICES",
    "WEIGHT_DECAY",
    "cross_validation_folds",
    "fit_calibrated_gate",
    "set_best_backbone",
]
