"""The app's logic without a server: per-session gates over shared backbones, checked uploads, save, push and load."""

import dataclasses
import io
import json
import re
import shutil
import threading
import zipfile
from types import SimpleNamespace
from unittest import mock

import datasets
import httpx
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate
from clip_ensemble.app import service
from clip_ensemble.app.keeping import GATE_FOLDER
from clip_ensemble.app.service import SharedEnsemble
from clip_ensemble.app.sessions import GateStore, SessionGate
from clip_ensemble.app.wording import calibration_verdict, recorded_verdict, verdict
from clip_ensemble.data import labelled
from clip_ensemble.models.class_head import ClassHead
from clip_ensemble.sources import HubUnreachable
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

LABELS = ", ".join(TOY_CLASSES)


@pytest.fixture(scope="module")
def ensemble(toy_backbone_dirs) -> SharedEnsemble:
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=["cat", "dog"])
    return SharedEnsemble(model, hub_cache=FeatureCache(None))


@pytest.fixture(scope="module")
def calibrated(ensemble, toy_uploads) -> SessionGate:
    return ensemble.calibrate_uploads(SessionGate(), LABELS, [toy_uploads[name] for name in TOY_CLASSES])


@pytest.fixture(scope="module")
def probe(toy_uploads) -> str:
    return toy_uploads["teal"][0]


def test_builtin_loaders_never_reach_datasets(ensemble, monkeypatch):
    called = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: called.append(a))
    for name in ["imagefolder", "parquet", "arrow", "json"]:
        with pytest.raises(ValueError, match="builtin loaders are not accepted"):
            ensemble.calibrate_hub(SessionGate(), name, "train", 2)
        with pytest.raises(ValueError, match="builtin loaders are not accepted"):
            ensemble.evaluate_hub(SessionGate(), name, "train", 10)
    assert called == []


def test_before_calibration_the_gate_is_plain_averaging_and_says_so(ensemble, probe):
    prediction = ensemble.classify(SessionGate(), LABELS, probe, top_k=3)
    assert len(prediction.top) == 3 and set(prediction.top) <= set(TOY_CLASSES)
    assert list(prediction.gate_weights.values()) == pytest.approx([1 / 3] * 3)
    assert list(prediction.gate_weights) == ["toy-clip-0", "toy-clip-1", "toy-clip-2"]
    assert "not calibrated" in prediction.note and "the mean of logits" in prediction.note
    total = sum(ensemble.model.backbone_gflops)
    assert f"needed {len(ensemble.names)} of {len(ensemble.names)} backbones, {total:.3g} GFLOPs" in prediction.note
    assert [row["top label"] in TOY_CLASSES for row in prediction.backbones] == [True] * 3


def test_calibration_on_uploads_reports_and_records_it(calibrated):
    assert calibrated.calibrated and calibrated.calibration["dataset"] == "uploaded images"
    assert calibrated.calibration["shots"] == 3 and calibrated.calibration["images"] == 18
    assert "Calibrated on uploaded images: 3 shots per class" in calibrated.report
    assert "(18 images embedded)" in calibrated.report  # the backbone work done before the lock is counted


def test_backbones_that_differ_in_cost_get_a_cascade_and_classify_shows_each_images_cost(
    ensemble, calibrated, probe, toy_uploads, monkeypatch
):
    gflops = ensemble.model.backbone_gflops
    assert ensemble.costs_differ and max(gflops) >= service.COSTS_DIFFER * min(gflops)  # true of the toy backbones
    # 18 images cannot show a saving within one point (that takes 98): no cascade, and the report says why.
    assert calibrated.cascade is None and "No cascade: the backbones differ in cost" in calibrated.report
    assert "takes at least 98 calibration images; these are 18" in calibrated.report
    # Where they can (a tolerance of 0.1 needs 8 images), the cascade is fitted with the gate and kept by the session.
    uploads = [toy_uploads[name] for name in TOY_CLASSES]
    monkeypatch.setattr(service, "CASCADE_TOLERANCE", 0.1)
    with_cascade = ensemble.calibrate_uploads(SessionGate(), LABELS, uploads)
    assert with_cascade.cascade is not None and with_cascade.cascade["tolerance"] == 0.1
    assert with_cascade.cascade_weights and "Cascade (tolerance 0.1)" in with_cascade.report
    note = ensemble.classify(with_cascade, LABELS, probe).note
    assert re.search(r"This image needed \d of 3 backbones, [\d.e-]+ GFLOPs", note)
    monkeypatch.setattr(ensemble, "costs_differ", False)  # backbones of one cost: no cascade to fit, nothing said
    uniform = ensemble.calibrate_uploads(SessionGate(), LABELS, uploads)
    assert uniform.cascade is None and uniform.cascade_weights is None and "No cascade" not in uniform.report


