"""The class head: a per-class correction of the combined logits, learnt on the calibration images when it beats the
gate and the other combinations out of fold (`clip_ensemble.calibration.fitting`).

The gate rescales each backbone's logits and cannot move one class against another; where the zero-shot heads
themselves are off (a class the prompts describe badly), a linear correction of the logits on the gate's input does
what the gate cannot. It is a logistic regression on the concatenated embeddings, in the directions the calibration
images span, anchored at the kept combination; unlike the gate it depends on the label set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClassHead(nn.Module):
    """The correction (h @ basis) @ weight.T + bias added to the combined logits, for h the (batch, sum d_b) gate input.

    `basis` ((sum d_b, rank), orthonormal columns) spans the calibration images' embeddings (their top right singular
    vectors); `weight` ((num_labels, rank)) and `bias` ((num_labels,)) are fitted there. All three are buffers: a head
    is fitted by calibration, never trained by backpropagation through the model.
    """

    def __init__(self, input_size: int, rank: int, num_labels: int):
        super().__init__()
        self.register_buffer("basis", torch.zeros(input_size, rank))
        self.register_buffer("weight", torch.zeros(num_labels, rank))
        self.register_buffer("bias", torch.zeros(num_labels))

    @classmethod
    def of(cls, basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> ClassHead:
        head = cls(basis.shape[0], basis.shape[1], weight.shape[0])
        head.load_state_dict({"basis": basis, "weight": weight, "bias": bias})
        return head

    def reordered(self, rows: Sequence[int]) -> ClassHead:
        """A copy whose label i is this head's label `rows[i]`: the same head for its labels listed in another order."""
        rows = list(rows)
        return ClassHead.of(self.basis, self.weight[rows], self.bias[rows]).to(self.basis)  # its device and dtype

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]

    def forward(self, gate_inputs: torch.Tensor) -> torch.Tensor:
        """(batch, sum d_b) gate inputs -> (batch, num_labels) corrections, added to the combined logits."""
        return torch.addmm(self.bias, gate_inputs @ self.basis, self.weight.T)


__all__ = ["ClassHead"]
