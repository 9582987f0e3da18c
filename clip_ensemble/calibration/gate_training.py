"""Training the gate on cached features: copies of it trained side by side, one per cross-validation fold (and one
on all the examples), by AdamW for a number of steps that the folds' held-out cross-entropy chooses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.cascade import margins
from ..models.gate import EnsembleGate, combine_logits
from .folds import Features

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


class GateStack(nn.Module):
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


def train_gates(
    gate: EnsembleGate,
    features: Features,
    trains: list[torch.Tensor],
    starts: list[torch.Tensor],
    steps: int,
    *,
    seed: int,
    on_checkpoint: Callable[[GateStack, int], bool],
) -> None:
    """AdamW on the cross-entropy of the combined logits, one copy of `gate` per training set (`trains`, rows of
    `features`) from the gate's initialisation with output bias `starts[i]` (static weights), for `steps` steps or
    until `on_checkpoint(stack, step)` (called at each of `STEP_CHOICES`, the gate in eval mode) returns True.
    Each copy takes mini-batches of `BATCH_SIZE` of its rows (all of them when fewer), gathered by row, so a training
    part is never copied whole (at paper scale its logits are hundreds of MB)."""
    stack = GateStack(gate, torch.stack(starts), seed)
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
class GatePath:
    """The gate's out-of-fold results at every training length that all folds reached, on the scored examples, and
    the copies' states there (copy `len(folds)`, when trained, is the gate on all the examples)."""

    predictions: dict[int, torch.Tensor]  # steps -> (m,) answers
    margins: dict[int, torch.Tensor]  # steps -> (m,) top-1 minus top-2 combined logits
    losses: dict[int, torch.Tensor]  # steps -> (m,) cross-entropy
    states: dict[int, dict]  # steps -> the kept copy's gate state
    reached: list[int]


def cross_validate_gate(
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
    progress: Callable[[float, str], object],
) -> GatePath:
    """Train on every fold's training part at once (from that fold's static weights, `starts`), scoring the held-out
    parts at every length in `STEP_CHOICES`; training stops once some fold's held-out cross-entropy keeps rising
    (see `PATIENCE`).
    `held_out_logits` are each fold's (m_f, B, C) logits over every class (`training` has the classes to train on).
    `row` maps an example to its row among the scored ones. `keep = (copy, start)`: the state of that copy at every
    checkpoint is kept, where copy `len(folds)`, trained on all the examples from output bias `start`, is an extra."""
    m, device = int((row >= 0).sum()), features.labels.device
    path = GatePath(
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
    def checkpoint(stack: GateStack, step: int) -> bool:
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

    train_gates(gate, training, trains, starts, most, seed=seed, on_checkpoint=checkpoint)
    return path


__all__ = [
    "BATCH_SIZE",
    "PATIENCE",
    "STEP_CHOICES",
    "STEP_SHIFT",
    "STOP_FROM",
    "WEIGHT_DECAY",
    "GatePath",
    "cross_validate_gate",
    "learning_rate",
    "train_gates",
]