def test_sessions_keep_their_own_gates_on_shared_backbones(ensemble, calibrated, probe):
    """Interleaved and concurrent requests of two sessions each get their own gate's answer."""
    plain = SessionGate()
    expected = {id(s): ensemble.classify(s, LABELS, probe) for s in (plain, calibrated)}
    assert expected[id(plain)].gate_weights != expected[id(calibrated)].gate_weights
    results, errors = [], []

    def classify(session):
        try:
            for _ in range(5):
                results.append((session, ensemble.classify(session, LABELS, probe)))
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=classify, args=(s,)) for s in (plain, calibrated, plain, calibrated)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20
    for session, prediction in results:
        assert prediction.gate_weights == pytest.approx(expected[id(session)].gate_weights)
        assert prediction.top == pytest.approx(expected[id(session)].top)


def test_classify_does_not_wait_for_another_sessions_calibration(ensemble, calibrated, toy_uploads, probe, monkeypatch):
    fitting, classified, result = threading.Event(), threading.Event(), {}
    real_calibrate = service.calibrate

    def slow_calibrate(*args, **kwargs):  # a calibration that goes on until a Classify has come back
        fitting.set()
        result["classify came back meanwhile"] = classified.wait(timeout=30)
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(service, "calibrate", slow_calibrate)
    uploads = [toy_uploads[name] for name in TOY_CLASSES]
    worker = threading.Thread(
        target=lambda: result.update(gate=ensemble.calibrate_uploads(SessionGate(), LABELS, uploads))
    )
    worker.start()
    assert fitting.wait(timeout=60)
    prediction = ensemble.classify(calibrated, LABELS, probe)  # had it waited for the calibration, it would hang here
    classified.set()
    worker.join(timeout=120)
    assert result["classify came back meanwhile"] and prediction.top
    assert result["gate"].calibrated and result["gate"].weights.keys() == calibrated.weights.keys()
    assert ensemble.classify(result["gate"], LABELS, probe).top == ensemble.classify(calibrated, LABELS, probe).top


def test_a_new_label_set_reuses_the_calibrated_gate(ensemble, calibrated, probe):
    prediction = ensemble.classify(calibrated, "teal, green, a dog", probe, top_k=5)
    assert set(prediction.top) == {"teal", "green", "a dog"} and "calibrated" in prediction.note


def test_bad_uploads_are_refused_by_name_and_the_gate_kept(
    ensemble, calibrated, toy_uploads, probe, tmp_path, monkeypatch
):
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    before = ensemble.classify(calibrated, LABELS, probe)
    files = [toy_uploads[name] for name in TOY_CLASSES]
    with pytest.raises(ValueError, match=r"'holiday.png' \(uploaded for 'green'\) is not an image .* keeps its gate"):
        ensemble.calibrate_uploads(calibrated, LABELS, [*files[:2], [*files[2], str(broken)], *files[3:]])
    with pytest.raises(ValueError, match="No images uploaded for 'blue'"):
        ensemble.calibrate_uploads(calibrated, LABELS, files[:4])
    monkeypatch.setattr(service, "MAX_IMAGES_PER_LABEL", 2)
    with pytest.raises(ValueError, match="3 images uploaded for 'red'; upload at most 2"):
        ensemble.calibrate_uploads(calibrated, LABELS, files)
    with pytest.raises(ValueError, match=r"'holiday.png' \(the image to classify\)"):
        ensemble.classify(calibrated, LABELS, str(broken))
    after = ensemble.classify(calibrated, LABELS, probe)
    assert after.gate_weights == pytest.approx(before.gate_weights) and after.top == pytest.approx(before.top)


def _toy_hub_dataset(*_, **__) -> datasets.Dataset:
    """What `datasets.load_dataset` returns for a Hub image dataset: an Image column and a ClassLabel column."""
    data = toy_dataset(per_class=6, seed=5)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(TOY_CLASSES))})
    return datasets.Dataset.from_dict({"image": data.images, "label": data.labels}, features=features)


