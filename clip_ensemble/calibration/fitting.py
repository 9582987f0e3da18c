"""Fitting on cached features: cross-validation folds, full-batch fits of static weights and of the gate, and the
choice between the gate, static per-backbone weights, the mean of logits and the best backbone that calibration makes
from the calibration data alone."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..models.cascade import margins
from ..models.gate import EnsembleGate, combine_logits

# Called as progress(fraction done, what is being done); `gr.Progress` instances and tqdm wrappers fit.
FitProgress = Callable[[float, str], object]


def _no_progress(fraction: float, description: str) -> None:
    pass


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


MEAN_OF_LOGITS = "mean of logits"
BEST_BACKBONE = "best backbone"
STATIC_WEIGHTS = "static weights"
GATE = "gate"

# Static weights: softplus(b) per backbone (the gate's output bias, its output weights zero), fitted to convergence
# by full-batch L-BFGS on cross-entropy + penalty * ||weights - 1/B||^2. The penalty is chosen by cross-validation
# among these, strongest first, a factor of about 30 apart; each fit starts from the previous one (inf: equal weights,
# the mean of logits).
STATIC_PENALTIES = (math.inf, 1.0, 0.03, 0.001)
MAX_ITER = 20  # L-BFGS iterations per fit (each fit starts from the previous penalty's)
# Training static weights and the gate on more classes than this keeps, per image, the classes that some backbone ranks
# high (and its label): the others have a negligible probability under any weights. Scoring always uses every class.
TRAIN_CLASSES = 16
# The gate, as the paper trains it: AdamW on mini-batches from its initialisation, for a number of steps chosen by
# cross-validation among STEP_CHOICES (fewer steps stay closer to where it starts); weight decay and batch size are
# fixed. It starts from the static weights that cross-validation chose (the mean of logits when those are equal
# weights), so the image-dependent part is what the steps learn. The learning rate follows the width of the gate's
# input: AdamW moves every weight by about the learning rate per step, so a hidden unit moves by about that times the
# input's L1 norm (11 for three 20-wide tiny backbones, 190 for the paper's nine), and the learning rate is
# STEP_SHIFT / that norm: one step moves a hidden unit by about one whatever the backbones, so that the same few
# step counts fit every ensemble (a fixed 1e-3 needed 800 steps for nine backbones, 25 s on 200 images).
STEP_CHOICES = (1, 2, 4, 8, 15, 30, 60, 120)
STEP_SHIFT = 1.0
WEIGHT_DECAY = 0.01
BATCH_SIZE = 128
# The gate's path stops when some fold's held-out cross-entropy has risen at PATIENCE checkpoints in a row, counting
# from step STOP_FROM on. The first steps always run: AdamW's first steps can raise the loss before it falls (at paper
# scale by 0.002 from step 1 to 8, then from 0.56 to 0.23 by step 120), and on small inputs they cost next to nothing.
# Each checkpoint doubles the steps run, so waiting for a second rise doubled the training: on the few-shot benchmark,
# stopping at the first rise left every cell's top-1 as it was but one (0.1 point up) and cut fitting by a fifth to
# two fifths (synthetic-50 at 4 shots, 200 images: 0.99 s -> 0.63 s).
PATIENCE = 1
STOP_FROM = 8
# From this many calibration examples on, one held-out quarter replaces k-fold cross-validation (the gate trained on
# the other three quarters is kept as it is): the estimate is already precise, and paper-scale calibration (16,000
# examples) stays within seconds.
SINGLE_SPLIT_FROM = 2000
# The best backbone or the gate replaces a simpler candidate when right more often out of fold by this many standard
# errors, tested exactly (see `_beats`).
MIN_WIN_Z = 1.0


class OutOfFold(NamedTuple):
    """A fitted combination's answers on the examples cross-validation scored, each from a model fitted without it."""

    index: torch.Tensor  # (m,) the scored examples (all of them with k folds; one quarter with a single split)
    predictions: torch.Tensor  # (m,) class indices
    margins: torch.Tensor  # (m,) top-1 minus top-2 combined logit

    @classmethod
    def of(cls, index: torch.Tensor, logits: torch.Tensor) -> OutOfFold:
        """From (m, C) out-of-fold combined logits of the examples `index`."""
        return cls(index, logits.argmax(-1), margins(logits))


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

    chosen: str  # GATE, STATIC_WEIGHTS, MEAN_OF_LOGITS or BEST_BACKBONE
    cv_loss: dict[str, float]
    cv_accuracy: dict[str, float]
    cv_spread: dict[str, float]
    num_folds: int  # folds whose held-out part was scored (1: a single held-out quarter)
    settings: dict = field(default_factory=dict)  # the chosen candidate's fitting settings, when it was fitted
    best_backbone: int = 0  # index of the backbone with the best top-1 on all calibration examples
    # The chosen candidate's answers out of fold, from which the cascade fits its stopping rule.
    out_of_fold: OutOfFold | None = field(default=None, repr=False, compare=False)


