"""Fitting a cascade on cached calibration features: a gate per prefix of the cheapest-first order, and the stopping
rule (one margin threshold) with the largest saving whose out-of-fold accuracy stays within a tolerance of the full
ensemble's."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .cost import Cascade, cost_order, margins
from .fitting import Features, cross_validation_folds, fit_calibrated_gate
from .gate import EnsembleGate, combine_logits
from .modeling_clip_ensemble import CLIPEnsembleModel

SINGLE_BACKBONE = "single backbone"  # the first stage: the cheapest backbone's own logits, unweighted
# Tolerances whose thresholds are kept in the config, for accuracy-against-compute charts.
CHART_TOLERANCES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
# Margin thresholds tried: this many quantiles of the early stages' out-of-fold margins.
_NUM_THRESHOLDS = 200


@dataclass
class CascadeReport:
    """What the cascade's fitting chose: out-of-fold top-1 and mean GFLOPs per image, of the full ensemble and of the
    cascade at the chosen threshold, and the trade-off at every threshold tried."""

    order: list[str]  # backbone names, cheapest first
    tolerance: float
    threshold: float | None  # None: never stops early
    full_gflops: float
    full_accuracy: float  # out-of-fold top-1 of the full ensemble
    accuracy: float  # out-of-fold top-1 of the cascade at `threshold`
    mean_gflops: float  # mean GFLOPs per image of the cascade at `threshold`, out of fold
    stop_fractions: list[float]  # fraction of images that stop after each backbone of `order`
    stage_choices: list[str]  # what calibration chose for each prefix gate (gate, averaging, best backbone)
    num_folds: int
    seconds: float
    tradeoff: list[dict] = field(default_factory=list)  # per threshold tried: threshold, accuracy, mean_gflops

    def to_dict(self) -> dict:
        return asdict(self)

    def at_tolerance(self, tolerance: float) -> dict:
        """The threshold, accuracy and mean GFLOPs that tolerance `tolerance` would have chosen (for charts)."""
        return _choose(self.tradeoff, self.full_accuracy, tolerance)

    def __str__(self) -> str:
        stops = ", ".join(f"{name} {100 * f:.0f}%" for name, f in zip(self.order, self.stop_fractions))
        threshold = "never stops early" if self.threshold is None else f"stops at margin {self.threshold:.3g}"
        return (
            f"Cascade (tolerance {self.tolerance}): {threshold}; out of fold ({self.num_folds} folds) top-1 "
            f"{100 * self.accuracy:.1f}% at {self.mean_gflops:.3g} GFLOPs/image against the full ensemble's "
            f"{100 * self.full_accuracy:.1f}% at {self.full_gflops:.3g}; images stopping after each backbone: {stops} "
            f"({self.seconds:.1f} s)"
        )


def _columns(embed_dims: list[int], backbones: list[int]) -> list[int]:
    """Gate-input columns of `backbones`, in that order."""
    starts = np.cumsum([0, *embed_dims])
    return [c for b in backbones for c in range(starts[b], starts[b + 1])]


def _prefix(features: Features, embed_dims: list[int], backbones: list[int]) -> Features:
    """The features of `backbones` alone, in that order, as `fit_calibrated_gate` takes them."""
    return Features(
        features.gate_inputs[:, _columns(embed_dims, backbones)], features.logits[:, backbones], features.labels
    )


def _stage_outputs(gates: list[EnsembleGate], features: Features, embed_dims: list[int], order: list[int]):
    """Each stage's (predictions (n,), margins (n,)) on `features`: gates[k] over the first k + 1 of `order`."""
    outputs = []
    with torch.no_grad():
        for k, gate in enumerate(gates):
            prefix = _prefix(features, embed_dims, order[: k + 1]) if k < len(order) - 1 else features
            combined = combine_logits(prefix.logits, gate(prefix.gate_inputs))
            outputs.append((combined.argmax(-1), margins(combined)))
    return outputs


