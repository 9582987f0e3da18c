import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clip_ensemble.data.features import FeatureCache
from clip_ensemble.data.labelled import LabelledImages
from clip_ensemble.tasks import (
    DIGIT_CLASSES,
    WIDTHS,
    digit_split_indices,
    digits_backbones_ready,
    digits_dataset,
    feature_task,
    synthetic_task,
    train_digits_clip,
)
from clip_ensemble.tasks import digits as digits_module
from clip_ensemble.tasks.digits import DIGIT_SPECIALISTS
from clip_ensemble.tasks.synthetic import hard_images_task, noise_task


def test_digits_split_is_a_partition_of_the_1797_digits():
    pool, test = digit_split_indices("pool"), digit_split_indices("test")
    assert (len(pool), len(test)) == (1198, 599)
    assert not set(pool) & set(test)
    assert sorted({*pool, *test}) == list(range(1797))
    data = digits_dataset("test")
    assert len(data) == 599 and data.label_names == list(DIGIT_CLASSES)
    assert set(data.labels) == set(range(10)) and set(digits_dataset("pool").labels) == set(range(10))
    assert data.images[0].mode == "RGB" and data.images[0].size == (32, 32)
    assert all(name.isalpha() and name.islower() for name in DIGIT_CLASSES)  # the tiny tokenizer's characters


def test_digits_split_names_the_valid_splits():
    with pytest.raises(ValueError, match="'pool' and 'test'"):
        digits_dataset("train")


def test_digits_task_names_the_extra_when_scikit_learn_is_missing(monkeypatch):
    digits_module._digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    try:
        with pytest.raises(ImportError, match=r'pip install "clip-ensemble\[demo\]"'):
            digits_dataset("pool")
    finally:
        digits_module._digits.cache_clear()


def test_digit_specialist_training_is_deterministic(tmp_path):
    specialist = DIGIT_SPECIALISTS[1]
    kwargs = {"architecture": specialist["architecture"], "steps": 5}
    first, second = (load_file(train_digits_clip(tmp_path / n, seed=1, **kwargs) / "model.safetensors") for n in "ab")
    other = load_file(train_digits_clip(tmp_path / "c", seed=2, **kwargs) / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_digit_specialists_are_imperfect_and_disagree(digits_task):
    logits = digits_task.logits(digits_task.test_embeds)  # (599, 3, 10)
    right = logits.argmax(-1) == digits_task.test_labels[:, None]
    single = right.float().mean(0)
    oracle = right.any(1).float().mean()
    assert ((single > 0.4) & (single < 0.95)).all(), single
    assert oracle > single.max() + 0.05, (single, oracle)
    # "partial" never saw a 7, 8 or 9: it is right on few of them.
    partial = [s["name"] for s in DIGIT_SPECIALISTS].index("partial")
    late = digits_task.test_labels >= 7
    assert right[late, partial].float().mean() < 0.2


def test_feature_task_from_a_model(digits_task, digits_backbone_dirs):
    assert digits_task.label_names == list(DIGIT_CLASSES)
    assert digits_task.backbone_names == [Path(folder).name for folder in digits_backbone_dirs]
    assert len(digits_task.pool_labels) == 1198 and len(digits_task.test_labels) == 599
    for pool, test, head in zip(digits_task.pool_embeds, digits_task.test_embeds, digits_task.heads):
        assert pool.shape == (1198, head.shape[1]) and test.shape == (599, head.shape[1])
        assert head.shape[0] == 10
        torch.testing.assert_close(test.norm(dim=-1), torch.ones(599))
    assert all(scale > 0 for scale in digits_task.logit_scales)


def test_feature_task_rejects_splits_with_different_labels(digits_backbone_dirs):
    from clip_ensemble import CLIPEnsembleModel

    model = CLIPEnsembleModel.from_backbones(digits_backbone_dirs, labels=list(DIGIT_CLASSES))
    pool = digits_dataset("pool")
    other = LabelledImages(pool.images[:2], [0, 1], ["a", "b"], name="other")
    with pytest.raises(ValueError, match="same label names"):
        feature_task("digits", model, pool, other, FeatureCache(None))


def test_digits_backbones_ready_only_when_all_are_saved(digits_backbone_dirs, tmp_path):
    root = digits_backbone_dirs[0].rsplit("/", 1)[0]
    assert digits_backbones_ready(root)
    assert not digits_backbones_ready(tmp_path)


def test_synthetic_task_shapes_and_shared_world():
    task = synthetic_task(num_classes=20, pool_shots=4, test_per_class=3, seed=0)
    assert len(task.backbone_names) == len(task.heads) == len(task.logit_scales) == len(WIDTHS) == 9
    assert task.pool_labels.tolist() == np.repeat(np.arange(20), 4).tolist()
    assert task.test_labels.tolist() == np.repeat(np.arange(20), 3).tolist()
    for width, pool, test, head in zip(WIDTHS, task.pool_embeds, task.test_embeds, task.heads):
        assert pool.shape == (80, width) and test.shape == (60, width) and head.shape == (20, width)
        torch.testing.assert_close(pool.norm(dim=-1), torch.ones(80))
        assert torch.cdist(test, pool).min() > 0.1  # no test image is a pool image
    assert task.logits(task.test_embeds).shape == (60, 9, 20)
    # The world (prototypes, heads) depends on the seed only, not on how many images are drawn from it.
    bigger = synthetic_task(num_classes=20, pool_shots=2, test_per_class=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(task.heads, bigger.heads))
    assert not torch.equal(synthetic_task(num_classes=20, seed=1).heads[0], task.heads[0])
    # Pool and test images come from the same classes: a backbone is about as accurate on both.
    for split in ("pool", "test"):
        embeds, labels = getattr(task, f"{split}_embeds"), getattr(task, f"{split}_labels")
        oracle = (task.logits(embeds).argmax(-1) == labels[:, None]).any(1).float().mean()
        assert oracle > 0.8, (split, oracle)


def test_noise_task_has_no_routing_signal_and_averaging_wins():
    task = noise_task(num_classes=30, pool_shots=4, test_per_class=10, seed=0)
    assert task.logits(task.test_embeds).shape == (300, 9, 30) and task.pool_labels.shape == (120,)
    logits, labels = task.logits(task.test_embeds), task.test_labels
    single = (logits.argmax(-1) == labels[:, None]).float().mean(0)  # (9,) every head right, noisy images
    averaging = (logits.mean(1).argmax(-1) == labels).float().mean()
    assert single.max() < 0.7 and averaging > single.max() + 0.2
    assert all(torch.equal(a, b) for a, b in zip(task.heads, noise_task(30, 4, 10, seed=0).heads))


def test_hard_images_task_has_similar_backbones_that_fail_together():
    task = hard_images_task(num_classes=20, seed=0)
    logits, labels = task.logits(task.test_embeds), task.test_labels  # (400, 5, 20)
    single = (logits.argmax(-1) == labels[:, None]).float().mean(0)
    averaging = (logits.mean(1).argmax(-1) == labels).float().mean()
    assert single.min() > 0.7 and single.max() < averaging < single.max() + 0.03  # averaging gains about a point
    wrong = (logits.argmax(-1) != labels[:, None]).float()
    # The errors fall on shared images: two backbones are both wrong far more often than independent ones would be.
    assert (wrong[:, 3] * wrong[:, 4]).mean() > 2 * wrong[:, 3].mean() * wrong[:, 4].mean()


def test_synthetic_task_rejects_empty_splits():
    with pytest.raises(ValueError, match="at least 2 classes"):
        synthetic_task(num_classes=10, test_per_class=0)