def set_best_backbone(gate: EnsembleGate, backbone: int) -> None:
    """Make `gate` route every image to `backbone` alone: weight 1 for it, (almost) 0 for the others."""
    gate.reset_parameters()
    with torch.no_grad():
        gate.fc2.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13; a softmax weight of ~e-30
        gate.fc2.bias[backbone] = math.log(math.e - 1) if gate.combination == "softplus" else 0.0


def _fit_inverse_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The t > 0 that minimises the cross-entropy of t * logits ((n, C), (n,)): it changes no answer, only how
    confident the answers are.

    The cross-entropy is convex in t, with slope mean_i(E_p[z_i] - z_i,label) and curvature mean_i Var_p(z_i) under
    p = softmax(t * z_i). Where its minimum lies inside [e^-10, e^10], Newton's method finds it in a few steps, kept
    inside a shrinking bracket of it (a geometric bisection where a step would leave it), in about a tenth of L-BFGS's
    time. Where it does not (every answer right: the cross-entropy falls as t grows without end), the scale is where
    L-BFGS on log t stops (`_fit_log_temperature_lbfgs`)."""
    rows = torch.arange(len(labels), device=logits.device)
    label_logits = logits[rows, labels]

    def slope_and_curvature(t: float) -> tuple[float, float]:
        probs = (t * logits).softmax(-1)
        expected = (probs * logits).sum(-1)
        variance = (probs * logits.square()).sum(-1) - expected.square()
        return float((expected - label_logits).mean()), float(variance.clamp_min(0).mean())

    low, high = math.exp(-10), math.exp(10)
    if slope_and_curvature(low)[0] >= 0 or slope_and_curvature(high)[0] <= 0:
        return _fit_log_temperature_lbfgs(logits, labels)
    t = 1.0
    for _ in range(100):
        slope, curvature = slope_and_curvature(t)
        if abs(slope) * t <= 1e-7:  # L-BFGS's tolerance on the gradient in log t
            break
        low, high = (t, high) if slope < 0 else (low, t)
        step = t - slope / curvature if curvature > 0 else low
        t = step if low < step < high else math.sqrt(low * high)
        if high / low < 1 + 1e-7:
            break
    return t


def _fit_log_temperature_lbfgs(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """`_fit_inverse_temperature` by L-BFGS on log t from t = 1, clamped to [e^-10, e^10]: where the minimum is not
    inside, the scale where its tolerances stop."""
    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits * log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(-10, 10).exp())


def _lbfgs_with_gradient(parameter: torch.Tensor, loss_and_gradient: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """Full-batch L-BFGS (at most `MAX_ITER` iterations) on `parameter`, updated in place; `loss_and_gradient()` gives
    the loss at its current value and the gradient in it."""
    optimizer = torch.optim.LBFGS(
        [parameter], max_iter=MAX_ITER, tolerance_grad=1e-5, tolerance_change=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        loss, parameter.grad = loss_and_gradient()
        return loss

    optimizer.step(closure)


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


def _static_loss_and_gradient(
    gate: EnsembleGate, bias: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of (n, B, C) `logits` combined under the static weights of output bias `bias` ((B,)), plus
    `penalty` * ||weights - 1/B||^2, and its (B,) gradient in `bias`, in closed form: on these small problems
    autograd's bookkeeping costs more than the loss itself. d cross-entropy / d w_b = mean_i sum_c (p_ic - y_ic) z_ibc,
    then through the activation's Jacobian."""
    weights = gate.activate(bias)
    rows = torch.arange(len(labels), device=logits.device)
    log_probs = combine_logits(logits, weights.expand(len(labels), -1)).log_softmax(-1)  # (n, C)
    loss = -log_probs[rows, labels].mean() + penalty * (weights - 1.0 / len(bias)).pow(2).sum()
    residual = log_probs.exp_()  # p - one_hot(label): n times the cross-entropy's gradient in the combined logits
    residual[rows, labels] -= 1
    by_weight = (logits @ residual[:, :, None]).squeeze(-1).mean(0) + 2 * penalty * (weights - 1.0 / len(bias))
    if gate.combination == "softplus":  # d softplus(b) / db = sigmoid(b), elementwise
        return loss, by_weight * torch.sigmoid(bias)
    return loss, weights * (by_weight - (weights * by_weight).sum())  # softmax's Jacobian, diag(w) - w w^T


