from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ensemble import CLIPEnsembleModel, FeatureCache
from clip_ensemble.backbones.transformers_backbone import TransformersBackbone
from clip_ensemble.data.features import backbone_fingerprint, image_fingerprint


@pytest.fixture(scope="module")
def model(backbone_dirs):
    return CLIPEnsembleModel.from_backbones(backbone_dirs[:2], labels=["a", "b"])


def test_cache_matches_direct_embeddings(model, images, tmp_path):
    embeds = FeatureCache(tmp_path).embed(model.backbones, images, progress=False)
    direct = model.encode_images(model.processor(images)["pixel_values"])
    for cached, expected in zip(embeds, direct):
        torch.testing.assert_close(cached, expected)


def test_second_pass_runs_no_backbone(model, images, tmp_path):
    first = FeatureCache(tmp_path)
    embeds = first.embed(model.backbones, images, progress=False)
    assert first.last_computed == [4, 4]
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2  # one shard per backbone

    fresh = FeatureCache(tmp_path)  # a new process: reads the shards from disk
    with mock.patch.object(TransformersBackbone, "encode_images", side_effect=AssertionError("forward pass")):
        again = fresh.embed(model.backbones, images[::-1], progress=False)
    assert fresh.last_computed == [0, 0]
    for a, b in zip(embeds, again):
        torch.testing.assert_close(a.flip(0), b)


def test_only_new_images_are_embedded(model, images, tmp_path):
    cache = FeatureCache(tmp_path)
    cache.embed(model.backbones, images[:2], progress=False)
    cache.embed(model.backbones, images + images[:1], progress=False)  # a duplicate costs nothing
    assert cache.last_computed == [2, 2]


def test_fingerprints_follow_content_and_preprocessing(model, tmp_path):
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.png")
    assert image_fingerprint(str(tmp_path / "a.png")) == image_fingerprint(str(tmp_path / "b.png"))
    assert image_fingerprint(Image.fromarray(pixels)) != image_fingerprint(Image.fromarray(pixels + 1))

    backbone = model.backbones[0]
    before, mean = backbone_fingerprint(backbone), backbone.processor.image_processor.image_mean
    backbone.processor.image_processor.image_mean = [0.0, 0.0, 0.0]
    try:
        assert backbone_fingerprint(backbone) != before
    finally:
        backbone.processor.image_processor.image_mean = mean
    assert backbone_fingerprint(backbone) == before


def test_memory_only_cache_writes_nothing(model, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FeatureCache(None).embed(model.backbones, images, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="Cannot read image file"):
        FeatureCache(tmp_path).embed(model.backbones, [str(tmp_path / "missing.jpg")], progress=False)
