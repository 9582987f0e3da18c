"""Image loading and per-backbone preprocessing."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Image.Image | str | os.PathLike | bytes | np.ndarray


def load_image(image: ImageInput, name: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, encoded bytes or an (H, W[, C]) uint8 array.

    Raises `ValueError` naming `name` when the input cannot be decoded, and `TypeError` for other types.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (str, os.PathLike, bytes)):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        try:
            with Image.open(source) as opened:
                return opened.convert("RGB")
        except FileNotFoundError as error:
            raise ValueError(f"{name}: no file at '{image}'; check the path.") from error
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
            where = f"'{image}'" if not isinstance(image, bytes) else f"{len(image)} bytes"
            raise ValueError(
                f"{name} ({where}) could not be decoded as an image: {error}. Pass a JPEG, PNG, WebP or "
                "another format Pillow reads, and check the file is not truncated."
            ) from error
    raise TypeError(
        f"{name} has type {type(image).__name__}; pass a PIL image, a file path, encoded bytes or a numpy array."
    )


def load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """`load_image` over a batch; a single image is a batch of one."""
    if isinstance(images, (Image.Image, str, os.PathLike, bytes, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("No images given: pass at least one image.")
    return [load_image(image, name=f"image {i}") for i, image in enumerate(images)]


class CLIPEnsembleProcessor:
    """Preprocesses images once per backbone: each backbone keeps its own size and normalisation.

    `processor(images)` returns `{"pixel_values": [tensor (batch, 3, H_b, W_b) for each backbone]}`, the input
    `CLIPEnsembleModel` takes.
    """

    def __init__(self, preprocessors: Sequence[Callable[[list[Image.Image]], torch.Tensor]]):
        # One `backbone.preprocess` per backbone: PIL images -> (batch, 3, H_b, W_b).
        self.preprocessors = list(preprocessors)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, list[torch.Tensor]]:
        pil_images = load_images(images)
        return {"pixel_values": [preprocess(pil_images) for preprocess in self.preprocessors]}


__all__ = ["CLIPEnsembleProcessor", "ImageInput", "load_image", "load_images"]
