"""clip-ensemble: adaptive ensembles of CLIP backbones (arXiv:2405.17139).

Names are imported when first used (PEP 562), so that `import clip_ensemble` and the `clip-ensemble` command line
start without torch or transformers. The first name taken from the package also registers the ensemble with
transformers (`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`, `AutoModelForZeroShotImageClassification`
and the `zero-shot-image-classification` pipeline task; see `clip_ensemble.pipelines`), so `AutoModel.from_pretrained`
and `pipeline("zero-shot-image-classification", model=saved_ensemble)` work after e.g.
`from clip_ensemble import CLIPEnsembleModel` or `import clip_ensemble.pipelines`.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Backbone": "backbones.base",
    "TransformersBackbone": "backbones.transformers_backbone",
    "load_backbone": "backbones.loading",
    "CalibrationReport": "calibration.calibrate",
    "calibrate": "calibration.calibrate",
    "CLIPEnsembleConfig": "models.configuration_clip_ensemble",
    "LabelledImages": "data.labelled",
    "from_hub_dataset": "data.labelled",
    "from_image_folder": "data.labelled",
    "from_lists": "data.labelled",
    "sample_few_shot": "data.labelled",
    "EvaluationReport": "evaluation.evaluate",
    "evaluate": "evaluation.evaluate",
    "evaluate_embeddings": "evaluation.evaluate",
    "ExtractionReport": "data.extraction",
    "extract_features": "data.extraction",
    "FeatureCache": "data.features",
    "EnsembleGate": "models.gate",
    "combine_logits": "models.gate",
    "CLIPEnsembleModel": "models.modeling_clip_ensemble",
    "CLIPEnsembleOutput": "models.modeling_clip_ensemble",
    "OpenCLIPBackbone": "backbones.open_clip_backbone",
    "CLIPEnsemblePipeline": "pipelines",
    "CLIPEnsembleZeroShotPipeline": "pipelines",
    "plan_placement": "models.placement",
    "SelectionReport": "calibration.selection",
    "select_backbones": "calibration.selection",
    "CLIPEnsembleProcessor": "models.processing_clip_ensemble",
    "load_image": "models.processing_clip_ensemble",
    "load_images": "models.processing_clip_ensemble",
    "OPENAI_IMAGENET_TEMPLATES": "backbones.templates",
    "SHORT_TEMPLATES": "backbones.templates",
    "TEMPLATE_SETS": "backbones.templates",
    "build_zero_shot_classifier": "backbones.zero_shot",
    "write_clip_benchmark_results": "evaluation.clip_benchmark",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clip_ensemble' has no attribute '{name}'")
    importlib.import_module(".pipelines", __name__)  # registers the Auto classes and the pipeline task, once
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# With transformers already imported (as before any `pipeline(...)` call), register at once, so that a plain
# `import clip_ensemble` is enough for `pipeline("zero-shot-image-classification", model=saved_ensemble)`. The command
# line never imports transformers first, so it still starts without torch.
if "transformers" in sys.modules:
    importlib.import_module(".pipelines", __name__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these on first use
    from .backbones.base import Backbone
    from .backbones.loading import load_backbone
    from .backbones.open_clip_backbone import OpenCLIPBackbone
    from .backbones.templates import OPENAI_IMAGENET_TEMPLATES, SHORT_TEMPLATES, TEMPLATE_SETS
    from .backbones.transformers_backbone import TransformersBackbone
    from .backbones.zero_shot import build_zero_shot_classifier
    from .calibration.calibrate import CalibrationReport, calibrate
    from .calibration.selection import SelectionReport, select_backbones
    from .data.extraction import ExtractionReport, extract_features
    from .data.features import FeatureCache
    from .data.labelled import LabelledImages, from_hub_dataset, from_image_folder, from_lists, sample_few_shot
    from .evaluation.clip_benchmark import write_clip_benchmark_results
    from .evaluation.evaluate import EvaluationReport, evaluate, evaluate_embeddings
    from .models.configuration_clip_ensemble import CLIPEnsembleConfig
    from .models.gate import EnsembleGate, combine_logits
    from .models.modeling_clip_ensemble import CLIPEnsembleModel, CLIPEnsembleOutput
    from .models.placement import plan_placement
    from .models.processing_clip_ensemble import CLIPEnsembleProcessor, load_image, load_images
    from .pipelines import CLIPEnsemblePipeline, CLIPEnsembleZeroShotPipeline

__all__ = [
    "SelectionReport",
    "select_backbones",
    "Backbone",
    "CLIPEnsembleConfig",
    "CLIPEnsembleModel",
    "CLIPEnsembleOutput",
    "CLIPEnsemblePipeline",
    "CLIPEnsembleProcessor",
    "CLIPEnsembleZeroShotPipeline",
    "CalibrationReport",
    "EnsembleGate",
    "EvaluationReport",
    "ExtractionReport",
    "FeatureCache",
    "LabelledImages",
    "OPENAI_IMAGENET_TEMPLATES",
    "OpenCLIPBackbone",
    "SHORT_TEMPLATES",
    "TEMPLATE_SETS",
    "TransformersBackbone",
    "build_zero_shot_classifier",
    "calibrate",
    "combine_logits",
    "evaluate",
    "evaluate_embeddings",
    "extract_features",
    "from_hub_dataset",
    "from_image_folder",
    "from_lists",
    "load_backbone",
    "load_image",
    "load_images",
    "plan_placement",
    "sample_few_shot",
    "write_clip_benchmark_results",
]
