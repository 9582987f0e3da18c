"""Saving, loading and pushing: only the config, the gate and a card; backbones by reference."""

import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import put_in_hub_cache
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from clip_ensemble import CLIPEnsembleConfig, CLIPEnsembleModel, FeatureCache, evaluate, from_lists
from clip_ensemble.models.saved_gate import read_saved_gate

LABELS = ["cat", "dog", "bird"]
SAVED_FILES = {"config.json", "gate.safetensors", "README.md"}


@pytest.fixture
def calibrated(backbone_dirs):
    """An ensemble whose gate is not the identity, so a round trip that drops the gate would show."""
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS)
    torch.manual_seed(0)
    with torch.no_grad():
        model.gate.fc2.weight.normal_(std=0.5)
    model.config.calibration = {"dataset": "toy", "shots": 4}
    return model.eval()


def test_save_writes_only_config_gate_and_card(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == SAVED_FILES
    gate = load_file(tmp_path / "gate.safetensors")
    assert set(gate) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # no backbone weight
    assert gate["fc1.weight"].shape == (128, 16 + 24 + 20)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: clip-ensemble" in card and "| dataset | toy |" in card and "cat, dog, bird" in card


def test_save_and_load_give_identical_logits(calibrated, tmp_path, images):
    calibrated.save_pretrained(tmp_path)
    loaded = CLIPEnsembleModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(images=images).logits, calibrated(images=images).logits, atol=0, rtol=0)
    assert loaded.config.calibration == {"dataset": "toy", "shots": 4} and loaded.labels == LABELS


def test_auto_classes_load_the_ensemble(calibrated, tmp_path, images):
    calibrated.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CLIPEnsembleConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, CLIPEnsembleModel)
    torch.testing.assert_close(loaded(images=images).logits, calibrated(images=images).logits)


def test_from_pretrained_through_the_hub_cache(backbone_dirs, tmp_path, images):
    """Repo ids resolve offline from the hub cache layout: the real `from_pretrained("org/name")` path."""
    commits = [put_in_hub_cache(folder, f"tiny-org/clip-{i}") for i, folder in enumerate(backbone_dirs[:2])]
    model = CLIPEnsembleModel.from_backbones(["tiny-org/clip-0", "tiny-org/clip-1"], labels=LABELS)
    assert [b["revision"] for b in model.config.backbones] == commits  # pinned to the commit loaded
    with torch.no_grad():
        model.gate.fc1.bias.fill_(0.3)
        model.gate.fc2.weight.fill_(0.1)
    model.save_pretrained(tmp_path / "ensemble")
    put_in_hub_cache(tmp_path / "ensemble", "tiny-org/ensemble")

    loaded = CLIPEnsembleModel.from_pretrained("tiny-org/ensemble")
    torch.testing.assert_close(loaded(images=images).logits, model(images=images).logits)
    assert AutoModel.from_pretrained("tiny-org/ensemble").config.backbones == model.config.backbones


