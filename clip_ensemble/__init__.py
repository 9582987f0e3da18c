"""clip-ensemble: adaptive ensembles of CLIP backbones (arXiv:2405.17139).

Names are imported when first used (PEP 562), so that `import clip_ensemble` and the `clip-ensemble` command line
start without torch or transformers. The first name taken from the package also registers the ensemble with
transformers (`AutoConfig`, `AutoModel`, `AutoModelForImageClassification`, `AutoModelForZeroShotImageClassification`
and the `zero-shot-image-classification` pipeline task; see `clip_ensemble.pipeline`), so `AutoModel.from_pretrained`
and `pipeline("zero-shot-image-classification", model=saved_ensemble)` work after e.g.
`from clip_ensemble import CLIPEnsembleModel` or `import clip_ensemble.pipeline`.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Backbone": "backbones",
    "TransformersBackbone": "backbones",
    "load_backbone": "backbones",
    "CalibrationReport": "calibration",
    "calibrate": "calibration",
    "CLIPEnsembleConfig": "configuration_clip_ensemble",
    "LabelledImages": "data",
    "from_hub_dataset": "data",
    "from_image_folder": "data",
    "from_lists": "data",
    "sample_few_shot": "data",
    "EvaluationReport": "evaluation",
    "evaluate": "evaluation",
    "evaluate_embeddings": "evaluation",
    "ExtractionReport": "extraction",
    "extract_features": "extraction",
    "FeatureCache": "features",
    "EnsembleGate": "gate",
    "combine_logits": "gate",
    "CLIPEnsembleModel": "modeling_clip_ensemble",
    "CLIPEnsembleOutput": "modeling_clip_ensemble",
    "OpenCLIPBackbone": "open_clip_backbone",
    "CLIPEnsemblePipeline": "pipeline",
    "CLIPEnsembleZeroShotPipeline": "pipeline",
    "plan_placement": "placement",
    "SelectionReport": "selection",
    "select_backbones": "selection",
    "CLIPEnsembleProcessor": "processing_clip_ensemble",
    "load_image": "processing_clip_ensemble",
    "load_images": "processing_clip_ensemble",
    "OPENAI_IMAGENET_TEMPLATES": "templates",
    "SHORT_TEMPLATES": "templates",
    "TEMPLATE_SETS": "templates",
    "build_zero_shot_classifier": "zero_shot",
    "write_clip_benchmark_results": "clip_benchmark",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clip_ensemble' has no attribute '{name}'")
    importlib.import_module(".pipeline", __name__)  # registers the Auto classes and the pipeline task, once
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# With transformers already imported (as before any `pipeline(...)` call), register at once, so that a plain
# `import clip_ensemble` is enough for `pipeline("zero-shot-image-classification", model=saved_ensemble)`. The command
# line never imports transformers first, so it still starts without torch.
if "transformers" in sys.modules:
    importlib.import_module(".pipeline", __name__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports these on first use
    from .backbones import Backbone, TransformersBackbone, load_backbone
    from .calibration import CalibrationReport, calibrate
    from .clip_benchmark import write_clip_benchmark_results
    from .configuration_clip_ensemble import CLIPEnsembleConfig
    from .data import LabelledImages, from_hub_dataset, from_image_folder, from_lists, sample_few_shot
    from .evaluation import EvaluationReport, evaluate, evaluate_embeddings
    from .extraction import ExtractionReport, extract_features
    from .features import FeatureCache
    from .gate import EnsembleGate, combine_logits
    from .modeling_clip_ensemble import CLIPEnsembleModel, CLIPEnsembleOutput
    from .open_clip_backbone import OpenCLIPBackbone
    from .pipeline import CLIPEnsemblePipeline, CLIPEnsembleZeroShotPipeline
    from .placement import plan_placement
    from .processing_clip_ensemble import CLIPEnsembleProcessor, load_image, load_images
    from .selection import SelectionReport, select_backbones
    from .templates import OPENAI_IMAGENET_TEMPLATES, SHORT_TEMPLATES, TEMPLATE_SETS
    from .zero_shot import build_zero_shot_classifier

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
