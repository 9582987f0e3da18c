import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from clip_ensemble.metrics import mean_per_class_recall, per_class_recall, top_k_accuracy


def test_metrics_agree_with_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 7, generator=generator)
    labels = torch.randint(0, 7, (200,), generator=generator)
    ranked = scores.argsort(dim=1, descending=True)
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=list(range(7)))
        assert abs(top_k_accuracy(ranked, labels, k) - expected) < 1e-9
    expected = balanced_accuracy_score(labels.numpy(), ranked[:, 0].numpy())
    assert abs(mean_per_class_recall(ranked[:, 0], labels, 7) - expected) < 1e-6


def test_classes_without_examples_are_left_out_of_the_mean():
    predictions, labels = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    recall = per_class_recall(predictions, labels, num_classes=3)
    assert recall[:2].tolist() == [0.5, 1.0] and recall[2].isnan()
    assert mean_per_class_recall(predictions, labels, 3) == 0.75
