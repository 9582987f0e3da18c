"""The model card (README.md) saved and pushed with a gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_clip_ensemble import CLIPEnsembleConfig

_MAX_LABELS_SHOWN = 50


class CardEvaluation(Protocol):
    """What the card needs of an evaluation (`clip_ensemble.EvaluationReport` is one): plain data, so that the model
    never imports the evaluation stage."""

    def card_entry(self) -> dict:
        """Keys: dataset, split, backbones, label_names, gate_method, results (one dict per method: method, top1,
        top5, mean_per_class_recall as fractions) and table (Markdown)."""


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name


def _calibration_rows(calibration: dict) -> list[str]:
    """Table rows of the calibration settings; a dict value (e.g. accuracy per backbone) gets one row per entry."""
    rows = []
    for key, value in calibration.items():
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        for name, item in entries:
            label = key if name is None else f"{key}: `{name}`"
            rows.append(f"| {label} | {str(item).replace('|', '&#124;')} |")
    return rows


def as_card_entry(evaluation: CardEvaluation | dict) -> dict:
    """An evaluation as the card takes it: a `card_entry()` dict."""
    return evaluation if isinstance(evaluation, dict) else evaluation.card_entry()


def eval_results(entry: dict) -> list[EvalResult]:
    """The gate's top-1 and top-5 accuracy and mean per-class recall on an evaluation's dataset (fractions), as the
    Hub's model-index entries; `entry` is a `card_entry()` dict."""
    row = next(row for row in entry["results"] if row["method"] == entry["gate_method"])
    dataset = {
        "task_type": "image-classification",
        "dataset_type": entry["dataset"],
        "dataset_name": entry["dataset"],
        "dataset_split": entry["split"],
    }
    return [
        EvalResult(**dataset, metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=round(row["top1"], 4)),
        EvalResult(
            **dataset, metric_type="top_5_accuracy", metric_name="Top-5 accuracy", metric_value=round(row["top5"], 4)
        ),
        EvalResult(
            **dataset,
            metric_type="mean_per_class_recall",
            metric_name="Mean per-class recall",
            metric_value=round(row["mean_per_class_recall"], 4),
        ),
    ]


