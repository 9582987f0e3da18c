"""The report folder: its files hold the numbers `EvaluationReport` computed, and its charts render."""

import csv
import json
import sys
from unittest import mock

import pytest
import torch
from PIL import Image

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate, evaluate
from clip_ensemble.cli import main
from clip_ensemble.evaluation.evaluate import ORACLE, TIE, EvaluationReport
from clip_ensemble.evaluation.report import REPORT_FILES, write_report
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@pytest.fixture(scope="module")
def calibrated(toy_backbone_dirs):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    calibrate(model, toy_dataset(per_class=16, seed=3), shots=1, seed=0, cache=FeatureCache(None), progress=False)
    return model


@pytest.fixture(scope="module")
def report(calibrated):
    return evaluate(calibrated, toy_dataset(per_class=12, seed=7), cache=FeatureCache(None), progress=False)


def test_report_files_hold_the_numbers_of_the_table(report, tmp_path):
    paths = write_report(report, tmp_path / "report")
    assert (
        sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES) == sorted(p.name for p in paths)
    )

    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["results"] == report.rows() and saved["num_images"] == 72
    assert saved["largest_gate_weight_share"] == report.largest_gate_weight_share()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert report.table() in markdown and "![Confusion matrix of the gate](confusion_matrix.png)" in markdown

    with open(tmp_path / "report" / "per_class_accuracy.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [row["label"] for row in per_class] == list(TOY_CLASSES)
    methods = [row["method"] for row in report.rows() if row["method"] != ORACLE]
    for method in methods:
        expected = report.per_class_accuracy(method)
        assert [float(row[method]) for row in per_class] == pytest.approx([expected[c] for c in TOY_CLASSES], abs=1e-6)

    with open(tmp_path / "report" / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == list(TOY_CLASSES)
    counts = torch.tensor([[int(x) for x in row[1:]] for row in rows[1:]])
    assert counts.sum(1).tolist() == [12] * 6
    gate_recall = report.per_class_accuracy(report.gate_method)
    assert (counts.diagonal() / 12).tolist() == pytest.approx([gate_recall[c] for c in TOY_CLASSES])
    assert counts.diagonal().sum() / 72 == pytest.approx(
        next(r["top1"] for r in report.rows() if r["method"] == "gate")
    )

    for name in ("accuracy.png", "gate_weights.png", "confusion_matrix.png"):
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and min(image.size) >= 250


def test_a_folder_of_other_files_is_refused_and_an_earlier_report_replaced(report, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):
        write_report(report, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    write_report(report, tmp_path / "again")
    write_report(report, tmp_path / "again")  # an earlier report's folder: replaced
    assert len(list((tmp_path / "again").iterdir())) == len(REPORT_FILES)


def test_confusion_matrix_chart_for_many_labels(tmp_path):
    """120 labels: names on both axes, still legible (about 17 px per label)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(120).repeat(5)
    top1 = torch.where(
        torch.rand(600, generator=generator) < 0.8, labels, torch.randint(0, 120, (600,), generator=generator)
    )
    ranked = torch.cat([top1[:, None], torch.randint(0, 120, (600, 4), generator=generator)], dim=1)
    report = EvaluationReport(
        dataset="many-labels",
        label_names=[f"label {i}" for i in range(120)],
        labels=labels,
        ranked={"a": ranked, "gate": ranked},
        oracle_correct=torch.ones(600, 2, dtype=torch.bool),
        gate_weights=torch.rand(600, 1, generator=generator),
        backbones=["a"],
        best_single="a",
        gate_method="gate",
    )
    write_report(report, tmp_path)
    with Image.open(tmp_path / "confusion_matrix.png") as image:
        assert image.size[1] >= 120 * 15


def test_uncalibrated_gate_weights_are_all_ties(toy_backbone_dirs):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = evaluate(model, toy_dataset(per_class=2, seed=7), cache=FeatureCache(None), progress=False)
    assert report.largest_gate_weight_share() == {**dict.fromkeys(model.config.backbone_names, 0.0), TIE: 1.0}


def test_cli_evaluate_writes_the_report(calibrated, tmp_path, capsys):
    calibrated.save_pretrained(tmp_path / "gate")
    folder = tmp_path / "photos" / "red"
    folder.mkdir(parents=True)
    toy_dataset(per_class=2, seed=5, classes=(0,)).images[0].save(folder / "0.png")
    args = ["evaluate", str(tmp_path / "gate"), "--dataset", str(tmp_path / "photos"), "--cache-dir", str(tmp_path)]
    assert main([*args, "--report", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "| gate |" in printed and "report.md" in printed
    assert json.loads((tmp_path / "report" / "results.json").read_text())["num_images"] == 1

    with mock.patch.dict(sys.modules, {"matplotlib": None}):  # matplotlib not installed
        assert main([*args, "--report", str(tmp_path / "other")]) == 2
    assert 'pip install "clip-ensemble[report]"' in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
