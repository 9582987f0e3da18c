"""Classification metrics on ranked predictions: top-k accuracy and mean per-class recall."""

from __future__ import annotations

import torch


def top_k_accuracy(ranked: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the first `k` of `ranked` (batch, >= k) label indices."""
    return float((ranked[:, :k] == labels[:, None]).any(dim=1).double().mean())


def per_class_recall(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) recall of each class; NaN for a class with no example."""
    hits = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    support = torch.bincount(labels, minlength=num_classes).double()
    return hits / support  # 0/0 = NaN marks classes absent from `labels`


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Balanced accuracy: the mean over classes present in `labels` of their recall."""
    return float(per_class_recall(predictions, labels, num_classes).nanmean())


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true label, column = predicted label."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, -1)


__all__ = ["confusion_matrix", "mean_per_class_recall", "per_class_recall", "top_k_accuracy"]
