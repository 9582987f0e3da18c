"""Fitting a cascade on cached calibration features: a gate per prefix of the cheapest-first order, and a stopping
rule per stage, fitted so that an image stops only where the backbones still to run are unlikely to change its
answer, with the largest saving whose top-1, judged on images the rule was not fitted on, stays within a tolerance
of the full ensemble's."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..models.cascade import Cascade, cost_order
from ..models.class_head import ClassHead
from ..models.gate import EnsembleGate, combine_logits
from .fitting import fit_calibrated_gate
from .folds import TRAIN_CLASSES, CalibrationData, Features, OutOfFold, calibration_folds, cross_validation_folds

SINGLE_BACKBONE = "single backbone"  # the first stage: the cheapest backbone's own logits, unweighted
# Tolerances whose stopping margins are kept in the config, for accuracy-against-compute charts.
CHART_TOLERANCES = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
# Risks tried: the estimated chance, among the images a stage stops, that the full ensemble would answer otherwise.
RISKS = tuple(float(r) for r in np.geomspace(1e-3, 0.5, 28))


@dataclass
class CascadeReport:
    """What the cascade's fitting chose: out-of-fold top-1 and mean GFLOPs per image of the full ensemble and of the
    cascade at the chosen risk, and the trade-off at every risk tried."""

    order: list[str]  # backbone names, cheapest first
    tolerance: float
    risk: float | None  # the chosen risk; None: never stops early
    stop_margins: list[float | None]  # per stage but the last: the margin at which an image stops (None: never)
    full_gflops: float
    full_accuracy: float  # out-of-fold top-1 of the full ensemble
    accuracy: float  # top-1 of the cascade out of fold, each image under stop margins fitted without it
    mean_gflops: float  # mean GFLOPs per image of the cascade, judged the same way
    stop_fractions: list[float]  # fraction of images that stop after each backbone of `order`
    stage_choices: list[str]  # what calibration chose for each prefix (mean of logits, best backbone, static weights)
    num_scored: int  # calibration images with out-of-fold answers, on which the rule was fitted
    seconds: float
    # When it never stops early: the calibration images that would show a saving at the rates of lost answers seen
    # here (the fewest over the stopping rules tried; None where every rule loses more than the tolerance).
    images_needed: int | None = None
    # Per risk tried: risk, stop_margins (kept), accuracy, estimated_loss, mean_gflops (judged out of fold).
    tradeoff: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def at_tolerance(self, tolerance: float) -> dict:
        """The point (risk, stop margins, accuracy, mean GFLOPs) that `tolerance` would have chosen (for charts)."""
        return _choose(self.tradeoff, tolerance)

    def __str__(self) -> str:
        stops = ", ".join(f"{name} {100 * f:.0f}%" for name, f in zip(self.order, self.stop_fractions))
        rule = "never stops early" if self.risk is None else f"stops where the change risk is under {self.risk:.2g}"
        if self.risk is None and self.tolerance > 0:
            rule += (
                f" (about {self.images_needed} calibration images, {self.images_needed - self.num_scored} more, would "
                "show a saving within the tolerance at the rate of lost answers seen here)"
                if self.images_needed is not None
                else " (every stopping rule tried loses more than the tolerance)"
            )
        return (
            f"Cascade (tolerance {self.tolerance}): {rule}; out of fold ({self.num_scored} images) top-1 "
            f"{100 * self.accuracy:.1f}% at {self.mean_gflops:.3g} GFLOPs/image against the full ensemble's "
            f"{100 * self.full_accuracy:.1f}% at {self.full_gflops:.3g}; images stopping after each backbone: {stops} "
            f"({self.seconds:.1f} s)"
        )


def stop_margins(stages: list[OutOfFold], full: OutOfFold, risk: float) -> list[float | None]:
    """Per early stage, the lowest margin at which an image may stop there, or None where none may.

    Stage by stage, over the images that have not stopped yet: sorted by the stage's margin, the largest top group
    whose estimated change rate, (images whose stage answer differs from the full ensemble's + 1) / (images + 2),
    is at most `risk` stops. The +1 and +2 (a uniform prior on the rate) keep a few agreeing images from looking
    safe: a rate under 1% needs about 100 images behind it.
    """
    return _stop_margins(_Answers.of(stages, full), risk)


class _Answers(NamedTuple):
    """Scored images' answers as NumPy arrays: the stopping rule is fitted and judged dozens of times on a few hundred
    images, where each torch call's overhead would cost more than its work (on hard-images, most of the cascade's
    fitting time beside the stages' own)."""

    stage_predictions: np.ndarray  # (S, m) each early stage's answer
    stage_margins: np.ndarray  # (S, m) float32, its top-1 minus top-2 combined logit
    full_predictions: np.ndarray  # (m,) the full ensemble's answer

    @classmethod
    def of(cls, stages: list[OutOfFold], full: OutOfFold) -> _Answers:
        def stacked(values: list[torch.Tensor]) -> np.ndarray:
            return torch.stack(values).cpu().numpy() if values else np.empty((0, len(full.predictions)))

        return cls(
            stacked([s.predictions for s in stages]),
            stacked([s.margins for s in stages]),
            full.predictions.cpu().numpy(),
        )

    def rows(self, keep: np.ndarray) -> _Answers:
        return _Answers(self.stage_predictions[:, keep], self.stage_margins[:, keep], self.full_predictions[keep])


def _stop_margins(answers: _Answers, risk: float) -> list[float | None]:
    """`stop_margins` on NumPy answers."""
    running = np.ones(len(answers.full_predictions), dtype=bool)
    risk = np.float32(risk)  # compared at the rates' (and margins') float32 precision
    margins: list[float | None] = []
    for predictions, stage_margins in zip(answers.stage_predictions, answers.stage_margins):
        candidates = np.flatnonzero(running)
        values = stage_margins[candidates]
        ranked = np.argsort(-values, kind="stable")
        sorted_margins = values[ranked]
        changes = np.cumsum(predictions[candidates[ranked]] != answers.full_predictions[candidates[ranked]])
        rate = (changes + 1).astype(np.float32) / np.arange(3, len(ranked) + 3, dtype=np.float32)
        # A group must end where the margin drops, so that a threshold separates it from the rest.
        ends = np.ones(len(ranked), dtype=bool)
        ends[:-1] = sorted_margins[:-1] > sorted_margins[1:]
        feasible = np.flatnonzero((rate <= risk) & ends & np.isfinite(sorted_margins))
        if len(feasible) == 0:
            margins.append(None)
            continue
        threshold = float(sorted_margins[feasible[-1]])
        margins.append(threshold)
        running[candidates[values >= threshold]] = False
    return margins


def _simulate(answers: _Answers, thresholds: list[float | None]) -> np.ndarray:
    """(m,) the stage each scored image stops at under `thresholds` (the number of early stages when it runs every
    backbone)."""
    stop = np.full(len(answers.full_predictions), len(thresholds))
    for k in reversed(range(len(thresholds))):  # the earliest stage whose margin is reached wins
        if thresholds[k] is not None:
            stop[answers.stage_margins[k] >= np.float32(thresholds[k])] = k
    return stop


class _Fold(NamedTuple):
    """One calibration fold of the scored images: the answers the stop margins are fitted on, and the held-out ones."""

    held: np.ndarray  # (m,) whether each scored image is in the fold
    train: _Answers  # the other folds' stage answers and full answers
    test: _Answers  # the fold's own


def _folds_of(answers: _Answers, folds: list[list[int]]) -> list[_Fold]:
    """The stages' and the full ensemble's out-of-fold answers split by `folds` (positions among the scored images),
    once for every risk."""
    split = []
    for fold in folds:
        held = np.zeros(len(answers.full_predictions), dtype=bool)
        held[fold] = True
        split.append(_Fold(held, answers.rows(~held), answers.rows(held)))
    return split


def _judged_out_of_fold(folds: list[_Fold], risk: float) -> tuple[np.ndarray, list[float | None]]:
    """(m,) the stage each scored image stops at under stop margins fitted at `risk` without its fold, and the stop
    margins to keep: per stage, the median of the folds' margins (None where most folds stop no image there).

    Margins fitted and scored on the same images look safer than they are: `stop_margins` places each one where
    the change rate of those very images just stays under the risk. On the synthetic task's 1,600 calibration
    images, margins fitted on one half lose about twice as many answers on the other half as on their own. Judged on
    held-out folds, a rule is scored as it will run, on images its margins never saw; and the margins kept are the
    folds' own, so what is kept is what was judged."""
    stop = np.empty(len(folds[0].held), dtype=np.int64)
    fold_margins = []
    for fold in folds:
        margins = _stop_margins(fold.train, risk)
        stop[fold.held] = _simulate(fold.test, margins)
        fold_margins.append(margins)
    kept = []
    for per_fold in zip(*fold_margins):
        stopping = [margin for margin in per_fold if margin is not None]
        kept.append(statistics.median(stopping) if len(stopping) > len(per_fold) / 2 else None)
    return stop, kept


def _estimated_loss(correct: np.ndarray, stage: np.ndarray) -> float:
    """(B, m) whether each stage's answer is right, (m,) the stage each image stops at -> the loss of top-1 against
    the full ensemble (the last stage), estimated conservatively: (images the full ensemble gets right and the
    cascade wrong + 1) / (images + 2), a uniform prior on the rate of lost answers; 0 when no image stops early.
    Answers the cascade gains do not offset those it loses (on a few images they are mostly luck), and a loss under
    1% needs about 100 images behind it."""
    m = len(stage)
    if bool((stage == len(correct) - 1).all()):
        return 0.0
    lost = correct[-1] & ~correct[stage, np.arange(m)]
    return float(lost.sum() + 1) / (m + 2)


def images_to_show_a_saving(tolerance: float, lost_rate: float = 0.0) -> float:
    """The fewest calibration images on which a stopping rule that loses `lost_rate` of the full ensemble's right
    answers is shown within `tolerance`: `_estimated_loss`, (lost_rate * images + 1) / (images + 2), must not exceed
    it. With no answer lost, 98 at 0.01; inf when `lost_rate` reaches the tolerance, or at tolerance 0."""
    if tolerance <= lost_rate:
        return math.inf
    return max(1, math.ceil((1 - 2 * tolerance) / (tolerance - lost_rate) - 1e-9))


def _choose(tradeoff: list[dict], tolerance: float) -> dict:
    """The cheapest point whose estimated loss (`_estimated_loss`) is within `tolerance`; ties go to the lower risk.
    Tolerance 0 never stops early (the last point)."""
    if tolerance == 0:
        return tradeoff[-1]
    feasible = [
        i
        for i, point in enumerate(tradeoff)
        if point["estimated_loss"] <= tolerance + 1e-9 and (_stops(point) or point["risk"] is None)
    ]  # a risk whose kept margins stop no image is the same as never stopping: reported as such
    return tradeoff[min(feasible, key=lambda i: (tradeoff[i]["mean_gflops"], i))]


def _stops(point: dict) -> bool:
    """Whether a trade-off point's kept margins let an image stop early."""
    return any(margin is not None for margin in point["stop_margins"])


def _stage_training_views(
    logits: torch.Tensor, labels: torch.Tensor, order: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`training_view` of the first 2, 3, ..., B - 1 backbones of `order` (the cascade's stages that combine), from
    (n, B, C) `logits`: per stage, (n, k, K) logits and (n,) label positions. Each image's log-probabilities are taken
    once for all the stages, 512 images at a time, and their running maximum over the backbones in run order gives
    every prefix's best log-probability per class."""
    n, num_backbones, num_classes = logits.shape
    if num_classes <= TRAIN_CLASSES:
        ordered = logits[:, order]
        return [(ordered[:, :k], labels) for k in range(2, num_backbones)]
    kept = torch.empty(num_backbones - 2, n, TRAIN_CLASSES, dtype=torch.long, device=logits.device)
    for start in range(0, n, 512):
        rows = slice(start, start + 512)
        best = logits[rows][:, order].log_softmax(-1)  # (r, B, C), made the best over each prefix in place
        for b in range(1, num_backbones):
            torch.maximum(best[:, b], best[:, b - 1], out=best[:, b])
        best[torch.arange(len(best)), :, labels[rows]] = math.inf  # the label is always kept, first
        kept[:, rows] = best[:, 1:-1].topk(TRAIN_CLASSES, dim=-1).indices.transpose(0, 1)
    views = []
    for k in range(2, num_backbones):  # the first k backbones, over their (n, K) classes
        view = torch.stack([logits[:, b].gather(1, kept[k - 2]) for b in order[:k]], 1)
        views.append((view, torch.zeros_like(labels)))
    return views


@torch.no_grad()
def run_on_features(
    cascade: Cascade,
    gate: EnsembleGate,
    features: Features,
    embed_dims: list[int],
    class_head: ClassHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade on cached features (every backbone's embeddings known, as in a benchmark): (n, C) the logits each
    image ends with, and (n,) how many backbones of `cascade.order` it ran. `gate` (and `class_head`, if calibration
    kept one) are the full ensemble's, which the images that run every backbone end with."""
    order, n = cascade.order, len(features.labels)
    logits = combine_logits(features.logits, gate(features.gate_inputs))
    if class_head is not None:
        logits += class_head(features.gate_inputs)
    run = torch.full((n,), len(order), device=logits.device)
    running = torch.ones(n, dtype=torch.bool, device=logits.device)
    for k in range(len(order) - 1):
        prefix = features.of_backbones(embed_dims, order[: k + 1])
        combined, _, stop = cascade.stage(k, [prefix.gate_inputs], prefix.logits)
        stop &= running
        logits[stop], run[stop] = combined[stop], k + 1
        running &= ~stop
    return logits, run


def fit_cascade(
    features: Features,
    embed_dims: list[int],
    gflops: list[float],
    full: OutOfFold,
    *,
    tolerance: float,
    seed: int = 0,
    hidden_size: int = 128,
    combination: str = "softplus",
    names: list[str] | None = None,
) -> tuple[Cascade, CascadeReport]:
    """Fit a cascade on calibration `features`, given the full ensemble's out-of-fold answers `full` (the
    `out_of_fold` of calibration's `fit_calibrated_gate` on the same features and seed).

    Backbones run cheapest first (by `gflops`; ties keep the given order). After each of the first B - 1, a static
    combination of the backbones run so far (the mean of their logits, the best of them or static weights, as
    `fit_calibrated_gate(per_image=False)` chooses on their logits, with the same folds) combines them (after the
    first backbone, its own logits), and an image stops when the combination's margin reaches that stage's stop
    margin. A stage has no hidden layer to train or to run: fitting costs little beside the gate's, and a stage
    costs an image one weighted sum of logits. Stop margins come from one risk (`stop_margins`):
    the estimated chance that running the rest would change a stopped image's answer. Each risk is judged on the
    calibration folds, every fold under margins fitted on the others (`_judged_out_of_fold`), and keeps the median
    of the folds' margins. The risk kept is the one with the lowest mean GFLOPs whose estimated loss of top-1 against
    the full ensemble, so judged (`_estimated_loss`), is at most `tolerance` (a fraction: 0.01 is one point).
    `tolerance=0` never stops early: the cascade then gives the full ensemble's answers exactly.
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise ValueError(
            f"cascade_tolerance={tolerance!r} must be a fraction of top-1 in [0, 1), e.g. 0.01 for one point; pass "
            "None for no cascade."
        )
    started = time.perf_counter()
    features = Features(*features)
    order = cost_order(gflops)
    names = names or [f"backbone {b}" for b in range(len(gflops))]
    cascade = Cascade(embed_dims, order, [None] * (len(order) - 1), hidden_size, combination)
    stages, stage_choices = [], []
    # What calibration reads from the (n, B, C) logits (576 MB at paper scale), read once for all the prefixes, in run
    # order: each prefix's held-out logits and right answers are slices of these.
    labels, folds = features.labels, calibration_folds(features.labels, seed)
    run_order = torch.tensor(order, device=labels.device)
    held_out = [features.logits[torch.tensor(fold, device=labels.device)[:, None], run_order] for fold in folds]
    single_correct = (features.logits.argmax(-1) == labels[:, None])[:, run_order]  # (n, B)
    views = _stage_training_views(features.logits, labels, order)
    for k, gate in enumerate(cascade.gates):
        if k == 0:  # one backbone: a gate could only rescale its logits, never change its answer
            stages.append(OutOfFold.of(full.index, features.logits[full.index, order[0]]))
            stage_choices.append(SINGLE_BACKBONE)
            continue
        prefix = [logits[:, : k + 1] for logits in held_out]
        data = CalibrationData(labels, folds, prefix, *views[k - 1], single_correct[:, : k + 1])
        choice = fit_calibrated_gate(gate, features, seed=seed, per_image=False, data=data)
        if not torch.equal(choice.out_of_fold.index, full.index):
            raise ValueError("`full` must come from `fit_calibrated_gate` on the same features with the same seed.")
        stages.append(choice.out_of_fold)
        stage_choices.append(choice.chosen)

    answers = _Answers.of(stages, full)
    labels = features.labels[full.index.to(features.labels.device)].cpu().numpy()
    correct = np.vstack([answers.stage_predictions, answers.full_predictions[None]]) == labels  # (B, m)
    costs = np.cumsum([float(gflops[b]) for b in order])  # (B,) cost of stopping after each backbone
    m = len(labels)
    folds = _folds_of(answers, cross_validation_folds(labels, seed=seed))  # to judge each rule out of fold
    tradeoff = []
    for risk in [*RISKS, None]:  # riskier first; None never stops early
        if risk is None:
            thresholds = [None] * len(stages)
            stage = _simulate(answers, thresholds)
        else:
            stage, thresholds = _judged_out_of_fold(folds, risk)
        right = correct[stage, np.arange(m)]
        tradeoff.append(
            {
                "risk": risk,
                "stop_margins": thresholds,
                "accuracy": float(right.mean()),
                "estimated_loss": _estimated_loss(correct, stage),
                "lost": int((correct[-1] & ~right).sum()),
                "mean_gflops": float(costs[stage].mean()),
                "stop_fractions": (np.bincount(stage, minlength=len(order)) / m).tolist(),
            }
        )
    full_accuracy = tradeoff[-1]["accuracy"]
    chosen = _choose(tradeoff, tolerance)
    needed = min(
        (images_to_show_a_saving(tolerance, p["lost"] / m) for p in tradeoff if _stops(p)),
        default=math.inf,
    )
    cascade.stop_margins = list(chosen["stop_margins"])
    report = CascadeReport(
        order=[names[b] for b in order],
        tolerance=float(tolerance),
        risk=chosen["risk"],
        stop_margins=cascade.stop_margins,
        full_gflops=float(costs[-1]),
        full_accuracy=full_accuracy,
        accuracy=chosen["accuracy"],
        mean_gflops=chosen["mean_gflops"],
        stop_fractions=chosen["stop_fractions"],
        stage_choices=stage_choices,
        num_scored=m,
        seconds=time.perf_counter() - started,
        images_needed=None if chosen["risk"] is not None or math.isinf(needed) else max(int(needed), m + 1),
        tradeoff=tradeoff,
    )
    return cascade, report


__all__ = [
    "CHART_TOLERANCES",
    "RISKS",
    "CascadeReport",
    "fit_cascade",
    "images_to_show_a_saving",
    "run_on_features",
    "stop_margins",
]
