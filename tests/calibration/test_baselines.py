"""The baselines a user would pick instead of the gate: fitted on the support features only, deterministic, and
listed by `evaluate` when it is given the calibration data."""

import json

import pytest
import torch
from torch import nn

from clip_ensemble import CLIPEnsembleModel, evaluate
from clip_ensemble.calibration import baselines as baselines_module
from clip_ensemble.calibration.baselines import LINEAR_PROBE, STACKING, TIP_ADAPTER, _cache_terms, fit_baselines
from clip_ensemble.calibration.folds import Features, cross_validation_folds
from clip_ensemble.cli import main
from clip_ensemble.evaluation.report import write_report
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

WIDTHS = [6, 8, 5]
NAMES = [STACKING, LINEAR_PROBE, TIP_ADAPTER]
NUM_CLASSES = 5


def _features(shots: int, seed: int) -> Features:
    """Embeddings around class prototypes per backbone; each backbone's zero-shot head swaps a different pair of
    classes, so the zero-shot ensemble is imperfect and the support labels carry information."""
    generator = torch.Generator().manual_seed(123)  # the task: the same for every draw
    prototypes = [nn.functional.normalize(torch.randn(NUM_CLASSES, w, generator=generator), dim=-1) for w in WIDTHS]
    draw = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(shots)
    embeds, logits = [], []
    for b, (width, proto) in enumerate(zip(WIDTHS, prototypes)):
        image = nn.functional.normalize(proto[labels] + 0.4 * torch.randn(len(labels), width, generator=draw), dim=-1)
        order = torch.arange(NUM_CLASSES)
        order[[b, b + 1]] = order[[b + 1, b]]
        embeds.append(image)
        logits.append(50.0 * image @ proto[order].T)
    return Features(torch.cat(embeds, dim=-1), torch.stack(logits, dim=1), labels)


def _fit(support: Features):
    return fit_baselines(support, WIDTHS, [50.0, 50.0, 50.0], seed=0)


def test_each_baseline_is_deterministic_and_records_its_choice():
    support, test = _features(4, seed=0), _features(10, seed=1)
    first, second = _fit(support), _fit(support)
    assert list(first) == NAMES
    for name in NAMES:
        assert torch.equal(first[name].scores(test), second[name].scores(test))
        assert first[name].settings == second[name].settings and first[name].settings
        assert first[name].scores(test).shape == (len(test.labels), NUM_CLASSES)
    assert set(first[TIP_ADAPTER].settings) == {"alpha", "beta"}
    assert len(first[STACKING].settings["weights"]) == len(WIDTHS)
    assert first[LINEAR_PROBE].settings["rank"] == sum(WIDTHS)  # narrower than PROBE_RANK: the full probe


def test_baselines_use_only_the_support_features():
    support, test = _features(4, seed=0), _features(10, seed=1)
    fitted = _fit(support)
    relabelled_test = test._replace(labels=(test.labels + 1) % NUM_CLASSES)
    relabelled_support = _fit(support._replace(labels=(support.labels + 1) % NUM_CLASSES))
    for name in NAMES:
        scores = fitted[name].scores(test)
        assert torch.equal(scores, fitted[name].scores(relabelled_test))
        assert not torch.allclose(scores, relabelled_support[name].scores(test))


def test_baselines_beat_the_zero_shot_ensemble_on_held_out_features():
    support, test = _features(8, seed=0), _features(20, seed=1)
    mean_of_logits = (test.logits.mean(1).argmax(-1) == test.labels).float().mean()
    for name, baseline in _fit(support).items():
        accuracy = (baseline.scores(test).argmax(-1) == test.labels).float().mean()
        assert accuracy > mean_of_logits, name


def test_tip_adapter_with_alpha_zero_is_the_mean_of_logits(monkeypatch):
    monkeypatch.setattr(baselines_module, "TIP_ALPHAS", (0.0,))
    support, test = _features(2, seed=0), _features(3, seed=1)
    tip = baselines_module.fit_tip_adapter(support, WIDTHS, [50.0, 50.0, 50.0])
    assert tip.settings["alpha"] == 0.0
    assert torch.equal(tip.scores(test), test.logits.mean(1))