def _static_path(gate: EnsembleGate, logits: torch.Tensor, labels: torch.Tensor, penalties: Sequence[float]):
    """(B,) output biases of static weights fitted on (n, B, C) logits, one per penalty, strongest first, each fit
    starting from the previous one; an infinite penalty keeps equal weights (the gate's initial bias)."""
    bias = torch.full((logits.shape[1],), gate.averaging_bias, device=logits.device)
    fitted = []
    for penalty in penalties:
        if not math.isinf(penalty):
            _lbfgs_with_gradient(
                bias, lambda penalty=penalty: _static_loss_and_gradient(gate, bias, logits, labels, penalty)
            )
        fitted.append(bias.clone())
    return fitted


def _static_logits(gate: EnsembleGate, bias: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(n, C) combined logits of (n, B, C) `logits` under the static weights of output bias `bias`."""
    return combine_logits(logits, gate.activate(bias).expand(len(logits), -1))


class _GateStack(nn.Module):
    """Copies of `gate`'s layers, one per training set (each fold's training part, and all the examples), trained
    side by side as one batched model: each copy's loss is the mean over its own rows and AdamW is elementwise, so
    each copy trains as it would alone, in one optimizer step for all of them."""

    def __init__(self, gate: EnsembleGate, starts: torch.Tensor, seed: int):
        super().__init__()
        self.gate = gate  # its `activate`, in its train or eval mode
        with torch.random.fork_rng(devices=[]):  # every copy starts from the gate's initialisation for `seed`
            torch.manual_seed(seed)
            gate.reset_parameters()
        copies = len(starts)  # starts: (F, B) output biases, the static weights each copy starts from

        def stacked(weight: torch.Tensor) -> nn.Parameter:
            # Contiguous: a plain clone keeps the transposed strides of `fc1.weight.T`, and fused AdamW then copies
            # the parameter to its gradient's layout and back at every step (most of a step's time at small n).
            return nn.Parameter(
                weight.detach().expand(copies, *weight.shape).clone(memory_format=torch.contiguous_format)
            )

        self.fc1_weight = stacked(gate.fc1.weight.T)  # (F, D, H)
        self.fc1_bias = stacked(gate.fc1.bias[None])  # (F, 1, H)
        self.fc2_weight = stacked(gate.fc2.weight.T)  # (F, H, B)
        self.fc2_bias = nn.Parameter(starts.detach()[:, None].clone())  # (F, 1, B)

    def forward(self, gate_inputs: torch.Tensor) -> torch.Tensor:
        """(F, m, D) gate inputs, a set per copy -> (F, m, B) backbone weights."""
        hidden = torch.relu(torch.baddbmm(self.fc1_bias, gate_inputs, self.fc1_weight))
        return self.gate.activate(torch.baddbmm(self.fc2_bias, hidden, self.fc2_weight))

    def weights_of(self, copy: int, gate_inputs: torch.Tensor) -> torch.Tensor:
        """(m, D) gate inputs -> (m, B) backbone weights under copy `copy` alone."""
        hidden = torch.relu(torch.addmm(self.fc1_bias[copy], gate_inputs, self.fc1_weight[copy]))
        return self.gate.activate(torch.addmm(self.fc2_bias[copy], hidden, self.fc2_weight[copy]))

    def state_of(self, copy: int) -> dict[str, torch.Tensor]:
        """Copy `copy` as an `EnsembleGate` state dict."""
        return {
            "fc1.weight": self.fc1_weight[copy].detach().T.clone(),
            "fc1.bias": self.fc1_bias[copy, 0].detach().clone(),
            "fc2.weight": self.fc2_weight[copy].detach().T.clone(),
            "fc2.bias": self.fc2_bias[copy, 0].detach().clone(),
        }


def learning_rate(gate_inputs: torch.Tensor) -> float:
    """The gate's AdamW learning rate for (n, D) calibration gate inputs: `STEP_SHIFT` over their mean L1 norm."""
    return STEP_SHIFT / float(gate_inputs.abs().sum(1).mean().clamp_min(1e-6))


