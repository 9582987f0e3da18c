"""The cascade: cheapest backbones first, confident images stop early; fitted by calibrate, saved and loaded."""

import copy

import pytest
import torch

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate
from clip_ensemble.calibration.cascade_fitting import (
    _Answers,
    _folds_of,
    _judged_out_of_fold,
    _stage_training_views,
    fit_cascade,
    images_to_show_a_saving,
    run_on_features,
    stop_margins,
)
from clip_ensemble.calibration.fitting import fit_calibrated_gate
from clip_ensemble.calibration.folds import TRAIN_CLASSES, Features, OutOfFold, cross_validation_folds, training_view
from clip_ensemble.models.cascade import Cascade, cost_order
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.models.modeling_clip_ensemble import CASCADE_WEIGHTS_NAME, GATE_WEIGHTS_NAME
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset
from clip_ensemble.tasks.synthetic import hard_images_task


@pytest.fixture(scope="module")
def cascaded(toy_backbone_dirs):
    """A toy ensemble calibrated with a cascade at tolerance 0.05, and its calibration report."""
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    data = toy_dataset(per_class=8, seed=3)
    report = calibrate(model, data, shots=8, cache=FeatureCache(None), progress=False, cascade_tolerance=0.05)
    return model, report


@pytest.fixture(scope="module")
def test_images():
    return toy_dataset(per_class=6, seed=7).images


def _run(model, images, cascade):
    """Logits, GFLOPs and backbones run per image with `cascade` set on `model` (restored afterwards)."""
    saved = model.cascade, dict(model.config.cascade or {})
    model.set_cascade(cascade)
    try:
        with torch.no_grad():
            return model(images=images)
    finally:
        model.set_cascade(saved[0], **saved[1]) if saved[0] is not None else model.set_cascade(None)


def test_calibrate_fits_a_cascade_cheapest_first(cascaded):
    model, report = cascaded
    assert model.cascade.order == cost_order(model.backbone_gflops)
    assert [model.backbone_gflops[b] for b in model.cascade.order] == sorted(model.backbone_gflops)
    assert report.cascade is not None and report.cascade.tolerance == 0.05
    # The estimate honours the tolerance, and the saving is real on the calibration folds.
    assert report.cascade.full_accuracy - report.cascade.accuracy <= 0.05 + 1e-9
    assert report.cascade.mean_gflops <= report.cascade.full_gflops
    assert model.config.cascade["order"] == model.cascade.order
    assert model.config.calibration["cascade"]["tolerance"] == 0.05
    assert "Cascade (tolerance 0.05)" in str(report)


def test_tolerance_zero_gives_the_full_ensembles_predictions(toy_backbone_dirs, test_images):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    data = toy_dataset(per_class=4, seed=5)
    report = calibrate(model, data, shots=4, cache=FeatureCache(None), progress=False, cascade_tolerance=0)
    assert model.cascade is not None and report.cascade.risk is None
    assert model.cascade.stop_margins == [None] * (len(model.backbones) - 1)
    with torch.no_grad():
        cascade_out = model(images=test_images)
    model.set_cascade(None)
    with torch.no_grad():
        full_out = model(images=test_images)
    assert torch.equal(cascade_out.logits.argmax(-1), full_out.logits.argmax(-1))
    torch.testing.assert_close(cascade_out.logits, full_out.logits)
    assert torch.equal(cascade_out.gflops, full_out.gflops)
    assert full_out.gflops.tolist() == pytest.approx([sum(model.backbone_gflops)] * len(test_images))


