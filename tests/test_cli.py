import json
import os
import subprocess
import sys

import datasets
import pytest

from clip_ensemble import CLIPEnsembleModel
from clip_ensemble.cli import main
from clip_ensemble.data.labelled import load_labelled_data
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
    card = (output / "README.md").read_text()
    assert "model-index:" in card  # the evaluation, in the card
    assert "| backbone_accuracy: `" in card and "{'" not in card  # a dict setting as rows, not a Python dict
    assert CLIPEnsembleModel.from_pretrained(output).labels == sorted(TOY_CLASSES)

    benchmark = tmp_path / "clip-benchmark"
    evaluate = ["evaluate", str(output), *args, "--json", str(tmp_path / "r.json")]
    assert main([*evaluate, "--clip-benchmark-json", str(benchmark), "--clip-benchmark-dataset", "photos"]) == 0
    assert "| gate |" in capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["num_images"] == 36
    # One CLIP_benchmark file per method of the table, whatever methods it has.
    exported = [json.loads(p.read_text()) for p in sorted(benchmark.iterdir())]
    assert sorted(r["model"] for r in exported) == sorted(row["method"] for row in results["results"])
    assert {(r["dataset"], r["pretrained"]) for r in exported} == {("photos", str(output))}

    image = next((image_folder / "teal").iterdir())
    assert main(["predict", str(output), str(image), "--top-k", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)[str(image)]
    assert len(predictions) == 2 and predictions[0]["label"] in TOY_CLASSES


def test_a_label_map_and_a_save_to_disk_folder(toy_backbone_dirs, image_folder, tmp_path, capsys):
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"teal": "teal/cyan"}))  # a label that cannot be a folder name
    output, cache = tmp_path / "gate", ["--cache-dir", str(tmp_path / "cache")]
    calibrate = ["calibrate", "--backbones", *toy_backbone_dirs, "--dataset", str(image_folder), *cache]
    assert main([*calibrate, "--shots", "2", "--labels-json", str(label_map), "--output", str(output)]) == 0
    labels = CLIPEnsembleModel.from_pretrained(output).labels
    assert "teal/cyan" in labels and "teal" not in labels

    # The same images, as `datasets` saves a prepared split.
    data = load_labelled_data(image_folder, label_map={"teal": "teal/cyan"})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=data.label_names)})
    split = datasets.Dataset.from_dict({"image": data.images, "label": data.labels}, features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(tmp_path / "prepared")
    capsys.readouterr()
    assert main(["evaluate", str(output), "--dataset", str(tmp_path / "prepared"), "--split", "test", *cache]) == 0
    assert f"prepared: {len(split)} images" in capsys.readouterr().out

    # predict takes the same folder (its rows, named folder[i]) and folders of image files.
    teal = image_folder / "teal"
    assert main(["predict", str(output), str(tmp_path / "prepared"), str(teal), "--top-k", "1", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == len(split) + len(list(teal.iterdir()))
    assert list(predictions)[0] == f"{tmp_path / 'prepared'}[0]" and f"{tmp_path / 'prepared'}[35]" in predictions
    assert all(str(f) in predictions for f in teal.iterdir())
    assert main(["predict", str(output), str(tmp_path / "prepared"), "--split", "train"]) == 2
    assert "Split 'train' not found in" in capsys.readouterr().err

    label_map.write_text("[1, 2]")
    assert main([*calibrate, "--labels-json", str(label_map), "--output", str(tmp_path / "other")]) == 2
    assert "must hold one JSON object of folder name -> label" in capsys.readouterr().err


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


def test_missing_paths_and_mistyped_names_are_named_before_any_hub_call(
    toy_backbone_dirs, image_folder, tmp_path, capsys
):
    output = ["--output", str(tmp_path / "gate")]
    assert main(["calibrate", "--backbones", "openai-vitt", "--dataset", str(image_folder), *output]) == 2
    err = capsys.readouterr().err
    assert "'openai-vitt' is not a backbone set" in err and "Did you mean 'openai-vit'" in err
    assert "`clip-ensemble configs`" in err
    assert main(["calibrate", "--backbones", *toy_backbone_dirs, "--dataset", "./no-such-folder", *output]) == 2
    assert "The dataset folder './no-such-folder' does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--backbones", "./no-such-clip", toy_backbone_dirs[0], "--dataset", "x", *output]) == 2
    assert "The backbone folder './no-such-clip' does not exist" in capsys.readouterr().err
    assert main(["predict", "./no-such-gate", "x.png"]) == 2
    assert "The model folder './no-such-gate' does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--backbones", "org/a b", "--dataset", "x", *output]) == 2
    assert "neither an existing folder nor a valid Hub repo id" in capsys.readouterr().err
    assert main(["configs", "paper-openai"]) == 2
    assert "Did you mean 'paper-openai-9'" in capsys.readouterr().err
    assert not (tmp_path / "gate").exists()


