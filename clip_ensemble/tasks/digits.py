"""The digits task: scikit-learn's bundled handwritten digits (real images, no download), and tiny CLIP
specialists that differ in resolution, width and the part of the data they saw."""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones.templates import SHORT_TEMPLATES
from ..data.labelled import LabelledImages
from .tiny import tiny_clip

# Lowercase letters only: the tiny tokenizer is character-level.
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_IMAGE_SIZE = 32  # the 8x8 scans are upscaled to this before each backbone's own resizing
_SPLIT_SEED = 0  # fixes which third of the 1,797 images is held out
# Three specialists, honestly imperfect and imperfect in different places:
# - "sharp" sees the digits at 24x24 but was trained on a third of the pool only;
# - "blurry" sees them at 4x4 (half the resolution of the 8x8 scans), from the whole pool;
# - "partial" is the widest, at 12x12, and saw the whole pool except the images of 7, 8 and 9 (their prompts
#   were only ever negatives).
# Each cuts its image into at most 3x3 patches: with so few tokens a fresh two-layer CLIP learns in a few hundred
# steps (all three train in about 13 s of CPU time).
DIGIT_SPECIALISTS = (
    {
        "name": "sharp",
        "architecture": {"hidden_size": 32, "projection_dim": 16, "image_size": 24, "patch_size": 8},
        "pool_fraction": 1 / 3,
        "classes": None,
    },
    {
        "name": "blurry",
        "architecture": {"hidden_size": 32, "projection_dim": 20, "image_size": 4, "patch_size": 2},
        "pool_fraction": 1.0,
        "classes": None,
    },
    {
        "name": "partial",
        "architecture": {"hidden_size": 48, "projection_dim": 24, "image_size": 12, "patch_size": 4},
        "pool_fraction": 1.0,
        "classes": (0, 1, 2, 3, 4, 5, 6),
    },
)


def _require_sklearn():
    try:
        import sklearn.datasets
    except ImportError as error:
        raise ImportError(
            'The digits task needs scikit-learn (its bundled handwritten digits): pip install "clip-ensemble[demo]"'
        ) from error
    return sklearn.datasets


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 scans scaled to 0..255, their labels, and a fixed permutation deciding the split."""
    bunch = _require_sklearn().load_digits()
    scans = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(scans))
    return scans, bunch.target.astype(int), order


def _to_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 greyscale scan -> a smooth DIGIT_IMAGE_SIZE RGB image (white ink on black, as scanned)."""
    return Image.fromarray(scan, mode="L").resize((DIGIT_IMAGE_SIZE,) * 2, Image.BILINEAR).convert("RGB")


def digit_split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of the "pool" (2/3: training and calibration) or "test" split (1/3)."""
    if split not in ("pool", "test"):
        raise ValueError(f"split={split!r}: the digits task has the splits 'pool' and 'test'.")
    scans, _, order = _digits()
    held_out = len(scans) // 3
    return np.sort(order[:held_out] if split == "test" else order[held_out:])


def digits_dataset(split: str) -> LabelledImages:
    """The "pool" (1,198 images: the backbones' training and k-shot calibration) or held-out "test" split
    (599 images) of scikit-learn's handwritten digits, as RGB images labelled into `DIGIT_CLASSES`."""
    scans, labels, _ = _digits()
    indices = digit_split_indices(split)
    return LabelledImages(
        [_to_image(scans[i]) for i in indices],
        [int(labels[i]) for i in indices],
        list(DIGIT_CLASSES),
        name=f"sklearn-digits ({split})",
    )


def train_digits_clip(
    folder: str | Path,
    seed: int,
    architecture: dict,
    pool_fraction: float = 1.0,
    classes: tuple[int, ...] | None = None,
    steps: int = 300,
) -> Path:
    """Train a tiny CLIP to match pool images with prompts naming their digit, on `pool_fraction` of the pool
    and only the images of `classes` (default: all; every class name stays in the prompts); save it with its
    processor to `folder`."""
    model, processor = tiny_clip(seed=seed, **architecture)
    data = digits_dataset("pool")
    rng = np.random.default_rng(seed)
    keep = [i for i in rng.permutation(len(data)) if classes is None or data.labels[i] in classes]
    keep = sorted(keep[: max(1, round(pool_fraction * len(keep)))])
    pixel_values = processor(images=[data.images[i] for i in keep], return_tensors="pt")["pixel_values"]
    targets = torch.tensor([data.labels[i] for i in keep])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # Start at CLIP's largest logit scale (100): the near-constant embeddings of a fresh model then give
    # gradients strong enough to leave the chance plateau in a few hundred steps.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    prompts = [
        processor(text=[t.format(n) for n in DIGIT_CLASSES], padding=True, return_tensors="pt") for t in SHORT_TEMPLATES
    ]
    model.train()
    # One thread: these steps are too small to share, and a second thread mostly waits (2x the CPU time).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = torch.randperm(len(targets), generator=generator)[:64]
            # A random prompt template per step, so that zero-shot heads averaged over templates work too.
            text = prompts[int(torch.randint(len(prompts), (1,), generator=generator))]
            out = model(pixel_values=pixel_values[batch], **text)
            loss = torch.nn.functional.cross_entropy(out.logits_per_image, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def _folder(root: str | Path, specialist: dict) -> Path:
    return Path(root) / f"digits-clip-{specialist['name']}"


def digits_backbones_ready(root: str | Path) -> bool:
    """Whether `digits_backbones(root)` would reuse saved backbones rather than train."""
    return all((_folder(root, s) / "model.safetensors").is_file() for s in DIGIT_SPECIALISTS)


def digits_backbones(root: str | Path, steps: int = 300) -> list[str]:
    """Train (once; reused if present) the three digit specialists under `root`; returns their folders."""
    folders = []
    for index, specialist in enumerate(DIGIT_SPECIALISTS):
        folder = _folder(root, specialist)
        if not (folder / "model.safetensors").is_file():
            # Trained into a side folder and renamed: an interrupted run never leaves a half-saved backbone.
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            train_digits_clip(
                partial,
                seed=index,
                architecture=specialist["architecture"],
                pool_fraction=specialist["pool_fraction"],
                classes=specialist["classes"],
                steps=steps,
            )
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        folders.append(str(folder))
    return folders


__all__ = [
    "DIGIT_CLASSES",
    "DIGIT_SPECIALISTS",
    "digit_split_indices",
    "digits_backbones",
    "digits_backbones_ready",
    "digits_dataset",
    "train_digits_clip",
]