def test_calibrate_and_evaluate_on_a_hub_dataset(ensemble, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _toy_hub_dataset)
    steps = []
    session, labels = ensemble.calibrate_hub(SessionGate(), "someone/colours", "train", 2, lambda *a: steps.append(a))
    assert labels == list(TOY_CLASSES)
    assert session.calibration["dataset"] == "someone/colours" and session.calibration["images"] == 12
    assert steps[0] == (0.0, "Loading someone/colours (train)") and steps[-1][0] == 1.0
    assert steps[-1][1].startswith("Training the gate: Kept the ")
    report = ensemble.evaluate_hub(session, "someone/colours", "test", max_images=20)
    assert len(report.labels) == 20
    table = report.table()
    assert table.startswith("someone/colours, a sample of 20 of 36 images (test): 20 images, 6 labels")
    assert "| gate |" in table and "| mean of logits |" in table and "oracle" in table
    whole = ensemble.evaluate_hub(session, "someone/colours", "test", max_images=100)
    assert whole.table().startswith("someone/colours (test): 36 images, 6 labels")


def test_hub_dataset_problems_name_the_fix(ensemble, monkeypatch, caplog):
    def unreachable(*_, **__):
        raise ConnectionError("Couldn't reach 'someone/colours' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"Could not load split 'train' of the Hub dataset 'someone/colours'.*id"):
        ensemble.calibrate_hub(SessionGate(), "someone/colours", "train", 2)

    # No Hub from the server: the visitor is told what they can do; the operator's fix goes to the log.
    def no_hub(repo_ids):
        raise HubUnreachable("Cannot reach the Hugging Face Hub ... set HF_HUB_OFFLINE=1; or pass local folders")

    monkeypatch.setattr(labelled, "require_hub", no_hub)
    with caplog.at_level("WARNING", logger=service.__name__), pytest.raises(ValueError) as error:
        ensemble.calibrate_hub(SessionGate(), "someone/colours", "train", 2)
    assert "cannot reach the Hugging Face Hub right now" in str(error.value) and "upload them" in str(error.value)
    assert "HF_HUB_OFFLINE" not in str(error.value) and "HF_HUB_OFFLINE=1" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(datasets, "load_dataset", _toy_hub_dataset)
    with pytest.raises(ValueError, match="shots=9 but class 'red' has only 6 images"):
        ensemble.calibrate_hub(SessionGate(), "someone/colours", "train", 9)
    with pytest.raises(ValueError, match="from 1 to 16"):
        ensemble.calibrate_hub(SessionGate(), "someone/colours", "train", 0)


def test_the_downloaded_zip_loads_with_from_pretrained(ensemble, calibrated, probe, tmp_path):
    archive = ensemble.save_zip(calibrated, LABELS, tmp_path / "out")
    assert archive == tmp_path / "out" / f"{GATE_FOLDER}.zip"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [archive.name]  # the unzipped folder is not left behind
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(name for name in zipped.namelist() if not name.endswith("/")) == [
            f"{GATE_FOLDER}/{name}" for name in ("README.md", "config.json", "gate.safetensors")
        ]
        zipped.extractall(tmp_path)
    loaded = CLIPEnsembleModel.from_pretrained(tmp_path / GATE_FOLDER)
    assert loaded.labels == list(TOY_CLASSES) and loaded.config.calibration == calibrated.calibration
    in_app = ensemble.classify(calibrated, LABELS, probe, top_k=6)
    [top] = loaded.classify([probe], top_k=6)
    assert {p["label"]: p["score"] for p in top} == pytest.approx(in_app.top)


def test_save_and_push_need_a_calibrated_gate(ensemble, tmp_path):
    with pytest.raises(ValueError, match="not calibrated yet"):
        ensemble.save_zip(SessionGate(), LABELS, tmp_path)
    with pytest.raises(ValueError, match="not calibrated yet"):
        ensemble.push(SessionGate(), LABELS, "me/gate", "hf_secret")


def test_push_uses_the_users_token_only_and_never_shows_it(ensemble, calibrated, monkeypatch):
    token = "hf_SeCrEt123"
    monkeypatch.setenv("HF_TOKEN", "hf_server_token")
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded.update(token=self.token, files={op.path_in_repo for op in operations})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message="",
            commit_description="",
            oid="abc",
        )

    with (
        mock.patch.object(HfApi, "create_repo", return_value=RepoUrl("https://huggingface.co/me/gate")),
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        assert ensemble.push(calibrated, LABELS, "me/gate", token) == "https://huggingface.co/me/gate/commit/abc"
        with pytest.raises(ValueError, match="Paste a Hugging Face access token"):
            ensemble.push(calibrated, LABELS, "me/gate", "  ")  # never the server's HF_TOKEN
    assert uploaded == {"token": token, "files": {"config.json", "gate.safetensors", "README.md"}}

    response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    refused = HfHubHTTPError(f"403 Forbidden: token {token} cannot write to me/gate", response=response)
    with mock.patch.object(HfApi, "create_repo", side_effect=refused), pytest.raises(ValueError) as error:
        ensemble.push(calibrated, LABELS, "me/gate", token)
    assert "Pushing to 'me/gate' failed: 403 Forbidden: token *** cannot write" in str(error.value)
    assert token not in str(error.value) and error.value.__suppress_context__  # no chained traceback shows it
    with pytest.raises(ValueError, match="not a repo id"):
        ensemble.push(calibrated, LABELS, "../etc", token)


def test_the_shared_head_cache_stays_bounded(ensemble, probe, monkeypatch):
    monkeypatch.setattr(service, "_HEAD_CACHE_SIZE", 2)
    for i in range(3):
        ensemble.classify(SessionGate(), f"red, label{i}", probe)
    assert [labels for labels, _ in ensemble.model._head_cache] == [("red", "label1"), ("red", "label2")]


def test_anonymous_sessions_never_evict_a_gate_and_only_idleness_expires_one(calibrated):
    now = [0.0]
    store = GateStore(max_gates=2, idle_s=60, clock=lambda: now[0])
    mine, other, third = (dataclasses.replace(calibrated) for _ in range(3))
    store.put("browser", mine)
    for i in range(520):  # a script's cheap requests under new session ids: they store nothing
        assert not store.get(f"script-{i}").calibrated
        store.put(f"script-{i}", SessionGate())
    assert store.get("browser") is mine and len(store) == 1
    store.put("browser-reloaded", mine)  # the same gate for a reloaded page counts once
    assert len(store) == 1
    store.put("other", other)
    with pytest.raises(ValueError, match="holds 2 calibrated gates already.*Nothing was changed"):
        store.put("third", third)  # refused: nobody's gate is dropped to make room
    assert store.get("browser") is mine and store.get("other") is other
    now[0] = 59.0
    assert store.get("browser") is mine  # used: its idle time starts again
    now[0] = 100.0
    assert store.get("browser") is mine
    expired = store.get("other")  # unused for 100 s > 60 s
    assert not expired.calibrated and "expired after" in expired.expired
    status = expired.describe()
    assert "expired" in status and "**not calibrated**" in status and "**calibrated**" not in status
    store.put("other", other)  # calibrating again clears the notice
    assert store.get("other") is other


def test_the_browser_copy_restores_the_gate_and_is_checked(ensemble, calibrated, probe):
    payload = json.loads(json.dumps(ensemble.to_browser(calibrated, "teal, red")))  # what localStorage holds
    restored, labels_text, problem = ensemble.from_browser(payload)
    assert problem == "" and labels_text == "teal, red"
    assert restored.labels == list(TOY_CLASSES) and restored.report == calibrated.report
    assert ensemble.classify(restored, LABELS, probe).top == ensemble.classify(calibrated, LABELS, probe).top
    payload["gate"]["backbones"][1]["embed_dim"] = 999
    broken, labels_text, problem = ensemble.from_browser(payload)
    assert not broken.calibrated and labels_text == "teal, red"
    assert "could not be restored" in problem and "999-d embeddings" in problem
    assert ensemble.from_browser(None)[0] == SessionGate()  # nothing kept yet
    only_labels = ensemble.to_browser(SessionGate(), "a, b")
    assert "gate" not in only_labels and ensemble.from_browser(only_labels)[1] == "a, b"


def test_a_downloaded_gate_loads_back_and_classifies_identically(ensemble, calibrated, probe, tmp_path):
    archive = ensemble.save_zip(calibrated, LABELS, tmp_path / "out")
    loaded = ensemble.load_gate([archive])
    assert loaded.labels == list(TOY_CLASSES) and loaded.calibration == calibrated.calibration
    assert "loaded from clip-ensemble-gate.zip" in loaded.describe()
    expected = ensemble.classify(calibrated, LABELS, probe)
    assert ensemble.classify(loaded, LABELS, probe).top == expected.top
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
    folder = tmp_path / GATE_FOLDER
    from_files = ensemble.load_gate([folder / "gate.safetensors", folder / "config.json"])
    assert ensemble.classify(from_files, LABELS, probe).top == expected.top
    with pytest.raises(ValueError, match=r"config.json and gate.safetensors \(and cascade.*\(got \['config.json'\]\)"):
        ensemble.load_gate([folder / "config.json"])


def _zip_with(config: dict, gate: bytes, path) -> str:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr(f"{GATE_FOLDER}/config.json", json.dumps(config))
        zipped.writestr(f"{GATE_FOLDER}/gate.safetensors", gate)
    return str(path)


def test_a_gate_for_other_backbones_is_refused_saying_which(ensemble, calibrated, tmp_path):
    archive = ensemble.save_zip(calibrated, LABELS, tmp_path / "out")
    with zipfile.ZipFile(archive) as zipped:
        config = json.loads(zipped.read(f"{GATE_FOLDER}/config.json"))
        gate = zipped.read(f"{GATE_FOLDER}/gate.safetensors")
    other = json.loads(json.dumps(config))
    other["backbones"][1]["name_or_path"] = "openai/clip-vit-base-patch32"
    with pytest.raises(
        ValueError,
        match=r"calibrated on 3 backbones .*: it needs 'openai/clip-vit-base-patch32', which is not loaded; "
        r"'toy-clip-1' is loaded but not in it\..*--backbones",
    ):
        ensemble.load_gate([_zip_with(other, gate, tmp_path / "a.zip")])
    wider = json.loads(json.dumps(config))
    wider["backbones"][0]["embed_dim"] += 8
    with pytest.raises(ValueError, match=r"'toy-clip-0' of the gate has \d+-d embeddings.*--backbones"):
        ensemble.load_gate([_zip_with(wider, gate, tmp_path / "b.zip")])
    fewer = {**config, "backbones": config["backbones"][:2]}
    with pytest.raises(ValueError, match="calibrated on 2 backbones .* but 3 are loaded .*'toy-clip-2' is loaded but"):
        ensemble.load_gate([_zip_with(fewer, gate, tmp_path / "c.zip")])
    pinned = json.loads(json.dumps(config))
    pinned["backbones"][2]["revision"] = "abc123"
    with (
        mock.patch.dict(ensemble.model.config.backbones[2], revision="def456"),
        pytest.raises(ValueError, match="needs 'toy-clip-2' at revision abc123, which is not loaded"),
    ):
        ensemble.load_gate([_zip_with(pinned, gate, tmp_path / "f.zip")])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ensemble.load_gate([_zip_with(config, b"not weights", tmp_path / "d.zip")])
    (tmp_path / "e.zip").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="'e.zip' is not a zip file"):
        ensemble.load_gate([tmp_path / "e.zip"])
    with pytest.raises(ValueError, match="not a Hub repo id"):
        ensemble.load_gate(repo_id="/etc")
    with pytest.raises(ValueError, match="Could not download the gate from the Hub repo 'me/gate'.*upload the"):
        ensemble.load_gate(repo_id="me/gate")  # offline in the tests


