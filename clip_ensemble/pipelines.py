"""transformers `Pipeline`s for the ensemble: image classification with its own labels (so `evaluate`'s evaluator
and pipeline code run it the way they run any Hub image classifier), and zero-shot image classification with any
labels per call, the calibrated gate reused.

Importing this module registers the ensemble with transformers: `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForZeroShotImageClassification`, and the
`zero-shot-image-classification` task, so that `pipeline("zero-shot-image-classification", model=saved_ensemble)`
builds a `CLIPEnsembleZeroShotPipeline` (other models still get transformers' own pipeline).
`import clip_ensemble` stays light; the first name taken from the package (`from clip_ensemble import ...`) imports
this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    Pipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY, ZeroShotImageClassificationPipeline

from .backbones.templates import TEMPLATE_SETS
from .models.configuration_clip_ensemble import CLIPEnsembleConfig
from .models.modeling_clip_ensemble import CLIPEnsembleModel
from .models.processing_clip_ensemble import ImageInput

ZERO_SHOT_TASK = "zero-shot-image-classification"


def _pixel_inputs(model: CLIPEnsembleModel, image: ImageInput) -> dict[str, torch.Tensor]:
    pixel_values = model.processor(image)["pixel_values"]
    # One (1, 3, H_b, W_b) tensor per backbone, under its own key so that batches stack them separately.
    return {f"pixel_values_{b}": pixels for b, pixels in enumerate(pixel_values)}


class _EnsemblePipeline(Pipeline):
    """What both pipelines share: the ensemble preprocesses with its own per-backbone processor (nothing to load
    from the repo), and the base class batches only when an image processor is set."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _task: str  # the task name each subclass serves

    def __init__(self, model: CLIPEnsembleModel, **kwargs):
        if not isinstance(model, CLIPEnsembleModel):
            raise TypeError(
                f"{type(self).__name__} needs a CLIPEnsembleModel, got {type(model).__name__}; load one with "
                "`CLIPEnsembleModel.from_pretrained`."
            )
        kwargs.setdefault("task", self._task)
        kwargs.setdefault("image_processor", model.processor)  # one tensor per backbone
        super().__init__(model=model, **kwargs)
        self.model.eval()


