"""Budgeted subsets: the subset of an ensemble's backbones with the best cross-validated top-1 within a GFLOPs budget,
chosen on cached calibration features and returned as a calibrated model that shares the backbones."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..data.features import FeatureCache
from ..data.labelled import LabelledImages, load_labelled_data, sample_few_shot
from ..models.configuration_clip_ensemble import CLIPEnsembleConfig
from ..models.gate import EnsembleGate
from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from .calibrate import CalibrationReport, calibrate
from .fitting import fit_calibrated_gate
from .folds import Features

# Subsets are enumerated exhaustively (2^B - 1 of them); beyond this many backbones that is too many.
_MAX_BACKBONES = 16


@dataclass
class SelectionReport:
    """The subsets weighed under a budget: GFLOPs per image, the mean of logits' top-1 on the calibration images (which
    ranks every subset, at no fitting cost) and, for the shortlisted ones, calibration's cross-validated top-1."""

    budget_gflops: float
    chosen: list[str]
    gflops: float
    candidates: list[dict]  # subset (names), gflops, averaging_accuracy, cv_accuracy (None when not shortlisted)
    subsets_within_budget: int
    seconds: float
    calibration: CalibrationReport | None = field(default=None, repr=False)  # the chosen subset's calibration

    def __str__(self) -> str:
        shortlisted = [c for c in self.candidates if c["cv_accuracy"] is not None]
        rows = [
            f"  {'+'.join(c['subset'])}: {c['gflops']:.4g} GFLOPs, cross-validated top-1 {100 * c['cv_accuracy']:.1f}% "
            f"(mean of logits {100 * c['averaging_accuracy']:.1f}%)"
            for c in shortlisted
        ]
        lines = [
            f"Budget {self.budget_gflops:.4g} GFLOPs/image: chose {'+'.join(self.chosen)} ({self.gflops:.4g} GFLOPs) "
            f"among {self.subsets_within_budget} subsets within budget; cross-validated on the shortlist ranked by "
            f"the mean of logits ({self.seconds:.1f} s):",
            *rows,
        ]
        if self.calibration is not None:
            lines.append(str(self.calibration))
        return "\n".join(lines)


def _check_budget(budget_gflops: float, gflops: list[float], names: list[str]) -> None:
    if isinstance(budget_gflops, bool) or not isinstance(budget_gflops, (int, float)) or not budget_gflops > 0:
        raise ValueError(f"budget_gflops={budget_gflops!r} must be a positive number of GFLOPs per image.")
    cheapest = min(range(len(gflops)), key=lambda b: (gflops[b], b))
    if budget_gflops < gflops[cheapest]:
        raise ValueError(
            f"budget_gflops={budget_gflops:.4g} is below the cheapest backbone ({names[cheapest]}, "
            f"{gflops[cheapest]:.4g} GFLOPs per image); raise the budget to at least {gflops[cheapest]:.4g}, or add a "
            "cheaper backbone. `model.backbone_gflops` lists each backbone's cost."
        )


def weigh_subsets(
    features: Features,
    embed_dims: list[int],
    gflops: list[float],
    budget_gflops: float,
    *,
    seed: int = 0,
    max_candidates: int = 5,
    hidden_size: int = 128,
    combination: str = "softplus",
) -> tuple[dict, list[dict], int]:
    """On cached calibration features: every subset of backbones within `budget_gflops` ranked by the mean of logits'
    top-1, the `max_candidates` best cross-validated with `fit_calibrated_gate`, and the best of those (ties: the
    cheaper). Returns (the best, the candidates as dicts of indices, gflops, averaging_accuracy and cv_accuracy
    (None when not shortlisted), best first by averaging, and how many subsets were within the budget)."""
    within = [
        subset
        for size in range(1, len(gflops) + 1)
        for subset in itertools.combinations(range(len(gflops)), size)
        if sum(gflops[b] for b in subset) <= budget_gflops
    ]
    candidates = []
    for subset in within:
        averaged = features.logits[:, list(subset)].mean(1)
        candidates.append(
            {
                "indices": subset,
                "gflops": sum(gflops[b] for b in subset),
                "averaging_accuracy": float((averaged.argmax(-1) == features.labels).float().mean()),
                "cv_accuracy": None,
            }
        )
    candidates.sort(key=lambda c: (-c["averaging_accuracy"], c["gflops"], c["indices"]))
    for candidate in candidates[:max_candidates]:
        subset = candidate["indices"]
        gate = EnsembleGate([embed_dims[b] for b in subset], hidden_size, combination)
        choice = fit_calibrated_gate(gate, features.of_backbones(embed_dims, subset), seed=seed)
        candidate["cv_accuracy"] = choice.cv_accuracy[choice.chosen]
    best = min(candidates[:max_candidates], key=lambda c: (-c["cv_accuracy"], c["gflops"], c["indices"]))
    return best, candidates, len(within)


