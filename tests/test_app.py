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
from contextlib import contextmanager
from pathlib import Path

import gradio
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import main
from clip_ensemble import CLIPEnsembleModel
from clip_ensemble.app_logic import GATE_FOLDER, MAX_UPLOAD_LABELS
from clip_ensemble.tasks import TOY_CLASSES

REPO = Path(__file__).resolve().parents[1]
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
def app_url(toy_backbone_dirs, tmp_path_factory) -> Iterator[str]:
    with running_app(["--backbones", *toy_backbone_dirs], tmp_path_factory.mktemp("app")) as url:
        yield url


def _uploads(toy_uploads: dict[str, list[str]]) -> list[list]:
    """The calibration upload boxes' values: one list of files per label, the spare boxes empty."""
    boxes = [[handle_file(path) for path in toy_uploads[name]] for name in TOY_CLASSES]
    return boxes + [[]] * (MAX_UPLOAD_LABELS - len(boxes))


def test_calibrate_classify_and_download_through_the_api(app_url, toy_backbone_dirs, toy_uploads, tmp_path):
    assert all(f"`{folder}`" in _page_text(app_url) for folder in toy_backbone_dirs)  # the page lists the backbones
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
    assert steps == [("Embedding images: 0 of 18", 0.0), ("Training the gate", 1.0)]
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


def test_no_server_file_is_served_and_big_uploads_are_refused(app_url, toy_backbone_dirs):
    for path in [REPO / "app.py", Path(toy_backbone_dirs[0]) / "config.json", Path("/etc/passwd")]:
        assert httpx.get(f"{app_url}gradio_api/file={path}", timeout=10).status_code == 403
    big = {"files": ("big.png", os.urandom(11_000_000), "image/png")}  # over the 10 MB limit
    assert httpx.post(f"{app_url}gradio_api/upload", files=big, timeout=60).status_code == 413


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium: apt-get install chromium")
def test_calibrate_and_classify_in_a_browser(app_url, toy_uploads, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url)
        page.fill("#labels textarea", LABELS)
        for i, name in enumerate(TOY_CLASSES):
            page.locator(f"#upload-{i} input[type=file]").set_input_files(toy_uploads[name])
            expect(page.locator(f"#upload-{i}")).to_contain_text(Path(toy_uploads[name][-1]).stem)
        expect(page.locator("#upload-5")).to_contain_text("Images of 'purple'")
        page.click("#calibrate")
        expect(page.locator("#report textarea")).to_have_value(
            # The report ends with the timings; the first line is enough to know calibration ran.
            re.compile("^Calibrated on uploaded images: 3 shots per class"),
            timeout=120_000,
        )
        expect(page.locator("#status")).to_contain_text("calibrated on uploaded images")
        page.screenshot(path=tmp_path / "calibrated.png", full_page=True)

        page.get_by_role("tab", name="Classify").click()
        page.locator("#classify-image input[type=file]").set_input_files(toy_uploads["teal"][0])
        page.click("#classify")
        expect(page.locator("#per-backbone")).to_contain_text("toy-clip-2", timeout=60_000)
        expect(page.locator("#prediction")).to_contain_text("%")
        expect(page.locator("#gate-weights canvas, #gate-weights svg").first).to_be_visible()  # the chart is drawn
        page.screenshot(path=tmp_path / "classified.png", full_page=True)

        page.get_by_role("tab", name="Calibrate", exact=True).click()
        broken = tmp_path / "scan.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        page.locator("#upload-0 input[type=file]").set_input_files(str(broken))
        page.click("#calibrate")
        expect(page.get_by_text("'scan.png' (uploaded for 'red') is not an image")).to_be_visible(timeout=60_000)
        expect(page.locator("#status")).to_contain_text("calibrated on uploaded images")
        page.screenshot(path=tmp_path / "refused.png", full_page=True)
        browser.close()
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("calibrated.png", "classified.png"))


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
    assert "python app.py --backbones DIR1 DIR2" in text
    assert "Traceback" not in text