def test_images_stopping_at_different_depths_get_the_logits_they_get_alone(cascaded, test_images):
    model, _ = cascaded
    # A threshold between the two middle margins of the first stage makes some images stop there and others go on,
    # with no image at the threshold itself (where a batch and a single image could round differently).
    with torch.no_grad():
        first = model.cascade.order[0]
        embeds = model.backbones[first].encode_images(model.processor(test_images)["pixel_values"][first])
        logits = model.logit_scales[first] * embeds @ model.zero_shot_heads[first].T
        top = logits.topk(2, dim=-1).values
        middle = (top[:, 0] - top[:, 1]).sort().values[len(test_images) // 2 - 1 : len(test_images) // 2 + 1]
        threshold = float(middle.mean())
    cascade = Cascade(model.embed_dims, model.cascade.order, [threshold, threshold], model.config.gate_hidden_size)
    cascade.load_state_dict(model.cascade.state_dict())
    batch = _run(model, test_images, cascade)
    assert len(set(batch.num_backbones_run.tolist())) >= 2, "the batch should stop at different depths"
    for i, image in enumerate(test_images):
        alone = _run(model, [image], cascade)
        assert alone.num_backbones_run.item() == batch.num_backbones_run[i].item()
        # Per image up to float32 batching: the backbones' matrix products may sum in another order in a batch.
        torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-5, atol=1e-5)
        assert alone.gflops.item() == batch.gflops[i].item()
    # Images that stopped early ran fewer backbones, paid less, and left the others' logits unset.
    early = batch.num_backbones_run < len(model.backbones)
    assert (batch.gflops[early] < sum(model.backbone_gflops)).all()
    assert torch.isnan(batch.per_backbone_logits[early][:, model.cascade.order[-1]]).all()


def test_cached_embeddings_replay_the_cascades_decisions(cascaded, test_images):
    model, _ = cascaded
    with torch.no_grad():
        from_pixels = model(images=test_images)
        embeds = model.encode_images(model.processor(test_images)["pixel_values"])
        from_embeds = model(image_embeds=embeds)
    assert torch.equal(from_pixels.num_backbones_run, from_embeds.num_backbones_run)
    assert torch.equal(from_pixels.gflops, from_embeds.gflops)
    torch.testing.assert_close(from_pixels.logits, from_embeds.logits, rtol=1e-5, atol=1e-5)


def test_a_cascade_saves_and_loads_exactly(cascaded, test_images, tmp_path):
    model, _ = cascaded
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", GATE_WEIGHTS_NAME, CASCADE_WEIGHTS_NAME, "README.md"}
    loaded = CLIPEnsembleModel.from_pretrained(tmp_path)
    assert loaded.config.cascade == model.config.cascade
    assert loaded.cascade.order == model.cascade.order
    assert loaded.cascade.stop_margins == model.cascade.stop_margins
    for name, tensor in model.cascade.state_dict().items():
        assert torch.equal(loaded.cascade.state_dict()[name], tensor), name
    with torch.no_grad():
        before, after = model(images=test_images), loaded(images=test_images)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.gflops, after.gflops)
    # Turned off, saved again: the cascade's file goes, and the loaded model runs every backbone.
    loaded.set_cascade(None)
    loaded.save_pretrained(tmp_path)
    assert not (tmp_path / CASCADE_WEIGHTS_NAME).exists()
    reloaded = CLIPEnsembleModel.from_pretrained(tmp_path)
    assert reloaded.cascade is None and reloaded.config.cascade is None


def test_a_cascade_whose_weights_are_missing_names_the_fix(cascaded, tmp_path):
    model, _ = cascaded
    model.save_pretrained(tmp_path)
    (tmp_path / CASCADE_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="no cascade.safetensors"):
        CLIPEnsembleModel.from_pretrained(tmp_path)


def test_classify_reports_cost_per_image(cascaded, test_images):
    model, _ = cascaded
    results = model.classify(test_images[:3], top_k=2, return_cost=True)
    names = model.config.backbone_names
    with torch.no_grad():
        out = model(images=test_images[:3])
    for result, gflops, count in zip(results, out.gflops, out.num_backbones_run):
        assert len(result["top"]) == 2 and result["top"][0]["label"] in TOY_CLASSES
        assert result["gflops"] == pytest.approx(float(gflops))
        assert result["backbones_run"] == [names[b] for b in model.cascade.order[: int(count)]]
    assert model.classify(test_images[:3], top_k=2) == [r["top"] for r in results]


