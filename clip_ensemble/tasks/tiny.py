"""Tiny CLIP backbones built in code: tests, the offline demo and benchmarks run on them without the Hub."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
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


def save_tiny_open_clip_resnet(folder: str | Path, embed_dim: int = 16, image_size: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised OpenCLIP ResNet CLIP (the paper's ModifiedResNet, tiny) in OpenCLIP's hf-hub
    layout, loadable as `local-dir:{folder}`. It uses OpenCLIP's own tokenizer, so the text tower keeps the full
    49,408-token vocabulary (about 0.8M of its parameters). Needs the `[open-clip]` extra.
    """
    from ..backbones.open_clip_backbone import CONFIG_NAME, WEIGHTS_NAME, import_open_clip

    open_clip = import_open_clip()
    # One bottleneck block per stage; the image is downsampled 32x, to 2x2 at image_size=64.
    model_cfg = {
        "embed_dim": embed_dim,
        "quick_gelu": True,  # as in OpenAI's ResNets
        "vision_cfg": {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, folder / WEIGHTS_NAME)
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    return folder


__all__ = ["save_tiny_clip", "save_tiny_open_clip_resnet", "tiny_clip", "tiny_tokenizer"]
