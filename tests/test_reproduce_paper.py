"""benchmarks/reproduce_paper.py on local data: toy backbones from a backbone-set .json file, and an image folder with
train/ and test/ splits, read by `datasets.load_dataset` as a Hub dataset id would be."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from clip_ensemble import FeatureCache
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

_SCRIPT = Path(__file__).parent.parent / "benchmarks" / "reproduce_paper.py"
_spec = importlib.util.spec_from_file_location("reproduce_paper", _SCRIPT)
reproduce_paper = importlib.util.module_from_spec(_spec)
sys.modules["reproduce_paper"] = reproduce_paper  # dataclasses look their module up there
_spec.loader.exec_module(reproduce_paper)


@pytest.fixture(scope="module")
def backbone_set(toy_backbone_dirs, tmp_path_factory) -> str:
    entries = [
        {"name_or_path": d, "revision": None, "license": "apache-2.0", "params_millions": None, "image_gflops": None}
        | {"note": "a toy CLIP trained in the tests"}
        for d in toy_backbone_dirs
    ]
    path = tmp_path_factory.mktemp("sets") / "toy-set.json"
    path.write_text(json.dumps({"description": "toy", "sources": "tests", "backbones": entries}))
    return str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy-colours")
    for split, per_class, seed in (("train", 4, 3), ("test", 5, 7)):
        data = toy_dataset(per_class=per_class, seed=seed)
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            folder = root / split / TOY_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    return str(root)


def test_parse_datasets(tmp_path):
    listed = tmp_path / "datasets.json"
    listed.write_text(json.dumps([{"id": "org/b", "test_split": "validation", "label_column": "fine_label"}]))
    specs = reproduce_paper.parse_datasets(["org/a", "org/c:train:val", str(listed)])
    assert [(s.id, s.train_split, s.test_split, s.label_column) for s in specs] == [
        ("org/a", "train", "test", None),
        ("org/c", "train", "val", None),
        ("org/b", "train", "validation", "fine_label"),
    ]
    with pytest.raises(ValueError, match="ID:TRAIN_SPLIT:TEST_SPLIT"):
        reproduce_paper.parse_datasets(["org/a:train"])
    listed.write_text(json.dumps([{"name": "org/b"}]))
    with pytest.raises(ValueError, match="must hold a JSON list of objects with 'id'"):
        reproduce_paper.parse_datasets([str(listed)])


def test_reproduce_on_local_data(backbone_set, image_folder, tmp_path):
    specs = reproduce_paper.parse_datasets([f"{image_folder}:train:test"])
    results = reproduce_paper.run(
        backbone_set, specs, shots=(2, 4), seeds=(0, 1), cache=FeatureCache(None), progress=False
    )
    assert [(r["shots"], r["seed"]) for r in results] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for result in results:
        assert result["test_images"] == 30 and result["best_single_backbone"] in result["backbones"]
        # The paper's claim, on toy backbones that disagree: the gate beats the best single backbone and averaging.
        assert result["gate"] > max(result["best single"], result["mean of logits"])
        assert result["gate"] <= result["oracle"]
    # Neither averaging nor the oracle is trained: the same for every k and seed.
    assert len({(r["mean of logits"], r["oracle"]) for r in results}) == 1

    markdown, data = reproduce_paper.write_results(backbone_set, results, tmp_path, command="test")
    assert (markdown.name, data.name) == ("reproduce_paper_toy-set.md", "reproduce_paper_toy-set.json")
    saved = json.loads(data.read_text())
    assert saved["runs"] == results
    assert [(row["shots"], row["seeds"]) for row in saved["table"]] == [(2, 2), (4, 2)]
    row = saved["table"][0]
    assert row["gate"] == pytest.approx((results[0]["gate"] + results[1]["gate"]) / 2)
    gain = 100 * (row["gate"] - row["best single"])
    assert f"| {image_folder} | 2 | 2 | {100 * row['best single']:.2f} |" in markdown.read_text()
    assert f"{gain:+.2f} |" in markdown.read_text()


def test_summary_averages_over_datasets():
    runs = [
        {"dataset": d, "shots": 1, "best single": b, "mean of logits": 0.5, "gate": g, "oracle": 0.9}
        for d, b, g in (("a", 0.4, 0.6), ("b", 0.6, 0.8))
    ]
    rows = reproduce_paper.summarise(runs)
    assert rows[-1]["dataset"] == "average"
    assert rows[-1]["gate"] == pytest.approx(0.7) and rows[-1]["best single"] == pytest.approx(0.5)