def test_predict_classifies_every_readable_image_and_reports_the_others(
    toy_backbone_dirs, image_folder, tmp_path, capsys
):
    gate = tmp_path / "gate"
    CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES)).save_pretrained(gate)
    good = [str(next((image_folder / name).iterdir())) for name in ("red", "blue")]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images = [good[0], str(broken), good[1], str(tmp_path / "missing.jpg")]
    assert main(["predict", str(gate), *images, "--top-k", "1", "--json"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert list(results) == images  # in the order given
    assert all(results[path][0]["label"] in TOY_CLASSES for path in good)
    assert "could not be decoded" in results[str(broken)]["error"]
    assert "no file at" in results[str(tmp_path / "missing.jpg")]["error"]
    assert f"error: {broken}:" in captured.err and "2 of 4 images could not be read" in captured.err
    assert main(["predict", str(gate), good[0]]) == 0
    assert capsys.readouterr().out.startswith(f"{good[0]}: ")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_help_and_argument_errors_import_no_heavy_module():
    code = """
import sys
from clip_ensemble.cli import main
for argv in (["--help"], ["calibrate", "--help"], ["calibrate", "--shots", "x"]):
    try:
        main(argv)
    except SystemExit:
        pass
main(["calibrate", "--backbones", "openai-vitt", "--dataset", "./nothing", "--output", "out"])
main(["configs"])
heavy = ("torch", "transformers", "datasets", "accelerate", "open_clip")
print(sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "Did you mean 'openai-vit'" in result.stderr


def test_an_unreachable_hub_fails_at_once_with_the_offline_fix(tmp_path):
    # Online mode, with the Hub at a local port where nothing listens: refused at once, no retries.
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = _run_python(
        "from clip_ensemble.cli import main; raise SystemExit(main(['predict', 'me/gate', 'x.png']))", **env
    )
    assert result.returncode == 2
    assert "Cannot reach the Hugging Face Hub at http://127.0.0.1:9" in result.stderr
    assert "set HF_HUB_OFFLINE=1" in result.stderr


def test_the_readme_launch_command_splits_over_two_cpu_processes(backbone_dirs, image_folder, tmp_path):
    # `accelerate launch --multi_gpu --num_processes 2 -m clip_ensemble.cli extract-features ...`, on a CPU-only
    # machine: without --multi_gpu accelerate would start one process here.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["-m", "clip_ensemble.cli", "extract-features", "--backbones", backbone_dirs[0]]
    command += ["--dataset", str(image_folder), "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "36 images x 1 backbones, 2 process(es)" in result.stdout
    assert "embedded per process: 18 in" in result.stdout


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "clip-ensemble calibrate --backbones" in out
    # Continued example lines end with a backslash, as typed in a shell.
    assert "extract-features --backbones openai-vit \\\n      --dataset" in out


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


def test_set_resolution_spells_the_backbone_prefixes_as_the_backbones_do():
    from clip_ensemble.backbones import base, hub_configs

    assert (hub_configs.HF_HUB_PREFIX, hub_configs.LOCAL_DIR_PREFIX) == (base.HF_HUB_PREFIX, base.LOCAL_DIR_PREFIX)


def test_calibrate_within_a_budget_with_a_cascade_and_predict_shows_the_cost(
    toy_backbone_dirs, image_folder, tmp_path, capsys
):
    output = tmp_path / "gate"
    args = ["--dataset", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--shots", "4"]
    cheapest = sorted(CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=["a", "b"]).backbone_gflops)
    limit = f"{cheapest[0] + cheapest[1]:.6f}"  # room for the two cheapest backbones, not for all three
    budget = ["--budget-gflops", limit, "--cascade-tolerance", "0.05", "--eval-split", "test"]
    assert main(["calibrate", "--backbones", *toy_backbone_dirs, *args, *budget, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert (
        f"Budget {float(limit):.4g} GFLOPs/image: chose" in out
        and "Cascade (tolerance 0.05)" in out
        and "| gate |" in out
    )
    model = CLIPEnsembleModel.from_pretrained(output)
    assert len(model.backbones) < 3 and sum(model.backbone_gflops) <= float(limit)
    assert model.cascade is not None and model.config.cascade["tolerance"] == 0.05
    image = next((image_folder / "teal").iterdir())
    assert main(["predict", str(output), str(image)]) == 0
    printed = capsys.readouterr().out
    assert f"{image}: " in printed and f" of {len(model.backbones)} backbones, " in printed and " GFLOPs]" in printed