def select_backbones(
    model: CLIPEnsembleModel,
    data,
    shots: int = 4,
    budget_gflops: float | None = None,
    seed: int = 0,
    *,
    split: str = "train",
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = True,
    max_candidates: int = 5,
    cascade_tolerance: float | None = None,
) -> tuple[CLIPEnsembleModel, SelectionReport]:
    """The subset of `model`'s backbones with the best expected top-1 within `budget_gflops` per image, calibrated.

    On the same `shots` calibration images per class that `calibrate` draws (embedded once, through `cache`), every
    subset within the budget is ranked by the mean of logits; the `max_candidates` best are each calibrated with
    calibration's own cross-validation (`fit_calibrated_gate` on the subset's columns), and the one with the best
    cross-validated top-1 wins (ties: the cheaper). Returns a new model over that subset, sharing `model`'s backbone
    modules (none is loaded twice) and calibrated with `calibrate` (and `cascade_tolerance`), and the report of what
    was weighed.
    """
    gflops, names = model.backbone_gflops, model.config.backbone_names
    if budget_gflops is None:
        raise ValueError("select_backbones needs budget_gflops, the GFLOPs per image the subset may spend.")
    _check_budget(budget_gflops, gflops, names)
    if len(gflops) > _MAX_BACKBONES:
        raise ValueError(
            f"select_backbones weighs every subset; {len(gflops)} backbones is more than {_MAX_BACKBONES}."
        )
    started = time.perf_counter()
    data: LabelledImages = load_labelled_data(data, split=split)
    support = data.subset(sample_few_shot(data, shots, seed), name=data.name)
    if support.label_names != model.labels:
        model.set_labels(support.label_names)
    cache = FeatureCache() if cache is None else cache
    embeds = cache.embed(model.backbones, support.images, batch_size=batch_size, progress=progress)
    device = model.gate.fc1.weight.device
    embeds = [e.to(device, torch.float32) for e in embeds]
    with torch.no_grad():
        logits = model.zero_shot_logits(embeds)  # (n, B, C)
    labels = torch.tensor(support.labels, device=device)
    features = Features(torch.cat(embeds, dim=-1), logits, labels)

    best, candidates, within = weigh_subsets(
        features,
        model.embed_dims,
        gflops,
        budget_gflops,
        seed=seed,
        max_candidates=max_candidates,
        hidden_size=model.config.gate_hidden_size,
        combination=model.config.combination,
    )
    for candidate in candidates:
        candidate["subset"] = [names[b] for b in candidate["indices"]]
    best["subset"] = [names[b] for b in best["indices"]]

    config = CLIPEnsembleConfig(
        backbones=[dict(model.config.backbones[b]) for b in best["indices"]],
        labels=model.labels,
        templates=model.config.templates,
        gate_hidden_size=model.config.gate_hidden_size,
        combination=model.config.combination,
    )
    subset_model = CLIPEnsembleModel(config, [model.backbones[b] for b in best["indices"]])
    subset_model.gate.to(device)
    report = SelectionReport(
        budget_gflops=float(budget_gflops),
        chosen=best["subset"],
        gflops=best["gflops"],
        candidates=[
            {key: c[key] for key in ("subset", "gflops", "averaging_accuracy", "cv_accuracy")} for c in candidates
        ],
        subsets_within_budget=within,
        seconds=time.perf_counter() - started,
    )
    report.calibration = calibrate(
        subset_model,
        data,
        shots=shots,
        seed=seed,
        cache=cache,
        batch_size=batch_size,
        progress=progress,
        cascade_tolerance=cascade_tolerance,
    )
    subset_model.config.calibration["backbone_selection"] = {
        "budget_gflops": report.budget_gflops,
        "gflops": round(report.gflops, 6),
        "candidates": [
            {
                "subset": c["subset"],
                "gflops": round(c["gflops"], 6),
                "cross_validated_accuracy": round(c["cv_accuracy"], 4),
            }
            for c in report.candidates
            if c["cv_accuracy"] is not None
        ],
    }
    return subset_model, report


__all__ = ["SelectionReport", "select_backbones", "weigh_subsets"]
