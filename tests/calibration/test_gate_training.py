"""The gate's training: AdamW steps that move it as far whatever the width of its input."""

import pytest
import torch

from clip_ensemble.calibration.folds import Features
from clip_ensemble.calibration.gate_training import train_gates
from clip_ensemble.models.gate import EnsembleGate


def _hidden_unit_moves(width: int) -> torch.Tensor:
    """How far the gate's hidden units move on a training image in its second AdamW step (its output layer starts at
    zero, so the first step moves only that), for three backbones of `width`-wide embeddings."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4)
    embeds = torch.nn.functional.normalize(torch.randn(4, 3, width, generator=generator), dim=-1).flatten(1)
    features = Features(embeds, torch.randn(4, 3, 4, generator=generator), labels)
    gate = EnsembleGate([width] * 3, hidden_size=16)
    preactivations = []

    @torch.no_grad()
    def checkpoint(stack, step: int) -> bool:
        preactivations.append(torch.addmm(stack.fc1_bias[0], embeds[:1], stack.fc1_weight[0]))
        return step == 2

    train_gates(gate, features, [labels], [gate.fc2.bias.detach()], 2, seed=0, on_checkpoint=checkpoint)
    moves = (preactivations[1] - preactivations[0]).abs().flatten()
    return moves[moves > 0]


def test_a_gate_step_moves_hidden_units_as_far_whatever_the_embedding_width():
    # The learning rate is over the inputs' L1 norm: at a fixed 1e-3 they would move 0.001 with 8-wide embeddings
    # and 7x as far with 512-wide ones.
    narrow, wide = _hidden_unit_moves(8).median(), _hidden_unit_moves(512).median()
    assert 0.05 < narrow < 2 and 0.05 < wide < 2
    assert wide / narrow == pytest.approx(1, abs=0.25)
