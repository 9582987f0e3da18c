"""End to end on trained toy backbones: the calibrated gate must beat every single backbone and the baselines."""

import json
from unittest import mock

import pytest
import torch

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate, evaluate
from clip_ensemble.backbones.transformers_backbone import TransformersBackbone
from clip_ensemble.evaluation.evaluate import ORACLE
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@pytest.fixture(scope="module")
def calibration_data():
    return toy_dataset(per_class=16, seed=3)


@pytest.fixture(scope="module")
def test_data():
    return toy_dataset(per_class=40, seed=7)  # held out: drawn with another seed


@pytest.fixture(scope="module")
def cache():
    return FeatureCache(None)


def _top1(report) -> dict[str, float]:
    return {row["method"]: row["top1"] for row in report.rows()}


def test_backbones_disagree_so_the_oracle_is_well_above_the_best_single(toy_backbone_dirs, test_data, cache):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    top1 = _top1(evaluate(model, test_data, cache=cache, progress=False))
    best_single = max(top1[f"toy-clip-{i}"] for i in range(3))
    assert top1[ORACLE] >= best_single + 0.2
    assert top1["gate (uncalibrated: mean of logits)"] == top1["mean of logits"]


def test_four_shot_gate_beats_best_single_and_mean_of_logits(toy_backbone_dirs, calibration_data, test_data, cache):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = calibrate(model, calibration_data, shots=4, seed=0, cache=cache, progress=False)
    assert report.num_images == 24 and report.chosen == "gate"
    evaluation = evaluate(model, test_data, cache=cache, progress=False)
    top1 = _top1(evaluation)
    best_single = f"best single ({evaluation.best_single}, chosen on calibration data)"
    assert top1["gate"] > top1[best_single] + 0.1
    assert top1["gate"] > top1["mean of logits"] + 0.1
    assert top1["gate"] > max(top1["mean of probabilities"], top1["majority vote"])
    assert top1["gate"] <= top1[ORACLE]


def test_one_shot_calibration_already_helps(toy_backbone_dirs, calibration_data, test_data, cache):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = calibrate(model, calibration_data, shots=1, seed=0, cache=cache, progress=False)
    assert report.num_images == 6 and report.num_folds == 5
    top1 = _top1(evaluate(model, test_data, cache=cache, progress=False))
    assert top1["gate"] >= top1["mean of logits"]


def test_calibration_is_deterministic_and_reuses_cached_features(toy_backbone_dirs, calibration_data, tmp_path):
    states = []
    for attempt in range(2):
        model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
        cache = FeatureCache(tmp_path)  # fresh object, same folder: the second attempt reads from disk
        if attempt == 0:
            report = calibrate(model, calibration_data, shots=2, seed=5, cache=cache, progress=False)
            assert report.images_embedded == 12
        else:
            with mock.patch.object(TransformersBackbone, "encode_images", side_effect=AssertionError("forward")):
                report = calibrate(model, calibration_data, shots=2, seed=5, cache=cache, progress=False)
            assert report.images_embedded == 0
        states.append(model.gate.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0)


def test_calibration_is_recorded_in_the_config_and_card(toy_backbone_dirs, calibration_data, cache, tmp_path):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=["will", "be", "replaced"])
    report = calibrate(model, calibration_data, shots=4, seed=0, cache=cache, progress=False)
    assert model.labels == list(TOY_CLASSES)  # the data's label set
    assert model.config.calibration["shots"] == 4 and model.config.calibration["dataset"] == calibration_data.name
    assert "4 shots per class" in str(report) and json.dumps(report.to_dict())
    model.save_pretrained(tmp_path)
    assert "best_single_backbone" in (tmp_path / "README.md").read_text()


def test_too_many_shots_is_a_clear_error(toy_backbone_dirs, cache):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs[:1], labels=list(TOY_CLASSES))
    with pytest.raises(ValueError, match="shots=8 but class 'red' has only 2 images"):
        calibrate(model, toy_dataset(per_class=2, seed=0), shots=8, cache=cache, progress=False)


def test_evaluate_reports_every_method_with_metrics(toy_backbone_dirs, test_data, cache, tmp_path):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = evaluate(model, test_data, cache=cache, progress=False)
    methods = [row["method"] for row in report.rows()]
    assert methods[:3] == ["toy-clip-0", "toy-clip-1", "toy-clip-2"] and methods[-1] == ORACLE
    assert {"mean of logits", "mean of probabilities", "majority vote"} <= set(methods)
    for row in report.rows():
        assert 0 <= row["top1"] <= row["top5"] <= 1 and 0 <= row["mean_per_class_recall"] <= 1
    saved = json.loads(report.to_json(tmp_path / "r.json"))
    assert saved == json.loads((tmp_path / "r.json").read_text()) and saved["num_images"] == 240
    assert "| oracle (any backbone right) |" in report.table()


def test_evaluate_rejects_labels_the_model_does_not_know(toy_backbone_dirs, test_data, cache):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs[:1], labels=["red", "green"])
    with pytest.raises(ValueError, match=r"labels the model does not know: \['blue', 'orange', 'purple', 'teal'\]"):
        evaluate(model, test_data, cache=cache, progress=False)


def test_a_kept_class_head_is_set_on_the_model_saved_and_scored(digits_backbone_dirs, cache, tmp_path):
    """The demo's draw (digits, 4 shots, seed 0) keeps a class head: `calibrate` puts it on the model, the report and
    the saved folder say so, and the held-out evaluation scores the model with it."""
    from clip_ensemble.tasks.digits import DIGIT_CLASSES, digits_dataset

    model = CLIPEnsembleModel.from_backbones(digits_backbone_dirs, labels=list(DIGIT_CLASSES))
    report = calibrate(model, digits_dataset("pool"), shots=4, seed=0, cache=cache, progress=False)
    assert report.chosen == "class head" and "Kept a class head on static weights" in report.verdict()
    assert model.class_head is not None and model.config.class_head == {
        "penalty": report.settings["penalty"],
        "rank": report.settings["rank"],
    }
    evaluation = evaluate(model, digits_dataset("test"), cache=cache, progress=False)
    top1 = _top1(evaluation)
    singles = [top1[name] for name in model.config.backbone_names]
    assert top1[evaluation.gate_method] > max(top1["mean of logits"], top1["mean of probabilities"], *singles)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "class_head.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["calibration"]["chosen"] == "class head"
    # Calibrating again drops a head the new choice does not keep.
    report = calibrate(model, digits_dataset("pool"), shots=1, seed=0, cache=cache, progress=False)
    assert report.chosen != "class head" and model.class_head is None and model.config.class_head is None
