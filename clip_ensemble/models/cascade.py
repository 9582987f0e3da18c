"""The runtime cascade: backbones run cheapest first, and an image stops once the rest are unlikely to change its
answer (fitted by `clip_ensemble.calibration.cascade_fitting`)."""

from __future__ import annotations

import torch
from torch import nn

from .gate import EnsembleGate, combine_logits


def cost_order(gflops: list[float]) -> list[int]:
    """Backbone indices from cheapest to dearest; equal costs keep the config's order."""
    return sorted(range(len(gflops)), key=lambda index: (gflops[index], index))


class Cascade(nn.Module):
    """Backbones run cheapest first; after each of the first B - 1, a gate over the backbones run so far combines
    their logits, and an image stops there when the combination's margin (top-1 minus top-2 logit) reaches that
    stage's stop margin. The others go on; after the last backbone the model's own gate decides. Fitted stages are
    static (the same weights for every image: `is_static`), so a stage runs no hidden layer, only a weighted sum.

    `order` is the run order (backbone indices); `gates[k]` weighs the first k + 1 backbones of it, and
    `stop_margins[k]` is its stop margin (`None`: no image stops there). With every stop margin `None` the cascade
    equals the full ensemble.
    """

    def __init__(
        self,
        embed_dims: list[int],
        order: list[int],
        stop_margins: list[float | None],
        hidden_size: int = 128,
        combination: str = "softplus",
    ):
        super().__init__()
        if sorted(order) != list(range(len(embed_dims))):
            raise ValueError(f"Cascade order {order} must list each of the {len(embed_dims)} backbones once.")
        self.order = list(order)
        self.stop_margins = stop_margins
        self.gates = nn.ModuleList(
            EnsembleGate([embed_dims[b] for b in order[: k + 1]], hidden_size, combination)
            for k in range(len(order) - 1)
        )

    @property
    def stop_margins(self) -> list[float | None]:
        return self._stop_margins

    @stop_margins.setter
    def stop_margins(self, values: list[float | None]) -> None:
        values = list(values)
        if len(values) != len(self.order) - 1 or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0) for v in values
        ):
            raise ValueError(
                f"Cascade stop margins {values!r} must be {len(self.order) - 1} margins >= 0 (one per stage but the "
                "last), each None where no image may stop."
            )
        self._stop_margins = [None if v is None else float(v) for v in values]

    def is_static(self, k: int) -> bool:
        """Whether stage `k`'s weights are the same for every image (its gate's output layer reads nothing)."""
        return not bool(self.gates[k].fc2.weight.any())

    def stage(
        self, k: int, image_embeds: list[torch.Tensor] | None, logits: torch.Tensor, static: bool | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Stage `k`'s combination: embeddings of `order[:k + 1]` in run order, their logits (n, k + 1, C) ->
        (combined logits (n, C), weights (n, k + 1), whether each image stops here (n,)). A static stage needs no
        embeddings (`None`): its hidden layer is not run. `static`: `is_static(k)`, when the caller knows it."""
        gate = self.gates[k]
        if self.is_static(k) if static is None else static:
            weights = gate.activate(gate.fc2.bias).expand(len(logits), -1)
        else:
            weights = gate(torch.cat(image_embeds, dim=-1))
        combined = combine_logits(logits, weights)
        return combined, weights, stops(combined, self.stop_margins[k])


def margins(logits: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n,): top-1 minus top-2 logit, how far an answer is from changing (inf with one label)."""
    if logits.shape[-1] < 2:
        return torch.full(logits.shape[:1], float("inf"), device=logits.device)
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def stops(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(n, C) -> (n,) bool: whether an image's margin reaches `threshold` (never when it is None)."""
    if threshold is None:
        return torch.zeros(logits.shape[:1], dtype=torch.bool, device=logits.device)
    return margins(logits) >= threshold


__all__ = ["Cascade", "cost_order", "margins", "stops"]
