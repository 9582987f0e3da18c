"""Fitting a class head (`clip_ensemble.models.class_head.ClassHead`): logistic regression on the calibration
images' embeddings, in the directions they span, anchored at a combination's logits and pulled back toward it by an
L2 penalty. The linear probe baseline fits the same way, anchored at the mean of logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .static_fits import lbfgs_with_gradient

# L2 penalty on the correction, strongest first (each fit starts from the last); an infinite penalty keeps no
# correction, i.e. the anchor itself.
HEAD_PENALTIES = (math.inf, 1e-1, 1e-2, 1e-3, 1e-4)
# At most this many directions of the embeddings: at paper scale (sum of widths 6528, 1000 classes) a full-width
# probe takes minutes per fit on a CPU.
HEAD_RANK = 256
_MAX_ITER = 30  # L-BFGS iterations per penalty


def head_basis(gate_inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """(sum d_b, r) orthonormal top right singular vectors of (n, sum d_b) calibration embeddings, r = min(n, sum d_b,
    `HEAD_RANK`). Under `HEAD_RANK` examples they span every embedding, and an L2-penalised fit from zero never leaves
    their span: the head loses nothing to the basis."""
    if min(gate_inputs.shape) <= HEAD_RANK:
        return torch.linalg.svd(gate_inputs, full_matrices=False).Vh.T
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random sketch; keep the caller's RNG untouched
        torch.manual_seed(seed)
        return torch.svd_lowrank(gate_inputs, q=HEAD_RANK, niter=2)[2]


def _loss_and_gradient(
    parameters: torch.Tensor, inputs: torch.Tensor, anchor: torch.Tensor, labels: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalised cross-entropy of a head whose (C, r) weight and (C,) bias are `parameters` flattened, and its
    gradient in them, in closed form (on these small problems autograd's bookkeeping costs more than the loss)."""
    num_classes = anchor.shape[1]
    weight, bias = parameters[:-num_classes].view(num_classes, -1), parameters[-num_classes:]
    rows = torch.arange(len(labels), device=labels.device)
    log_probs = torch.addmm(anchor + bias, inputs, weight.T).log_softmax(-1)  # (n, C)
    loss = -log_probs[rows, labels].mean() + 0.5 * penalty * parameters.pow(2).sum()
    residual = log_probs.exp_()  # (p - one_hot(label)) / n: the cross-entropy's gradient in the scores
    residual[rows, labels] -= 1
    residual /= len(labels)
    gradient = torch.cat([(residual.T @ inputs).flatten(), residual.sum(0)]) + penalty * parameters
    return loss, gradient


def head_path(
    inputs: torch.Tensor, anchor: torch.Tensor, labels: torch.Tensor, penalties: Sequence[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (weight (C, r), bias (C,)) per penalty, fitted in order, each from the previous one, minimising the
    cross-entropy of anchor + inputs @ weight.T + bias ((n, r) inputs, (n, C) anchor logits) plus
    penalty / 2 * (||weight||^2 + ||bias||^2)."""
    num_classes, rank = anchor.shape[1], inputs.shape[1]
    parameters = anchor.new_zeros(num_classes * (rank + 1))
    fitted = []
    for penalty in penalties:
        if not math.isinf(penalty):
            lbfgs_with_gradient(
                parameters,
                lambda penalty=penalty: _loss_and_gradient(parameters, inputs, anchor, labels, penalty),
                max_iter=_MAX_ITER,
                tolerance_grad=1e-7,
                tolerance_change=1e-9,
            )
        fitted.append(
            (parameters[: num_classes * rank].view(num_classes, rank).clone(), parameters[-num_classes:].clone())
        )
    return fitted


__all__ = ["HEAD_PENALTIES", "HEAD_RANK", "head_basis", "head_path"]
