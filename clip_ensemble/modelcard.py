"""The model card (README.md) saved and pushed with a gate."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_clip_ensemble import CLIPEnsembleConfig

_MAX_LABELS_SHOWN = 50


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name


def build_model_card(config: CLIPEnsembleConfig, repo_id: str | None = None) -> ModelCard:
    """A card listing the backbones, labels, gate and calibration, with the code that loads the ensemble."""
    hub_backbones = [b["name_or_path"] for b in config.backbones if _is_repo_id(b["name_or_path"])]
    data = ModelCardData(
        library_name="clip-ensemble",
        pipeline_tag="image-classification",
        tags=["clip", "ensemble", "clip-ensemble", "few-shot"],
        base_model=hub_backbones or None,
    )
    rows = "\n".join(
        f"| {i} | `{b['name_or_path']}` | {b['revision'] or 'main'} | {b['embed_dim']} |"
        for i, b in enumerate(config.backbones)
    )
    labels = ", ".join(config.labels[:_MAX_LABELS_SHOWN])
    if len(config.labels) > _MAX_LABELS_SHOWN:
        labels += f", ... ({len(config.labels) - _MAX_LABELS_SHOWN} more)"
    templates = config.templates if isinstance(config.templates, str) else f"{len(config.templates)} custom"
    if config.calibration:
        calibration = "\n".join(f"| {key} | {value} |" for key, value in config.calibration.items())
        calibration = f"| | |\n|---|---|\n{calibration}"
    else:
        calibration = "Not calibrated: the gate gives every backbone the same weight (plain logit averaging)."
    source = repo_id or "path/to/this/folder"
    content = f"""---
{data.to_yaml()}
---

# CLIP ensemble: {config.num_backbones} backbones, {len(config.labels)} labels

An adaptive ensemble of CLIP backbones made with clip-ensemble, after "Synergy and Diversity in CLIP" (arXiv:2405.17139). Each backbone classifies zero-shot with its own text
tower; a small gate reads every backbone's image embedding and weighs each backbone's logits per image. This
repo holds only the gate and its config: the backbones load from their own repos.

## Backbones

| # | backbone | revision | embedding width |
|---|---|---|---|
{rows}

## Labels

{labels}

Prompt templates: {templates}. Gate: `{config.combination}` combination, hidden size {config.gate_hidden_size}.

## Calibration

{calibration}

## Usage

```python
from clip_ensemble import CLIPEnsembleModel

model = CLIPEnsembleModel.from_pretrained("{source}")
print(model.classify(["image.jpg"], top_k=5))
```
"""
    return ModelCard(content)


__all__ = ["build_model_card"]
