"""OpenCLIP backbones: a tiny ResNet CLIP in OpenCLIP's hf-hub layout, alone and mixed with a transformers CLIP."""

import shutil
import sys

import pytest
import torch
from conftest import put_in_hub_cache

from clip_ensemble import (
    CLIPEnsembleModel,
    FeatureCache,
    OpenCLIPBackbone,
    TransformersBackbone,
    calibrate,
    load_backbone,
)
from clip_ensemble.tasks import save_tiny_open_clip_resnet, toy_dataset

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> str:
    pytest.importorskip("open_clip")
    # embed_dim 12 and 64-pixel images: unlike every tiny ViT in conftest.
    return str(save_tiny_open_clip_resnet(tmp_path_factory.mktemp("open_clip") / "resnet", embed_dim=12))


@pytest.fixture(scope="module")
def resnet(resnet_dir) -> OpenCLIPBackbone:
    return OpenCLIPBackbone.from_pretrained(f"local-dir:{resnet_dir}")


def mixed_ensemble(backbone_dirs, resnet_dir) -> CLIPEnsembleModel:
    return CLIPEnsembleModel.from_backbones([backbone_dirs[0], f"local-dir:{resnet_dir}"], labels=LABELS)


def test_backbone_uses_open_clip_preprocessing_tokenizer_and_towers(resnet, resnet_dir, images):
    import open_clip

    model, transform = open_clip.create_model_from_pretrained(f"local-dir:{resnet_dir}")
    model.eval()  # OpenCLIP returns it in training mode: BatchNorm would use batch statistics
    tokenizer = open_clip.get_tokenizer(f"local-dir:{resnet_dir}")
    pixels = resnet.preprocess(images)
    assert pixels.shape == (4, 3, 64, 64)
    torch.testing.assert_close(pixels[2], transform(images[2]))
    with torch.no_grad():
        expected_images = model.encode_image(pixels, normalize=True)
        expected_texts = model.encode_text(tokenizer(["a photo of a cat.", "dog"]), normalize=True)
    torch.testing.assert_close(resnet.encode_images(pixels), expected_images)
    torch.testing.assert_close(resnet.encode_texts(["a photo of a cat.", "dog"]), expected_texts)
    assert type(resnet.model.visual).__name__ == "ModifiedResNet"
    assert resnet.embed_dim == 12 and resnet.logit_scale == pytest.approx(model.logit_scale.exp().item())
    assert resnet.device == torch.device("cpu") and resnet.dtype == torch.float32
    assert resnet.describe() == {"name_or_path": f"local-dir:{resnet_dir}", "revision": None, "embed_dim": 12}


def test_dtype_loads_the_whole_model_in_that_precision(resnet, resnet_dir, images):
    half = OpenCLIPBackbone.from_pretrained(f"local-dir:{resnet_dir}", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    pixels = resnet.preprocess(images)
    embeds = half.encode_images(pixels)
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, resnet.encode_images(pixels), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="dtype=torch.int8 is not supported"):
        OpenCLIPBackbone.from_pretrained(f"local-dir:{resnet_dir}", dtype=torch.int8)


def test_hf_hub_ids_resolve_from_the_hub_cache_and_pin_the_commit(resnet, resnet_dir, images):
    commit = put_in_hub_cache(resnet_dir, "tiny-org/resnet-clip")
    backbone = load_backbone({"name_or_path": "hf-hub:tiny-org/resnet-clip", "revision": None})
    assert isinstance(backbone, OpenCLIPBackbone) and backbone.revision == commit
    pixels = resnet.preprocess(images)
    torch.testing.assert_close(backbone.encode_images(pixels), resnet.encode_images(pixels))


def test_one_ensemble_mixes_a_resnet_and_a_vit(backbone_dirs, resnet_dir, images):
    model = mixed_ensemble(backbone_dirs, resnet_dir)
    assert [type(b) for b in model.backbones] == [TransformersBackbone, OpenCLIPBackbone]
    assert [tuple(p.shape[-2:]) for p in model.processor(images)["pixel_values"]] == [(30, 30), (64, 64)]
    out = model(images=images)
    assert [tuple(e.shape) for e in out.image_embeds] == [(4, 16), (4, 12)]
    assert out.per_backbone_logits.shape == (4, 2, 4)
    torch.testing.assert_close(out.logits, out.per_backbone_logits.mean(dim=1))  # the untrained gate averages


def test_mixed_ensemble_saves_and_loads_with_identical_logits(backbone_dirs, resnet_dir, images, tmp_path):
    model = mixed_ensemble(backbone_dirs, resnet_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        model.gate.fc2.weight.normal_(std=0.5)
    model.eval().save_pretrained(tmp_path)
    loaded = CLIPEnsembleModel.from_pretrained(tmp_path)
    assert loaded.config.backbones[1] == {"name_or_path": f"local-dir:{resnet_dir}", "revision": None, "embed_dim": 12}
    torch.testing.assert_close(loaded(images=images).logits, model(images=images).logits, atol=0, rtol=0)


def test_mixed_ensemble_calibrates_through_the_feature_cache(backbone_dirs, resnet_dir, tmp_path):
    """calibrate() on a ResNet + ViT ensemble: features cached once, the gate trained, backbones frozen."""
    model = mixed_ensemble(backbone_dirs, resnet_dir)
    data = toy_dataset(per_class=4, seed=0)
    before = {k: v.clone() for k, v in model.backbones.state_dict().items()}
    report = calibrate(model, data, shots=4, cache=FeatureCache(tmp_path), progress=False)
    assert report.images_embedded == len(data) and report.chosen in report.cv_accuracy
    assert all(torch.equal(v, model.backbones.state_dict()[k]) for k, v in before.items())
    again = calibrate(model, data, shots=4, cache=FeatureCache(tmp_path), progress=False)
    assert again.images_embedded == 0  # the OpenCLIP backbone's features came from the cache too


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "clip-ensemble\[open-clip\]"'):
        load_backbone({"name_or_path": "hf-hub:timm/resnet50_clip.openai"})


def test_bad_open_clip_sources_raise_clear_errors(resnet_dir, tmp_path):
    with pytest.raises(ValueError, match="no folder at"):
        OpenCLIPBackbone.from_pretrained(f"local-dir:{tmp_path / 'missing'}")
    pickled_only = tmp_path / "pickled"
    pickled_only.mkdir()
    shutil.copy(f"{resnet_dir}/open_clip_config.json", pickled_only)
    (pickled_only / "open_clip_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no open_clip_model.safetensors .* never loaded"):
        OpenCLIPBackbone.from_pretrained(f"local-dir:{pickled_only}")
    with pytest.raises(ValueError, match="'hf-hub:tiny-org/absent' .* could not be downloaded"):
        OpenCLIPBackbone.from_pretrained("hf-hub:tiny-org/absent")
    with pytest.raises(ValueError, match="not an OpenCLIP id"):
        OpenCLIPBackbone.from_pretrained("tiny-org/absent")