def test_one_shot_support_and_a_class_without_cache_entry():
    support = _features(1, seed=0)
    folds = cross_validation_folds(support.labels, 5, seed=0)
    assert all(len(set(support.labels[fold].tolist())) < NUM_CLASSES for fold in folds)  # folds miss classes
    fitted = _fit(support)
    assert all(fitted[name].scores(_features(2, seed=1)).isfinite().all() for name in NAMES)

    keys, key_labels = support.gate_inputs[1:], support.labels[1:]  # class 0 has no cache entry
    terms = _cache_terms(support.gate_inputs, keys, key_labels, NUM_CLASSES, WIDTHS, [50.0] * 3, [1.0, 5.5])
    assert terms.shape == (2, NUM_CLASSES, NUM_CLASSES)
    assert (terms[..., 0] == 0).all() and (terms[..., 1:] > 0).all()


def test_bad_widths_are_a_clear_error():
    with pytest.raises(ValueError, match="embed_dims"):
        fit_baselines(_features(2, seed=0), [6, 8], seed=0)
    with pytest.raises(ValueError, match="logit_scales"):
        fit_baselines(_features(2, seed=0), WIDTHS, [100.0], seed=0)


def test_evaluate_lists_the_baselines_fitted_on_the_calibration_images(toy_calibration, feature_cache, tmp_path):
    model, calibration = toy_calibration
    test_data = toy_dataset(per_class=30, seed=7)
    report = evaluate(model, test_data, support=calibration, cache=feature_cache, progress=False)
    top1 = {row["method"]: row["top1"] for row in report.rows()}
    for name in NAMES:
        assert 0.5 < top1[name] <= 1.0, (name, top1)  # 6 classes: chance is 1/6
    assert [m for m in report.ranked][-4:] == [*NAMES, "gate"]
    saved = report.to_dict()["baselines"]
    assert saved[TIP_ADAPTER]["settings"].keys() == {"alpha", "beta"} and saved[STACKING]["folds"] == 5

    # The same calibration images given as data: the same baselines.
    same = evaluate(model, test_data, support=calibration.support, cache=feature_cache, progress=False)
    assert same.rows() == report.rows() and same.baselines == report.baselines
    # Without support, the report is as before.
    plain = evaluate(model, test_data, cache=feature_cache, progress=False)
    assert not plain.baselines and "baselines" not in plain.to_dict()
    assert [row for row in report.rows() if row["method"] not in NAMES] == plain.rows()

    write_report(report, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Baselines fitted on the calibration data" in markdown and "cross-validation" in markdown
    assert f"| {TIP_ADAPTER} | alpha {report.baselines[TIP_ADAPTER]['settings']['alpha']}" in markdown
    assert json.loads((tmp_path / "report" / "results.json").read_text())["baselines"] == json.loads(
        json.dumps(report.baselines)
    )


def test_cli_evaluate_redraws_the_support_set(toy_calibration, toy_backbone_dirs, tmp_path, capsys):
    model, _ = toy_calibration
    model.save_pretrained(tmp_path / "gate")
    data = toy_dataset(per_class=5, seed=3)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        (tmp_path / "photos" / TOY_CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "photos" / TOY_CLASSES[label] / f"{i}.png")
    args = ["evaluate", str(tmp_path / "gate"), "--dataset", str(tmp_path / "photos"), "--cache-dir", str(tmp_path)]
    assert main([*args, "--support-split", "train", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in NAMES)
    assert set(json.loads((tmp_path / "r.json").read_text())["baselines"]) == set(NAMES)

    CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES)).save_pretrained(tmp_path / "raw")
    args[1] = str(tmp_path / "raw")
    assert main([*args, "--support-split", "train"]) == 2
    assert "never calibrated" in capsys.readouterr().err
