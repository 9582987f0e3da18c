"""The `evaluate` library's side: metric modules that work offline, and an evaluator that keeps rankings.

`evaluate.load("accuracy")` fetches the metric's script from the Hub; these `evaluate.Metric` subclasses live in the
package, compute with `clip_ensemble.evaluation.metrics`, and plug into `evaluate.combine` and evaluators alike:

```python
>>> from clip_ensemble.evaluation.evaluate_modules import CLIPEnsembleEvaluator

>>> CLIPEnsembleEvaluator(ranked=True).compute(model_or_pipeline="me/eurosat-gate", data="tanganke/eurosat", split="test")
{'accuracy': 0.91, 'top_5_accuracy': 0.99, 'mean_per_class_recall': 0.9, 'total_time_in_seconds': ...}
```
"""

from __future__ import annotations

import os

import datasets
import evaluate
import torch
from evaluate.evaluator import ImageClassificationEvaluator
from transformers import Pipeline, pipeline

from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from ..pipelines import CLIPEnsemblePipeline
from .metrics import mean_per_class_recall, top_k_accuracy

# Each example's prediction is a ranked list of label ids (best first) or a single label id.
_RANKED = datasets.Features(
    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
)
_SINGLE = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_INPUTS = """
Args:
    predictions (`list[int]` or `list[list[int]]`): per example, the predicted label id, or the label ids ranked
        best first (the top-k of a classifier; all examples ranked to the same depth).
    references (`list[int]`): per example, the true label id.
"""
_CITATION = (
    'Rodriguez-Opazo et al., "Synergy and Diversity in CLIP: Enhancing Performance Through Adaptive Backbone '
    'Ensembling", ICLR 2025, arXiv:2405.17139.'
)


def _metric_info(description: str) -> evaluate.MetricInfo:
    # Either input format; evaluate picks the first that encodes the first example.
    return evaluate.MetricInfo(
        description=description,
        citation=_CITATION,
        inputs_description=_INPUTS,
        features=[_RANKED, _SINGLE],
        reference_urls=["https://arxiv.org/abs/2405.17139"],
    )


