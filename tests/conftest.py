"""Offline fixtures: tiny CLIP backbones built in code, and a private Hugging Face cache."""

import os
import tempfile

# Before anything imports huggingface_hub: no network, and a cache of our own that tests fill.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="clip-ensemble-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from PIL import Image  # noqa: E402

from clip_ensemble.tasks import save_tiny_clip  # noqa: E402

# Three backbones with different embedding widths and image sizes, like a real mixed ensemble.
TINY_BACKBONES = {
    "a": {"hidden_size": 32, "projection_dim": 16, "image_size": 30, "patch_size": 6, "seed": 0},
    "b": {"hidden_size": 48, "projection_dim": 24, "image_size": 36, "patch_size": 6, "seed": 1},
    "c": {"hidden_size": 32, "projection_dim": 20, "image_size": 28, "patch_size": 7, "seed": 2},
}


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("backbones")
    return [str(save_tiny_clip(root / name, **kwargs)) for name, kwargs in TINY_BACKBONES.items()]


@pytest.fixture
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8)) for i in range(4)]


def put_in_hub_cache(folder: str | Path, repo_id: str) -> str:
    """Copy `folder` into the hub cache layout as `repo_id` at main; returns the fake commit hash."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="session")
def toy_backbone_dirs(tmp_path_factory) -> list[str]:
    """Three tiny CLIPs trained here in seconds, each confidently wrong on a different pair of classes."""
    from clip_ensemble.tasks import toy_backbones

    return toy_backbones(tmp_path_factory.mktemp("toy-backbones"))


@pytest.fixture(scope="session")
def toy_uploads(tmp_path_factory) -> dict[str, list[str]]:
    """Three toy images per class saved as PNG files, as a browser uploads them: class name -> file paths."""
    from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

    root = tmp_path_factory.mktemp("uploads")
    data = toy_dataset(per_class=3, seed=11)
    files = {name: [] for name in TOY_CLASSES}
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        path = root / f"{TOY_CLASSES[label]}-{i}.png"
        image.save(path)
        files[TOY_CLASSES[label]].append(str(path))
    return files


@pytest.fixture(scope="session")
def digits_backbone_dirs(tmp_path_factory) -> list[str]:
    """The three digit specialists (sharp, blurry, partial), trained here in seconds on scikit-learn's digits."""
    from clip_ensemble.tasks import digits_backbones

    return digits_backbones(tmp_path_factory.mktemp("digits-backbones"))


@pytest.fixture(scope="session")
def digits_task(digits_backbone_dirs):
    """The digits task as features: the specialists' embeddings of the pool and the test split, their heads."""
    from clip_ensemble import CLIPEnsembleModel
    from clip_ensemble.data.features import FeatureCache
    from clip_ensemble.tasks import DIGIT_CLASSES, digits_dataset, feature_task

    model = CLIPEnsembleModel.from_backbones(digits_backbone_dirs, labels=list(DIGIT_CLASSES))
    return feature_task("digits", model, digits_dataset("pool"), digits_dataset("test"), FeatureCache(None))


@pytest.fixture(scope="module")
def feature_cache():
    """An in-memory feature cache, one per test module."""
    from clip_ensemble.data.features import FeatureCache

    return FeatureCache(None)


@pytest.fixture(scope="module")
def toy_calibration(toy_backbone_dirs, feature_cache):
    """The toy ensemble calibrated on 4 shots per class, and its `CalibrationReport` (one per test module)."""
    from clip_ensemble import CLIPEnsembleModel, calibrate
    from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = calibrate(model, toy_dataset(per_class=16, seed=3), shots=4, seed=0, cache=feature_cache, progress=False)
    return model, report