def build_model_card(
    config: CLIPEnsembleConfig,
    repo_id: str | None = None,
    evaluations: Sequence[CardEvaluation | dict] = (),
    backbone_gflops: Sequence[float] | None = None,
) -> ModelCard:
    """A card listing the backbones, labels, gate and calibration, with the code that loads the ensemble.

    Each of `evaluations` (an `EvaluationReport` or its `card_entry()` dict) adds the gate's results to the card's metadata (the Hub's model-index) and its table of
    every method to the card's text. `backbone_gflops` (measured, `model.backbone_gflops`) fills a cost column.
    """
    names = config.backbone_names
    evaluations = [as_card_entry(evaluation) for evaluation in evaluations]
    for index, entry in enumerate(evaluations):
        if entry["backbones"] != names or entry["label_names"] != config.labels:
            raise ValueError(
                f"evaluations[{index}] ({entry['dataset']}) scored backbones {entry['backbones']} on "
                f"{len(entry['label_names'])} labels, but this model has backbones {names} and {len(config.labels)} "
                "labels; pass evaluations of this model with its current labels."
            )
    hub_backbones = [name for name in names if _is_repo_id(name)]
    data = ModelCardData(
        library_name="clip-ensemble",
        pipeline_tag="image-classification",
        tags=["clip", "ensemble", "clip-ensemble", "few-shot"],
        base_model=hub_backbones or None,
        # model-index entries need a model name; the repo's, else the library's.
        model_name=(repo_id.split("/")[-1] if repo_id else "clip-ensemble") if evaluations else None,
        eval_results=[result for entry in evaluations for result in eval_results(entry)] or None,
    )
    gflops = [f"{g:.4g}" for g in backbone_gflops] if backbone_gflops is not None else ["n/a"] * len(names)
    rows = "\n".join(
        f"| {i} | `{b['name_or_path']}` | {b['revision'] or 'main'} | {b['embed_dim']} | {g} |"
        for i, (b, g) in enumerate(zip(config.backbones, gflops))
    )
    if config.cascade is not None:
        order = " -> ".join(f"`{names[b]}`" for b in config.cascade["order"])
        expected = config.cascade.get("mean_gflops")
        cascade = (
            f"\n\nCascade: backbones run {order}; an image stops once the backbones still to run are unlikely to "
            "change its answer "
            + (
                f"(about {expected:.4g} GFLOPs per image on the calibration data, against "
                f"{config.cascade['full_gflops']:.4g} for all, top-1 within {config.cascade['tolerance']} of the full "
                "ensemble there)."
                if expected is not None
                else "."
            )
        )
    else:
        cascade = ""
    labels = ", ".join(config.labels[:_MAX_LABELS_SHOWN])
    if len(config.labels) > _MAX_LABELS_SHOWN:
        labels += f", ... ({len(config.labels) - _MAX_LABELS_SHOWN} more)"
    templates = config.templates if isinstance(config.templates, str) else f"{len(config.templates)} custom"
    class_head = (
        f" Class head (`class_head.safetensors`): calibration kept a per-class correction of the combined logits, "
        f"linear in the image embeddings (rank {config.class_head['rank']}); it serves these labels and templates "
        "only (in any order), and `model.set_labels` drops it for others."
        if config.class_head is not None
        else ""
    )
    if config.calibration:
        calibration = "\n".join(_calibration_rows(config.calibration))
        calibration = f"| | |\n|---|---|\n{calibration}"
    else:
        calibration = "Not calibrated: the gate gives every backbone the same weight (the mean of logits)."
    if evaluations:
        tables = "\n\n".join(entry["table"] for entry in evaluations)
        evaluation = (
            f"{tables}\n\nAccuracies in percent. The best single backbone is chosen on the calibration data; the "
            "oracle counts an image as right when any backbone is (an upper bound)."
        )
    else:
        evaluation = (
            "Not evaluated here: `clip-ensemble evaluate` compares the gate with every backbone on a labelled split, "
            "and `push_to_hub(repo, evaluations=[report])` adds its results to this card."
        )
    source = repo_id or "path/to/this/folder"
    content = f"""---
{data.to_yaml()}
---

# CLIP ensemble: {config.num_backbones} backbones, {len(config.labels)} labels

An adaptive ensemble of CLIP backbones made with clip-ensemble, after "Synergy and Diversity in CLIP" (arXiv:2405.17139). Each backbone classifies zero-shot with its own text
tower; a small gate reads every backbone's image embedding and weighs each backbone's logits per image. This
repo holds only the gate (with what calibration kept beside it) and its config: the backbones load from their
own repos.

## Backbones

| # | backbone | revision | embedding width | GFLOPs/image |
|---|---|---|---|---|
{rows}

GFLOPs: forward pass of the image tower on one image at its input size, measured with torch's FLOP counter
(2 FLOPs per multiply-add).{cascade}

## Labels

{labels}

Prompt templates: {templates}. Gate: `{config.combination}` combination, hidden size {config.gate_hidden_size}.{class_head}

## Calibration

{calibration}

## Evaluation

{evaluation}

## Usage

```python
from clip_ensemble import CLIPEnsembleModel

model = CLIPEnsembleModel.from_pretrained("{source}")
print(model.classify(["image.jpg"], top_k=5))
```

or as a transformers pipeline (which `evaluate` can score on a Hub dataset with
`clip_ensemble.evaluation.evaluate_modules.CLIPEnsembleEvaluator`):

```python
from transformers import pipeline
from clip_ensemble import CLIPEnsemblePipeline

classifier = pipeline("image-classification", model="{source}", pipeline_class=CLIPEnsemblePipeline)
print(classifier("image.jpg"))
```
"""
    return ModelCard(content)


__all__ = ["CardEvaluation", "as_card_entry", "build_model_card", "eval_results"]