@pytest.mark.parametrize("tolerance", [-0.01, 1.5, "0.01"])
def test_bad_tolerances_raise_before_anything_changes(toy_backbone_dirs, tolerance):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    gate = {name: tensor.clone() for name, tensor in model.gate.state_dict().items()}
    with pytest.raises(ValueError, match=r"cascade_tolerance=.*must be a fraction of top-1 in \[0, 1\)"):
        calibrate(
            model, toy_dataset(per_class=2, seed=3), shots=2, cache=FeatureCache(None), cascade_tolerance=tolerance
        )
    assert all(torch.equal(model.gate.state_dict()[name], tensor) for name, tensor in gate.items())
    assert model.config.calibration is None


def test_set_cascade_checks_what_it_is_given(cascaded):
    model, _ = cascaded
    with pytest.raises(TypeError, match="Cascade or None"):
        model.set_cascade({"order": [0, 1, 2]})
    with pytest.raises(ValueError, match="each of the 3 backbones once"):
        Cascade(model.embed_dims, [0, 0, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 margins >= 0"):
        Cascade(model.embed_dims, [0, 1, 2], [-1.0, None])
    with pytest.raises(ValueError, match="2 margins >= 0"):
        Cascade(model.embed_dims, [0, 1, 2], [1.0])


def test_evaluate_charts_accuracy_against_compute(cascaded, tmp_path):
    from clip_ensemble import evaluate
    from clip_ensemble.evaluation.report import write_report

    model, _ = cascaded
    report = evaluate(model, toy_dataset(per_class=5, seed=9), cache=FeatureCache(None), progress=False)
    kinds = {point["kind"] for point in report.compute}
    assert kinds == {"backbone", "subset", "full", "cascade"}
    full = next(p for p in report.compute if p["kind"] == "full")
    assert full["gflops"] == pytest.approx(sum(model.backbone_gflops))
    chosen = next(p for p in report.compute if p["method"].endswith("(chosen)"))
    # The chosen point is the model as it runs: the gate row of the same evaluation, at its mean cost.
    gate_row = next(row for row in report.rows() if row["method"] == report.gate_method)
    assert chosen["top1"] == pytest.approx(gate_row["top1"]) and chosen["gflops"] <= full["gflops"]
    assert model.cascade is not None and model.config.cascade["tolerance"] == 0.05  # left as it was
    write_report(report, tmp_path / "report")
    assert (tmp_path / "report" / "compute_accuracy.png").stat().st_size > 0
    assert "## Accuracy against compute" in (tmp_path / "report" / "report.md").read_text()


def _answers(margins: list[float], agree: list[bool]) -> tuple[OutOfFold, OutOfFold]:
    """A stage's and the full ensemble's out-of-fold answers on images with these stage margins, agreeing where
    `agree` says."""
    full = torch.zeros(len(margins), dtype=torch.long)
    stage = torch.where(torch.tensor(agree), full, full + 1)
    index = torch.arange(len(margins))
    return OutOfFold(index, stage, torch.tensor(margins)), OutOfFold(index, full, torch.full((len(margins),), 9.0))


def test_a_stage_stops_only_the_confident_images_that_agree_with_the_full_ensemble():
    # 300 images, margins 300..1: the 200 most confident agree with the full ensemble, the others do not.
    stage, full = _answers([float(m) for m in range(300, 0, -1)], [True] * 200 + [False] * 100)
    assert stop_margins([stage], full, risk=0.005) == [101.0]  # the agreeing 200: (0 + 1) / (200 + 2) < 0.005
    # A higher risk takes the largest group within it: 203 images, 3 of them changed, (3 + 1) / (203 + 2) < 0.02.
    assert stop_margins([stage], full, risk=0.02) == [98.0]
    # The +1/+2 prior: 20 agreeing images cannot show a change rate under 2% (1/22), 60 can (1/62).
    assert stop_margins(
        [_answers([1.0 * m for m in range(20, 0, -1)], [True] * 20)[0]], _answers([0.0] * 20, [True] * 20)[1], 0.02
    ) == [None]
    few, few_full = _answers([float(m) for m in range(60, 0, -1)], [True] * 60)
    assert stop_margins([few], few_full, 0.02) == [1.0]
    # A later stage only sees the images an earlier one let through.
    second, _ = _answers([float(m) for m in range(300, 0, -1)], [True] * 300)
    # At risk 0.005 the 100 images left are too few to show it ((0 + 1) / 102); at 0.01 the 99 left are enough.
    assert stop_margins([stage, second], full, risk=0.005) == [101.0, None]
    assert stop_margins([stage, second], full, risk=0.01) == [100.0, 1.0]


def _rows(answers: OutOfFold, keep: torch.Tensor) -> OutOfFold:
    return OutOfFold(answers.index[keep], answers.predictions[keep], answers.margins[keep])


def test_each_stopping_rule_is_judged_on_images_its_margins_were_not_fitted_on():
    # 300 images, margins 300..1: the 200 most confident agree with the full ensemble, then every third one does not.
    agree = [True] * 200 + [i % 3 > 0 for i in range(100)]
    stage, full = _answers([float(m) for m in range(300, 0, -1)], agree)
    folds = cross_validation_folds(torch.zeros(300, dtype=torch.long), 5, seed=0)
    stops, kept = _judged_out_of_fold(_folds_of(_Answers.of([stage], full), folds), risk=0.02)
    fold_margins = []
    for fold in folds:  # each fold stops as the margin fitted without it says
        held = torch.zeros(300, dtype=torch.bool)
        held[fold] = True
        (margin,) = stop_margins([_rows(stage, ~held)], _rows(full, ~held), 0.02)
        assert stops[held].tolist() == [0 if m >= margin else 1 for m in stage.margins[held].tolist()]
        fold_margins.append(margin)
    # Kept: the median of the five folds' margins, the rule that was judged.
    assert kept == [sorted(fold_margins)[2]]
    # A stage where most folds stop nothing keeps no margin: 20 images cannot show a 2% change rate.
    few, few_full = _answers([float(m) for m in range(20, 0, -1)], [True] * 20)
    few_folds = cross_validation_folds(torch.zeros(20, dtype=torch.long), 5, seed=0)
    assert _judged_out_of_fold(_folds_of(_Answers.of([few], few_full), few_folds), risk=0.02)[1] == [None]


def test_cached_features_give_the_models_own_cascade_answers(cascaded, test_images):
    model, _ = cascaded
    with torch.no_grad():
        embeds = model.encode_images(model.processor(test_images)["pixel_values"])
        out = model(image_embeds=embeds)
        features = Features(torch.cat(embeds, -1), model.zero_shot_logits(embeds), torch.zeros(len(embeds[0])))
    logits, run = run_on_features(model.cascade, model.gate, features, model.embed_dims)
    assert torch.equal(run, out.num_backbones_run)
    torch.testing.assert_close(logits, out.logits)


def test_fitting_a_cascade_reuses_calibrations_out_of_fold_answers(toy_backbone_dirs, monkeypatch):
    # Only the combinations of 2 .. B - 1 backbones are fitted: no fold is refitted for the stopping rule.
    import clip_ensemble.calibration.cascade_fitting

    calls = []
    fit = clip_ensemble.calibration.cascade_fitting.fit_calibrated_gate
    monkeypatch.setattr(
        clip_ensemble.calibration.cascade_fitting,
        "fit_calibrated_gate",
        lambda *a, **k: calls.append(1) or fit(*a, **k),
    )
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    calibrate(model, toy_dataset(per_class=4, seed=5), shots=4, cache=FeatureCache(None), cascade_tolerance=0.05)
    assert len(calls) == len(model.backbones) - 2


def test_the_stages_training_views_are_each_prefixs_own():
    # Taken in one pass for all the stages, the view of each prefix of the run order is `training_view` of its logits.
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(1100, 5, 3 * TRAIN_CLASSES, generator=generator)  # more than one block of 512 images
    labels = torch.randint(3 * TRAIN_CLASSES, (1100,), generator=generator)
    order = [3, 0, 4, 1, 2]
    views = _stage_training_views(logits, labels, order)
    assert len(views) == 3  # the stages of 2, 3 and 4 backbones
    for k, (view_logits, view_labels) in enumerate(views, start=2):
        own_logits, own_labels = training_view(logits[:, order[:k]], labels)
        assert torch.equal(view_logits, own_logits) and torch.equal(view_labels, own_labels)


def test_a_cascades_stages_are_fitted_as_calibration_fits_their_backbones_alone():
    # The stages read the logits once for every prefix: each is fitted as its backbones' own calibration would fit it
    # (here with more classes than the training view keeps).
    task = hard_images_task(num_classes=TRAIN_CLASSES + 4, pool_shots=8, test_per_class=1, seed=1)
    embeds = task.pool_embeds
    features = Features(torch.cat(embeds, -1), task.logits(embeds), task.pool_labels)
    dims, gflops = [e.shape[1] for e in embeds], [4.0, 1.0, 3.0, 2.0, 5.0]
    full = fit_calibrated_gate(EnsembleGate(dims), features, seed=2).out_of_fold
    cascade, report = fit_cascade(features, dims, gflops, full, tolerance=0.05, seed=2)
    for k in range(1, len(cascade.order) - 1):
        prefix = features.of_backbones(dims, cascade.order[: k + 1])
        gate = EnsembleGate([dims[b] for b in cascade.order[: k + 1]])
        choice = fit_calibrated_gate(gate, prefix, seed=2, per_image=False)
        assert choice.chosen == report.stage_choices[k]
        torch.testing.assert_close(cascade.gates[k].fc2.bias, gate.fc2.bias)


def test_gflops_given_as_integers_cost_what_the_same_floats_cost():
    # Costs typed by hand (`[4, 1, 3]`) once failed in torch's mean of an integer tensor.
    task = hard_images_task(num_classes=6, pool_shots=8, test_per_class=1, seed=1)
    features = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
    dims = [e.shape[1] for e in task.pool_embeds]
    full = fit_calibrated_gate(EnsembleGate(dims), features, seed=0).out_of_fold
    _, from_floats = fit_cascade(features, dims, [4.0, 1.0, 3.0, 2.0, 5.0], full, tolerance=0.05)
    _, from_integers = fit_cascade(features, dims, [4, 1, 3, 2, 5], full, tolerance=0.05)
    assert from_integers.mean_gflops == from_floats.mean_gflops and from_integers.full_gflops == 15.0


def test_a_cascades_stages_are_static_combinations_that_read_no_embeddings(cascaded):
    model, report = cascaded
    cascade = model.cascade
    assert all(cascade.is_static(k) for k in range(len(cascade.gates)))
    assert set(report.cascade.stage_choices) <= {"single backbone", "mean of logits", "best backbone", "static weights"}
    logits = torch.randn(4, 2, len(TOY_CLASSES))
    embeds = torch.randn(4, sum(model.embed_dims[b] for b in cascade.order[:2]))
    _, static_weights, _ = cascade.stage(1, None, logits)
    torch.testing.assert_close(static_weights, cascade.gates[1](embeds))  # what its hidden layer would have given


def test_a_cascade_that_never_stops_runs_as_the_full_ensemble(cascaded, test_images):
    model, _ = cascaded
    never = copy.copy(model.cascade)  # shares the stages; only the stop margins differ
    never.stop_margins = [None] * len(never.gates)
    out, plain = _run(model, test_images, never), _run(model, test_images, None)
    torch.testing.assert_close(out.logits, plain.logits)
    assert out.num_backbones_run.tolist() == [len(model.backbones)] * len(test_images)
    assert not out.per_backbone_logits.isnan().any()


def test_too_few_calibration_images_to_show_a_saving_say_how_many_would(toy_backbone_dirs):
    assert images_to_show_a_saving(0.01) == 98  # (0 + 1) / (98 + 2): no answer lost
    assert images_to_show_a_saving(0.01, lost_rate=0.005) == 196  # (0.98 + 1) / 198 <= 0.01
    assert images_to_show_a_saving(0.01, lost_rate=0.01) == float("inf")
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    report = calibrate(
        model, toy_dataset(per_class=4, seed=5), shots=4, cache=FeatureCache(None), cascade_tolerance=0.01
    ).cascade
    # A loss under 1% needs about 100 images behind it; some stopping rules lose no answer on these 24.
    assert report.risk is None and report.num_scored == 24 and report.images_needed == 98
    assert "never stops early (about 98 calibration images, 74 more, would show a saving" in str(report)
