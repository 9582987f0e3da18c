"""The colour task: coloured shapes on noise, and three tiny CLIPs trained to be wrong in different places."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..backbones.templates import SHORT_TEMPLATES
from ..data.labelled import LabelledImages
from .tiny import tiny_clip

# A toy task: coloured shapes on noise, named by their colour, in three look-alike pairs. Each toy backbone
# tells apart one pair only and was trained with captions that merge the others (orange shapes captioned "red",
# ...): the backbones are confidently wrong in different places, the way real CLIPs disagree, so an oracle that
# picks the right backbone per image beats each of them.
TOY_CLASSES = ("red", "orange", "green", "teal", "blue", "purple")
_TOY_HUES = (0, 30, 120, 170, 225, 275)  # degrees, one per class
TOY_CONFUSIONS = ({3: 2, 5: 4}, {1: 0, 5: 4}, {1: 0, 3: 2})  # per backbone: class -> the class it is captioned as
TOY_ARCHITECTURES = (
    {"hidden_size": 32, "projection_dim": 16, "image_size": 32, "patch_size": 8},
    {"hidden_size": 48, "projection_dim": 24, "image_size": 28, "patch_size": 7},
    {"hidden_size": 32, "projection_dim": 20, "image_size": 36, "patch_size": 6},
)


def draw_toy_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A circle, square or triangle in the colour of `TOY_CLASSES[label]` (hue jittered), on grey noise."""
    pixels = np.clip(rng.integers(20, 110) + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    hue = (_TOY_HUES[label] + rng.uniform(-8, 8)) % 360
    colour = f"hsv({hue:.0f},{rng.uniform(65, 100):.0f}%,{rng.uniform(70, 100):.0f}%)"
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    shape = rng.integers(3)
    draw = ImageDraw.Draw(image)
    if shape == 0:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == 1:
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def toy_dataset(per_class: int, seed: int, classes: tuple[int, ...] | None = None) -> LabelledImages:
    """`per_class` toy images for each class index in `classes` (default: all), labels into `TOY_CLASSES`."""
    rng = np.random.default_rng(seed)
    classes = tuple(range(len(TOY_CLASSES))) if classes is None else classes
    labels = [c for c in classes for _ in range(per_class)]
    images = [draw_toy_image(c, rng) for c in labels]
    return LabelledImages(images, labels, list(TOY_CLASSES), name=f"toy-colours (seed {seed})")


def train_toy_clip(folder: str | Path, confusions: dict[int, int], seed: int, steps: int = 100, **architecture) -> Path:
    """Train a tiny CLIP to match toy images with prompts naming their class, except that images of class k
    are captioned as class `confusions[k]`; save it with its processor to `folder`."""
    model, processor = tiny_clip(seed=seed, **architecture)
    data = toy_dataset(per_class=64, seed=1000 + seed)
    pixel_values = processor(images=data.images, return_tensors="pt")["pixel_values"]
    targets = torch.tensor([confusions.get(label, label) for label in data.labels])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(targets), generator=generator)[:64]
        # A random prompt template per step, so that zero-shot heads averaged over templates work too.
        template = SHORT_TEMPLATES[int(torch.randint(len(SHORT_TEMPLATES), (1,), generator=generator))]
        text = processor(text=[template.format(name) for name in TOY_CLASSES], padding=True, return_tensors="pt")
        out = model(pixel_values=pixel_values[batch], **text)
        loss = torch.nn.functional.cross_entropy(out.logits_per_image, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def toy_backbones(root: str | Path, steps: int = 100) -> list[str]:
    """Train (once; reused if present) the three toy backbones under `root`; returns their folders."""
    folders = []
    for index, (confusions, architecture) in enumerate(zip(TOY_CONFUSIONS, TOY_ARCHITECTURES)):
        folder = Path(root) / f"toy-clip-{index}"
        if not (folder / "model.safetensors").is_file():
            train_toy_clip(folder, confusions, seed=index, steps=steps, **architecture)
        folders.append(str(folder))
    return folders


__all__ = ["TOY_CLASSES", "draw_toy_image", "toy_backbones", "toy_dataset", "train_toy_clip"]
