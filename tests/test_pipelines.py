"""The image-classification and zero-shot pipelines, and `evaluate`'s evaluator on a local `datasets.Dataset`, with
trained toy backbones: the evaluator must report exactly what `clip_ensemble.evaluate` reports for the gate."""

import subprocess
import sys
from unittest import mock

import datasets
import pytest
import torch
from transformers import pipeline
from transformers.pipelines import ZeroShotImageClassificationPipeline

from clip_ensemble import (
    CLIPEnsembleModel,
    CLIPEnsemblePipeline,
    CLIPEnsembleZeroShotPipeline,
    TransformersBackbone,
    evaluate,
)
from clip_ensemble.evaluation.evaluate_modules import CLIPEnsembleEvaluator, MeanPerClassRecall, TopKAccuracy
from clip_ensemble.models.class_head import ClassHead
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@pytest.fixture(scope="module")
def calibrated(toy_calibration):
    return toy_calibration[0]


@pytest.fixture(scope="module")
def test_dataset():
    """Held-out toy images as a `datasets.Dataset` with an Image column and a ClassLabel column, like a Hub dataset."""
    data = toy_dataset(per_class=6, seed=7)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(TOY_CLASSES))})
    return datasets.Dataset.from_dict({"image": data.images, "label": data.labels}, features=features)


def _gate_row(report) -> dict:
    return next(row for row in report.rows() if row["method"] == report.gate_method)


def test_pipeline_returns_labels_and_scores_like_transformers(calibrated, test_dataset):
    classifier = CLIPEnsemblePipeline(calibrated)
    images = test_dataset["image"][:6]
    one = classifier(images[0])
    assert [set(p) for p in one] == [{"label", "score"}] * 5  # top_k=5 by default
    assert [p["score"] for p in one] == sorted((p["score"] for p in one), reverse=True)
    expected = calibrated.classify(images, top_k=2)
    batched = classifier(images, top_k=2, batch_size=4)  # each backbone's pixel values stacked separately
    assert [[p["label"] for p in top] for top in batched] == [[p["label"] for p in top] for top in expected]
    for top, reference in zip(batched, expected):
        torch.testing.assert_close([p["score"] for p in top], [p["score"] for p in reference])
    with pytest.raises(ValueError, match="top_k=0"):
        classifier(images[0], top_k=0)


def test_transformers_pipeline_loads_a_saved_ensemble(calibrated, test_dataset, tmp_path):
    CLIPEnsemblePipeline(calibrated).save_pretrained(tmp_path)  # the ensemble's small files, no processor
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "gate.safetensors", "README.md"}
    classifier = pipeline("image-classification", model=str(tmp_path), pipeline_class=CLIPEnsemblePipeline)
    image = test_dataset[0]["image"]
    assert isinstance(classifier.model, CLIPEnsembleModel)
    assert classifier(image, top_k=3) == CLIPEnsemblePipeline(calibrated)(image, top_k=3)
    with pytest.raises(TypeError, match="needs a CLIPEnsembleModel"):
        CLIPEnsemblePipeline(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("calibrated_gate", [True, False])
def test_evaluator_agrees_with_evaluate(toy_backbone_dirs, calibrated, test_dataset, feature_cache, calibrated_gate):
    model = calibrated if calibrated_gate else CLIPEnsembleModel.from_backbones(toy_backbone_dirs, list(TOY_CLASSES))
    expected = _gate_row(evaluate(model, test_dataset, cache=feature_cache, progress=False))
    results = CLIPEnsembleEvaluator(ranked=True).compute(model_or_pipeline=model, data=test_dataset)
    assert results["accuracy"] == expected["top1"]
    assert results["top_5_accuracy"] == expected["top5"]
    assert results["mean_per_class_recall"] == pytest.approx(expected["mean_per_class_recall"], abs=1e-12)
    # The toy gate is meaningful: calibrated, it is right where plain averaging is not.
    assert expected["top1"] > 0.9 if calibrated_gate else expected["top1"] < 0.7


def test_evaluator_takes_a_pipeline_or_a_saved_folder(calibrated, test_dataset, tmp_path):
    expected = CLIPEnsembleEvaluator().compute(model_or_pipeline=calibrated, data=test_dataset)
    assert set(expected) >= {"accuracy", "mean_per_class_recall", "samples_per_second"}
    calibrated.save_pretrained(tmp_path)
    from_folder = CLIPEnsembleEvaluator().compute(
        model_or_pipeline=str(tmp_path),
        data=test_dataset,
        metric=TopKAccuracy(1),
        label_mapping=calibrated.config.label2id,
    )
    assert from_folder["accuracy"] == expected["accuracy"]
    from_pipeline = CLIPEnsembleEvaluator().compute(
        model_or_pipeline=CLIPEnsemblePipeline(calibrated, batch_size=16),
        data=test_dataset,
        metric=MeanPerClassRecall(),
    )
    assert from_pipeline["mean_per_class_recall"] == expected["mean_per_class_recall"]


def test_evaluator_names_unmapped_labels(calibrated, test_dataset):
    with pytest.raises(ValueError, match="which the label mapping does not map"):
        CLIPEnsembleEvaluator().compute(model_or_pipeline=calibrated, data=test_dataset, label_mapping={"red": 0})
    plain = test_dataset.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match="not a ClassLabel; pass label_mapping"):
        CLIPEnsembleEvaluator().compute(model_or_pipeline=calibrated, data=plain)


