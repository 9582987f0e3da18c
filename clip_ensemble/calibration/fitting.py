"""The choice that calibration makes from the calibration data alone, between the gate, a class head on static
weights, static per-backbone weights, the mean of logits and the best backbone, each scored out of fold
(`fit_calibrated_gate`). The folds and what is read from the logits are in `folds`, the small full-batch fits in
`static_fits` and `class_head_fits`, the gate's training in `gate_training`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..models.cascade import margins
from ..models.class_head import ClassHead
from ..models.gate import EnsembleGate, combine_logits
from .class_head_fits import HEAD_PENALTIES, HEAD_RANK, head_basis, head_path
from .folds import SINGLE_SPLIT_FROM, CalibrationData, Features, OutOfFold
from .gate_training import BATCH_SIZE, WEIGHT_DECAY, cross_validate_gate, learning_rate
from .static_fits import fit_inverse_temperature, static_logits, static_path

# Called as progress(fraction done, what is being done); `gr.Progress` instances and tqdm wrappers fit.
FitProgress = Callable[[float, str], object]


def _no_progress(fraction: float, description: str) -> None:
    pass


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
STATIC_WEIGHTS = "static weights"
GATE = "gate"
CLASS_HEAD = "class head"

# Static weights: softplus(b) per backbone (the gate's output bias, its output weights zero), fitted to convergence
# by full-batch L-BFGS on cross-entropy + penalty * ||weights - 1/B||^2. The penalty is chosen by cross-validation
# among these, strongest first, a factor of about 30 apart; each fit starts from the previous one (inf: equal weights,
# the mean of logits).
STATIC_PENALTIES = (math.inf, 1.0, 0.03, 0.001)
# The best backbone or the gate replaces a simpler candidate when right more often out of fold by this many standard
# errors, tested exactly (see `_beats`).
MIN_WIN_Z = 1.0
# The class head is a candidate while one evaluation of its loss costs at most this many multiply-adds (examples x
# classes x rank): at paper scale (16,000 images, 1,000 classes, rank 256: 4e9) its fits would take minutes on a CPU.
CLASS_HEAD_MAX_MACS = 2**26


class _ScoredAnswers(NamedTuple):
    """A candidate's answers on the m scored examples, filled fold by fold; of each fold's (m_f, C) combined logits
    only these are kept (at paper scale a (m, C) table per candidate and penalty would be tens of MB)."""

    predictions: torch.Tensor  # (m,) class indices
    margins: torch.Tensor  # (m,) top-1 minus top-2 combined logit
    losses: torch.Tensor  # (m,) cross-entropy

    @classmethod
    def empty(cls, m: int, device: torch.device) -> _ScoredAnswers:
        return cls(
            torch.zeros(m, dtype=torch.long, device=device),
            torch.zeros(m, device=device),
            torch.zeros(m, device=device),
        )

    def record(self, rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> None:
        """Fill `rows` from (m_f, C) combined logits; the cross-entropy at inverse temperature `scale`."""
        self.predictions[rows], self.margins[rows] = logits.argmax(-1), margins(logits)
        scaled = logits if scale == 1.0 else scale * logits  # the fitted candidates' own scale: no (m_f, C) copy
        self.losses[rows] = nn.functional.cross_entropy(scaled, labels, reduction="none")


@dataclass
class GateChoice:
    """What `fit_calibrated_gate` chose and why.

    `cv_loss` is each candidate's mean cross-entropy on the held-out examples; `cv_accuracy` and `cv_spread` are
    the mean and standard deviation over folds of its top-1 there; the choice compares top-1, then cross-entropy.
    Everything is out of fold: the gate, the static weights (and their penalties) and the best backbone are chosen
    and fitted without the examples they are scored on (the mean of logits has nothing to fit), and the untrained
    candidates' confidence (an inverse temperature) too.
    """

    chosen: str  # GATE, CLASS_HEAD, STATIC_WEIGHTS, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_loss: dict[str, float]
    cv_accuracy: dict[str, float]
    cv_spread: dict[str, float]
    num_folds: int  # folds whose held-out part was scored (1: a single held-out quarter)
    settings: dict = field(default_factory=dict)  # the chosen candidate's fitting settings, when it was fitted
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples
    # The chosen candidate's answers out of fold, from which the cascade fits its stopping rule.
    out_of_fold: OutOfFold | None = field(default=None, repr=False, compare=False)
    # With CLASS_HEAD chosen, the head to add to the gate's combination (its static weights).
    class_head: ClassHead | None = field(default=None, repr=False, compare=False)

    @torch.no_grad()
    def logits(self, gate: EnsembleGate, features: Features) -> torch.Tensor:
        """(n, C) logits of what was kept, for `features` of other images: `gate`'s combination (the gate fitted with
        this choice), plus the class head's correction when one was kept."""
        combined = combine_logits(features.logits, gate(features.gate_inputs))
        return combined if self.class_head is None else combined + self.class_head(features.gate_inputs)


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        gate.fc2.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13; a softmax weight of ~e-30
        gate.fc2.bias[backbone] = math.log(math.e - 1) if gate.combination == "softplus" else 0.0


