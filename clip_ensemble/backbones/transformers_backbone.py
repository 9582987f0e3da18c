"""Transformers backbones: any model with `get_image_features` and `get_text_features` and an AutoProcessor."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from huggingface_hub import hf_hub_download
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor

from .base import Backbone

# OpenAI CLIP's learned logit scale is capped at log(100); used when a model has none.
_DEFAULT_LOGIT_SCALE = 100.0


def _as_tensor(features) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _pinned_revision(name_or_path: str, revision: str | None) -> str | None:
    """The commit a Hub backbone was loaded at (from its cache snapshot), so a saved gate pins it."""
    if os.path.isdir(name_or_path):
        return revision
    config_file = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
    # Hub cache layout: .../models--org--name/snapshots/<commit>/config.json
    return config_file.parent.name if config_file.parent.parent.name == "snapshots" else revision


class TransformersBackbone(Backbone):
    """A transformers model with `get_image_features` and `get_text_features` (CLIP, SigLIP, AltCLIP, ...).

    `encode_images` and `encode_texts` return L2-normalised embeddings of shape (batch, embed_dim).
    """

    def __init__(self, model: nn.Module, processor, name_or_path: str, revision: str | None = None):
        super().__init__()
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise TypeError(
                    f"Backbone '{name_or_path}' ({type(model).__name__}) has no `{method}`; use a CLIP-like "
                    "model with image and text towers (CLIP, SigLIP, AltCLIP, ChineseCLIP, ...)."
                )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name_or_path = name_or_path
        self.revision = revision
        model_type = getattr(model.config, "model_type", "")
        # SigLIP's text tower was trained on sequences padded to the maximum length.
        self._text_padding = "max_length" if "siglip" in model_type else True

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, **model_kwargs) -> TransformersBackbone:
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
            model = AutoModel.from_pretrained(name_or_path, revision=revision, **model_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Backbone '{name_or_path}' (revision {revision or 'main'}) could not be loaded: {error}\n"
                "Check the repo id or folder; for a gated or private repo log in with `hf auth login`; "
                "offline, pass a local folder that holds the model and its processor."
            ) from error
        return cls(model, processor, name_or_path, _pinned_revision(name_or_path, revision))

    @classmethod
    def weight_bytes(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the weights in `dtype` (default: the checkpoint's, as `from_pretrained` loads them), measured on
        the meta device: only the config is read."""
        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Backbone '{name_or_path}' (revision {revision or 'main'}) has no readable config: {error}\n"
                "Check the repo id or folder; offline, pass a local folder that holds the model."
            ) from error
        with init_empty_weights():
            model = AutoModel.from_config(config)
        return compute_module_sizes(model, dtype=dtype or config.dtype or torch.float32)[""]

    @property
    def embed_dim(self) -> int:
        config = self.model.config
        # CLIP-style models project to `projection_dim`; SigLIP-style ones use the vision width.
        return int(getattr(config, "projection_dim", None) or config.vision_config.hidden_size)

    @property
    def logit_scale(self) -> float:
        if getattr(self.model, "logit_scale", None) is None:
            return _DEFAULT_LOGIT_SCALE
        with self.onloaded():
            return float(self.model.logit_scale.exp())

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel values (batch, 3, height, width) with this backbone's resizing and normalisation."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)
        with self.onloaded():
            features = _as_tensor(self.model.get_image_features(pixel_values=pixel_values))
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, padding=self._text_padding, truncation=True, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with self.onloaded():
            features = _as_tensor(self.model.get_text_features(**inputs))
        return nn.functional.normalize(features.float(), dim=-1)

    def cache_key(self) -> dict:
        """What determines this backbone's image embeddings; the feature cache hashes it."""
        key = {
            "library": "transformers",
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "config": self.model.config.to_dict(),
            "preprocessing": self.processor.image_processor.to_dict(),
            "dtype": str(self.dtype),
        }
        if os.path.isdir(self.name_or_path):
            # A local folder has no commit: its weight files' sizes and times stand in for one.
            key["files"] = sorted(
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(self.name_or_path).glob("*.safetensors")
            )
        return key


__all__ = ["TransformersBackbone"]
