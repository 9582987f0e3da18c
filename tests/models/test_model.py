import pytest
import torch

from clip_ensemble import CLIPEnsembleModel, build_zero_shot_classifier

LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def model(backbone_dirs):
    return CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS)


def test_output_shapes(model, images):
    out = model(images=images, labels=torch.tensor([0, 1, 2, 3]))
    assert out.logits.shape == (4, 4)
    assert out.gate_weights.shape == (4, 3)
    assert out.per_backbone_logits.shape == (4, 3, 4)
    assert [e.shape for e in out.image_embeds] == [(4, 16), (4, 24), (4, 20)]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_uncalibrated_model_is_plain_logit_averaging(model, images):
    out = model(images=images)
    torch.testing.assert_close(out.logits, out.per_backbone_logits.mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.gate_weights, torch.full((4, 3), 1 / 3))


@pytest.mark.parametrize("combination", ["softplus", "softmax", "top1"])
def test_combinations_start_from_uniform_weights(backbone_dirs, images, combination):
    model = CLIPEnsembleModel.from_backbones(backbone_dirs[:2], labels=LABELS, combination=combination)
    model.train()
    weights = model(images=images).gate_weights
    torch.testing.assert_close(weights, torch.full((4, 2), 0.5))


def test_top1_routes_each_image_to_one_backbone_at_inference(backbone_dirs, images):
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, combination="top1")
    with torch.no_grad():
        model.gate.fc2.weight.normal_()
    model.eval()
    out = model(images=images)
    assert torch.equal(out.gate_weights.sum(dim=1), torch.ones(4))
    assert set(out.gate_weights.unique().tolist()) <= {0.0, 1.0}
    chosen = out.gate_weights.argmax(dim=1)
    torch.testing.assert_close(out.logits, out.per_backbone_logits[torch.arange(4), chosen])


def test_inputs_agree(model, images):
    from_images = model(images=images).logits
    pixel_values = model.processor(images)["pixel_values"]
    assert [tuple(p.shape[-2:]) for p in pixel_values] == [(30, 30), (36, 36), (28, 28)]
    from_pixels = model(pixel_values=pixel_values)
    from_embeds = model(image_embeds=from_pixels.image_embeds).logits
    torch.testing.assert_close(from_images, from_pixels.logits)
    torch.testing.assert_close(from_images, from_embeds)


def test_per_backbone_logits_follow_the_method(model, images):
    """z_b = s_b * normalize(f_b(x)) @ W_b^T with W_b from `build_zero_shot_classifier`."""
    out = model(images=images)
    backbone = model.backbones[1]
    head = build_zero_shot_classifier(backbone, LABELS, model.config.template_list)
    assert head.shape == (4, 24)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(4))
    expected = backbone.logit_scale * out.image_embeds[1] @ head.T
    torch.testing.assert_close(out.per_backbone_logits[:, 1], expected)


def test_classify_returns_top_k_labels_with_probabilities(model, images):
    predictions = model.classify(images, top_k=2)
    assert len(predictions) == 4 and all(len(p) == 2 for p in predictions)
    assert all(p[0]["label"] in LABELS and p[0]["score"] >= p[1]["score"] for p in predictions)
    assert len(model.classify(images[0], top_k=10)[0]) == 4  # top_k larger than the label set


def test_set_labels_rebuilds_heads_and_keeps_the_gate(backbone_dirs, images):
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS)
    gate_before = {k: v.clone() for k, v in model.gate.state_dict().items()}
    model.set_labels(["car", "boat"], templates=["a {}."])
    out = model(images=images)
    assert out.logits.shape == (4, 2) and model.config.id2label == {0: "car", 1: "boat"}
    assert all(torch.equal(v, model.gate.state_dict()[k]) for k, v in gate_before.items())
    heads = model.zero_shot_heads
    model.set_labels(LABELS)
    model.set_labels(["car", "boat"], templates=["a {}."])
    assert all(a is b for a, b in zip(heads, model.zero_shot_heads))  # cached, not rebuilt


def test_set_labels_rejects_duplicates_and_keeps_the_old_labels(model):
    with pytest.raises(ValueError, match="not unique"):
        model.set_labels(["cat", "cat"])
    assert model.labels == LABELS


def test_undecodable_image_names_the_image(model, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(ValueError, match=r"image 1 \('.*broken.jpg'\) could not be decoded"):
        model.classify([images[0], str(broken)])
    with pytest.raises(ValueError, match=r"image 0 \(9 bytes\) could not be decoded"):
        model.classify([b"not a png"])
    with pytest.raises(ValueError, match="no file at"):
        model.classify([str(tmp_path / "missing.png")])
    with pytest.raises(TypeError, match="has type int"):
        model.classify([3])


def test_forward_needs_exactly_one_input(model, images):
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="pixel values for 1 backbones"):
        model(pixel_values=[torch.zeros(1, 3, 30, 30)])


def test_no_backbones_is_an_error():
    with pytest.raises(ValueError, match="No backbones given"):
        CLIPEnsembleModel.from_backbones([], labels=LABELS)


def test_missing_backbone_names_it_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)Backbone 'org/does-not-exist' .* could not be loaded.*local folder"):
        CLIPEnsembleModel.from_backbones(["org/does-not-exist"], labels=LABELS)
    with pytest.raises(ValueError, match="could not be loaded"):
        CLIPEnsembleModel.from_backbones([str(tmp_path / "empty")], labels=LABELS)


def test_an_image_over_pillows_pixel_limit_is_a_value_error(tmp_path, monkeypatch):
    from PIL import Image

    from clip_ensemble import load_image

    big = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels is over twice the limit: a "bomb"
    with pytest.raises(ValueError, match=r"big.png'\) is too large: 400 pixels, over the limit of 200 .*Resize it"):
        load_image(str(big))
