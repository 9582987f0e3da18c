"""The app end to end: `python app.py` on 127.0.0.1 with the toy backbones, driven through gradio_client and through
a headless Chromium; and `app.main` on unreachable Hub backbones."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gradio
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import build_demo, hub_reachable, main, rebind_uploads
from clip_ensemble import CLIPEnsembleModel, FeatureCache
from clip_ensemble.app.keeping import GATE_FOLDER
from clip_ensemble.app.service import SharedEnsemble
from clip_ensemble.app.sessions import GateStore
from clip_ensemble.app.uploads import MAX_UPLOAD_LABELS
from clip_ensemble.tasks import TOY_CLASSES

REPO = Path(__file__).resolve().parents[2]
LABELS = ", ".join(TOY_CLASSES)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(args: list[str], folder: Path, timeout_s: float = 300) -> Iterator[str]:
    """`python app.py ARGS` on a free port of 127.0.0.1; yields its URL once it answers, stops it after."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), folder / "app.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", *args, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {timeout_s} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def app_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(toy_backbone_dirs, app_folder) -> Iterator[str]:
    with running_app(["--backbones", *toy_backbone_dirs, "--examples", "toy"], app_folder) as url:
        yield url


def test_the_api_names_every_input(app_url):
    info = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")
    calibrate = [p["parameter_name"] for p in info["named_endpoints"]["/calibrate_uploads"]["parameters"]]
    assert calibrate == ["labels_text"] + [f"images_{i + 1}" for i in range(MAX_UPLOAD_LABELS)]
    for endpoint in info["named_endpoints"].values():
        assert not any(p["parameter_name"].startswith("param_") for p in endpoint["parameters"])


def _uploads(toy_uploads: dict[str, list[str]]) -> list[list]:
    """The calibration upload boxes' values: one list of files per label, the spare boxes empty."""
    boxes = [[handle_file(path) for path in toy_uploads[name]] for name in TOY_CLASSES]
    return boxes + [[]] * (MAX_UPLOAD_LABELS - len(boxes))


def test_calibrate_classify_and_download_through_the_api(app_url, toy_backbone_dirs, toy_uploads, tmp_path):
    text = _page_text(app_url)  # the page lists the backbones by name, never their server paths
    assert all(f"`{Path(folder).name}`" in text and folder not in text for folder in toy_backbone_dirs)
    client = Client(app_url, verbose=False, download_files=str(tmp_path / "downloads"))
    probe = handle_file(toy_uploads["teal"][0])
    label, per_backbone, chart, note = client.predict(LABELS, probe, 6, api_name="/classify")
    assert "not calibrated" in note  # classification works before calibration, and says what it is
    assert [round(weight, 6) for _, weight in chart["data"]] == [round(1 / 3, 6)] * 3

    job = client.submit(LABELS, *_uploads(toy_uploads), api_name="/calibrate_uploads")
    report, status = job.result()
    updates, steps = job.communicator.updates, []  # every status update the job received, progress bar included
    while not updates.empty():
        steps += [(unit.desc, unit.progress) for unit in getattr(updates.get_nowait(), "progress_data", None) or []]
    # Progress moves with the work: the images embedded, then the gate's folds and training steps, to the end.
    assert steps[:2] == [("Embedding images: 0 of 18", 0.0), ("Training the gate", 0.0)]
    training = steps[2:]
    assert len(training) > 5 and all(desc.startswith("Training the gate: ") for desc, _ in training)
    assert any("5 folds together, step" in desc for desc, _ in training)
    assert [fraction for _, fraction in training] == sorted(fraction for _, fraction in training)
    # Into the gate's training steps (after 10% for static weights); the last updates may arrive after the result.
    assert training[-1][1] > 0.1
    assert "Calibrated on uploaded images: 3 shots per class" in report and "**calibrated**" in status
    label, per_backbone, chart, note = client.predict(LABELS, probe, 6, api_name="/classify")
    assert label["label"] in TOY_CLASSES and "**calibrated**" in note
    assert [row[0] for row in per_backbone["data"]] == [Path(folder).name for folder in toy_backbone_dirs]
    scores = {item["label"]: item["confidence"] for item in label["confidences"]}

    broken = tmp_path / "scan.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(AppError, match=r"'scan.png' \(uploaded for 'red'\) is not an image .* keeps its gate"):
        client.predict(LABELS, [handle_file(str(broken))], *_uploads(toy_uploads)[1:], api_name="/calibrate_uploads")
    again, *_ = client.predict(LABELS, probe, 6, api_name="/classify")
    assert again == label  # the session kept its calibrated gate

    archive = client.predict(LABELS, api_name="/download_gate")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
    [top] = CLIPEnsembleModel.from_pretrained(tmp_path / GATE_FOLDER).classify([toy_uploads["teal"][0]], top_k=6)
    assert {p["label"]: p["score"] for p in top} == pytest.approx(scores, abs=1e-6)

    # The downloaded gate uploads back into another session and classifies identically.
    other = Client(app_url, verbose=False)
    report, status = other.predict([handle_file(archive)], "", LABELS, api_name="/load_gate")
    assert "loaded from clip-ensemble-gate.zip" in status and "**calibrated**" in status
    assert other.predict(LABELS, probe, 6, api_name="/classify")[0] == label