def test_zero_shot_pipeline_reuses_the_gate_on_new_labels(calibrated, test_dataset):
    classifier = pipeline(
        "zero-shot-image-classification", model=calibrated, pipeline_class=CLIPEnsembleZeroShotPipeline
    )
    images = test_dataset["image"][:4]
    subset = ["teal", "blue", "green"]
    result = classifier(images[0], candidate_labels=subset)
    # transformers' format: every candidate label with its softmax score, best first.
    assert [list(entry) for entry in result] == [["score", "label"]] * 3
    assert sorted(entry["label"] for entry in result) == sorted(subset)
    assert [e["score"] for e in result] == sorted((e["score"] for e in result), reverse=True)
    assert sum(e["score"] for e in result) == pytest.approx(1.0)
    assert calibrated.labels == list(TOY_CLASSES)  # the model's own labels are left as they were

    # The same as switching the model to the new labels (same gate, new zero-shot heads) and classifying.
    reference = CLIPEnsembleModel.from_backbones([b.name_or_path for b in calibrated.backbones], labels=subset)
    reference.gate.load_state_dict(calibrated.gate.state_dict())
    expected = reference.classify(images, top_k=3)
    batched = classifier(images, candidate_labels=subset, batch_size=3)
    for top, ref in zip(batched, expected):
        assert [e["label"] for e in top] == [e["label"] for e in ref]
        # Batched and single forward passes agree to float32 precision.
        torch.testing.assert_close([e["score"] for e in top], [e["score"] for e in ref], rtol=1e-5, atol=1e-6)
    # With the ensemble's own labels it answers what the image-classification pipeline answers.
    own = classifier(images[1], candidate_labels=list(TOY_CLASSES))
    assert own == [
        {"score": p["score"], "label": p["label"]} for p in CLIPEnsemblePipeline(calibrated)(images[1], top_k=6)
    ]


def test_zero_shot_heads_are_cached_per_label_set_and_templates_apply(calibrated, test_dataset):
    classifier = CLIPEnsembleZeroShotPipeline(calibrated)
    image = test_dataset[0]["image"]
    labels = ["purple", "red"]
    with mock.patch.object(
        TransformersBackbone, "encode_texts", autospec=True, side_effect=TransformersBackbone.encode_texts
    ) as texts:
        first = classifier(image, candidate_labels=labels, hypothesis_template="a {} shape")
        prompts = [call.args[1] for call in texts.call_args_list]
        assert ["a purple shape", "a red shape"] in prompts  # the template, applied to each candidate label
        texts.reset_mock()
        assert classifier(image, candidate_labels=labels, hypothesis_template="a {} shape") == first
        texts.assert_not_called()  # heads for a label set seen before come from the cache
    # A list of templates or a template set name: each backbone's head averages over them.
    assert classifier(image, candidate_labels="purple, red", hypothesis_template="single")[0]["label"] in labels
    assert len(classifier(image, candidate_labels=labels, hypothesis_template=["a {}.", "{} colour"])) == 2


