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


def fit_gate(
    gate: nn.Module,
    train: Features,
    val: Features | None = None,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    batch_size: int = 512,
    eval_every: int = 5,
    patience: int = 50,
    seed: int = 0,
) -> tuple[int, list[float], list[float]]:
    """AdamW on cross-entropy of the combined logits, from the averaging initialisation.

    `train` and `val` are cached tensors: no backbone runs. With `val`, it is scored every `eval_every` steps,
    training stops after `patience` steps without improvement, and the best state is kept.
    Returns (best step, train losses per step, held-out losses per evaluation).
    """
    torch.manual_seed(seed)
    gate.reset_parameters()
    gate.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    train, val = Features(*train), None if val is None else Features(*val)
    n = len(train.labels)
    train_losses, val_losses = [], []
    best_step, best_val, best_state = steps, float("inf"), None
    for step in range(1, steps + 1):
        batch = torch.randperm(n, generator=generator)[:batch_size] if n > batch_size else slice(None)
        loss = _loss(gate, train.subset(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())
        if val is not None and (step % eval_every == 0 or step == steps):
            with torch.no_grad():
                val_losses.append(_loss(gate, val).item())
            if val_losses[-1] < best_val:
                best_step, best_val, best_state = step, val_losses[-1], copy.deepcopy(gate.state_dict())
            elif step - best_step >= patience:
                break
    if best_state is not None:
        gate.load_state_dict(best_state)
    gate.eval()
    return best_step, train_losses, val_losses


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
GATE = "gate"


@dataclass
class GateChoice:
    """What `fit_calibrated_gate` chose and why: cross-validated top-1 per candidate (mean and spread over folds)."""

    chosen: str  # GATE, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_accuracy: dict[str, float]  # candidate -> mean top-1 over folds
    cv_spread: dict[str, float]  # candidate -> standard deviation of top-1 over folds
    num_folds: int
    settings: dict = field(default_factory=dict)  # the gate's fitting settings, when the gate was chosen
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        if gate.combination == "softplus":
            # softplus(log(e - 1)) = 1; softplus(-30) ~ 1e-13.
            gate.fc2.bias.fill_(-30.0)
            gate.fc2.bias[backbone] = math.log(math.e - 1)
        else:
            gate.fc2.bias.fill_(-30.0)
            gate.fc2.bias[backbone] = 0.0


def _top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def fit_calibrated_gate(gate: EnsembleGate, features: Features, *, seed: int = 0, num_folds: int = 5) -> GateChoice:
    """Fit `gate` in place on `features` and return what was chosen.

    Candidates are scored by cross-validation on the calibration examples: plain logit averaging (the gate's
    starting point), the best single backbone (chosen on each fold's training part), and the trained gate.
    """
    features = Features(*features)
    folds = cross_validation_folds(features.labels, num_folds, seed)
    everything = set(range(len(features.labels)))
    scores: dict[str, list[float]] = {MEAN_OF_LOGITS: [], BEST_BACKBONE: [], GATE: []}
    for fold in folds:
        train, val = features.subset(sorted(everything - set(fold))), features.subset(fold)
        scores[MEAN_OF_LOGITS].append(_top1(val.logits.mean(1), val.labels))
        best = int((train.logits.argmax(-1) == train.labels[:, None]).float().mean(0).argmax())
        scores[BEST_BACKBONE].append(_top1(val.logits[:, best], val.labels))
        fit_gate(gate, train, seed=seed)
        with torch.no_grad():
            scores[GATE].append(_top1(combine_logits(val.logits, gate(val.gate_inputs)), val.labels))
    cv_accuracy = {name: float(np.mean(values)) for name, values in scores.items()}
    cv_spread = {name: float(np.std(values)) for name, values in scores.items()}
    # Ties go to the simpler candidate: averaging, then the best backbone, then the gate.
    chosen = max(scores, key=lambda name: cv_accuracy[name])
    best_backbone = int((features.logits.argmax(-1) == features.labels[:, None]).float().mean(0).argmax())
    settings = {}
    if chosen == GATE:
        fit_gate(gate, features, seed=seed)
        settings = {"steps": 300, "lr": 3e-3, "weight_decay": 0.01}
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best_backbone)
    else:
        gate.reset_parameters()
    gate.eval()
    return GateChoice(chosen, cv_accuracy, cv_spread, len(folds), settings, best_backbone)


__all__ = [
    "BEST_BACKBONE",
    "Features",
    "GATE",
    "GateChoice",
    "MEAN_OF_LOGITS",
    "cross_validation_folds",
    "fit_calibrated_gate",
    "fit_gate",
    "set_best_backbone",
]
