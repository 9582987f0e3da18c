"""Offline example tasks with tiny trained CLIP backbones, for the demo, the tests and the benchmarks.

Not part of the model: nothing in the library imports this package.
"""

from .colours import TOY_CLASSES, draw_toy_image, toy_backbones, toy_dataset, train_toy_clip
from .tiny import save_tiny_clip, save_tiny_open_clip_resnet, tiny_clip, tiny_tokenizer

__all__ = [
    "TOY_CLASSES",
    "draw_toy_image",
    "save_tiny_clip",
    "save_tiny_open_clip_resnet",
    "tiny_clip",
    "tiny_tokenizer",
    "toy_backbones",
    "toy_dataset",
    "train_toy_clip",
]