def _train_gates(
    gate: EnsembleGate,
    features: Features,
    trains: list[torch.Tensor],
    starts: list[torch.Tensor],
    steps: int,
    *,
    seed: int,
    on_checkpoint: Callable[[_GateStack, int], bool],
) -> None:
    """AdamW on the cross-entropy of the combined logits, one copy of `gate` per training set (`trains`, rows of
    `features`) from the gate's initialisation with output bias `starts[i]` (static weights), for `steps` steps or
    until `on_checkpoint(stack, step)` (called at each of `STEP_CHOICES`, the gate in eval mode) returns True.
    Each copy takes mini-batches of `BATCH_SIZE` of its rows (all of them when fewer), gathered by row, so a training
    part is never copied whole (at paper scale its logits are hundreds of MB)."""
    stack = _GateStack(gate, torch.stack(starts), seed)
    lr = learning_rate(features.gate_inputs)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=True)
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(rows) for rows in trains]
    rows = nn.utils.rnn.pad_sequence(trains, batch_first=True)  # (F, n_max), padded with row 0
    padding = torch.arange(rows.shape[1]) >= torch.tensor(sizes)[:, None]  # (F, n_max)
    width = min(rows.shape[1], BATCH_SIZE)

    # The batches' gate inputs, (F, width, D), are gathered into one buffer: a new one per step (20 MB for six copies
    # at paper widths) would cost more in fresh memory than the gather itself.
    gate_inputs = features.gate_inputs.new_empty(len(trains), width, features.gate_inputs.shape[1])

    def batch(order: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """The rows at positions `order` ((F, width)) of each copy's set, and which of them are padding."""
        picked = rows.gather(1, order)
        torch.index_select(features.gate_inputs, 0, picked.flatten(), out=gate_inputs.view(-1, gate_inputs.shape[-1]))
        return Features(gate_inputs, features.logits[picked], features.labels[picked]), padding.gather(1, order)

    every_row = torch.arange(width)  # a copy with at most `width` rows trains on all of them (and padding)
    fixed = None if any(size > width for size in sizes) else batch(every_row.expand(len(trains), -1))
    for step in range(1, steps + 1):
        gate.train()
        if fixed is None:  # a random subset of the rows of each copy that has more
            order = [torch.randperm(size, generator=generator)[:width] if size > width else every_row for size in sizes]
            inputs, ignored = batch(torch.stack(order))
        else:
            inputs, ignored = fixed
        logits = combine_logits(inputs.logits, stack(inputs.gate_inputs))  # (F, width, C)
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), inputs.labels, reduction="none")  # (F, width)
        loss = (loss.masked_fill(ignored, 0.0).sum(1) / (~ignored).sum(1)).sum()  # each copy's mean, summed
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gate.eval()
        if step in STEP_CHOICES and on_checkpoint(stack, step):
            break


@dataclass
class _GatePath:
    """The gate's out-of-fold results at every training length that all folds reached, on the scored examples, and
    the copies' states there (copy `len(folds)`, when trained, is the gate on all the examples)."""

    predictions: dict[int, torch.Tensor]  # steps -> (m,) answers
    margins: dict[int, torch.Tensor]  # steps -> (m,) top-1 minus top-2 combined logits
    losses: dict[int, torch.Tensor]  # steps -> (m,) cross-entropy
    states: dict[int, dict]  # steps -> the kept copy's gate state
    reached: list[int]