def _simulate(predictions: torch.Tensor, stage_margins: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(stages, n) predictions and margins -> (n,) the stage each image stops at (the last when none is sure)."""
    stages, n = predictions.shape
    if threshold is None:
        return torch.full((n,), stages - 1)
    sure = stage_margins >= threshold
    sure[-1] = True
    return sure.float().argmax(0)  # the first stage that is sure


def _choose(tradeoff: list[dict], full_accuracy: float, tolerance: float) -> dict:
    """The cheapest point whose accuracy is within `tolerance` of the full ensemble's; ties go to the safer (higher)
    threshold. Tolerance 0 never stops early."""
    if tolerance == 0:
        return tradeoff[-1]
    feasible = [i for i, point in enumerate(tradeoff) if full_accuracy - point["accuracy"] <= tolerance + 1e-9]
    return tradeoff[min(feasible, key=lambda i: (tradeoff[i]["mean_gflops"], -i))]


def fit_cascade(
    model: CLIPEnsembleModel, features: Features, *, tolerance: float, seed: int = 0, num_folds: int = 3
) -> CascadeReport:
    """Fit a cascade for `model` on its calibration `features` (model.gate already fitted) and set it on the model.

    Backbones run cheapest first (by `model.backbone_gflops`; ties keep the config's order). After each of the first
    B - 1, a gate over the backbones run so far, fitted with `fit_calibrated_gate` on their columns, combines them
    (after the first backbone alone, its own logits: a gate could not change its answer), and an image stops when the combination's margin reaches a threshold. The threshold is the one with the lowest
    mean GFLOPs whose top-1 stays within `tolerance` (a fraction: 0.01 is one point) of the full ensemble's, both
    estimated out of fold (`num_folds` folds of `cross_validation_folds`): the prefix gates and the full gate are
    refitted on each fold's training part and scored on its held-out part. `tolerance=0` keeps the full ensemble's answers exactly: no stop can be shown to change
    none on new images, so the cascade then runs every backbone.
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise ValueError(
            f"cascade_tolerance={tolerance!r} must be a fraction of top-1 in [0, 1), e.g. 0.01 for one point; pass "
            "None for no cascade."
        )
    started = time.perf_counter()
    features = Features(*features)
    dims, gflops = model.embed_dims, model.backbone_gflops
    order = cost_order(gflops)
    num_backbones = len(order)
    settings = {"hidden_size": model.config.gate_hidden_size, "combination": model.config.combination}

    def fit_prefix_gates(train: Features) -> tuple[list[EnsembleGate], list[str]]:
        gates, chosen = [], []
        for k in range(num_backbones - 1):
            gate = EnsembleGate([dims[b] for b in order[: k + 1]], settings["hidden_size"], settings["combination"])
            if k == 0:  # one backbone: a gate could only rescale its logits, never change its answer
                chosen.append(SINGLE_BACKBONE)
            else:
                chosen.append(fit_calibrated_gate(gate, _prefix(train, dims, order[: k + 1]), seed=seed).chosen)
            gates.append(gate)
        return gates, chosen

    # Out of fold: every stage's answer and margin on examples that none of its gates was fitted on.
    n = len(features.labels)
    predictions = torch.empty(num_backbones, n, dtype=torch.long)
    stage_margins = torch.empty(num_backbones, n)
    folds = cross_validation_folds(features.labels, num_folds, seed)
    for fold in folds:
        held_out = torch.tensor(fold)
        train_index = sorted(set(range(n)) - set(fold))
        train, val = features.subset(train_index), features.subset(fold)
        gates, _ = fit_prefix_gates(train)
        full = copy.deepcopy(model.gate)
        fit_calibrated_gate(full, train, seed=seed)
        for k, (answer, margin) in enumerate(_stage_outputs([*gates, full], val, dims, order)):
            predictions[k, held_out], stage_margins[k, held_out] = answer, margin

    costs = torch.tensor([gflops[b] for b in order]).cumsum(0)  # (stages,) cost of stopping after each
    correct = predictions == features.labels.cpu()
    early = stage_margins[:-1].flatten()
    finite = early[torch.isfinite(early)]
    candidates = (
        sorted(set(torch.quantile(finite, torch.linspace(0, 1, _NUM_THRESHOLDS)).tolist())) if len(finite) else []
    )
    tradeoff = []
    for threshold in [*candidates, None]:  # safer and safer; None never stops early
        stage = _simulate(predictions, stage_margins, threshold)
        tradeoff.append(
            {
                "threshold": threshold,
                "accuracy": float(correct[stage, torch.arange(n)].float().mean()),
                "mean_gflops": float(costs[stage].mean()),
                "stop_fractions": torch.bincount(stage, minlength=num_backbones).div(n).tolist(),
            }
        )
    full_accuracy = tradeoff[-1]["accuracy"]
    chosen = _choose(tradeoff, full_accuracy, tolerance)

    # The deployed prefix gates: fitted on all calibration examples.
    gates, stage_choices = fit_prefix_gates(features)
    cascade = Cascade(dims, order, chosen["threshold"], settings["hidden_size"], settings["combination"])
    for target, gate in zip(cascade.gates, gates):
        target.load_state_dict(gate.state_dict())
    report = CascadeReport(
        order=[model.config.backbone_names[b] for b in order],
        tolerance=float(tolerance),
        threshold=chosen["threshold"],
        full_gflops=float(costs[-1]),
        full_accuracy=full_accuracy,
        accuracy=chosen["accuracy"],
        mean_gflops=chosen["mean_gflops"],
        stop_fractions=chosen["stop_fractions"],
        stage_choices=stage_choices,
        num_folds=len(folds),
        seconds=time.perf_counter() - started,
        tradeoff=tradeoff,
    )
    model.set_cascade(
        cascade,
        tolerance=report.tolerance,
        mean_gflops=round(report.mean_gflops, 6),
        full_gflops=round(report.full_gflops, 6),
        cross_validated_accuracy=round(report.accuracy, 4),
        full_cross_validated_accuracy=round(report.full_accuracy, 4),
        stop_fractions=[round(f, 4) for f in report.stop_fractions],
        # What other tolerances would have chosen, so that evaluation can chart the trade-off.
        thresholds={str(t): report.at_tolerance(t)["threshold"] for t in CHART_TOLERANCES},
    )
    return report


__all__ = ["CHART_TOLERANCES", "CascadeReport", "fit_cascade"]