def test_a_gate_calibrated_on_the_same_backbones_in_another_order_loads_reordered(
    ensemble, toy_backbone_dirs, probe, tmp_path, monkeypatch
):
    # Calibrated on the backbones in reverse order, with a gate that depends on the image and a cascade.
    model = CLIPEnsembleModel.from_backbones(list(reversed(toy_backbone_dirs)), labels=list(TOY_CLASSES))
    calibrate(model, toy_dataset(per_class=8, seed=3), shots=8, cache=FeatureCache(None), cascade_tolerance=0.05)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.gate.fc2.weight, std=0.5)  # per-image weights, whatever calibration kept
    model.cascade.stop_margins = [None, None]  # no image stops early: the full gate decides
    model.set_cascade(model.cascade)
    model.save_pretrained(tmp_path / "plain")
    loaded = ensemble.load_gate(sorted((tmp_path / "plain").glob("*.*")))
    prediction = ensemble.classify(loaded, LABELS, probe)
    with torch.no_grad():
        expected = model(images=[probe])
    weights = dict(zip(model.config.backbone_names, expected.gate_weights[0].tolist()))  # by name
    assert prediction.gate_weights == pytest.approx(weights, abs=1e-5)
    probabilities = expected.logits.softmax(-1)[0]
    assert prediction.top == pytest.approx(
        {label: float(probabilities[TOY_CLASSES.index(label)]) for label in prediction.top}, abs=1e-4
    )

    model.cascade.stop_margins = [0.0, 0.0]  # every image stops after the cheapest backbone
    model.set_cascade(model.cascade)
    model.save_pretrained(tmp_path / "cascade")
    loaded = ensemble.load_gate([shutil.make_archive(str(tmp_path / "cascade"), "zip", root_dir=tmp_path / "cascade")])
    ran, _ = [], ensemble.model.backbone_gflops  # measured once (a forward per backbone), before recording
    for backbone in ensemble.model.backbones:
        monkeypatch.setattr(backbone, "encode_images", _recording(backbone.encode_images, backbone, ran))
    assert "needed 1 of 3 backbones" in ensemble.classify(loaded, LABELS, probe).note
    cheapest = model.config.backbone_names[model.cascade.order[0]]  # the same backbone, at another index
    assert ran == [ensemble.model.backbones[ensemble.names.index(cheapest)]]


