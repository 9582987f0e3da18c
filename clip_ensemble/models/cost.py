"""Compute cost: forward GFLOPs per image of each backbone's image tower, measured with torch's FLOP counter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..backbones.base import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, Backbone
from .configuration_clip_ensemble import CLIPEnsembleConfig


def input_size(backbone: Backbone) -> tuple[int, int]:
    """(height, width) of the pixel values the backbone's own preprocessing makes."""
    pixel_values = backbone.preprocess([Image.new("RGB", (64, 64))])  # (1, 3, H, W)
    return int(pixel_values.shape[-2]), int(pixel_values.shape[-1])


def measure_gflops(backbone: Backbone) -> float:
    """Forward GFLOPs of `backbone`'s image tower on one image at its own input size (embedding included).

    Counted by `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs, as OpenCLIP's
    profile table does (the `image_gflops` of `hub_configs/`: 8.82 for ViT-B/32, which this measures as 8.818).
    Only the operations it knows are counted (matrix products, convolutions, attention): normalisation and
    activations are not, well under 1% of a CLIP. Attention runs on PyTorch's math kernel while counting: the
    fused CPU kernels are invisible to the counter (a ViT-B/32 would measure 8.73). Cached on the backbone.
    """
    if getattr(backbone, "_measured_gflops", None) is None:  # the forward pass reads it on every call
        height, width = input_size(backbone)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            backbone.encode_images(torch.zeros(1, 3, height, width))
        backbone._measured_gflops = counter.get_total_flops() / 1e9
    return backbone._measured_gflops


def measure_gflops_from_config(name_or_path: str, revision: str | None = None) -> float:
    """`measure_gflops` of a transformers backbone from its config alone (weights on the meta device, none read):
    for tables of backbones that are not loaded, e.g. `clip-ensemble configs NAME --measure`."""
    from transformers import AutoConfig, AutoModel

    if name_or_path.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        raise ValueError(f"'{name_or_path}' is an OpenCLIP backbone: load it and use `model.backbone_gflops`.")
    config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    size = config.vision_config.image_size
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.get_image_features(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def describe_costs(config: CLIPEnsembleConfig, backbones: Sequence[Backbone]) -> str:
    """An ensemble's backbones as a Markdown table (embedding width, input size, measured GFLOPs per image), and its
    cascade from `config.cascade`, if any."""
    gflops = [measure_gflops(backbone) for backbone in backbones]
    rows = [
        f"| {i} | `{name}` | {entry['embed_dim']} | {'x'.join(map(str, input_size(backbone)))} | {cost:.3g} |"
        for i, (name, entry, backbone, cost) in enumerate(
            zip(config.backbone_names, config.backbones, backbones, gflops)
        )
    ]
    lines = [
        "| # | backbone | embedding width | input | GFLOPs/image |",
        "|---|---|---|---|---|",
        *rows,
        f"| | total | | | {sum(gflops):.3g} |",
    ]
    if config.cascade is not None:
        info = config.cascade
        order = " -> ".join(config.backbone_names[b] for b in info["order"])
        expected = (
            f": about {info['mean_gflops']:.3g} GFLOPs per image expected, top-1 within {info['tolerance']} of "
            "the full ensemble"
            if info.get("mean_gflops") is not None
            else ""
        )
        lines.append(f"\nCascade: {order}{expected}.")
    return "\n".join(lines)


__all__ = ["describe_costs", "input_size", "measure_gflops", "measure_gflops_from_config"]
