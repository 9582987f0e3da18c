"""Cross-validation folds and the classes calibration trains on."""

import math

import pytest
import torch

from clip_ensemble.calibration.folds import TRAIN_CLASSES, cross_validation_folds, training_view


def test_training_view_keeps_the_label_first_and_every_backbones_likeliest_classes():
    generator = torch.Generator().manual_seed(0)
    n, num_backbones, num_classes = 40, 3, 4 * TRAIN_CLASSES
    logits = 5 * torch.randn(n, num_backbones, num_classes, generator=generator)
    labels = torch.randint(num_classes, (n,), generator=generator)
    view_logits, view_labels = training_view(logits, labels)
    assert view_logits.shape == (n, num_backbones, TRAIN_CLASSES) and bool((view_labels == 0).all())
    torch.testing.assert_close(view_logits[:, :, 0], logits[torch.arange(n), :, labels])
    # The classes kept are those with the best probability under some backbone (taken a few hundred images at a time).
    best = logits.log_softmax(-1).amax(1)
    best[torch.arange(n), labels] = math.inf
    kept = best.topk(TRAIN_CLASSES, dim=-1).indices
    assert torch.equal(view_logits, logits.gather(2, kept[:, None].expand(-1, num_backbones, -1)))
    for b in range(num_backbones):  # each backbone's likeliest class is among the kept ones
        assert torch.equal(view_logits[:, b].amax(-1), logits[:, b].amax(-1))
    few = logits[..., :TRAIN_CLASSES], labels % TRAIN_CLASSES  # no more classes than the view holds: all of them
    assert all(kept is given for kept, given in zip(training_view(*few), few))


@pytest.mark.parametrize("shots", [1, 2, 3, 16])
def test_folds_cover_every_example_once_and_are_balanced(shots):
    labels = torch.arange(10).repeat_interleave(shots)
    folds = cross_validation_folds(labels, num_folds=5, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(len(labels)))
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 1
    for fold in folds:  # a class's shots are spread over folds: at 2+ shots, each held-out class is also trained on
        held_out = labels[fold].tolist()
        assert max(held_out.count(c) for c in set(held_out)) <= -(-shots // 5)
    assert folds == cross_validation_folds(labels, num_folds=5, seed=3)


def test_folds_need_two_examples():
    with pytest.raises(ValueError, match="at least 2 labelled examples"):
        cross_validation_folds([0], num_folds=5)