def test_a_gate_used_with_new_labels_says_so_and_saves_its_own(ensemble, calibrated, probe, tmp_path):
    status = calibrated.describe(["cat", "dog"])
    assert "**calibrated**" in status and "calibrated on the labels red, orange" in status
    assert "now serves your current labels" in status
    assert "now serves" not in calibrated.describe(list(reversed(TOY_CLASSES)))  # the same labels, reordered
    archive = ensemble.save_zip(calibrated, "cat, dog", tmp_path)
    with zipfile.ZipFile(archive) as zipped:
        config = json.loads(zipped.read(f"{GATE_FOLDER}/config.json"))
        card = zipped.read(f"{GATE_FOLDER}/README.md").decode()
    assert config["labels"] == list(TOY_CLASSES) and config["calibration"] == calibrated.calibration
    assert "last used with other labels: cat, dog" in card
    assert "loaded from local folders" in card and "toy-clip-0" in card  # the toy backbones are local folders


def test_uploads_are_summed_up_before_calibration(ensemble, toy_uploads):
    files = [toy_uploads[name] for name in TOY_CLASSES]
    assert ensemble.upload_summary(LABELS, files).startswith("Images per label: 'red': 3, 'orange': 3")
    uneven = [files[0][:1], *files[1:]]
    assert "calibration takes 1 per label (as many as the smallest), so 10 image(s) will not be used" in (
        ensemble.upload_summary(LABELS, uneven)
    )
    assert "Still to upload: 'blue', 'purple'" in ensemble.upload_summary(LABELS, files[:4])
    gate = ensemble.calibrate_uploads(SessionGate(), LABELS, uneven)
    assert "1 images per label were used (as many as the smallest); 10 left out" in gate.report


