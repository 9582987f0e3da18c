"""Zero-shot heads: one fixed classifier per backbone, built from its text tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Backbone


def build_zero_shot_classifier(
    backbone: Backbone,
    labels: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """W[c] = normalize(mean over t of normalize(text(t.format(label_c)))), shape (num_labels, embed_dim).

    Prompts are encoded in batches of `batch_size` texts; the result is float32 on the backbone's device.
    """
    prompts = [template.format(label) for label in labels for template in templates]
    text_embeds = torch.cat(
        [backbone.encode_texts(prompts[start : start + batch_size]) for start in range(0, len(prompts), batch_size)]
    )  # (num_labels * num_templates, embed_dim), each row normalised
    class_embeds = text_embeds.view(len(labels), len(templates), -1).mean(dim=1)
    return nn.functional.normalize(class_embeds, dim=-1)


__all__ = ["build_zero_shot_classifier"]
