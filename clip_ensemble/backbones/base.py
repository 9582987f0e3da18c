"""The interface every backbone adapter implements, and the id prefixes that tell OpenCLIP models apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import align_module_device
from torch import nn

# Backbone ids with these prefixes are OpenCLIP models (`open_clip_backbone.py`); any other is a transformers model.
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"


class Backbone(nn.Module):
    """What the ensemble needs from one frozen CLIP-like model, whichever library provides it.

    Subclasses set `self.model` (the wrapped module), `name_or_path` and `revision`, and implement `from_pretrained`,
    `weight_bytes` (the size of the weights, without loading them), `embed_dim`, `logit_scale`, `preprocess`,
    `encode_images`, `encode_texts` and `cache_key` (what determines the image embeddings, for the feature cache);
    the embeddings they return are L2-normalised float32 of shape (batch, embed_dim). Methods that use the weights run
    inside `self.onloaded()`, so that a backbone offloaded to CPU or disk (placement.py) works as any other.
    """

    name_or_path: str
    revision: str | None
    # Set by `placement.offload_backbone`: the weights then sit on the meta device between calls.
    execution_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """Where the backbone computes: its weights' device, or the execution device of an offloaded backbone."""
        return self.execution_device or next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextmanager
    def onloaded(self) -> Iterator[None]:
        """Bring offloaded weights, all of them, to the execution device for the duration; a no-op otherwise."""
        with align_module_device(self.model):
            yield

    def describe(self) -> dict:
        """The config entry that points back at this backbone."""
        return {"name_or_path": self.name_or_path, "revision": self.revision, "embed_dim": self.embed_dim}


__all__ = ["Backbone", "HF_HUB_PREFIX", "LOCAL_DIR_PREFIX"]