def _page_text(url: str) -> str:
    """The Markdown texts of the running app's page."""
    config = httpx.get(f"{url}config", timeout=10).json()
    return "\n".join(str(c["props"].get("value")) for c in config["components"] if c["type"] == "markdown")


def test_each_client_has_its_own_gate(app_url, toy_uploads):
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    first.predict(LABELS, *_uploads(toy_uploads), api_name="/calibrate_uploads")
    *_, note = second.predict(LABELS, handle_file(toy_uploads["red"][0]), 3, api_name="/classify")
    assert "not calibrated" in note
    with pytest.raises(AppError, match="not calibrated yet"):
        second.predict(LABELS, api_name="/download_gate")


def _raw_call(url: str, api_name: str, data: list) -> str:
    """An API call as any HTTP client can make it, file inputs named by path (no upload): the server's answer."""
    event = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{api_name}/{event}", timeout=120).text


def test_no_server_file_is_served_read_or_fetched_and_big_uploads_are_refused(app_url, toy_backbone_dirs, app_folder):
    for path in [REPO / "app.py", Path(toy_backbone_dirs[0]) / "config.json", Path("/etc/passwd")]:
        assert httpx.get(f"{app_url}gradio_api/file={path}", timeout=10).status_code == 403
        answer = _raw_call(app_url, "classify", [LABELS, {"path": str(path), "meta": {"_type": "gradio.FileData"}}, 3])
        assert f"{path.name}: a path on the server was given, not an uploaded file" in answer
    url = {"path": "https://example.com/cat.png", "url": "https://example.com/cat.png"}
    answer = _raw_call(app_url, "classify", [LABELS, {**url, "meta": {"_type": "gradio.FileData"}}, 3])
    assert "this app does not fetch URLs" in answer
    client = Client(app_url, verbose=False)
    for name in ["imagefolder", "parquet", "arrow", "json", "./", "https://example.com/data"]:
        with pytest.raises(AppError, match="is not a Hub dataset id"):
            client.predict(name, "train", 2, api_name="/calibrate_hub")
    big = {"files": ("big.png", os.urandom(11_000_000), "image/png")}  # over the 10 MB limit
    assert httpx.post(f"{app_url}gradio_api/upload", files=big, timeout=60).status_code == 413
    assert "Traceback" not in (app_folder / "app.log").read_text()


