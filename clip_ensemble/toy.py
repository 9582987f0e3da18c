"""Tiny CLIP backbones built in code: tests, the offline demo and benchmarks run on them without the Hub."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

_CHARACTERS = string.ascii_lowercase + string.digits + ".,'-"


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges), so any lowercase label gets its own token sequence."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARACTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(
    hidden_size: int = 32, projection_dim: int = 16, image_size: int = 30, patch_size: int = 6, seed: int = 0
) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised two-layer CLIP and its processor; widths and image sizes vary per call."""
    tokenizer = tiny_tokenizer()
    tower = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": 2}
    tower["num_attention_heads"] = 4
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(folder: str | Path, **kwargs) -> Path:
    """Save `tiny_clip(**kwargs)` with its processor to `folder`, loadable with `from_pretrained(folder)`."""
    model, processor = tiny_clip(**kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


__all__ = ["save_tiny_clip", "tiny_clip", "tiny_tokenizer"]
