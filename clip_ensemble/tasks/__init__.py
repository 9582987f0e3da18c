"""Offline example tasks with tiny trained CLIP backbones, for the demo, the tests and the benchmarks.

Not part of the model: nothing in the library imports this package.
"""

from .colours import TOY_CLASSES, draw_toy_image, toy_backbones, toy_dataset, train_toy_clip
from .digits import (
    DIGIT_CLASSES,
    digit_split_indices,
    digits_backbones,
    digits_backbones_ready,
    digits_dataset,
    train_digits_clip,
)
from .synthetic import (
    WIDTHS,
    FeatureTask,
    averaging_task,
    dominant_backbone_task,
    feature_task,
    hard_images_task,
    leading_backbone_task,
    noise_task,
    synthetic_features,
    synthetic_task,
)
from .tiny import save_tiny_clip, save_tiny_open_clip_resnet, tiny_clip, tiny_tokenizer

__all__ = [
    "DIGIT_CLASSES",
    "TOY_CLASSES",
    "WIDTHS",
    "FeatureTask",
    "averaging_task",
    "digit_split_indices",
    "dominant_backbone_task",
    "digits_backbones",
    "digits_backbones_ready",
    "digits_dataset",
    "draw_toy_image",
    "feature_task",
    "hard_images_task",
    "leading_backbone_task",
    "noise_task",
    "save_tiny_clip",
    "save_tiny_open_clip_resnet",
    "synthetic_features",
    "synthetic_task",
    "tiny_clip",
    "tiny_tokenizer",
    "toy_backbones",
    "toy_dataset",
    "train_digits_clip",
    "train_toy_clip",
]