def _pick(correct: torch.Tensor, losses: torch.Tensor) -> int:
    """Index of the row of (m, n) out-of-fold hits and losses with the most hits; ties: the lowest loss, then the
    first (the simplest, as grids go from the strongest penalty)."""
    hits = correct.float().sum(1)
    tied = torch.nonzero(hits == hits.max()).flatten()
    return int(tied[losses[tied].mean(1).argmin()])


def _sign_test(wins: int, losses: int) -> float:
    """The chance of at least `wins` of the `wins + losses` disagreements going the challenger's way if each went
    either way with even odds: the one-sided p-value of McNemar's exact test (a binomial tail, summed in logs)."""
    n = wins + losses
    log_scale = math.lgamma(n + 1) - n * math.log(2)  # log(n! / 2^n)
    return math.fsum(math.exp(log_scale - math.lgamma(i + 1) - math.lgamma(n - i + 1)) for i in range(wins, n + 1))


def _beats(
    challenger: str,
    correct: torch.Tensor,
    incumbent_correct: torch.Tensor,
    loss: torch.Tensor,
    incumbent_loss: torch.Tensor,
) -> bool:
    """Whether `challenger` beats the incumbent on the same held-out examples ((n,) hits and losses each).

    - Static weights: right more often, or as often with a lower cross-entropy. Cross-validation has already chosen
      their penalty on these examples against an infinite one (the mean of logits itself), and a handful of weights
      has little room to fit noise; asking for more evidence as well kept the mean of logits where one backbone
      leads by under two points (the few-shot benchmark's leading-20 at 4 shots: 90.4% without that hurdle; 89.8%
      with it, in a one-off run on the same draws).
    - The best backbone, the gate and the class head: right more often by more than `MIN_WIN_Z` standard errors of
      the count of images they disagree on: one image more out of twenty is not evidence. The test is McNemar's,
      exact (`_sign_test`): with a handful of disagreements the normal approximation let 2 wins to none, or 3 to 1,
      pass as one standard error (z = 1.41, 1.00), where the chance of as many by luck is 25% and 31%, not 16%. The
      best backbone, one discrete pick that drops the other backbones, is judged by its answers alone: its
      cross-entropy, from the few images a single backbone gets wrong, says little about the images it has not seen.
      The gate and the class head, which contain the static weights (their starting point) and have thousands of
      weights, may also win by cross-entropy: lower by more than one standard error of the paired difference while
      right at least as often, as a richer model is judged by its likelihood as well as its answers.
    """
    wins = int((correct & ~incumbent_correct).sum())
    losses = int((incumbent_correct & ~correct).sum())
    if challenger == STATIC_WEIGHTS:
        return wins > losses or (wins == losses and bool(loss.mean() < incumbent_loss.mean()))
    if wins > losses and _sign_test(wins, losses) < 0.5 * math.erfc(MIN_WIN_Z / math.sqrt(2)):
        return True
    if wins < losses or challenger not in (GATE, CLASS_HEAD):
        return False
    gain = incumbent_loss - loss
    return bool(gain.mean() > gain.std(correction=0) / math.sqrt(len(gain)))