def test_push_to_hub_uploads_exactly_the_small_files(calibrated):
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="abc",
        )

    with (
        mock.patch.object(HfApi, "create_repo", return_value=RepoUrl("https://huggingface.co/me/gate")) as create,
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        calibrated.push_to_hub("me/gate", private=True)
    create.assert_called_once_with("me/gate", private=True, exist_ok=True)
    assert set(uploaded) == SAVED_FILES
    assert b'from_pretrained("me/gate")' in uploaded["README.md"]


def test_push_with_evaluations_writes_the_model_index(calibrated, images, tmp_path):
    report = evaluate(calibrated, from_lists(images, ["cat", "dog", "bird", "cat"]), cache=FeatureCache(None))
    gate = next(row for row in report.rows() if row["method"] == "gate")
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message="m",
            commit_description="",
            oid="abc",
        )

    with (
        mock.patch.object(HfApi, "create_repo", return_value=RepoUrl("https://huggingface.co/me/gate")),
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        calibrated.push_to_hub("me/gate", evaluations=report)
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.model_name == "gate"
    results = {(r.dataset_type, r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("lists", "image-classification", "accuracy"): round(gate["top1"], 4),
        ("lists", "image-classification", "top_5_accuracy"): round(gate["top5"], 4),
        ("lists", "image-classification", "mean_per_class_recall"): round(gate["mean_per_class_recall"], 4),
    }
    assert report.table() in card.text
    calibrated.save_pretrained(tmp_path)  # without evaluations: no model-index
    assert "model-index" not in (tmp_path / "README.md").read_text()


def test_evaluations_of_another_label_set_are_refused(calibrated, images, tmp_path):
    report = evaluate(calibrated, from_lists(images[:2], ["cat", "dog"]), cache=FeatureCache(None))
    calibrated.set_labels(["cat", "dog"])
    with pytest.raises(ValueError, match=r"evaluations\[0\] \(lists\) scored backbones .* on 3 labels"):
        calibrated.save_pretrained(tmp_path / "gate", evaluations=[report])
    assert not (tmp_path / "gate").exists()


def test_gate_with_wrong_shapes_is_rejected(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    gate = load_file(tmp_path / "gate.safetensors")
    gate["fc1.weight"] = torch.zeros(128, 10)
    save_file(gate, tmp_path / "gate.safetensors")
    with pytest.raises(ValueError, match=r"fc1.weight: file \(128, 10\) vs config \(128, 60\)"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_gate_with_missing_or_extra_keys_is_rejected(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    gate = load_file(tmp_path / "gate.safetensors")
    gate["extra"] = gate.pop("fc2.bias")
    save_file(gate, tmp_path / "gate.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['fc2.bias'\], unexpected keys \['extra'\]"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_corrupted_gate_file_is_rejected(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    (tmp_path / "gate.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupted or not a readable safetensors file"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_folder_without_gate_is_rejected(calibrated, tmp_path):
    calibrated.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no gate.safetensors"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_backbone_whose_width_changed_is_rejected(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    config = CLIPEnsembleConfig.from_pretrained(tmp_path)
    config.backbones[0]["embed_dim"] = 99
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has embedding width 16, but the config expects 99"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_missing_backbone_on_load_is_named(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    config = CLIPEnsembleConfig.from_pretrained(tmp_path)
    config.backbones[1]["name_or_path"] = "tiny-org/gone"
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Backbone 'tiny-org/gone'"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_a_failed_save_keeps_the_previous_gate(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    before = (tmp_path / "gate.safetensors").read_bytes()
    with (
        mock.patch("clip_ensemble.models.saved_gate.save_file", side_effect=OSError("disk full")),
        pytest.raises(OSError, match="disk full"),
    ):
        calibrated.save_pretrained(tmp_path)
    assert (tmp_path / "gate.safetensors").read_bytes() == before


def test_one_loader_reads_a_folder_its_zip_or_its_files(calibrated, tmp_path, images):
    """`from_pretrained` and the app read saved gates through `read_saved_gate`: a zip of the folder, or the files
    themselves, load as the folder does, and a file over a size cap is refused before it is read."""
    calibrated.save_pretrained(tmp_path / "gate")
    archive = shutil.make_archive(str(tmp_path / "gate"), "zip", root_dir=tmp_path, base_dir="gate")
    loaded = CLIPEnsembleModel.from_pretrained(archive)
    torch.testing.assert_close(loaded(images=images).logits, calibrated(images=images).logits, atol=0, rtol=0)
    files = [tmp_path / "gate" / name for name in ("config.json", "gate.safetensors")]
    saved = read_saved_gate(files)
    assert saved.gate_bytes == (tmp_path / "gate" / "gate.safetensors").read_bytes() and saved.cascade_bytes is None
    assert saved.labels == LABELS and saved.calibration == {"dataset": "toy", "shots": 4}
    with pytest.raises(
        ValueError, match=r"'gate.safetensors' is too large to be a gate file \(\d+ bytes; at most 10\)"
    ):
        read_saved_gate(tmp_path / "gate", max_weights_bytes=10)
    with pytest.raises(ValueError, match=r"in the zip is \d+ bytes; at most 10 are read"):
        read_saved_gate(archive, max_weights_bytes=10)
    (tmp_path / "gate" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="is not a clip-ensemble gate's"):
        read_saved_gate(tmp_path / "gate")
