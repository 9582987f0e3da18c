import evaluate
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from clip_ensemble.evaluation.evaluate_modules import MeanPerClassRecall, TopKAccuracy
from clip_ensemble.evaluation.metrics import confusion_matrix, mean_per_class_recall, per_class_recall, top_k_accuracy


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


def test_confusion_matrix_agrees_with_scikit_learn():
    generator = torch.Generator().manual_seed(1)
    predictions = torch.randint(0, 6, (300,), generator=generator)
    labels = torch.randint(0, 6, (300,), generator=generator)
    expected = sklearn_confusion_matrix(labels.numpy(), predictions.numpy(), labels=list(range(6)))
    assert confusion_matrix(predictions, labels, 6).tolist() == expected.tolist()


def test_evaluate_modules_agree_with_scikit_learn():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(150, 9, generator=generator)
    labels = torch.randint(0, 9, (150,), generator=generator)
    ranked = scores.argsort(dim=1, descending=True)[:, :5].tolist()
    references = labels.tolist()
    y, s = labels.numpy(), scores.numpy()
    metric = evaluate.combine([TopKAccuracy(1), TopKAccuracy(5), MeanPerClassRecall()])
    results = metric.compute(predictions=ranked, references=references)
    assert set(results) == {"accuracy", "top_5_accuracy", "mean_per_class_recall"}
    assert abs(results["accuracy"] - top_k_accuracy_score(y, s, k=1, labels=list(range(9)))) < 1e-9
    assert abs(results["top_5_accuracy"] - top_k_accuracy_score(y, s, k=5, labels=list(range(9)))) < 1e-9
    assert abs(results["mean_per_class_recall"] - balanced_accuracy_score(y, s.argmax(1))) < 1e-9
    # One label id per example, as evaluate's stock image-classification evaluator passes them.
    top1 = [row[0] for row in ranked]
    assert TopKAccuracy(1).compute(predictions=top1, references=references) == {"accuracy": results["accuracy"]}
    recall = MeanPerClassRecall().compute(predictions=top1, references=references)["mean_per_class_recall"]
    assert recall == results["mean_per_class_recall"]


def test_evaluate_modules_reject_bad_input():
    with pytest.raises(ValueError, match="k=0"):
        TopKAccuracy(0)
    with pytest.raises(ValueError, match="ranked at least 5 deep, got 2"):
        TopKAccuracy(5).compute(predictions=[[0, 1], [1, 0]], references=[0, 1])
    with pytest.raises(ValueError, match="different lengths"):
        TopKAccuracy(1).compute(predictions=[[0, 1], [1]], references=[0, 1])


def test_labels_outside_the_dataset_count_as_wrong():
    """An evaluator's label mapping sends model labels the dataset lacks to -1: wrong, never an error."""
    assert TopKAccuracy(1).compute(predictions=[-1, 1], references=[0, 1]) == {"accuracy": 0.5}
    assert MeanPerClassRecall().compute(predictions=[-1, 1], references=[0, 1]) == {"mean_per_class_recall": 0.5}