def _cross_validate_gate(
    gate: EnsembleGate,
    features: Features,
    training: Features,
    folds: list[list[int]],
    held_out_logits: list[torch.Tensor],
    row: torch.Tensor,
    starts: list[torch.Tensor],
    *,
    seed: int,
    keep: tuple[int, torch.Tensor] | None,
    progress: FitProgress = _no_progress,
) -> _GatePath:
    """Train on every fold's training part at once (from that fold's static weights, `starts`), scoring the held-out
    parts at every length in `STEP_CHOICES`; training stops once some fold's held-out cross-entropy keeps rising
    (see `PATIENCE`).
    `held_out_logits` are each fold's (m_f, B, C) logits over every class (`training` has the classes to train on).
    `row` maps an example to its row among the scored ones. `keep = (copy, start)`: the state of that copy at every
    checkpoint is kept, where copy `len(folds)`, trained on all the examples from output bias `start`, is an extra."""
    m, device = int((row >= 0).sum()), features.labels.device
    path = _GatePath(
        {s: torch.zeros(m, dtype=torch.long, device=device) for s in STEP_CHOICES},
        {s: torch.zeros(m, device=device) for s in STEP_CHOICES},
        {s: torch.zeros(m, device=device) for s in STEP_CHOICES},
        {},
        [],
    )
    n = len(features.labels)
    trains = [torch.tensor(sorted(set(range(n)) - set(fold)), dtype=torch.long, device=device) for fold in folds]
    starts = list(starts)
    if keep is not None and keep[0] == len(folds):  # the gate on all the examples, trained beside the folds
        trains.append(torch.arange(n, device=device))
        starts.append(keep[1])
    held_out = [
        (Features(features.gate_inputs[fold], logits, features.labels[fold]), row[fold])
        for fold, logits in zip(folds, held_out_logits)
    ]
    fold_losses: list[list[float]] = [[] for _ in folds]  # from step STOP_FROM on
    most = STEP_CHOICES[-1]

    @torch.no_grad()
    def checkpoint(stack: _GateStack, step: int) -> bool:
        progress(step / most, f"{len(folds)} folds together, step {step} of at most {most}")
        for f, (val, rows) in enumerate(held_out):
            logits = combine_logits(val.logits, stack.weights_of(f, val.gate_inputs))
            path.predictions[step][rows], path.margins[step][rows] = logits.argmax(-1), margins(logits)
            path.losses[step][rows] = nn.functional.cross_entropy(logits, val.labels, reduction="none")
            if step >= STOP_FROM:
                fold_losses[f].append(float(path.losses[step][rows].mean()))
        if keep is not None:
            path.states[step] = stack.state_of(keep[0])
        path.reached.append(step)
        rising = [
            len(recent) > PATIENCE and all(a < b for a, b in zip(recent, recent[1:]))
            for recent in (losses[-PATIENCE - 1 :] for losses in fold_losses)
        ]
        return any(rising)

    _train_gates(gate, training, trains, starts, most, seed=seed, on_checkpoint=checkpoint)
    return path


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
    - The best backbone and the gate: right more often by more than `MIN_WIN_Z` standard errors of the count of
      images they disagree on: one image more out of twenty is not evidence. The test is McNemar's, exact
      (`_sign_test`): with a handful of disagreements the normal approximation let 2 wins to none, or 3 to 1, pass
      as one standard error (z = 1.41, 1.00), where the chance of as many by luck is 25% and 31%, not 16%. The best
      backbone, one discrete pick that drops the other backbones, is judged by its answers alone: its cross-entropy,
      from the few images a single backbone gets wrong, says little about the images it has not seen. The gate, which
      contains the incumbent (the mean of logits or static weights: its starting point) and has thousands of weights,
      may also win by cross-entropy: lower by more than one standard error of the paired difference while right at
      least as often, as a richer model is judged by its likelihood as well as its answers.
    """
    wins = int((correct & ~incumbent_correct).sum())
    losses = int((incumbent_correct & ~correct).sum())
    if challenger == STATIC_WEIGHTS:
        return wins > losses or (wins == losses and bool(loss.mean() < incumbent_loss.mean()))
    if wins > losses and _sign_test(wins, losses) < 0.5 * math.erfc(MIN_WIN_Z / math.sqrt(2)):
        return True
    if wins < losses or challenger != GATE:
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
       stages: no training run, and no hidden layer to run for an image).
    The best backbone is chosen on each fold's training part; averaging and the best backbone are scored at an
    inverse temperature fitted there. Each candidate in turn replaces the one kept so far when it beats it out of
    fold (see `_beats`): the best backbone and the gate when right more often by more than one standard error (an
    exact McNemar test at the level of z = `MIN_WIN_Z`), the gate also when its cross-entropy is lower by more than
    one standard error and it is right at least as often; static weights, whose penalty cross-validation has already weighed against the
    mean of logits, when right more often, or as often with a lower cross-entropy. The chosen candidate is refitted
    on all the examples. From `SINGLE_SPLIT_FROM` examples on, one held-out quarter is scored instead of k folds, and
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
            scale = _fit_inverse_temperature(view[train], view_labels[train])
            answers[name].record(fold_rows, logits, fold_labels, scale)
        static_paths.append(_static_path(gate, view_logits[train], view_labels[train], STATIC_PENALTIES))
        with torch.no_grad():
            for penalty_answers, bias in zip(static_answers, static_paths[-1]):
                penalty_answers.record(fold_rows, _static_logits(gate, bias, fold_logits), fold_labels)
    static_index = _pick(
        torch.stack([a.predictions for a in static_answers]) == scored_labels,
        torch.stack([a.losses for a in static_answers]),
    )
    answers[STATIC_WEIGHTS] = static_answers[static_index]
    out_of_fold = {name: OutOfFold(scored, a.predictions, a.margins) for name, a in answers.items()}
    losses = {name: a.losses for name, a in answers.items()}

    def static_bias_on_everything() -> torch.Tensor:  # kept as they are, or where the gate on all the examples starts
        return _static_path(gate, view_logits, view_labels, STATIC_PENALTIES[: static_index + 1])[-1]

    static_bias = static_bias_on_everything() if per_image and not single_split else None
    # The gate (unless only static combinations are asked for), from each fold's chosen static weights; beside the
    # folds, the gate on all the examples (from one quarter on, the gate kept is the one trained without the scored
    # quarter).
    if per_image:
        starts = [path[static_index] for path in static_paths]
        gate_path = _cross_validate_gate(
            gate,
            features,
            Features(features.gate_inputs, view_logits, view_labels),
            folds,
            data.held_out_logits,
            row,
            starts,
            seed=seed,
            keep=(0, starts[0]) if single_split else (len(folds), static_bias),
            progress=lambda fraction, what: progress(0.1 + 0.9 * fraction, f"The gate, cross-validated: {what}"),
        )
        steps = min(gate_path.reached, key=lambda s: float(gate_path.losses[s].mean()))  # ties: the shortest
        out_of_fold[GATE] = OutOfFold(scored, gate_path.predictions[steps], gate_path.margins[steps])
        losses[GATE] = gate_path.losses[steps]

    correct = {name: answers.predictions == scored_labels for name, answers in out_of_fold.items()}
    chosen = MEAN_OF_LOGITS
    # At the infinite penalty static weights are the mean of logits: no challenger.
    for name in (BEST_BACKBONE, *([STATIC_WEIGHTS] if static_index > 0 else []), *([GATE] if per_image else [])):
        if _beats(name, correct[name], correct[chosen], losses[name], losses[chosen]):
            chosen = name

    settings: dict = {}
    if chosen == STATIC_WEIGHTS:
        static_bias = static_bias_on_everything() if static_bias is None else static_bias
        with torch.random.fork_rng(devices=[]):  # the unused hidden layer too is the same for a seed
            torch.manual_seed(seed)
            gate.reset_parameters()
        with torch.no_grad():
            gate.fc2.bias.copy_(static_bias)
        settings = {"optimizer": "L-BFGS", "penalty": STATIC_PENALTIES[static_index]}
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
    )


__all__ = [
    "BEST_BACKBONE",
    "CalibrationData",
    "Features",
    "FitProgress",
    "GATE",
    "GateChoice",
    "MEAN_OF_LOGITS",
    "OutOfFold",
    "STATIC_PENALTIES",
    "STEP_CHOICES",
    "STEP_SHIFT",
    "STATIC_WEIGHTS",
    "calibration_folds",
    "cross_validation_folds",
    "fit_calibrated_gate",
    "learning_rate",
    "set_best_backbone",
    "training_view",
]
