"""Cost: measured GFLOPs per backbone, and budgeted subsets of an ensemble."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

from clip_ensemble import CLIPEnsembleModel, FeatureCache, TransformersBackbone
from clip_ensemble.backbones.hub_configs import load_hub_config
from clip_ensemble.calibration.selection import select_backbones
from clip_ensemble.models.cascade import cost_order
from clip_ensemble.models.cost import measure_gflops
from clip_ensemble.tasks import TOY_CLASSES, tiny_clip, toy_dataset


def test_backbone_gflops_are_measured_per_backbone_at_its_input_size(backbone_dirs):
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=["cat", "dog"])
    gflops = model.backbone_gflops
    # Backbone b (hidden 48, 36 px) does more work than a (hidden 32, 30 px); each figure is its own forward pass.
    assert gflops[1] > gflops[0] > 0 and len(set(gflops)) == 3
    for folder, backbone, measured in zip(backbone_dirs, model.backbones, gflops):
        # The same count as the plain (eager) attention gives: the fused kernel the model runs on is not counted
        # by the FLOP counter, so measuring must not depend on it.
        assert backbone.model.config._attn_implementation == "sdpa"
        eager = CLIPModel.from_pretrained(folder, attn_implementation="eager")
        size = backbone.processor.image_processor.crop_size["height"]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            eager.get_image_features(pixel_values=torch.zeros(1, 3, size, size))
        assert measured == counter.get_total_flops() / 1e9
    out = model(images=[torch.zeros(3, 40, 40).numpy().transpose(1, 2, 0).astype("uint8")])
    assert out.gflops.tolist() == pytest.approx([sum(gflops)])
    assert out.num_backbones_run.tolist() == [3]
    table = model.describe()
    assert "GFLOPs/image" in table and f"{gflops[1]:.3g}" in table and "36x36" in table


def test_a_vit_b32_measures_openclips_profile_figure():
    """The measurement agrees with OpenCLIP's profile table (hub_configs' image_gflops), 2 FLOPs per multiply-add."""
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig())  # ViT-B/32 shapes, no weights allocated
    _, processor = tiny_clip(image_size=224, patch_size=32)
    backbone = TransformersBackbone(clip, processor, "vit-b-32-shapes")
    profile = next(
        b["image_gflops"]
        for b in load_hub_config("openai-vit")["backbones"]
        if b["name_or_path"] == "openai/clip-vit-base-patch32"
    )
    assert measure_gflops(backbone) == pytest.approx(profile, rel=0.01)


def test_equal_costs_keep_the_configs_order():
    assert cost_order([2.0, 1.0, 2.0, 1.0]) == [1, 3, 0, 2]


@pytest.fixture(scope="module")
def toy_model(toy_backbone_dirs):
    return CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))


def test_select_backbones_calibrates_the_best_subset_within_budget(toy_model):
    gflops = toy_model.backbone_gflops
    budget = sorted(gflops)[0] + sorted(gflops)[1]  # room for the two cheapest, not for all three
    data = toy_dataset(per_class=6, seed=3)
    subset_model, report = select_backbones(
        toy_model, data, shots=6, budget_gflops=budget, cache=FeatureCache(None), progress=False
    )
    assert sum(subset_model.backbone_gflops) <= budget
    assert 1 <= len(subset_model.backbones) < len(toy_model.backbones)
    # No backbone loaded twice: the subset model holds the very modules of the full one.
    assert all(any(b is full for full in toy_model.backbones) for b in subset_model.backbones)
    assert subset_model.config.backbone_names == report.chosen
    weighed = [c for c in report.candidates if c["cv_accuracy"] is not None]
    assert weighed and all(c["gflops"] <= budget for c in report.candidates)
    assert report.subsets_within_budget == len(report.candidates)
    # The chosen subset has the best cross-validated top-1 of those weighed.
    chosen = next(c for c in weighed if c["subset"] == report.chosen)
    assert chosen["cv_accuracy"] == max(c["cv_accuracy"] for c in weighed)
    assert subset_model.config.calibration["backbone_selection"]["budget_gflops"] == budget
    assert report.calibration.cv_accuracy and "Budget" in str(report)


def test_a_budget_below_the_cheapest_backbone_names_the_fix(toy_model):
    cheapest = min(toy_model.backbone_gflops)
    with pytest.raises(ValueError, match=r"below the cheapest backbone .*raise the budget to at least"):
        select_backbones(toy_model, toy_dataset(per_class=2, seed=3), shots=2, budget_gflops=cheapest / 2)
    with pytest.raises(ValueError, match="must be a positive number"):
        select_backbones(toy_model, toy_dataset(per_class=2, seed=3), shots=2, budget_gflops=-1)


def test_cli_calibrate_within_a_budget(toy_model, toy_backbone_dirs, tmp_path, capsys):
    from clip_ensemble.cli import main

    data = toy_dataset(per_class=3, seed=11)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        (tmp_path / "photos" / TOY_CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "photos" / TOY_CLASSES[label] / f"{i}.png")
    cheapest = min(toy_model.backbone_gflops)
    args = ["calibrate", "--backbones", *toy_backbone_dirs, "--dataset", str(tmp_path / "photos"), "--shots", "3"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "gate")]
    assert main([*args, "--budget-gflops", str(cheapest * 1.01)]) == 0
    assert "Budget" in capsys.readouterr().out
    saved = CLIPEnsembleModel.from_pretrained(tmp_path / "gate")
    assert len(saved.backbones) == 1 and sum(saved.backbone_gflops) <= cheapest * 1.01
    assert "| GFLOPs/image |" in (tmp_path / "gate" / "README.md").read_text()
    assert main([*args, "--budget-gflops", str(cheapest / 2)]) == 2
    assert "raise the budget" in capsys.readouterr().err
