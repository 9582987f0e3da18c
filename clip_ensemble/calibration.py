"""Few-shot calibration: train the gate on cached backbone features, backbones frozen."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import LOCAL_DIR_PREFIX
from .data import LabelledImages, load_labelled_data, sample_few_shot
from .features import FeatureCache
from .gate import combine_logits
from .modeling_clip_ensemble import CLIPEnsembleModel


@dataclass
class CalibrationReport:
    """What a calibration did and how well the gate fits its few-shot data."""

    dataset: str
    shots: int
    seed: int
    num_train: int
    num_val: int
    steps: int
    best_step: int
    train_accuracy: float
    val_accuracy: float | None
    backbone_accuracy: dict[str, float]  # each backbone alone on all calibration images
    mean_logits_accuracy: float
    feature_seconds: float
    gate_seconds: float
    images_embedded: int  # backbone forward passes over images (0 when all came from the cache)
    train_losses: list[float] = field(default_factory=list, repr=False)
    val_losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        val = "-" if self.val_accuracy is None else f"{100 * self.val_accuracy:.1f}%"
        lines = [
            f"Calibrated on {self.dataset}: {self.shots} shots per class, seed {self.seed}",
            f"  images: {self.num_train} train, {self.num_val} held out for early stopping",
            f"  gate: best step {self.best_step} of {self.steps}, train accuracy {100 * self.train_accuracy:.1f}%, "
            f"held-out accuracy {val}",
            f"  mean of logits: {100 * self.mean_logits_accuracy:.1f}% on the calibration images",
            *(f"  {name}: {100 * acc:.1f}%" for name, acc in self.backbone_accuracy.items()),
            f"  time: {self.feature_seconds:.1f} s features ({self.images_embedded} images embedded), "
            f"{self.gate_seconds:.1f} s gate training",
        ]
        return "\n".join(lines)


def backbone_names(model: CLIPEnsembleModel) -> list[str]:
    """Names for tables: repo ids as they are, local folders by their last component when that stays unique."""
    names = [entry["name_or_path"] for entry in model.config.backbones]
    short = [Path(name.removeprefix(LOCAL_DIR_PREFIX)).name if _is_local(name) else name for name in names]
    return short if len(set(short)) == len(short) else names


def _is_local(name: str) -> bool:
    return name.startswith(LOCAL_DIR_PREFIX) or os.path.isdir(name)


def _split_validation(labels: list[int], shots: int, seed: int) -> tuple[list[int], list[int]]:
    """Hold out a quarter of each class's shots (at least 1) when there are 4 or more; else no held-out part."""
    if shots < 4:
        return list(range(len(labels))), []
    held_out_per_class = max(1, shots // 4)
    rng = np.random.default_rng(seed + 1)
    val = []
    for c in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == c]
        val += rng.permutation(members)[:held_out_per_class].tolist()
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate inputs (n, sum d_b), logits (n, B, C), labels (n,)


def _loss(gate: nn.Module, features: Features) -> torch.Tensor:
    gate_inputs, per_backbone_logits, labels = features
    return nn.functional.cross_entropy(combine_logits(per_backbone_logits, gate(gate_inputs)), labels)


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
    n = len(train[2])
    train_losses, val_losses = [], []
    best_step, best_val, best_state = steps, float("inf"), None
    for step in range(1, steps + 1):
        batch = torch.randperm(n, generator=generator)[:batch_size] if n > batch_size else slice(None)
        loss = _loss(gate, tuple(t[batch] for t in train))
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


def calibrate(
    model: CLIPEnsembleModel,
    data,
    shots: int = 4,
    seed: int = 0,
    *,
    split: str = "train",
    steps: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> CalibrationReport:
    """Train `model`'s gate on `shots` labelled images per class of `data`; the backbones stay frozen.

    `data` is a `LabelledImages`, an image folder, a `datasets.Dataset` or a Hub dataset id (`split` is used for
    the last two). The model takes the data's label names. Image embeddings come from `cache` (by default the
    on-disk cache), so a second calibration on the same images runs no backbone. Deterministic for a seed.
    """
    data: LabelledImages = load_labelled_data(data, split=split)
    support = data.subset(sample_few_shot(data, shots, seed), name=data.name)
    if support.label_names != model.labels:
        model.set_labels(support.label_names)
    cache = FeatureCache() if cache is None else cache

    started = time.perf_counter()
    embeds = cache.embed(model.backbones, support.images, batch_size=batch_size, progress=progress)
    feature_seconds = time.perf_counter() - started

    started = time.perf_counter()
    device = model.gate.fc1.weight.device
    embeds = [e.to(device) for e in embeds]
    labels = torch.tensor(support.labels, device=device)
    with torch.no_grad():
        per_backbone_logits = model.zero_shot_logits(embeds)  # (n, B, C), fixed during training
    gate_inputs = torch.cat(embeds, dim=-1)  # (n, sum d_b)
    train_index, val_index = _split_validation(support.labels, shots, seed)
    features = (gate_inputs, per_backbone_logits, labels)
    best_step, train_losses, val_losses = fit_gate(
        model.gate,
        tuple(t[train_index] for t in features),
        tuple(t[val_index] for t in features) if val_index else None,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    gate_seconds = time.perf_counter() - started

    with torch.no_grad():
        correct = combine_logits(per_backbone_logits, model.gate(gate_inputs)).argmax(-1) == labels
        backbone_correct = per_backbone_logits.argmax(-1) == labels[:, None]  # (n, B)
        mean_correct = per_backbone_logits.mean(1).argmax(-1) == labels
    names = backbone_names(model)
    report = CalibrationReport(
        dataset=data.name,
        shots=shots,
        seed=seed,
        num_train=len(train_index),
        num_val=len(val_index),
        steps=len(train_losses),
        best_step=best_step,
        train_accuracy=float(correct[train_index].float().mean()),
        val_accuracy=float(correct[val_index].float().mean()) if val_index else None,
        backbone_accuracy=dict(zip(names, backbone_correct.float().mean(0).tolist())),
        mean_logits_accuracy=float(mean_correct.float().mean()),
        feature_seconds=feature_seconds,
        gate_seconds=gate_seconds,
        images_embedded=max(cache.last_computed, default=0),
        train_losses=train_losses,
        val_losses=val_losses,
    )
    model.config.calibration = {
        "dataset": report.dataset,
        "shots": shots,
        "seed": seed,
        "images": len(support),
        "train_accuracy": round(report.train_accuracy, 4),
        "held_out_accuracy": None if report.val_accuracy is None else round(report.val_accuracy, 4),
        "best_single_backbone": names[int(backbone_correct.float().mean(0).argmax())],
        "backbone_accuracy": {name: round(acc, 4) for name, acc in report.backbone_accuracy.items()},
    }
    return report


__all__ = ["CalibrationReport", "calibrate", "fit_gate"]
