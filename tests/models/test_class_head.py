"""The class head: added to the combined logits, saved beside the gate, loaded strictly, and only for its labels."""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_ensemble import CLIPEnsembleConfig, CLIPEnsembleModel
from clip_ensemble.models.class_head import ClassHead
from clip_ensemble.models.gate import combine_logits
from clip_ensemble.models.saved_gate import check_fits, read_saved_gate

LABELS = ["cat", "dog", "bird"]


def _random_head(input_size: int, num_labels: int, rank: int = 4, seed: int = 0) -> ClassHead:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(input_size, rank, generator=generator)).Q
    return ClassHead.of(basis, 3 * torch.randn(num_labels, rank, generator=generator), torch.randn(num_labels))


@pytest.fixture
def with_head(backbone_dirs):
    """An ensemble with a static gate and a class head strong enough to change answers."""
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS)
    model.set_class_head(_random_head(sum(model.embed_dims), len(LABELS)), penalty=0.01)
    model.config.calibration = {"dataset": "toy", "chosen": "class head"}
    return model.eval()


def test_the_head_adds_its_correction_to_the_combined_logits(with_head, images):
    output = with_head(images=images)
    inputs = torch.cat(output.image_embeds, dim=-1)
    expected = combine_logits(output.per_backbone_logits, output.gate_weights) + with_head.class_head(inputs)
    torch.testing.assert_close(output.logits, expected)
    head = with_head.class_head
    torch.testing.assert_close(head(inputs), inputs @ head.basis @ head.weight.T + head.bias)
    assert with_head.config.class_head == {"penalty": 0.01, "rank": 4}


def test_save_and_load_keep_the_head(with_head, tmp_path, images):
    with_head.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "gate.safetensors",
        "class_head.safetensors",
        "README.md",
    }
    assert set(load_file(tmp_path / "class_head.safetensors")) == {"basis", "weight", "bias"}
    assert "Class head (`class_head.safetensors`)" in (tmp_path / "README.md").read_text()
    loaded = CLIPEnsembleModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(images=images).logits, with_head(images=images).logits, atol=0, rtol=0)
    # Saving without a head removes the stale file, so the folder never holds a head its config does not name.
    loaded.set_class_head(None)
    loaded.save_pretrained(tmp_path)
    assert not (tmp_path / "class_head.safetensors").exists()
    assert CLIPEnsembleModel.from_pretrained(tmp_path).class_head is None


def test_a_missing_or_mis_shaped_head_file_is_refused(with_head, tmp_path):
    with_head.save_pretrained(tmp_path)
    head = load_file(tmp_path / "class_head.safetensors")
    save_file({**head, "weight": head["weight"][:2]}, tmp_path / "class_head.safetensors")
    with pytest.raises(ValueError, match=r"class_head.safetensors of .* does not match the config: .*weight"):
        CLIPEnsembleModel.from_pretrained(tmp_path)
    (tmp_path / "class_head.safetensors").unlink()
    with pytest.raises(ValueError, match="the config has a class head but no class_head.safetensors came with it"):
        CLIPEnsembleModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a positive int 'rank'"):
        CLIPEnsembleConfig(backbones=["a"], labels=LABELS, class_head={"rank": 0})


def test_new_labels_drop_the_head_and_keep_the_gate(with_head, images, caplog):
    gate = {name: t.clone() for name, t in with_head.gate.state_dict().items()}
    with_head.set_labels(LABELS)  # the same labels: the head stays
    assert with_head.class_head is not None
    with caplog.at_level(logging.WARNING):
        with_head.set_labels(["car", "boat"])
    assert with_head.class_head is None and with_head.config.class_head is None
    assert "class head was calibrated for the labels ['cat', 'dog', 'bird'] and is dropped" in caplog.text
    assert all(torch.equal(t, with_head.gate.state_dict()[name]) for name, t in gate.items())
    output = with_head(images=images)
    torch.testing.assert_close(output.logits, combine_logits(output.per_backbone_logits, output.gate_weights))


def test_a_head_loaded_for_backbones_in_another_order_reads_the_same_embeddings(
    with_head, backbone_dirs, tmp_path, images
):
    with_head.save_pretrained(tmp_path)
    reordered = CLIPEnsembleModel.from_backbones(backbone_dirs[::-1], labels=LABELS)
    fitting = check_fits(read_saved_gate(tmp_path), reordered.config, reordered.gate.state_dict(), "fix")
    head = ClassHead(sum(reordered.embed_dims), 4, len(LABELS))
    head.load_state_dict(fitting.class_head_weights)
    original = with_head(images=images)
    inputs = torch.cat(original.image_embeds[::-1], dim=-1)  # the same embeddings, in the loaded order
    torch.testing.assert_close(head(inputs), with_head.class_head(torch.cat(original.image_embeds, dim=-1)))


def test_the_same_labels_in_another_order_keep_the_head_with_its_rows_reordered(with_head, images, caplog):
    before = with_head(images=images).logits
    with caplog.at_level(logging.WARNING):
        with_head.set_labels(LABELS[::-1])
    assert with_head.class_head is not None and with_head.config.class_head == {"penalty": 0.01, "rank": 4}
    assert "dropped" not in caplog.text
    torch.testing.assert_close(with_head(images=images).logits, before.flip(-1))
    with_head.set_labels(LABELS)
    torch.testing.assert_close(with_head(images=images).logits, before)