def test_the_calibration_report_gives_its_verdict_first_and_a_loaded_gate_the_same(ensemble, calibrated, tmp_path):
    assert calibrated.report.startswith("Verdict: Kept the ")
    assert calibrated.report.index("Verdict") < calibrated.report.index("Details:")
    verdict_line = calibrated.report.split("\n\n")[0]
    assert re.search(r"of held-out images \(5-fold cross-validation on the \d+ calibration images", verdict_line)
    assert "plain averaging" not in calibrated.report and "cross-entropy)." in verdict_line  # no loss values
    own = SimpleNamespace(verdict=lambda: "Kept the mean of logits.")
    assert calibration_verdict(own) == "Verdict: Kept the mean of logits."
    kept = SessionGate(weights={}, calibration={"dataset": "x", "shots": 1, "images": 2, "chosen": "mean of logits"})
    assert "calibration kept the mean of logits: the gate did not beat it" in kept.describe()

    # Loaded back, the gate tells the same verdict from its record, then what it was calibrated on; never raw JSON.
    loaded = ensemble.load_gate([ensemble.save_zip(calibrated, LABELS, tmp_path / "out")])
    assert loaded.report.startswith(verdict_line) and "Calibration record:\n  dataset: " in loaded.report
    assert "{" not in loaded.report  # the record in words: no dict or JSON printed
    assert "  backbone accuracy: toy-clip-0 " in loaded.report
    assert recorded_verdict(None).startswith("Verdict: this gate came without a calibration record")
    edited = {**calibrated.calibration, "cross_validated_accuracy": "lots"}  # a record edited by hand
    assert recorded_verdict(edited).startswith(f"Verdict: {calibrated.calibration['why']}")
    odd = {**calibrated.calibration, "chosen": "{0} {best}"}  # braces in a record are text, not a template
    assert recorded_verdict(odd).startswith("Verdict: Kept {0} {best}. A richer combination")