def test_zero_shot_pipeline_names_bad_arguments(calibrated, test_dataset):
    classifier = CLIPEnsembleZeroShotPipeline(calibrated)
    image = test_dataset[0]["image"]
    with pytest.raises(ValueError, match="candidate_labels=\\['cat', 'dog'\\]"):
        classifier(image)
    with pytest.raises(ValueError, match="has no '{}' for the label"):
        classifier(image, candidate_labels=["red", "blue"], hypothesis_template="a photo")
    with pytest.raises(ValueError, match="not unique"):
        classifier(image, candidate_labels=["red", "red"])
    with pytest.raises(TypeError, match="needs a CLIPEnsembleModel"):
        CLIPEnsembleZeroShotPipeline(torch.nn.Linear(2, 2))


def test_zero_shot_task_loads_a_saved_ensemble_and_still_serves_plain_clips(calibrated, backbone_dirs, tmp_path):
    calibrated.save_pretrained(tmp_path / "gate")
    # Registered when clip_ensemble's names are first used: no pipeline_class needed.
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "gate"))
    assert isinstance(classifier, CLIPEnsembleZeroShotPipeline)
    image = toy_dataset(per_class=1, seed=9).images[0]
    expected = CLIPEnsembleZeroShotPipeline(calibrated)(image, candidate_labels=["red", "blue"])
    assert classifier(image, candidate_labels=["red", "blue"]) == expected
    # Any other model still gets transformers' own pipeline.
    plain = pipeline("zero-shot-image-classification", model=backbone_dirs[0])
    assert type(plain) is ZeroShotImageClassificationPipeline
    result = plain(image, candidate_labels=["red", "blue"])
    assert sorted(entry["label"] for entry in result) == ["blue", "red"]


def test_a_plain_import_after_transformers_registers_the_ensemble():
    code = (
        "import transformers, clip_ensemble\n"
        "from transformers import CONFIG_MAPPING\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "print('clip_ensemble' in CONFIG_MAPPING, PIPELINE_REGISTRY.supported_tasks['zero-shot-image-classification'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True") and "clip_ensemble" in out


def test_pipelines_apply_a_class_head_to_its_own_labels_only(toy_backbone_dirs, test_dataset, tmp_path):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES)).eval()
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(sum(model.embed_dims), 4, generator=generator)).Q
    head = ClassHead.of(basis, 5 * torch.randn(len(TOY_CLASSES), 4, generator=generator), torch.zeros(len(TOY_CLASSES)))
    model.set_class_head(head, penalty=0.01)
    image = test_dataset[0]["image"]
    with torch.no_grad():
        output = model(images=[image])
    probabilities = output.logits.softmax(-1)[0]
    correction = output.logits - output.per_backbone_logits.mean(1)  # the gate is still the mean of logits
    torch.testing.assert_close(correction, head(torch.cat(output.image_embeds, -1)))
    assert correction.abs().max() > 1
    top = CLIPEnsemblePipeline(model)(image, top_k=6)
    assert {p["label"]: p["score"] for p in top} == pytest.approx(dict(zip(TOY_CLASSES, probabilities.tolist())))
    model.save_pretrained(tmp_path)
    loaded = pipeline("image-classification", model=str(tmp_path), pipeline_class=CLIPEnsemblePipeline)
    assert {p["label"]: p["score"] for p in loaded(image, top_k=6)} == pytest.approx(
        {p["label"]: p["score"] for p in top}
    )

    zero_shot = CLIPEnsembleZeroShotPipeline(model=model)
    subset = ["teal", "blue", "green"]
    plain = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=subset).eval()
    expected = {p["label"]: p["score"] for p in plain.classify([image], top_k=3)[0]}
    assert {e["label"]: e["score"] for e in zero_shot(image, candidate_labels=subset)} == pytest.approx(expected)
    assert model.class_head is head and model.config.class_head == {"penalty": 0.01, "rank": 4}  # put back
    own = zero_shot(image, candidate_labels=list(TOY_CLASSES))
    assert {e["label"]: e["score"] for e in own} == pytest.approx(dict(zip(TOY_CLASSES, probabilities.tolist())))
    # The same labels in another order: the head follows them (rows reordered), and is back in order after.
    reordered = zero_shot(image, candidate_labels=list(TOY_CLASSES)[::-1])
    expected = dict(zip(TOY_CLASSES, probabilities.tolist()))
    assert {e["label"]: e["score"] for e in reordered} == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert model.labels == list(TOY_CLASSES)
    torch.testing.assert_close(model.class_head.weight, head.weight, atol=0, rtol=0)