class CLIPEnsemblePipeline(_EnsemblePipeline):
    """Image classification with a `CLIPEnsembleModel`: per image, the `top_k` labels (5 by default) with their
    probabilities, `[{"label": ..., "score": ...}, ...]`, best first, as transformers' image-classification pipeline
    returns them.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> from clip_ensemble import CLIPEnsembleModel, CLIPEnsemblePipeline

    >>> model = CLIPEnsembleModel.from_pretrained("me/my-gate")
    >>> classifier = CLIPEnsemblePipeline(model)  # or: pipeline("image-classification", model=model,
    >>> #                                                        pipeline_class=CLIPEnsemblePipeline)
    >>> classifier(["cat.jpg", "dog.jpg"], top_k=1, batch_size=8)
    [[{'label': 'cat', 'score': 0.98}], [{'label': 'dog', 'score': 0.95}]]
    ```

    Images are what `clip_ensemble.load_image` reads: PIL images (e.g. a `datasets` Image column), file paths,
    encoded bytes or arrays. Batching (`batch_size=`) stacks each backbone's pixel values separately.
    """

    _task = "image-classification"

    def _sanitize_parameters(self, top_k: int | None = None) -> tuple[dict, dict, dict]:
        postprocess = {}
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k={top_k!r}; give a positive number of labels to return, e.g. top_k=5.")
            postprocess["top_k"] = top_k
        return {}, {}, postprocess

    def preprocess(self, image: ImageInput) -> dict[str, torch.Tensor]:
        return _pixel_inputs(self.model, image)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixel_values = [model_inputs[f"pixel_values_{b}"] for b in range(len(self.model.backbones))]
        return {"logits": self.model(pixel_values=pixel_values).logits}  # (batch, num_labels)

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int = 5) -> list[dict]:
        probs = model_outputs["logits"][0].float().softmax(dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]))
        labels = self.model.labels
        return [{"label": labels[i], "score": float(s)} for s, i in zip(top.values, top.indices.tolist())]

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the ensemble (config, gate and card); its processors come with its backbones."""
        self.model.save_pretrained(save_directory, **kwargs)


def _candidate_labels(candidate_labels) -> list[str]:
    """A list of label names, or one comma-separated string (as transformers' text zero-shot pipeline takes)."""
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if (
        not isinstance(candidate_labels, Sequence)
        or not candidate_labels
        or not all(isinstance(label, str) and label for label in candidate_labels)
    ):
        raise ValueError(
            f"candidate_labels={candidate_labels!r}; give the label names to choose from, e.g. "
            "candidate_labels=['cat', 'dog']."
        )
    return list(candidate_labels)


def _templates(hypothesis_template: str | Sequence[str]) -> list[str] | str:
    """One template with '{}' (transformers' `hypothesis_template`), a list of them, or a set name from
    `TEMPLATE_SETS`; checked by `CLIPEnsembleConfig` when the heads are built."""
    if isinstance(hypothesis_template, str):
        if "{}" in hypothesis_template:
            return [hypothesis_template]
        if hypothesis_template not in TEMPLATE_SETS:
            raise ValueError(
                f"hypothesis_template={hypothesis_template!r} has no '{{}}' for the label and is not a template set; "
                f"give e.g. 'a photo of a {{}}.', a list of such templates, or one of {sorted(TEMPLATE_SETS)}."
            )
        return hypothesis_template
    return list(hypothesis_template)


class CLIPEnsembleZeroShotPipeline(_EnsemblePipeline):
    """Zero-shot image classification with a `CLIPEnsembleModel`: any `candidate_labels` per call, scored by every
    backbone's zero-shot head for those labels and combined by the calibrated gate (it reads image embeddings only,
    so it does not depend on the labels). Output as transformers' zero-shot pipeline gives it: per image, every
    candidate label with its probability, `[{"score": ..., "label": ...}, ...]`, best first.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import clip_ensemble.pipelines  # registers the task for saved ensembles

    >>> classifier = pipeline("zero-shot-image-classification", model="me/my-gate")
    >>> classifier("cat.jpg", candidate_labels=["cat", "dog", "bird"], hypothesis_template="a photo of a {}.")
    [{'score': 0.97, 'label': 'cat'}, {'score': 0.02, 'label': 'dog'}, {'score': 0.01, 'label': 'bird'}]
    ```

    `hypothesis_template` is one template with `{}`, a list of them (each backbone's head averages over them), or
    a set name from `clip_ensemble.backbones.templates.TEMPLATE_SETS`; by default the ensemble's own templates (not
    transformers' "This is a photo of {}."). Zero-shot heads are cached per (labels, templates) by the model, so a
    label set seen before costs no text forward pass. The model's own labels are left as they were.
    """

    _task = ZERO_SHOT_TASK

    def __call__(self, image, candidate_labels=None, **kwargs):
        image = kwargs.pop("images", image)
        if candidate_labels is None:
            raise ValueError("Give the labels to choose from: classifier(image, candidate_labels=['cat', 'dog']).")
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(
        self, candidate_labels=None, hypothesis_template: str | Sequence[str] | None = None
    ) -> tuple[dict, dict, dict]:
        forward, postprocess = {}, {}
        if candidate_labels is not None:
            labels = _candidate_labels(candidate_labels)
            templates = self.model.config.templates if hypothesis_template is None else _templates(hypothesis_template)
            # Checked (distinct labels, '{}' in each template) and heads built now, before any image is read.
            self._with_labels(labels, templates, lambda: None)
            forward["label_set"] = (labels, templates)
            postprocess["candidate_labels"] = labels
        return {}, forward, postprocess

    def _with_labels(self, labels: list[str], templates: list[str] | str, run):
        """`run()` with the model switched to `labels`, then switched back (both from the model's head cache). A class
        head serves the model's own labels only, in any order: it is set aside for other labels, and put back after."""
        previous = (self.model.labels, self.model.config.templates)
        class_head, class_head_info = self.model.class_head, self.model.config.class_head
        if class_head is not None and sorted(labels) != sorted(previous[0]):
            self.model.set_class_head(None)
        self.model.set_labels(labels, templates)
        try:
            return run()
        finally:
            self.model.set_labels(*previous)
            if class_head is not None and self.model.class_head is None:
                self.model.set_class_head(class_head, **class_head_info)

    def preprocess(self, image: ImageInput) -> dict[str, torch.Tensor]:
        return _pixel_inputs(self.model, image)

    def _forward(self, model_inputs: dict[str, torch.Tensor], label_set: tuple) -> dict[str, torch.Tensor]:
        pixel_values = [model_inputs[f"pixel_values_{b}"] for b in range(len(self.model.backbones))]
        logits = self._with_labels(*label_set, lambda: self.model(pixel_values=pixel_values).logits)
        return {"logits": logits}  # (batch, num_candidate_labels)

    def postprocess(self, model_outputs: dict[str, torch.Tensor], candidate_labels: list[str]) -> list[dict]:
        scores = model_outputs["logits"][0].float().softmax(dim=-1).tolist()
        return [
            {"score": score, "label": label}
            for score, label in sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        ]

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the ensemble (config, gate and card); its processors come with its backbones."""
        self.model.save_pretrained(save_directory, **kwargs)


class _ZeroShotImageClassification:
    """What `pipeline("zero-shot-image-classification", ...)` builds once this module is imported: a
    `CLIPEnsembleZeroShotPipeline` for an ensemble, transformers' own pipeline for any other model.

    The tokenizer and image processor are loaded when the repo has them (an ensemble's repo has none: each
    backbone keeps its own).
    """

    _load_processor = False
    _load_image_processor = None
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = None

    def __new__(cls, model, **kwargs):
        if isinstance(model, CLIPEnsembleModel):
            for component in ("tokenizer", "image_processor", "feature_extractor", "processor"):
                kwargs.pop(component, None)  # the ensemble's processors come with its backbones
            return CLIPEnsembleZeroShotPipeline(model, **kwargs)
        return ZeroShotImageClassificationPipeline(model=model, **kwargs)


def _register() -> None:
    AutoConfig.register(CLIPEnsembleConfig.model_type, CLIPEnsembleConfig)
    for auto_class in (AutoModel, AutoModelForImageClassification, AutoModelForZeroShotImageClassification):
        auto_class.register(CLIPEnsembleConfig, CLIPEnsembleModel)
    stock = PIPELINE_REGISTRY.supported_tasks[ZERO_SHOT_TASK]
    # Replacing a built-in task logs a warning on every import; the dispatcher keeps the built-in behaviour.
    registry_logger = logging.getLogger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        PIPELINE_REGISTRY.register_pipeline(
            ZERO_SHOT_TASK,
            pipeline_class=_ZeroShotImageClassification,
            pt_model=AutoModelForZeroShotImageClassification,
            default=stock.get("default"),
            type=stock.get("type"),
        )
    finally:
        registry_logger.setLevel(level)


_register()

__all__ = ["ZERO_SHOT_TASK", "CLIPEnsemblePipeline", "CLIPEnsembleZeroShotPipeline"]