def test_concurrent_classifies_of_one_image_all_succeed_and_corrupt_ones_say_why(
    app_url, toy_uploads, tmp_path, app_folder
):
    """Identical uploads share a cache path: 30 at once must all be read whole (an RGBA image is the case that
    `gr.Image` would convert and re-write in place). A corrupt or truncated image gets a message, no traceback."""
    from PIL import Image

    rgba = tmp_path / "teal.png"
    Image.open(toy_uploads["teal"][0]).convert("RGBA").save(rgba)
    client = Client(app_url, verbose=False)
    expected = client.predict(LABELS, handle_file(str(rgba)), 3, api_name="/classify")[0]
    jobs = [client.submit(LABELS, handle_file(str(rgba)), 3, api_name="/classify") for _ in range(30)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: job.result(timeout=300)[0], jobs))
    assert results == [expected] * 30

    truncated = tmp_path / "cut.png"
    truncated.write_bytes(rgba.read_bytes()[:60])
    broken = tmp_path / "scan.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for bad in (truncated, broken):
        with pytest.raises(AppError, match=rf"'{bad.name}' \(the image to classify\) is not an image that can be read"):
            client.predict(LABELS, handle_file(str(bad)), 3, api_name="/classify")
    assert "Traceback" not in (app_folder / "app.log").read_text()


def test_labels_edited_after_uploading_never_mislabel():
    boxes = [["r1.png", "r2.png"], ["t1.png"], ["b1.png"]]
    files, stash, notice = rebind_uploads(["red", "teal", "blue"], ["teal", "red", "blue"], boxes, {})
    assert files[:3] == [["t1.png"], ["r1.png", "r2.png"], ["b1.png"]] and stash == {}
    assert "The images of 'teal', 'red' moved with their label" in notice
    files, stash, notice = rebind_uploads(["teal", "red", "blue"], ["teal", "crimson", "blue"], files, stash)
    assert files[:3] == [["t1.png"], [], ["b1.png"]] and stash == {"red": ["r1.png", "r2.png"]}
    assert "2 image(s) of 'red' set aside: type 'red' again" in notice
    files, stash, _ = rebind_uploads(["teal", "crimson", "blue"], ["red", "teal", "blue"], files, stash)
    assert files[:3] == [["r1.png", "r2.png"], ["t1.png"], ["b1.png"]] and stash == {}
    assert len(files) == MAX_UPLOAD_LABELS and files[3:] == [[]] * (MAX_UPLOAD_LABELS - 3)


