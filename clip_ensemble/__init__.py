"""clip-ensemble: adaptive ensembles of CLIP backbones (arXiv:2405.17139)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .backbones import Backbone, TransformersBackbone, load_backbone
from .calibration import CalibrationReport, calibrate
from .configuration_clip_ensemble import CLIPEnsembleConfig
from .data import LabelledImages, from_hub_dataset, from_image_folder, from_lists, sample_few_shot
from .evaluation import EvaluationReport, evaluate, evaluate_embeddings
from .extraction import ExtractionReport, extract_features
from .features import FeatureCache
from .gate import EnsembleGate, combine_logits
from .modeling_clip_ensemble import CLIPEnsembleModel, CLIPEnsembleOutput
from .open_clip_backbone import OpenCLIPBackbone
from .pipeline import CLIPEnsemblePipeline
from .placement import plan_placement
from .processing_clip_ensemble import CLIPEnsembleProcessor, load_image, load_images
from .selection import SelectionReport, select_backbones
from .templates import OPENAI_IMAGENET_TEMPLATES, SHORT_TEMPLATES, TEMPLATE_SETS
from .zero_shot import build_zero_shot_classifier

AutoConfig.register("clip_ensemble", CLIPEnsembleConfig)
AutoModel.register(CLIPEnsembleConfig, CLIPEnsembleModel)
# An image classifier: `pipeline("image-classification", model=repo_or_folder, pipeline_class=CLIPEnsemblePipeline)`.
AutoModelForImageClassification.register(CLIPEnsembleConfig, CLIPEnsembleModel)

__version__ = "0.1.0"

__all__ = [
    "CalibrationReport",
    "EvaluationReport",
    "ExtractionReport",
    "FeatureCache",
    "LabelledImages",
    "calibrate",
    "evaluate",
    "evaluate_embeddings",
    "extract_features",
    "from_hub_dataset",
    "from_image_folder",
    "from_lists",
    "sample_few_shot",
    "select_backbones",
    "SelectionReport",
    "Backbone",
    "CLIPEnsembleConfig",
    "CLIPEnsembleModel",
    "CLIPEnsembleOutput",
    "CLIPEnsemblePipeline",
    "CLIPEnsembleProcessor",
    "EnsembleGate",
    "OPENAI_IMAGENET_TEMPLATES",
    "OpenCLIPBackbone",
    "SHORT_TEMPLATES",
    "TEMPLATE_SETS",
    "TransformersBackbone",
    "build_zero_shot_classifier",
    "combine_logits",
    "load_backbone",
    "load_image",
    "load_images",
    "plan_placement",
]
