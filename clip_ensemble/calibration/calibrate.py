"""Few-shot calibration: fit the gate on cached backbone features, backbones frozen, choosing by cross-validation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.features import FeatureCache
from ..data.labelled import LabelledImages, load_labelled_data, sample_few_shot
from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from .cascade_fitting import CHART_TOLERANCES, CascadeReport, fit_cascade
from .fitting import (
    BEST_BACKBONE,
    CLASS_HEAD,
    GATE,
    MEAN_OF_LOGITS,
    STATIC_WEIGHTS,
    Features,
    FitProgress,
    GateChoice,
    fit_calibrated_gate,
)

# What each candidate is, in the words every report uses (one name per method, as in the evaluate table).
_WHAT = {
    MEAN_OF_LOGITS: "the mean of logits (every backbone weighs the same)",
    BEST_BACKBONE: "the best backbone alone ({best})",
    STATIC_WEIGHTS: "static weights (one learned weight per backbone, the same for every image)",
    GATE: "the gate (a learned weight per backbone for each image)",
    CLASS_HEAD: "a class head on static weights (a learned correction per class, read from the image embeddings)",
}


def describe_choice(
    chosen: str, accuracy: dict, spread: dict, folds: int, best_backbone: str, images: int | None = None
) -> str:
    """What calibration kept and why, from its cross-validated top-1 (mean and spread over folds, per candidate):
    the words of the report, the app and the model card, for a gate just calibrated or loaded from its record."""
    names = [name for name in (MEAN_OF_LOGITS, BEST_BACKBONE, STATIC_WEIGHTS, GATE, CLASS_HEAD) if name in accuracy]

    def score(name: str) -> str:
        return f"{100 * accuracy[name]:.1f}%" + (f" (± {100 * spread[name]:.1f})" if name in (spread or {}) else "")

    def short(name: str) -> str:
        return f"the best backbone ({best_backbone})" if name == BEST_BACKBONE else f"the {name}"

    others = [f"{score(name)} for {short(name)}" for name in names if name != chosen]
    on = f"the {images} calibration images" if images else "the calibration images"
    held_out = "one held-out quarter of" if folds == 1 else f"{folds}-fold cross-validation on"
    evidence = (
        f" Right on {score(chosen)} of held-out images ({held_out} {on}, ± spread over folds), against "
        f"{', '.join(others[:-1])}{' and ' if len(others) > 1 else ''}{others[-1]}."
        if chosen in accuracy and others
        else ""
    )
    return (
        f"Kept {_WHAT[chosen].format(best=best_backbone) if chosen in _WHAT else chosen}.{evidence} A richer "
        "combination is kept only when right more often out of fold: the best backbone, the gate and the class head by "
        "more than one standard error (the gate and the class head also when as often and clearly more confidently); "
        "static weights, whose penalty cross-validation chose, when right more often, or as often and more confidently "
        "(a lower held-out cross-entropy)."
    )


@dataclass
class CalibrationReport:
    """What a calibration chose and why: the cross-validated top-1 (mean and spread over folds) and cross-entropy,
    which the choice compares, of the gate, of a class head, of static per-backbone weights, of the mean of logits and
    of the best backbone on the calibration images, and how long it took."""

    dataset: str
    shots: int
    seed: int
    num_images: int
    chosen: str  # "gate", "class head", "static weights", "mean of logits" or "best backbone"
    cv_loss: dict[str, float]  # candidate -> mean cross-entropy on the folds' held-out parts
    cv_accuracy: dict[str, float]  # candidate -> mean top-1 over the folds' held-out parts
    cv_spread: dict[str, float]  # candidate -> standard deviation of that top-1 over folds
    num_folds: int
    settings: dict  # the fitting settings chosen by cross-validation (empty when nothing was trained)
    best_backbone: str  # the best single backbone on all calibration images
    train_accuracy: float  # the final model on all calibration images (optimistic: it was fitted on them)
    backbone_accuracy: dict[str, float]  # each backbone alone on all calibration images
    mean_logits_accuracy: float
    feature_seconds: float
    gate_seconds: float
    images_embedded: int  # backbone forward passes over images (0 when all came from the cache)
    support: LabelledImages | None = field(default=None, repr=False)  # the calibration images, for baselines
    cascade: CascadeReport | None = None  # the cascade fitted with `cascade_tolerance`, if any

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if name != "support"}

    def verdict(self) -> str:
        """What calibration kept and the cross-validated evidence for it, in plain words (see `describe_choice`)."""
        return describe_choice(
            self.chosen, self.cv_accuracy, self.cv_spread, self.num_folds, self.best_backbone, self.num_images
        )

    def __str__(self) -> str:
        settings = ", ".join(f"{key} {value}" for key, value in self.settings.items())
        lines = [
            f"Calibrated on {self.dataset}: {self.shots} shots per class, seed {self.seed}, {self.num_images} images",
            f"  {self.verdict()}",
            *([f"  fitting settings ({self.chosen}) chosen by cross-validation: {settings}"] if settings else []),
            f"  on all calibration images: final model {100 * self.train_accuracy:.1f}% (fitted on them), mean of "
            f"logits {100 * self.mean_logits_accuracy:.1f}%",
            *(f"  {name}: {100 * acc:.1f}%" for name, acc in self.backbone_accuracy.items()),
            f"  time: {self.feature_seconds:.1f} s features ({self.images_embedded} images embedded), "
            f"{self.gate_seconds:.1f} s fitting",
            *([f"  {self.cascade}"] if self.cascade is not None else []),
        ]
        return "\n".join(lines)


@contextmanager
def _fit_progress(progress: bool | FitProgress) -> Iterator[FitProgress | None]:
    """The fitting's progress callback: `progress` itself when callable, a tqdm bar when True, none when False."""
    if callable(progress) or not progress:
        yield progress or None
        return
    with tqdm(total=100, desc="Fitting", unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:

        def report(fraction: float, description: str) -> None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(description)

        yield report


def calibrate(
    model: CLIPEnsembleModel,
    data,
    shots: int = 4,
    seed: int = 0,
    *,
    split: str = "train",
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool | FitProgress = True,
    cascade_tolerance: float | None = None,
) -> CalibrationReport:
    """Fit `model`'s gate on `shots` labelled images per class of `data`; the backbones stay frozen.

    Cross-validation on those images chooses between the trained gate, static per-backbone weights, plain logit
    averaging (the gate's starting point) and the best single backbone, and the fitting settings (see
    `clip_ensemble.calibration.fitting.fit_calibrated_gate`); the report says what was chosen and why.
    `data` is a `LabelledImages`, an image folder, a `datasets.Dataset` or a Hub dataset id (`split` is used for
    the last two). The model takes the data's label names. Image embeddings come from `cache` (by default the
    on-disk cache), so a second calibration on the same images runs no backbone. Deterministic for a seed.
    `progress`: True shows progress bars (embedding, then fitting: folds and training steps), False shows none, and
    a callable `progress(fraction, description)` hears of the fitting instead.

    `cascade_tolerance` (e.g. 0.01, one point of top-1) also fits a cascade (`clip_ensemble.calibration.cascade_fitting.fit_cascade`):
    backbones run cheapest first and an image stops once the rest are unlikely to change its answer, with the
    largest saving whose cross-validated top-1 stays within that tolerance of the full ensemble's. `None` (the
    default) removes any cascade.
    """
    if cascade_tolerance is not None and (
        isinstance(cascade_tolerance, bool)
        or not isinstance(cascade_tolerance, (int, float))
        or not 0 <= cascade_tolerance < 1
    ):
        raise ValueError(
            f"cascade_tolerance={cascade_tolerance!r} must be a fraction of top-1 in [0, 1), e.g. 0.01 for one "
            "point; pass None for no cascade."
        )
    data: LabelledImages = load_labelled_data(data, split=split)
    support = data.subset(sample_few_shot(data, shots, seed), name=data.name)
    if support.label_names != model.labels:
        model.set_labels(support.label_names)
    cache = FeatureCache() if cache is None else cache

    started = time.perf_counter()
    embeds = cache.embed(model.backbones, support.images, batch_size=batch_size, progress=progress is True)
    feature_seconds = time.perf_counter() - started

    started = time.perf_counter()
    device = model.gate.fc1.weight.device
    embeds = [e.to(device, torch.float32) for e in embeds]
    with torch.no_grad():
        per_backbone_logits = model.zero_shot_logits(embeds)  # (n, B, C), fixed while fitting
    labels = torch.tensor(support.labels, device=device)
    features = Features(torch.cat(embeds, dim=-1), per_backbone_logits, labels)
    with _fit_progress(progress) as report_progress:
        choice = fit_calibrated_gate(model.gate, features, seed=seed, progress=report_progress)
    gate_seconds = time.perf_counter() - started
    model.set_class_head(None)  # a head from an earlier calibration would be for other labels or another gate
    if choice.class_head is not None:
        model.set_class_head(choice.class_head, penalty=choice.settings["penalty"])
    cascade = None
    model.set_cascade(None)
    if cascade_tolerance is not None:
        cascade = _fit_cascade(model, features, choice, cascade_tolerance, seed)

    with torch.no_grad():
        final = model.combined_logits(per_backbone_logits, model.gate(features.gate_inputs), [features.gate_inputs])
    names = model.config.backbone_names
    backbone_accuracy = (per_backbone_logits.argmax(-1) == labels[:, None]).float().mean(0).tolist()
    report = CalibrationReport(
        dataset=data.name,
        shots=shots,
        seed=seed,
        num_images=len(support),
        chosen=choice.chosen,
        cv_loss=choice.cv_loss,
        cv_accuracy=choice.cv_accuracy,
        cv_spread=choice.cv_spread,
        num_folds=choice.num_folds,
        settings=choice.settings,
        best_backbone=names[choice.best_backbone],
        train_accuracy=float((final.argmax(-1) == labels).float().mean()),
        backbone_accuracy=dict(zip(names, backbone_accuracy)),
        mean_logits_accuracy=float((per_backbone_logits.mean(1).argmax(-1) == labels).float().mean()),
        feature_seconds=feature_seconds,
        gate_seconds=gate_seconds,
        images_embedded=max(cache.last_computed, default=0),
        support=support,
        cascade=cascade,
    )
    model.config.calibration = {
        "dataset": report.dataset,
        "shots": shots,
        "seed": seed,
        "images": len(support),
        "chosen": report.chosen,
        "why": report.verdict(),
        "cross_validated_loss": {name: round(loss, 4) for name, loss in report.cv_loss.items()},
        "cross_validated_accuracy": {name: round(acc, 4) for name, acc in report.cv_accuracy.items()},
        "cross_validated_spread": {name: round(acc, 4) for name, acc in report.cv_spread.items()},
        "folds": report.num_folds,
        "settings": report.settings,
        "best_single_backbone": report.best_backbone,
        "backbone_accuracy": {name: round(acc, 4) for name, acc in report.backbone_accuracy.items()},
    }
    if cascade is not None:
        model.config.calibration["cascade"] = {
            "tolerance": cascade.tolerance,
            "order": cascade.order,
            "risk": cascade.risk,
            "cross_validated_accuracy": round(cascade.accuracy, 4),
            "mean_gflops": round(cascade.mean_gflops, 4),
            "full_gflops": round(cascade.full_gflops, 4),
        }
    return report


def _fit_cascade(
    model: CLIPEnsembleModel, features: Features, full: GateChoice, tolerance: float, seed: int
) -> CascadeReport:
    """Fit a cascade on the calibration features (the gate's own out-of-fold answers are the full ensemble's) and set
    it on `model`, with what its fitting estimated and the stop margins of other tolerances (for charts)."""
    cascade, report = fit_cascade(
        features,
        model.embed_dims,
        model.backbone_gflops,
        full.out_of_fold,
        tolerance=tolerance,
        seed=seed,
        hidden_size=model.config.gate_hidden_size,
        combination=model.config.combination,
        names=model.config.backbone_names,
    )
    model.set_cascade(
        cascade.to(model.gate.fc1.weight.device),
        tolerance=report.tolerance,
        risk=report.risk,
        mean_gflops=round(report.mean_gflops, 6),
        full_gflops=round(report.full_gflops, 6),
        cross_validated_accuracy=round(report.accuracy, 4),
        full_cross_validated_accuracy=round(report.full_accuracy, 4),
        stop_fractions=[round(f, 4) for f in report.stop_fractions],
        stop_margins_by_tolerance={str(t): report.at_tolerance(t)["stop_margins"] for t in CHART_TOLERANCES},
    )
    return report


__all__ = ["CalibrationReport", "calibrate", "describe_choice"]
