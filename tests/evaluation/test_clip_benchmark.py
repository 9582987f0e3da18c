"""CLIP_benchmark export: one result file per method of an evaluation, in the shape CLIP_benchmark's own `eval`
writes, merged by its own `build` beside a result of its own."""

import csv
import json
import math
import sys

import pytest
import torch
from clip_benchmark import cli as clip_benchmark_cli
from clip_benchmark.metrics import zeroshot_classification

from clip_ensemble import (
    CLIPEnsembleModel,
    FeatureCache,
    LabelledImages,
    calibrate,
    evaluate,
    write_clip_benchmark_results,
)
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


class _OneHotImages(torch.utils.data.Dataset):
    """Images that are already embeddings: one-hot vectors of their class."""

    templates = ["a photo of a {c}."]
    classes = list(TOY_CLASSES)

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.nn.functional.one_hot(torch.tensor(index % 6), 6).float(), index % 6


class _OneHotCLIP(torch.nn.Module):
    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens, 6).float()


def _tokenize(texts):
    return torch.tensor([TOY_CLASSES.index(text.split()[-1].rstrip(".")) for text in texts])


def _accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which numpy 2 refuses; same computation.
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].sum()) / len(target) for k in topk]


def _run_clip_benchmark(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *argv])
    clip_benchmark_cli.main()


@pytest.fixture
def theirs(tmp_path, monkeypatch):
    """A result file written by CLIP_benchmark's `eval` (its `run()` and zero-shot `evaluate()`), with a one-hot model
    and dataset in place of downloads."""
    monkeypatch.setattr(clip_benchmark_cli, "load_clip", lambda **_: (_OneHotCLIP(), None, _tokenize))
    monkeypatch.setattr(clip_benchmark_cli, "build_dataset", lambda **_: _OneHotImages())
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    path = tmp_path / "theirs" / "toy_openai_ViT-B-32_en_zeroshot_classification.json"
    path.parent.mkdir()
    _run_clip_benchmark(
        ["eval", "--dataset", "toy", "--task", "zeroshot_classification", "--model", "ViT-B-32"]
        + ["--pretrained", "openai", "--num_workers", "0", "--quiet", "--output", str(path)],
        monkeypatch,
    )
    return json.loads(path.read_text()), path


@pytest.fixture(scope="module")
def report(toy_backbone_dirs):
    cache = FeatureCache(None)
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    calibrate(model, toy_dataset(per_class=16, seed=3), shots=4, seed=0, cache=cache, progress=False)
    return evaluate(model, toy_dataset(per_class=5, seed=7), cache=cache, progress=False)


def test_one_file_per_method_in_clip_benchmarks_shape(report, theirs, tmp_path):
    their_result, _ = theirs
    paths = write_clip_benchmark_results(report, tmp_path / "ours", pretrained="me/toy-gate", dataset="toy")
    rows = report.rows()
    assert len(paths) == len(rows) == len({p.name for p in paths})  # whatever methods the report holds
    ours = [json.loads(p.read_text()) for p in paths]
    assert [r["model"] for r in ours] == [row["method"] for row in rows]
    for result, row in zip(ours, rows):
        assert set(result) == set(their_result)
        assert set(result["metrics"]) == set(their_result["metrics"])
        assert result["task"] == their_result["task"] == "zeroshot_classification"
        assert (result["dataset"], result["pretrained"], result["language"]) == ("toy", "me/toy-gate", "en")
        assert result["metrics"]["acc1"] == row["top1"]
        assert result["metrics"]["acc5"] == row["top5"]  # 6 classes: top-5 is defined
        assert result["metrics"]["mean_per_class_recall"] == row["mean_per_class_recall"]
    gate = next(r for r in ours if r["model"] == report.gate_method)
    assert gate["metrics"]["acc1"] > 0.9


def test_clip_benchmark_build_merges_ours_with_theirs(report, theirs, tmp_path, monkeypatch):
    their_result, their_path = theirs
    paths = write_clip_benchmark_results(report, tmp_path / "ours", pretrained="toy-gate")
    output = tmp_path / "benchmark.csv"
    _run_clip_benchmark(["build", *map(str, paths), str(their_path), "--output", str(output)], monkeypatch)
    with open(output) as f:
        merged = list(csv.DictReader(f))
    assert len(merged) == len(paths) + 1
    by_name = {row["model_fullname"]: row for row in merged}
    assert float(by_name["ViT-B-32 openai"]["acc1"]) == their_result["metrics"]["acc1"]
    gate_row = next(row for row in report.rows() if row["method"] == report.gate_method)
    assert float(by_name[f"{report.gate_method} toy-gate"]["acc1"]) == gate_row["top1"]


def test_fewer_than_five_labels_have_no_top5_like_clip_benchmark(toy_backbone_dirs, tmp_path):
    names = ["red", "green", "blue"]
    data = toy_dataset(per_class=2, seed=5, classes=(0, 2, 4))
    data = LabelledImages(data.images, [names.index(TOY_CLASSES[label]) for label in data.labels], names)
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=names)
    report = evaluate(model, data, cache=FeatureCache(None), progress=False)
    paths = write_clip_benchmark_results(report, tmp_path / "out")
    results = [json.loads(p.read_text()) for p in paths]
    assert len(results) == len(report.rows())
    assert all(math.isnan(r["metrics"]["acc5"]) and 0 <= r["metrics"]["acc1"] <= 1 for r in results)
    with pytest.raises(ValueError, match="is a file"):
        write_clip_benchmark_results(report, paths[0])