def test_evaluate_on_a_zip_of_class_folders_with_a_verdict(ensemble, calibrated, tmp_path):
    data = toy_dataset(per_class=3, seed=21)
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            zipped.writestr(f"photos/{TOY_CLASSES[label]}/{i}.png", encoded.getvalue())
        zipped.writestr("photos/red/notes.txt", b"not counted")
        zipped.writestr("__MACOSX/photos/red/._0.png", b"resource fork")
    report = ensemble.evaluate_uploads(calibrated, "", archive=archive)
    assert len(report.labels) == 18 and sorted(report.label_names) == sorted(TOY_CLASSES)
    assert report.table().startswith(
        "images of mine.zip (2 other entries skipped: photos/red/notes.txt (not an image type (.bmp, "
    )
    assert "__MACOSX/photos/red/._0.png (a hidden or system file)): 18 images, 6 labels" in report.table()
    text = verdict(report)
    assert text.startswith("**Verdict on 18 images:** the gate scores")
    assert "the mean of logits" in text and "toy-clip-0" in text and "treat small differences as noise" in text
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zipped:
        zipped.writestr("1.png", b"x")
    with pytest.raises(ValueError, match="one folder of images per label"):
        ensemble.evaluate_uploads(calibrated, "", archive=tmp_path / "flat.zip")
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zipped:
        zipped.writestr("red/1.png", b"not a png")
        zipped.writestr("teal/2.png", b"not a png")
    with pytest.raises(ValueError, match="'red/1.png' in the zip is not an image"):
        ensemble.evaluate_uploads(calibrated, "", archive=tmp_path / "bad.zip")
    too_large = r"'\w+/0.png' in the zip is too large: 1,600 pixels, over the limit of 200 .*Resize it"
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 100), pytest.raises(ValueError, match=too_large):
        ensemble.evaluate_uploads(calibrated, "", archive=archive)  # 40 x 40 images: over twice Pillow's limit


def test_the_backbone_list_names_backbones_not_server_paths(ensemble, toy_backbone_dirs):
    text = ensemble.describe()
    assert "`toy-clip-0`" in text and "(a local folder)" in text
    assert all(folder not in text for folder in toy_backbone_dirs)


def _recording(encode, backbone, ran):
    def wrapped(*args, **kwargs):
        ran.append(backbone)
        return encode(*args, **kwargs)

    return wrapped


