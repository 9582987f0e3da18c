"""CLIP backbones with real architectures and random weights, built in code, for offline benchmarks with real compute.

ViT-B/32 is transformers' default `CLIPConfig` (the architecture of openai/clip-vit-base-patch32: 151M parameters
with the full 49,408-token vocabulary); `patch_size=16` gives ViT-B/16. The tokenizer is the toy character-level one
(its token ids are a subset of that vocabulary), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from clip_ensemble.tasks import tiny_tokenizer


def vit_clip(patch_size: int = 32, seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised CLIP ViT-B/`patch_size` at 224 px and its processor."""
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"patch_size": patch_size},
    )
    torch.manual_seed(seed)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tiny_tokenizer())
    return CLIPModel(config).eval(), processor


def save_vit_clip(folder: str | Path, patch_size: int = 32, seed: int = 0) -> str:
    """Save `vit_clip(...)` to `folder` (safetensors), loadable by path; returns the folder."""
    model, processor = vit_clip(patch_size, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


__all__ = ["save_vit_clip", "vit_clip"]