def fit_calibrated_gate(
    gate: EnsembleGate,
    features: Features,
    *,
    seed: int = 0,
    num_folds: int = 5,
    per_image: bool = True,
    progress: FitProgress | None = None,
    data: CalibrationData | None = None,
) -> GateChoice:
    """Fit `gate` in place on `features`, keeping a simpler combination when the gate does not help.

    The candidates, from the simplest to the richest:
    1. the mean of logits (the gate's starting point);
    2. the best single backbone (on all the examples);
    3. static weights: one weight per backbone, the same for every image (the gate's output bias alone), fitted to
       convergence by full-batch L-BFGS with a penalty toward equal weights that cross-validation chooses (the most
       out-of-fold hits, ties by cross-entropy);
    4. the gate, whose weights depend on the image, trained by AdamW from those static weights for a number of steps
       that cross-validation chooses (the lowest out-of-fold cross-entropy); not with `per_image=False` (a cascade's
       stages: no training run, and no hidden layer to run for an image);
    5. a class head on those static weights: a per-class correction of their logits, linear in the embeddings
       (`clip_ensemble.models.class_head`), fitted by L-BFGS with an L2 penalty that cross-validation chooses; with
       `per_image`, and while its fits are cheap (`CLASS_HEAD_MAX_MACS`). It can move one class against another,
       which no weighing of backbones can, where the zero-shot heads themselves are off.
    The best backbone is chosen on each fold's training part; averaging and the best backbone are scored at an
    inverse temperature fitted there. Each candidate in turn replaces the one kept so far when it beats it out of
    fold (see `_beats`): the best backbone, the gate and the class head when right more often by more than one
    standard error (an exact McNemar test at the level of z = `MIN_WIN_Z`), the gate and the class head also when
    their cross-entropy is lower by more than one standard error and they are right at least as often; static
    weights, whose penalty cross-validation has already weighed against the mean of logits, when right more often, or
    as often with a lower cross-entropy. The chosen candidate is refitted on all the examples. From `SINGLE_SPLIT_FROM` examples on, one held-out quarter is scored instead of k folds, and
    a chosen gate is the one trained on the other three quarters.
    The chosen candidate's out-of-fold answers come back in `GateChoice.out_of_fold` (the cascade fits its stopping
    rule on them). `progress(fraction, description)` hears of each fold's static weights and of the gate's training
    steps (the folds' gates train together). `data`, what the fit reads from the logits (`CalibrationData.of` of
    `features` by default), may be that of some of their backbones alone: a cascade's stages pass slices of the full
    ensemble's, with `per_image=False`, and `features.logits` is then not read.
    """
    progress = progress or _no_progress
    features = Features(*features)
    data = CalibrationData.of(features, seed, num_folds) if data is None else data
    labels, folds, single_correct = data.labels, data.folds, data.single_correct
    device, n = labels.device, len(labels)
    single_split = n >= SINGLE_SPLIT_FROM
    scored = torch.tensor(sorted(i for fold in folds for i in fold), device=device)
    # Index tensors made once: indexing by a Python list converts it anew each time.
    fold_index = [torch.tensor(fold, dtype=torch.long, device=device) for fold in folds]
    trains = [torch.tensor(sorted(set(range(n)) - set(fold)), dtype=torch.long, device=device) for fold in folds]
    best = int(single_correct.float().mean(0).argmax())
    scored_labels = labels[scored]
    row = torch.full((n,), -1, dtype=torch.long, device=device)  # example -> its row among the scored ones
    row[scored] = torch.arange(len(scored), device=device)
    # The classes to fit static weights on, per image, once for all folds (every class unless there are many).
    view_logits, view_labels = data.view_logits, data.view_labels

    # Out-of-fold answers of the scored examples per untrained candidate, and per penalty for static weights. The
    # untrained candidates' cross-entropy is taken at an inverse temperature fitted on the training part (it changes
    # none of their answers), so that it compares with the fitted candidates' learnt scale.
    answers = {name: _ScoredAnswers.empty(len(scored), device) for name in (MEAN_OF_LOGITS, BEST_BACKBONE)}
    static_answers = [_ScoredAnswers.empty(len(scored), device) for _ in STATIC_PENALTIES]
    static_paths = []
    for f, (fold, train, fold_logits) in enumerate(zip(fold_index, trains, data.held_out_logits)):  # (m_f, B, C)
        progress(0.1 * f / len(folds), f"Static weights: fold {f + 1} of {len(folds)}")
        fold_rows, fold_labels = row[fold], labels[fold]
        train_best = int(single_correct[train].float().mean(0).argmax())
        for name, logits, view in (
            (MEAN_OF_LOGITS, fold_logits.mean(1), view_logits.mean(1)),
            (BEST_BACKBONE, fold_logits[:, train_best], view_logits[:, train_best]),
        ):
            scale = fit_inverse_temperature(view[train], view_labels[train])
            answers[name].record(fold_rows, logits, fold_labels, scale)
        static_paths.append(static_path(gate, view_logits[train], view_labels[train], STATIC_PENALTIES))
        with torch.no_grad():
            for penalty_answers, bias in zip(static_answers, static_paths[-1]):
                penalty_answers.record(fold_rows, static_logits(gate, bias, fold_logits), fold_labels)
    static_index = _pick(
        torch.stack([a.predictions for a in static_answers]) == scored_labels,
        torch.stack([a.losses for a in static_answers]),
    )
    answers[STATIC_WEIGHTS] = static_answers[static_index]
    out_of_fold = {name: OutOfFold(scored, a.predictions, a.margins) for name, a in answers.items()}
    losses = {name: a.losses for name, a in answers.items()}

    def static_bias_on_everything() -> torch.Tensor:  # kept as they are, or where the gate on all the examples starts
        return static_path(gate, view_logits, view_labels, STATIC_PENALTIES[: static_index + 1])[-1]

    static_bias = static_bias_on_everything() if per_image and not single_split else None
    # The gate (unless only static combinations are asked for), from each fold's chosen static weights; beside the
    # folds, the gate on all the examples (from one quarter on, the gate kept is the one trained without the scored
    # quarter).
    if per_image:
        starts = [path[static_index] for path in static_paths]
        gate_path = cross_validate_gate(
            gate,
            features,
            Features(features.gate_inputs, view_logits, view_labels),
            folds,
            data.held_out_logits,
            row,
            starts,
            seed=seed,
            keep=(0, starts[0]) if single_split else (len(folds), static_bias),
            progress=lambda fraction, what: progress(0.1 + 0.8 * fraction, f"The gate, cross-validated: {what}"),
        )
        steps = min(gate_path.reached, key=lambda s: float(gate_path.losses[s].mean()))  # ties: the shortest
        out_of_fold[GATE] = OutOfFold(scored, gate_path.predictions[steps], gate_path.margins[steps])
        losses[GATE] = gate_path.losses[steps]

    # The class head, on each fold's chosen static weights, in the directions of every calibration embedding (read
    # without labels, so the held-out folds' too).
    num_classes = features.logits.shape[-1] if per_image else 0
    head_index = 0
    if per_image and n * num_classes * min(n, features.gate_inputs.shape[1], HEAD_RANK) <= CLASS_HEAD_MAX_MACS:
        basis = head_basis(features.gate_inputs, seed)
        head_inputs = features.gate_inputs @ basis  # (n, r)
        head_answers = [_ScoredAnswers.empty(len(scored), device) for _ in HEAD_PENALTIES]
        for f, (fold, train, fold_logits) in enumerate(zip(fold_index, trains, data.held_out_logits)):
            progress(0.9 + 0.1 * f / len(folds), f"Class head: fold {f + 1} of {len(folds)}")
            with torch.no_grad():  # (n_train, C) and (m_f, C) logits under the fold's static weights
                anchor = static_logits(gate, static_paths[f][static_index], features.logits[train])
                held_out_anchor = static_logits(gate, static_paths[f][static_index], fold_logits)
            for head_fold, (weight, bias) in zip(
                head_answers, head_path(head_inputs[train], anchor, labels[train], HEAD_PENALTIES)
            ):
                head_logits = torch.addmm(held_out_anchor + bias, head_inputs[fold], weight.T)
                head_fold.record(row[fold], head_logits, labels[fold])
        head_index = _pick(
            torch.stack([a.predictions for a in head_answers]) == scored_labels,
            torch.stack([a.losses for a in head_answers]),
        )
        kept_head = head_answers[head_index]
        out_of_fold[CLASS_HEAD] = OutOfFold(scored, kept_head.predictions, kept_head.margins)
        losses[CLASS_HEAD] = kept_head.losses

    correct = {name: answers.predictions == scored_labels for name, answers in out_of_fold.items()}
    chosen = MEAN_OF_LOGITS
    # At an infinite penalty static weights are the mean of logits, and the class head is the static weights: no
    # challenger then.
    same = {STATIC_WEIGHTS} if static_index == 0 else set()
    same |= {CLASS_HEAD} if head_index == 0 else set()
    for name in (c for c in (BEST_BACKBONE, STATIC_WEIGHTS, GATE, CLASS_HEAD) if c in out_of_fold and c not in same):
        if _beats(name, correct[name], correct[chosen], losses[name], losses[chosen]):
            chosen = name

    settings: dict = {}
    class_head = None
    if chosen in (STATIC_WEIGHTS, CLASS_HEAD):
        static_bias = static_bias_on_everything() if static_bias is None else static_bias
        with torch.random.fork_rng(devices=[]):  # the unused hidden layer too is the same for a seed
            torch.manual_seed(seed)
            gate.reset_parameters()
        with torch.no_grad():
            gate.fc2.bias.copy_(static_bias)
        settings = {"optimizer": "L-BFGS", "penalty": STATIC_PENALTIES[static_index]}
        if chosen == CLASS_HEAD:  # on the static weights just set, fitted on all the examples
            with torch.no_grad():
                anchor = static_logits(gate, static_bias, features.logits)
            weight, bias = head_path(head_inputs, anchor, labels, HEAD_PENALTIES[: head_index + 1])[-1]
            class_head = ClassHead.of(basis, weight, bias)
            settings = {"optimizer": "L-BFGS", "static_penalty": settings["penalty"]}
            settings |= {"penalty": HEAD_PENALTIES[head_index], "rank": class_head.rank}
    elif chosen == GATE:
        settings = {"optimizer": "AdamW", "steps": steps, "lr": round(learning_rate(features.gate_inputs), 6)}
        settings["weight_decay"] = WEIGHT_DECAY
        settings |= {"batch_size": BATCH_SIZE, "static_penalty": STATIC_PENALTIES[static_index]}
        gate.load_state_dict(gate_path.states[steps])
        if single_split:  # trained on three quarters of the examples, kept as scored
            settings["trained_on"] = f"{n - len(folds[0])} of {n} examples"
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gate.reset_parameters()
    gate.eval()
    progress(1.0, f"Kept the {chosen}")
    fold_accuracy = {name: [float(hits[row[i]].float().mean()) for i in fold_index] for name, hits in correct.items()}
    return GateChoice(
        chosen=chosen,
        cv_loss={name: float(loss.mean()) for name, loss in losses.items()},
        cv_accuracy={name: float(np.mean(values)) for name, values in fold_accuracy.items()},
        cv_spread={name: float(np.std(values)) for name, values in fold_accuracy.items()},
        num_folds=len(folds),
        settings=settings,
        best_backbone=best,
        out_of_fold=out_of_fold[chosen],
        class_head=class_head,
    )


# Besides its own names, the types of `fit_calibrated_gate`'s arguments and answers.
__all__ = [
    "BEST_BACKBONE",
    "CLASS_HEAD",
    "CalibrationData",
    "Features",
    "FitProgress",
    "GATE",
    "GateChoice",
    "MEAN_OF_LOGITS",
    "OutOfFold",
    "STATIC_PENALTIES",
    "STATIC_WEIGHTS",
    "fit_calibrated_gate",
    "set_best_backbone",
]
