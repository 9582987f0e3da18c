"""Feature extraction split over processes: the cache ends up holding every image, and calibration runs no backbone."""

import os
import subprocess
import sys
from unittest import mock

import pytest

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate
from clip_ensemble.backbones.transformers_backbone import TransformersBackbone
from clip_ensemble.data.extraction import extract_features
from clip_ensemble.data.features import image_fingerprint
from clip_ensemble.data.labelled import from_image_folder
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    data = toy_dataset(per_class=2, seed=21)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        (root / TOY_CLASSES[label]).mkdir(exist_ok=True)
        image.save(root / TOY_CLASSES[label] / f"{i}.png")
    return root


def cached_everywhere(cache_dir, backbone_dirs, data) -> bool:
    digests = [image_fingerprint(image) for image in data.images]
    cache = FeatureCache(cache_dir)
    return all(all(cache.contains(TransformersBackbone.from_pretrained(d), digests)) for d in backbone_dirs)


def test_two_processes_fill_one_cache_that_calibration_reads(backbone_dirs, image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "clip_ensemble.cli", "extract-features", "--backbones", *backbone_dirs[:2]]
    command += ["--dataset", str(image_folder), "--cache-dir", str(cache_dir), "--chunk-size", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 images x 2 backbones, 2 process(es)" in result.stdout
    assert "embedded per process: 6 in" in result.stdout  # images 0, 2, ... and 1, 3, ...
    # Each process wrote its own shards: 2 chunks of 4 + 2 images each, per backbone.
    assert len(list(cache_dir.glob("*/*.safetensors"))) == 2 * 2 * 2
    assert not list(cache_dir.glob("*/.*"))  # no partial file left

    data = from_image_folder(image_folder)
    assert cached_everywhere(cache_dir, backbone_dirs[:2], data)
    model = CLIPEnsembleModel.from_backbones(backbone_dirs[:2], labels=data.label_names)
    with mock.patch.object(TransformersBackbone, "encode_images", side_effect=AssertionError("forward pass")):
        report = calibrate(model, data, shots=2, cache=FeatureCache(cache_dir), progress=False)
    assert report.images_embedded == 0


def test_one_process_embeds_in_chunks_and_a_rerun_embeds_nothing(backbone_dirs, tmp_path):
    data = toy_dataset(per_class=1, seed=4)
    cache = FeatureCache(tmp_path)
    first = extract_features(backbone_dirs[:2], data, cache=cache, chunk_size=4, progress=False)
    assert (first.num_images, first.images_embedded, first.num_processes) == (6, [6], 1)
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2 * 2  # one shard per chunk and backbone, saved as done
    again = extract_features(backbone_dirs[:2], data, cache=FeatureCache(tmp_path), progress=False)
    assert again.images_embedded == [0]
    assert cached_everywhere(tmp_path, backbone_dirs[:2], data)


def test_a_cache_the_processes_do_not_share_is_reported(backbone_dirs, tmp_path):
    data = toy_dataset(per_class=1, seed=4)
    with (
        mock.patch.object(FeatureCache, "contains", lambda self, backbone, digests: [False] * len(digests)),
        pytest.raises(ValueError, match="6 of 6 images are missing .* Put --cache-dir on storage that every machine"),
    ):
        extract_features(backbone_dirs[:1], data, cache=FeatureCache(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"fills an on-disk cache; pass FeatureCache\(folder\)"):
        extract_features(backbone_dirs[:1], data, cache=FeatureCache(None))
    with pytest.raises(ValueError, match="chunk_size=0"):
        extract_features(backbone_dirs[:1], data, cache=FeatureCache(tmp_path), chunk_size=0)


def test_cli_calibrate_reads_bfloat16_features_extracted_before(backbone_dirs, image_folder, tmp_path, capsys):
    from clip_ensemble.cli import main

    common = ["--backbones", *backbone_dirs[:2], "--dataset", str(image_folder), "--cache-dir", str(tmp_path)]
    common += ["--dtype", "bfloat16"]
    assert main(["extract-features", *common]) == 0
    assert "embedded per process: 12 in" in capsys.readouterr().out
    # Cached per dtype: calibrating in bfloat16 on the CPU reads them all.
    assert main(["calibrate", *common, "--device-map", "cpu", "--shots", "2", "--output", str(tmp_path / "g")]) == 0
    assert "(0 images embedded)" in capsys.readouterr().out
