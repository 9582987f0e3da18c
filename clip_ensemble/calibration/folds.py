"""Cached calibration features, the folds that cross-validation scores them on, and what calibration reads from
their logits once."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..models.cascade import margins


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
        gate_inputs = torch.cat([self.gate_inputs[:, starts[b] : starts[b + 1]] for b in backbones], dim=1)
        return Features(gate_inputs, self.logits[:, list(backbones)], self.labels)


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
    counts = np.unique(labels, return_counts=True)[1]
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # each class's indices, ascending
    for members in by_class:
        members = rng.permutation(members).tolist()
        for rank, index in enumerate(members):
            folds[(offset + rank) % num_folds].append(index)
        offset += len(members)  # the next class starts where this one stopped, keeping folds balanced
    return [sorted(fold) for fold in folds]


# Training static weights and the gate on more classes than this keeps, per image, the classes that some backbone ranks
# high (and its label): the others have a negligible probability under any weights. Scoring always uses every class.
TRAIN_CLASSES = 16
# From this many calibration examples on, one held-out quarter replaces k-fold cross-validation (the gate trained on
# the other three quarters is kept as it is): the estimate is already precise, and paper-scale calibration (16,000
# examples) stays within seconds.
SINGLE_SPLIT_FROM = 2000


class OutOfFold(NamedTuple):
    """A fitted combination's answers on the examples cross-validation scored, each from a model fitted without it."""

    index: torch.Tensor  # (m,) the scored examples (all of them with k folds; one quarter with a single split)
    predictions: torch.Tensor  # (m,) class indices
    margins: torch.Tensor  # (m,) top-1 minus top-2 combined logit

    @classmethod
    def of(cls, index: torch.Tensor, logits: torch.Tensor) -> OutOfFold:
        """From (m, C) out-of-fold combined logits of the examples `index`."""
        return cls(index, logits.argmax(-1), margins(logits))


def training_view(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, B, C) logits and (n,) labels to train on: with more than `TRAIN_CLASSES` classes, each image's
    `TRAIN_CLASSES` classes with the best probability under some backbone, its own label first, as (n, B, K) logits
    and (n,) zeros (the label's position); else the logits and labels as they are."""
    if logits.shape[-1] <= TRAIN_CLASSES:
        return logits, labels
    # (n, C) each class's best log-probability under any backbone, 512 images at a time: a (n, B, C) log-softmax would
    # be 576 MB at paper scale, and a backbone at a time (strided rows) took four times as long.
    best_log_probs = logits.new_empty(logits.shape[0], logits.shape[2])
    for start in range(0, len(labels), 512):
        rows = slice(start, start + 512)
        torch.amax(logits[rows].log_softmax(-1), 1, out=best_log_probs[rows])
    best_log_probs[torch.arange(len(labels)), labels] = math.inf  # the label is always kept, first
    kept = best_log_probs.topk(TRAIN_CLASSES, dim=-1).indices  # (n, K)
    return logits.gather(2, kept[:, None].expand(-1, logits.shape[1], -1)), torch.zeros_like(labels)


def calibration_folds(labels: torch.Tensor, seed: int = 0, num_folds: int = 5) -> list[list[int]]:
    """The folds whose held-out parts calibration scores: `num_folds` stratified folds, or from `SINGLE_SPLIT_FROM`
    examples on one held-out quarter."""
    if len(labels) >= SINGLE_SPLIT_FROM:
        return cross_validation_folds(labels, 4, seed)[:1]
    return cross_validation_folds(labels, num_folds, seed)


class CalibrationData(NamedTuple):
    """What calibration reads from (n, B, C) calibration logits, read once (a cascade's stages are given theirs, each
    built from one pass over the logits for all of them)."""

    labels: torch.Tensor  # (n,) class indices
    folds: list[list[int]]  # the examples of each scored fold (`calibration_folds`)
    held_out_logits: list[torch.Tensor]  # per fold, (m_f, B, C): its examples' logits over every class, to score
    view_logits: torch.Tensor  # (n, B, K): every example's logits over the classes to train on (`training_view`)
    view_labels: torch.Tensor  # (n,): the label's position among them
    single_correct: torch.Tensor  # (n, B): whether each backbone alone is right

    @classmethod
    def of(cls, features: Features, seed: int = 0, num_folds: int = 5) -> CalibrationData:
        logits, labels = features.logits, features.labels
        folds = calibration_folds(labels, seed, num_folds)
        view_logits, view_labels = training_view(logits, labels)
        held_out = [logits[fold] for fold in folds]
        return cls(labels, folds, held_out, view_logits, view_labels, logits.argmax(-1) == labels[:, None])


__all__ = [
    "SINGLE_SPLIT_FROM",
    "TRAIN_CLASSES",
    "CalibrationData",
    "Features",
    "OutOfFold",
    "calibration_folds",
    "cross_validation_folds",
    "training_view",
]