def _as_tensors(predictions: list, references: list) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ranked (n, depth) and labels (n,) tensors; a single prediction per example is a ranking of depth 1."""
    if len(predictions) == 0:
        raise ValueError("No predictions given: pass at least one prediction with its reference.")
    rows = [p if isinstance(p, list) else [p] for p in predictions]
    depths = sorted({len(row) for row in rows})
    if len(depths) > 1:
        raise ValueError(f"Ranked predictions have different lengths {depths}; rank every example to the same depth.")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(references, dtype=torch.long)


class TopKAccuracy(evaluate.Metric):
    """Share of examples whose reference is among their first `k` ranked predictions.

    The result's key is `accuracy` for `k=1` (as `evaluate.load("accuracy")` names it) and `top_{k}_accuracy`
    otherwise. With `k > 1`, `predictions` must be rankings at least `k` deep.
    """

    def __init__(self, k: int = 1, **kwargs):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r}; give a positive number of ranked predictions to look at, e.g. k=5.")
        self.k = k
        super().__init__(config_name=f"top{k}", **kwargs)

    @property
    def key(self) -> str:
        return "accuracy" if self.k == 1 else f"top_{self.k}_accuracy"

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Top-k accuracy: the share of examples whose true label is among the k best predictions.")

    def _compute(self, predictions, references) -> dict[str, float]:
        ranked, labels = _as_tensors(predictions, references)
        if ranked.shape[1] < self.k:
            raise ValueError(
                f"Top-{self.k} accuracy needs each example's predictions ranked at least {self.k} deep, got "
                f"{ranked.shape[1]}; pass the top-{self.k} label ids (e.g. a pipeline called with top_k={self.k})."
            )
        return {self.key: top_k_accuracy(ranked, labels, self.k)}


class MeanPerClassRecall(evaluate.Metric):
    """Balanced accuracy: the mean over the classes present in `references` of their recall (top-1)."""

    def _info(self) -> evaluate.MetricInfo:
        return _metric_info("Mean per-class recall (balanced accuracy) of the top-1 prediction.")

    def _compute(self, predictions, references) -> dict[str, float]:
        ranked, labels = _as_tensors(predictions, references)
        num_classes = int(max(ranked.max(), labels.max())) + 1
        return {"mean_per_class_recall": mean_per_class_recall(ranked[:, 0], labels, num_classes)}


class CLIPEnsembleEvaluator(ImageClassificationEvaluator):
    """`evaluate`'s image-classification evaluator (same `compute` arguments and results) for the ensemble.

    Three differences: `model_or_pipeline` may be a `CLIPEnsembleModel`, a saved ensemble (folder or Hub repo id) or
    an image-classification pipeline object (the stock evaluator of evaluate 0.4.6 fails on every pipeline object
    under transformers 5, looking up the removed `transformers.TFPreTrainedModel`); without `label_mapping`, the
    pipeline's label names map to ids through the dataset's `ClassLabel` label column; without `metric`, it computes
    `TopKAccuracy(1)` and `MeanPerClassRecall()`, offline.

    `ranked=True` passes each image's label ids ranked best first, as deep as the pipeline's `top_k` (5 by default),
    instead of the best one only, so that `TopKAccuracy(5)` can be computed (and is, without `metric`).
    `batch_size` is the pipeline's when the evaluator builds it from a model (a pipeline object keeps its own).
    """

    def __init__(self, ranked: bool = False, batch_size: int = 32):
        super().__init__()
        self.ranked = ranked
        self.batch_size = batch_size
        self._class_names: list[str] | None = None  # the label column's ClassLabel names, set by prepare_data

    def prepare_data(self, data: datasets.Dataset, input_column: str, label_column: str, *args, **kwargs):
        metric_inputs, pipe_inputs = super().prepare_data(data, input_column, label_column, *args, **kwargs)
        feature = data.features[label_column]
        self._class_names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        return metric_inputs, pipe_inputs

    def prepare_pipeline(self, model_or_pipeline, tokenizer=None, feature_extractor=None, device=None) -> Pipeline:
        if isinstance(model_or_pipeline, Pipeline):
            pipe = model_or_pipeline
        elif isinstance(model_or_pipeline, (str, os.PathLike, CLIPEnsembleModel)):
            pipe = pipeline(
                self.task,
                model=model_or_pipeline,
                pipeline_class=CLIPEnsemblePipeline,
                device=self._infer_device() if device is None else device,
                batch_size=self.batch_size,
            )
        else:
            raise TypeError(
                f"model_or_pipeline has type {type(model_or_pipeline).__name__}; pass a CLIPEnsembleModel, the folder "
                "or Hub repo id of a saved ensemble, or an image-classification pipeline."
            )
        if pipe.task != self.task:
            raise ValueError(f"The pipeline's task is '{pipe.task}'; pass an image-classification pipeline.")
        return pipe

    def prepare_metric(self, metric):
        if metric is None:
            metrics = [TopKAccuracy(1), *([TopKAccuracy(5)] if self.ranked else []), MeanPerClassRecall()]
            return evaluate.combine(metrics)
        return super().prepare_metric(metric)

    def predictions_processor(self, predictions, label_mapping) -> dict[str, list]:
        if label_mapping is None:
            if self._class_names is None:
                raise ValueError(
                    "The label column is not a ClassLabel; pass label_mapping={label name: id in the label column}."
                )
            label_mapping = {name: i for i, name in enumerate(self._class_names)}
        ranked = []
        for prediction in predictions:
            names = [p["label"] for p in sorted(prediction, key=lambda p: p["score"], reverse=True)]
            names = names if self.ranked else names[:1]
            unknown = [name for name in names if name not in label_mapping]
            if unknown:
                raise ValueError(
                    f"The pipeline predicted label '{unknown[0]}', which the label mapping does not map; map every "
                    f"label of the model, those the dataset lacks to -1 (the mapping has {sorted(label_mapping)[:10]})."
                )
            ranked.append([label_mapping[name] for name in names])
        return {"predictions": ranked if self.ranked else [ids[0] for ids in ranked]}


__all__ = ["CLIPEnsembleEvaluator", "MeanPerClassRecall", "TopKAccuracy"]
