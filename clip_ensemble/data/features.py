"""A feature cache: each backbone's image embeddings computed once and kept on disk as safetensors.

Entries are keyed by the backbone (repo id, revision, model config, preprocessing, dtype) and by the content of
each image, so a second calibration or evaluation over the same images runs no backbone forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models.placement import run_per_device
from ..models.processing_clip_ensemble import ImageInput, load_images


def default_cache_dir() -> Path:
    """`$HF_HOME/clip_ensemble/features` (by default `~/.cache/huggingface/clip_ensemble/features`)."""
    return Path(constants.HF_HOME) / "clip_ensemble" / "features"


def image_fingerprint(image: ImageInput) -> str:
    """SHA-256 of an image's content: file bytes for paths and bytes, decoded pixels for PIL images and arrays."""
    digest = hashlib.sha256()
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    elif isinstance(image, np.ndarray):
        digest.update(f"{image.dtype}{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    elif isinstance(image, bytes):
        digest.update(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            digest.update(Path(image).read_bytes())
        except OSError as error:
            raise ValueError(f"Cannot read image file '{image}': {error}; check the path.") from error
    else:
        raise TypeError(f"Cannot fingerprint an image of type {type(image).__name__}.")
    return digest.hexdigest()


def backbone_fingerprint(backbone) -> str:
    """SHA-256 of what determines a backbone's image embeddings (`backbone.cache_key()`)."""
    payload = json.dumps(backbone.cache_key(), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _embed(backbone, images: list[Image.Image]) -> torch.Tensor | None:
    """(len(images), embed_dim) float32 embeddings on the CPU; None for no image."""
    return backbone.encode_images(backbone.preprocess(images)).cpu() if images else None


class FeatureCache:
    """Image embeddings per backbone, in `directory/<backbone fingerprint>/<shard>.safetensors`.

    Each shard holds `embeds` (n, embed_dim) float32 and `keys` (n, 32) uint8, the images' SHA-256 digests.
    `directory=None` keeps embeddings in memory only.
    """

    def __init__(self, directory: str | os.PathLike | None = "default"):
        if directory == "default":
            directory = default_cache_dir()
        self.directory = Path(directory) if directory is not None else None
        self._stores: dict[str, dict[str, torch.Tensor]] = {}
        self.last_computed: list[int] = []  # images embedded (cache misses) per backbone in the last call

    def _store(self, backbone_key: str) -> dict[str, torch.Tensor]:
        """Image digest -> embedding for one backbone, read from disk once."""
        if backbone_key not in self._stores:
            store: dict[str, torch.Tensor] = {}
            folder = self.directory / backbone_key if self.directory else None
            for shard in sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []:
                tensors = load_file(shard)
                store.update(zip((bytes(k).hex() for k in tensors["keys"].tolist()), tensors["embeds"]))
            self._stores[backbone_key] = store
        return self._stores[backbone_key]

    def _write_shard(self, backbone_key: str, digests: list[str], embeds: torch.Tensor) -> None:
        folder = self.directory / backbone_key
        folder.mkdir(parents=True, exist_ok=True)
        keys = torch.tensor([list(bytes.fromhex(d)) for d in digests], dtype=torch.uint8)
        name = uuid.uuid4().hex
        partial = folder / f".{name}.partial"
        save_file({"embeds": embeds.contiguous(), "keys": keys}, partial, metadata={"format": "pt"})
        os.replace(partial, folder / f"{name}.safetensors")  # atomic: readers never see half a shard

    def embed(
        self, backbones: Sequence, images: Sequence[ImageInput], batch_size: int = 32, progress: bool = True
    ) -> list[torch.Tensor]:
        """One (len(images), embed_dim_b) float32 CPU tensor per backbone, computing only what is not cached."""
        digests = [image_fingerprint(images[i]) for i in range(len(images))]
        keys = [backbone_fingerprint(backbone) for backbone in backbones]
        stores = [self._store(key) for key in keys]
        # First occurrence of each digest that some backbone is missing, in data order.
        first_index: dict[str, int] = {}
        for i, digest in enumerate(digests):
            first_index.setdefault(digest, i)
        missing = [{d for d in first_index if d not in store} for store in stores]
        todo = [i for d, i in first_index.items() if any(d in m for m in missing)]
        new: list[dict[str, torch.Tensor]] = [{} for _ in backbones]
        devices = [backbone.device for backbone in backbones]

        bar = tqdm(total=len(todo), desc="Embedding images", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            pil_images = load_images([images[i] for i in batch])
            wanted = [[j for j, i in enumerate(batch) if digests[i] in missing[b]] for b in range(len(backbones))]
            inputs = [[pil_images[j] for j in rows] for rows in wanted]
            # Backbones on different accelerators run at the same time.
            encoded = run_per_device(lambda b, inputs=inputs: _embed(backbones[b], inputs[b]), devices)
            for b, embeds in enumerate(encoded):
                if embeds is not None:
                    new[b].update(zip((digests[batch[j]] for j in wanted[b]), embeds))
            bar.update(len(batch))
        bar.close()

        for key, store, rows in zip(keys, stores, new):
            if rows and self.directory:
                self._write_shard(key, list(rows), torch.stack(list(rows.values())))
            store.update(rows)
        self.last_computed = [len(rows) for rows in new]
        return [torch.stack([store[d] for d in digests]) for store in stores]

    def contains(self, backbone, digests: Sequence[str]) -> list[bool]:
        """Whether each image digest (`image_fingerprint`) has an embedding for `backbone` in the cache."""
        store = self._store(backbone_fingerprint(backbone))
        return [digest in store for digest in digests]


__all__ = ["FeatureCache", "backbone_fingerprint", "default_cache_dir", "image_fingerprint"]