def test_a_gate_with_a_cascade_loads_runs_saves_and_survives_a_reload(
    ensemble, toy_backbone_dirs, probe, tmp_path, monkeypatch
):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    calibrate(model, toy_dataset(per_class=8, seed=3), shots=8, cache=FeatureCache(None), cascade_tolerance=0.05)
    model.cascade.stop_margins = [0.0, 0.0]  # every image stops after the cheapest backbone
    model.set_cascade(model.cascade)
    model.save_pretrained(tmp_path / "saved")
    archive = shutil.make_archive(str(tmp_path / "saved-gate"), "zip", root_dir=tmp_path / "saved")

    loaded = ensemble.load_gate([archive])
    assert loaded.cascade["stop_margins"] == [0.0, 0.0] and "With a cascade" in loaded.describe()
    ran, _ = [], ensemble.model.backbone_gflops  # measured once (a forward per backbone), before recording
    for backbone in ensemble.model.backbones:
        monkeypatch.setattr(backbone, "encode_images", _recording(backbone.encode_images, backbone, ran))
    prediction = ensemble.classify(loaded, LABELS, probe)
    monkeypatch.undo()
    assert "needed 1 of 3 backbones" in prediction.note
    first = model.cascade.order[0]  # only the cheapest backbone ran; the table says which did not
    assert ran == [ensemble.model.backbones[first]]
    skipped = [row for row in prediction.backbones if row["probability"] is None]
    assert len(skipped) == 2 and all("not run" in row["top label"] and row["gate weight"] == 0 for row in skipped)
    with torch.no_grad():
        expected = model(images=[probe])
    assert list(prediction.top)[0] == TOY_CLASSES[int(expected.logits.argmax())]
    assert "needed 3 of 3 backbones" in ensemble.classify(SessionGate(), LABELS, probe).note  # others: no cascade

    # Saved again by the app, and kept in the browser: the cascade goes along.
    again = ensemble.load_gate([ensemble.save_zip(loaded, LABELS, tmp_path / "out")])
    assert again.cascade["stop_margins"] == [0.0, 0.0]
    payload = json.loads(json.dumps(ensemble.to_browser(loaded, LABELS)))
    restored, _, problem = ensemble.from_browser(payload)
    assert problem == "" and "needed 1 of 3 backbones" in ensemble.classify(restored, LABELS, probe).note
    payload["gate"]["cascade"]["stop_margins"] = [-1.0, 0.0]
    broken, _, problem = ensemble.from_browser(payload)
    assert not broken.calibrated and "could not be restored" in problem and "stop margin -1.0" in problem

    # A config with a cascade needs its cascade.safetensors.
    folder = tmp_path / "saved"
    with pytest.raises(ValueError, match="the config has a cascade but no cascade.safetensors came with it"):
        ensemble.load_gate([folder / "config.json", folder / "gate.safetensors"])
    files = ensemble.load_gate([folder / "config.json", folder / "gate.safetensors", folder / "cascade.safetensors"])
    assert files.cascade["order"] == model.cascade.order


def test_a_gate_with_a_class_head_loads_serves_its_labels_in_any_order_and_saves_it(
    ensemble, toy_backbone_dirs, probe, tmp_path
):
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=list(TOY_CLASSES))
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(sum(model.embed_dims), 4, generator=generator)).Q
    weight = 5 * torch.randn(len(TOY_CLASSES), 4, generator=generator)
    model.set_class_head(ClassHead.of(basis, weight, torch.randn(len(TOY_CLASSES), generator=generator)), penalty=0.01)
    model.config.calibration = {"dataset": "toy", "chosen": "class head"}
    model.save_pretrained(tmp_path / "saved")
    archive = shutil.make_archive(str(tmp_path / "saved-gate"), "zip", root_dir=tmp_path / "saved")

    loaded = ensemble.load_gate([archive])
    assert loaded.class_head == {"penalty": 0.01, "rank": 4}
    with torch.no_grad():
        expected = dict(zip(TOY_CLASSES, model(images=[probe]).logits.softmax(-1)[0].tolist()))
    top = ensemble.classify(loaded, LABELS, probe, top_k=len(TOY_CLASSES)).top
    assert top == pytest.approx(expected, abs=1e-5)
    # The same labels in another order: the head's rows follow the labels.
    reversed_labels = ", ".join(reversed(TOY_CLASSES))
    assert ensemble.classify(loaded, reversed_labels, probe, top_k=len(TOY_CLASSES)).top == pytest.approx(
        expected, abs=1e-5
    )
    # Other labels: the gate carries over, the head does not, and the status says so.
    other = ensemble.classify(loaded, "teal, red", probe)
    assert "class head corrects those labels only" in other.note
    # Saved again by the app, and kept in the browser: the head goes along.
    again = ensemble.load_gate([ensemble.save_zip(loaded, LABELS, tmp_path / "out")])
    assert ensemble.classify(again, LABELS, probe, top_k=len(TOY_CLASSES)).top == pytest.approx(expected, abs=1e-5)
    restored, _, problem = ensemble.from_browser(json.loads(json.dumps(ensemble.to_browser(loaded, LABELS))))
    assert problem == "" and restored.class_head == loaded.class_head
    assert ensemble.classify(restored, LABELS, probe, top_k=len(TOY_CLASSES)).top == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="the config has a class head but no class_head.safetensors came with it"):
        ensemble.load_gate([tmp_path / "saved" / "config.json", tmp_path / "saved" / "gate.safetensors"])
