import json

import pytest

from clip_ensemble import CLIPEnsembleModel
from clip_ensemble.cli import main
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Toy images saved as `class/image.png`, the layout users keep their photos in."""
    root = tmp_path_factory.mktemp("photos")
    data = toy_dataset(per_class=6, seed=11)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / TOY_CLASSES[label]
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{i}.png")
    return root


def test_calibrate_evaluate_predict(toy_backbone_dirs, image_folder, tmp_path, capsys):
    output, cache = tmp_path / "gate", tmp_path / "cache"
    args = ["--dataset", str(image_folder), "--cache-dir", str(cache)]
    calibrate = ["calibrate", "--backbones", *toy_backbone_dirs, *args, "--shots", "2", "--eval-split", "test"]
    assert main([*calibrate, "--output", str(output)]) == 0
    assert "2 shots per class" in capsys.readouterr().out
    assert {p.name for p in output.iterdir()} == {"config.json", "gate.safetensors", "README.md"}
    assert "model-index:" in (output / "README.md").read_text()  # the evaluation, in the card
    assert CLIPEnsembleModel.from_pretrained(output).labels == sorted(TOY_CLASSES)

    assert main(["evaluate", str(output), *args, "--json", str(tmp_path / "r.json")]) == 0
    assert "| gate |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 36

    image = next((image_folder / "teal").iterdir())
    assert main(["predict", str(output), str(image), "--top-k", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[str(image)]
    assert len(predictions) == 2 and predictions[0]["label"] in TOY_CLASSES


def test_errors_exit_non_zero_with_the_fix(toy_backbone_dirs, image_folder, tmp_path, capsys):
    code = main(
        ["calibrate", "--backbones", toy_backbone_dirs[0], "--dataset", str(image_folder), "--shots", "9"]
        + ["--output", str(tmp_path / "gate"), "--cache-dir", str(tmp_path)]
    )
    assert code == 2
    assert "error: shots=9 but class 'blue' has only 6 images" in capsys.readouterr().err
    assert not (tmp_path / "gate").exists()
    assert main(["predict", str(tmp_path / "nothing-here"), "x.png"]) == 2
    assert "error:" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "clip-ensemble calibrate --backbones" in capsys.readouterr().out


def test_configs_lists_the_curated_sets(capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("openai-vit", "paper-openai-9", "laion-vit", "siglip", "small-cpu"))
    assert main(["configs", "nope"]) == 2
    assert "Unknown backbone set 'nope'" in capsys.readouterr().err


def test_calibrate_pushes_to_the_hub(toy_backbone_dirs, image_folder, tmp_path, capsys):
    from unittest import mock

    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    pushed = []

    def fake_create_commit(self, repo_id, operations, **kwargs):
        pushed.extend(op.path_in_repo for op in operations)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="", commit_description="", oid="1"
        )

    repo = RepoUrl("https://huggingface.co/me/toy-gate")
    with (
        mock.patch.object(HfApi, "create_repo", return_value=repo),
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        code = main(
            ["calibrate", "--backbones", *toy_backbone_dirs[:2], "--dataset", str(image_folder), "--shots", "1"]
            + [
                "--output",
                str(tmp_path / "gate"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--push-to-hub",
                "me/toy-gate",
            ]
        )
    assert code == 0 and sorted(pushed) == ["README.md", "config.json", "gate.safetensors"]
    assert "Pushed to https://huggingface.co/me/toy-gate/commit/1" in capsys.readouterr().out


def test_demo_runs_offline_on_the_digits_task(digits_backbone_dirs, tmp_path, capsys):
    workdir = digits_backbone_dirs[0].rsplit("/", 1)[0]  # trained by the fixture: the demo reuses them
    output = tmp_path / "demo-gate"
    assert main(["demo", "--shots", "2", "--output", str(output), "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert f"Using the cached digit backbones in {workdir}" in out and "Training" not in out
    assert "Before calibration" in out and "After calibration, on the 599 held-out digits" in out
    assert out.count("| oracle") == 2  # the evaluate table, before and after
    assert CLIPEnsembleModel.from_pretrained(output).labels == [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"
    ]  # fmt: skip