def test_an_expired_gate_is_reported_never_shown_as_calibrated(toy_backbone_dirs, toy_uploads, tmp_path):
    """Only idleness removes a gate from the server; then every answer says it expired (in this process, with a
    clock of the test's own)."""
    now = [0.0]
    model = CLIPEnsembleModel.from_backbones(toy_backbone_dirs, labels=["cat", "dog"])
    store = GateStore(idle_s=3600, clock=lambda: now[0])
    demo = build_demo(SharedEnsemble(model, hub_cache=FeatureCache(None)), tmp_path, store)
    demo.queue().launch(server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        _, status = client.predict(LABELS, *_uploads(toy_uploads), api_name="/calibrate_uploads")
        assert "**calibrated**" in status and len(store) == 1
        for _ in range(10):  # other sessions come and go: they store nothing and evict nothing
            Client(demo.local_url, verbose=False).predict(
                LABELS, handle_file(toy_uploads["red"][0]), 1, api_name="/classify"
            )
        assert (
            "**calibrated**" in client.predict(LABELS, handle_file(toy_uploads["red"][0]), 3, api_name="/classify")[3]
        )
        now[0] += 3601
        *_, note = client.predict(LABELS, handle_file(toy_uploads["red"][0]), 3, api_name="/classify")
        assert "expired after 1 h unused" in note and "**not calibrated**" in note and "**calibrated**" not in note
        with pytest.raises(AppError, match="expired after 1 h unused.*not calibrated yet"):
            client.predict(LABELS, api_name="/download_gate")
    finally:
        demo.close()


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium: apt-get install chromium")
def test_calibrate_reload_and_classify_in_a_browser(app_url, toy_uploads, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a busy machine: each step waits up to this long, none waits for nothing
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url)
        expect(page.locator("#status")).to_contain_text("not calibrated")  # the page has loaded
        page.fill("#labels textarea", LABELS)
        expect(page.locator("#upload-5")).to_contain_text("Images of 'purple' (0)")
        for i, name in enumerate(TOY_CLASSES):
            page.locator(f"#upload-{i} input[type=file]").set_input_files(toy_uploads[name])
            expect(page.locator(f"#upload-{i}")).to_contain_text(Path(toy_uploads[name][-1]).stem)
        expect(page.locator("#upload-5")).to_contain_text("Images of 'purple' (3)")
        # Reordering the labels after uploading moves the files with their label.
        page.fill("#labels textarea", "teal, " + LABELS.replace("teal, ", ""))
        expect(page.locator("#upload-0")).to_contain_text("Images of 'teal' (3)")
        expect(page.locator("#upload-0")).to_contain_text(Path(toy_uploads["teal"][0]).stem)
        expect(page.locator("#upload-3")).to_contain_text(Path(toy_uploads["green"][0]).stem)
        expect(page.locator("#upload-note")).to_contain_text("moved with their label")
        expect(page.locator("#preview-0 img")).to_have_count(3)  # thumbnails of the box's files
        page.click("#calibrate")
        expect(page.locator("#report textarea")).to_have_value(re.compile("^Verdict: "), timeout=120_000)
        expect(page.locator("#status")).to_contain_text("calibrated on uploaded images")
        page.screenshot(path=tmp_path / "calibrated.png", full_page=True)

        page.reload()  # the browser kept the labels, the gate and its report
        expect(page.locator("#status")).to_contain_text("calibrated on uploaded images", timeout=30_000)
        expect(page.locator("#labels textarea")).to_have_value(re.compile("^teal, red"))
        expect(page.locator("#report textarea")).to_have_value(re.compile("^Verdict: "))

        page.get_by_role("tab", name="Classify").click()
        page.locator("#classify-image input[type=file]").set_input_files(toy_uploads["teal"][0])
        page.click("#classify")
        expect(page.locator("#per-backbone")).to_contain_text("toy-clip-2", timeout=60_000)
        expect(page.locator("#prediction")).to_contain_text("%")
        expect(page.locator("#classify-note")).to_contain_text("calibrated on uploaded images")
        expect(page.locator("#gate-weights canvas, #gate-weights svg").first).to_be_visible()  # the chart is drawn
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
        for tab in ("Calibrate", "Classify", "Evaluate", "Save / load"):  # every tab on the screen, none behind "..."
            expect(page.get_by_role("tab", name=tab, exact=True)).to_be_in_viewport()

        page.get_by_role("tab", name="Calibrate", exact=True).click()
        broken = tmp_path / "scan.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        page.locator("#upload-0 input[type=file]").set_input_files(str(broken))
        page.click("#calibrate")
        error = page.get_by_text("'scan.png' (uploaded for 'teal') is not an image")
        expect(error).to_be_visible(timeout=60_000)
        expect(page.locator("#status")).to_contain_text("calibrated on uploaded images")
        page.wait_for_timeout(12_000)  # longer than Gradio's default of 10 s for an error toast
        expect(error).to_be_visible()  # it stays until the visitor closes it
        browser.close()
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("calibrated.png", "phone.png"))


def test_unreachable_backbones_show_the_problem_and_the_fix(monkeypatch):
    """Offline, the default Hub backbones cannot load: `app.main` still serves a page that says so, with the command
    that works (in this process, so that the server can be stopped after)."""
    launched, launch = [], gradio.Blocks.launch
    monkeypatch.setattr(
        gradio.Blocks,
        "launch",
        lambda self, **kw: launched.append(self) or launch(self, **kw, prevent_thread_lock=True),
    )
    main(["--port", str(_free_port())])
    [page] = launched
    try:
        text = _page_text(page.local_url)
    finally:
        page.close()
    assert "The backbones could not be loaded" in text and "openai/clip-vit-base-patch32" in text
    assert "The Hugging Face Hub cannot be reached from this machine" in text  # said at once, with the fix
    assert "python app.py --backbones DIR1 DIR2" in text
    assert "Traceback" not in text


def test_an_unreachable_hub_is_detected_without_retrying(monkeypatch):
    from huggingface_hub import constants

    assert not hub_reachable()  # HF_HUB_OFFLINE is set in the tests: no probe at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:  # a port nobody listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        assert not hub_reachable(timeout_s=30)
