"""Which adapter loads a backbone id: `hf-hub:` and `local-dir:` ids are OpenCLIP models, any other a transformers
model."""

from __future__ import annotations

from .base import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, Backbone
from .transformers_backbone import TransformersBackbone


def backbone_class(name_or_path: str) -> type[Backbone]:
    """`hf-hub:org/name` and `local-dir:/path` are OpenCLIP models (the `[open-clip]` extra); any other repo id or
    folder is a transformers model."""
    if name_or_path.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        from .open_clip_backbone import OpenCLIPBackbone  # imported on use: open_clip is an optional extra

        return OpenCLIPBackbone
    return TransformersBackbone


def load_backbone(entry: dict, **model_kwargs) -> Backbone:
    """Load one backbone from its config entry (repo id or folder, revision)."""
    return backbone_class(entry["name_or_path"]).from_pretrained(
        entry["name_or_path"], revision=entry.get("revision"), **model_kwargs
    )


__all__ = ["backbone_class", "load_backbone"]
