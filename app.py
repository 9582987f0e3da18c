"""The clip-ensemble demo: calibrate a gate over several CLIP backbones on a few labelled images, in the browser.

    python app.py                                   # the `small-cpu` set of public Hub backbones
    python app.py --backbones ./clip-a ./clip-b     # local folders, no Hub needed
    python app.py --backbones openai-vit --port 7861
    python app.py --backbones toy/toy-clip-* --examples toy   # the offline toy backbones, with example images

The page's logic lives in `clip_ensemble/app/`; this file only lays it out. Each browser session has its own
gate, kept on the server (only idleness removes it) and in the browser (a reload restores it); the backbones are
loaded once and shared.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import pandas as pd
from gradio import processing_utils
from gradio.exceptions import InvalidPathError
from gradio_client import utils as client_utils

from clip_ensemble.app.service import SharedEnsemble
from clip_ensemble.app.sessions import GateStore, SessionGate
from clip_ensemble.app.uploads import (
    MAX_HUB_IMAGES,
    MAX_IMAGES_PER_LABEL,
    MAX_SHOTS,
    MAX_UPLOAD_LABELS,
    parse_labels,
    split_labels,
)
from clip_ensemble.app.wording import verdict

DEFAULT_BACKBONES = ["small-cpu"]
DEFAULT_LABELS = "cat, dog, bird, car, flower"
MAX_FILE_SIZE = "10mb"
CONCURRENCY = 2  # events computing at once; the rest wait in the queue
QUEUE_SIZE = 64
UPLOADS_PER_ROW = 3
HUB_PROBE_S = 3.0  # how long `main` waits for the Hub before starting offline
# Gradio finds a progress parameter by this default and passes a tracker for the event in its place.
PROGRESS = gr.Progress()
INTRO = """# CLIP ensemble: few-shot calibration
Several CLIP backbones classify each image zero-shot; a small gate, calibrated on a few labelled images, weighs them
per image ([Synergy and Diversity in CLIP, arXiv:2405.17139](https://arxiv.org/abs/2405.17139)). Type your labels,
calibrate on a few images per label (or a Hub dataset), then classify. Your gate is yours alone: it is kept for this
browser (a reload restores it) until you download it or push it to the Hub."""
CSS = """
#classify-image img, .upload-preview img { image-rendering: pixelated; }
#classify-image img { width: 100%; height: 100%; object-fit: contain; }
@media (max-width: 640px) {
  .upload-row { flex-direction: column !important; }
  .upload-row > * { min-width: 100% !important; }
}
"""


def _shown(fn: Callable) -> Callable:
    """Bad input (ValueError, TypeError) becomes a message in the page and in the API's error, with no traceback in
    the log; the session state is left as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as error:
            # duration=None: the message stays until the visitor closes it, not ten seconds.
            raise gr.Error(html.escape(str(error), quote=False), duration=None, print_exception=False) from None

    return wrapper


def _undecoded(image: gr.Image) -> gr.Image:
    """`image` hands the function the uploaded file's path, undecoded.

    `gr.Image` decodes the upload before the function runs: a corrupt file then fails inside Gradio (a bare "Error",
    a traceback in the log), and a non-RGB image is converted and re-written in place, not atomically, to a path
    named by its content hash (`processing_utils.save_pil_to_cache`), which concurrent requests with the same image
    read half-written. The app decodes the file itself instead. (An instance attribute, not a subclass: Gradio writes
    a `.pyi` stub next to the module of every component subclass.)
    """
    image.preprocess = lambda payload: None if payload is None else payload.path
    return image


def _quiet(files: gr.File) -> gr.File:
    """`files` refuses a file type it does not take with a message, without a traceback in the log."""
    preprocess = files.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error as error:
            raise gr.Error(error.message, print_exception=False) from None

    files.preprocess = checked
    return files


def _file_payloads(data) -> list[dict]:
    found = []
    client_utils.traverse(data, found.append, client_utils.is_file_obj_with_meta)
    return found


def _refuse_server_files() -> None:
    """Make Gradio answer a file input that names a server path or a URL (possible through the API) with a message,
    instead of an empty error and a traceback in the log (path) or fetching the URL. Installed once per process."""
    original = processing_utils.async_move_files_to_cache
    if getattr(original, "_refuses_server_files", False):
        return

    async def guarded(data, block, postprocess=False, check_in_upload_folder=False, keep_in_cache=False):
        if not postprocess:
            for payload in _file_payloads(data):
                if any(client_utils.is_http_url_like(payload.get(key)) for key in ("path", "url")) and not str(
                    payload.get("path") or ""
                ).startswith(("/", ".")):
                    raise gr.Error(
                        "A URL was given for a file; this app does not fetch URLs. Upload the file itself "
                        "(gradio_client: handle_file('local/path.png')).",
                        print_exception=False,
                    )
        try:
            return await original(
                data,
                block,
                postprocess=postprocess,
                check_in_upload_folder=check_in_upload_folder,
                keep_in_cache=keep_in_cache,
            )
        except InvalidPathError:
            names = ", ".join(Path(str(p.get("path"))).name for p in _file_payloads(data)) or "a file"
            raise gr.Error(
                f"{html.escape(names)}: a path on the server was given, not an uploaded file; upload the file itself "
                "(gradio_client: handle_file('local/path.png')).",
                print_exception=False,
            ) from None

    guarded._refuses_server_files = True
    processing_utils.async_move_files_to_cache = guarded


def _download_dir(root: Path, max_age_s: float = 600) -> Path:
    """A fresh folder for one download; older ones were copied to Gradio's cache long ago and are removed."""
    for old in root.iterdir():
        if time.time() - old.stat().st_mtime > max_age_s:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def _box_title(label: str, files) -> str:
    return f"Images of '{label}' ({len(files or [])})"


def rebind_uploads(
    old_labels: list[str], new_labels: list[str], boxes: list, stash: dict[str, list]
) -> tuple[list, dict[str, list], str]:
    """The upload boxes after the labels changed from `old_labels` to `new_labels`: files follow their label.

    A label that is gone has its files set aside in `stash` (they come back if the label is typed again); a box never
    keeps files under another label's title. Returns the boxes' files, the new stash and a notice for the page.
    """
    held = {label: list(files or []) for label, files in zip(old_labels, boxes) if files}
    stash = {**stash}
    notices = []
    for label, files in held.items():
        if label not in new_labels[:MAX_UPLOAD_LABELS]:
            stash[label] = files
            notices.append(f"{len(files)} image(s) of '{label}' set aside: type '{label}' again to get them back.")
    files_now = []
    for label in new_labels[:MAX_UPLOAD_LABELS]:
        files = held.get(label) or stash.pop(label, None) or []
        files_now.append(files)
    files_now += [[]] * (MAX_UPLOAD_LABELS - len(files_now))
    moved = [
        label
        for i, label in enumerate(new_labels[:MAX_UPLOAD_LABELS])
        if label in held and (i >= len(old_labels) or old_labels[i] != label)
    ]
    if moved:
        notices.insert(0, f"The images of {', '.join(repr(m) for m in moved)} moved with their label.")
    return files_now, stash, " ".join(notices)


def _cell_updates(names: list[str], files_now: list[list], files_before: list) -> list:
    """Updates of the upload cells, their boxes and thumbnails for the labels `names` holding `files_now`: cells
    beyond the labels hidden; a box's value sent only when its files changed (an upload in progress is kept)."""
    cells, boxes, previews = [], [], []
    for i, files in enumerate(files_now):
        changed = files != list(files_before[i] or [])
        cells.append(gr.update(visible=i < len(names)))
        title = {"label": _box_title(names[i], files)} if i < len(names) else {}
        boxes.append(gr.update(**title, **({"value": files or None} if changed else {})))
        previews.append(gr.update(value=files) if changed else gr.update())
    return [*cells, *boxes, *previews]


def _browser_key(ensemble: SharedEnsemble) -> str:
    """Where the browser keeps the gate: one key per backbone set, so that a gate for other backbones is never
    offered here (it would be refused anyway)."""
    ids = "|".join(entry["name_or_path"] for entry in ensemble.model.config.backbones)
    return "clip-ensemble-gate-" + hashlib.sha256(ids.encode()).hexdigest()[:16]


def build_demo(
    ensemble: SharedEnsemble,
    downloads: Path,
    store: GateStore | None = None,
    examples: dict[str, list[str]] | None = None,
) -> gr.Blocks:
    """The page. `store` keeps the sessions' gates; `examples` (label -> image files) adds a one-click example."""
    store = GateStore() if store is None else store
    _refuse_server_files()

    def held(request: gr.Request) -> SessionGate:
        return store.get(request.session_hash)

    # Uploads and downloads leave Gradio's cache after two hours; no usage statistics are sent.
    with gr.Blocks(title="CLIP ensemble", delete_cache=(3600, 7200), analytics_enabled=False) as demo:
        # The browser's copy of the gate (encrypted in localStorage): a reload restores it.
        kept = gr.BrowserState(
            None,
            storage_key=_browser_key(ensemble),
            secret=os.environ.get("CLIP_ENSEMBLE_BROWSER_SECRET", _browser_key(ensemble)),
        )
        bound = gr.State(None)  # the labels the upload boxes hold files for, in order (None: the first titles)
        stash = gr.State({})  # label -> files set aside when the label was removed
        gr.Markdown(INTRO)
        with gr.Accordion("Backbones", open=False):
            gr.Markdown(ensemble.describe(), elem_id="backbones")
        labels = gr.Textbox(
            DEFAULT_LABELS, label="Labels", info="comma-separated or one per line", elem_id="labels", max_lines=6
        )
        status = gr.Markdown(SessionGate().describe(), elem_id="status")

        with gr.Tabs(overflow_behavior="wrap"):  # on a phone the tabs wrap: none hides behind "..."
            with gr.Tab("Calibrate", elem_id="calibrate-tab"):
                with gr.Tab("Upload images"):
                    gr.Markdown(
                        f"Upload a few images for each label (at most {MAX_UPLOAD_LABELS} labels, "
                        f"{MAX_IMAGES_PER_LABEL} images each, {MAX_FILE_SIZE} a file). The files stay with their label "
                        "when you edit the labels."
                    )
                    if examples:
                        use_example = gr.Button("Try the example: toy colour images", size="sm", elem_id="use-example")
                    boxes, previews, cells = [], [], []
                    box_names = [f"images_{i + 1}" for i in range(MAX_UPLOAD_LABELS)]  # the API's names for the boxes
                    first = split_labels(DEFAULT_LABELS)
                    for row in range(0, MAX_UPLOAD_LABELS, UPLOADS_PER_ROW):
                        with gr.Row(equal_height=True, elem_classes="upload-row"):
                            for i in range(row, min(row + UPLOADS_PER_ROW, MAX_UPLOAD_LABELS)):
                                # One cell per label: the files, titled with the label and their count, and thumbnails.
                                with gr.Column(visible=i < len(first), min_width=200) as cell:
                                    boxes.append(
                                        _quiet(
                                            gr.File(
                                                file_count="multiple",
                                                file_types=["image"],
                                                elem_id=f"upload-{i}",
                                                height=150,
                                                label=_box_title(first[i], []) if i < len(first) else None,
                                            )
                                        )
                                    )
                                    previews.append(
                                        gr.Gallery(
                                            show_label=False,
                                            columns=6,
                                            fit_columns=False,  # small thumbnails even for a few files
                                            height=130,
                                            object_fit="contain",
                                            allow_preview=False,
                                            interactive=False,
                                            elem_id=f"preview-{i}",
                                            elem_classes="upload-preview",
                                        )
                                    )
                                cells.append(cell)
                    upload_note = gr.Markdown(elem_id="upload-note")
                    calibrate_uploads = gr.Button("Calibrate on the uploads", variant="primary", elem_id="calibrate")
                with gr.Tab("Hub dataset"):
                    with gr.Row():
                        cal_dataset = gr.Textbox(label="Dataset id", placeholder="tanganke/eurosat")
                        cal_split = gr.Textbox("train", label="Split")
                        shots = gr.Slider(1, MAX_SHOTS, value=4, step=1, label="Images per label (k)")
                    calibrate_hub = gr.Button("Calibrate on the dataset", variant="primary")
                report = gr.Textbox(label="Calibration report", lines=12, interactive=False, elem_id="report")

            with gr.Tab("Classify", elem_id="classify-tab"):
                with gr.Row():
                    with gr.Column(min_width=240):
                        image = _undecoded(
                            gr.Image(type="filepath", label="Image", elem_id="classify-image", height=280)
                        )
                        top_k = gr.Slider(1, 10, value=5, step=1, label="Top k")
                        classify = gr.Button("Classify", variant="primary", elem_id="classify")
                        if examples:
                            gr.Examples(
                                [[files[-1]] for files in examples.values()], inputs=[image], label="Example images"
                            )
                    with gr.Column(min_width=240):
                        top = gr.Label(label="Ensemble", elem_id="prediction")
                        note = gr.Markdown(elem_id="classify-note")
                with gr.Row():
                    per_backbone = gr.Dataframe(label="Each backbone", interactive=False, elem_id="per-backbone")
                    weights = gr.BarPlot(
                        x="backbone",
                        y="weight",
                        label="Gate weights for this image",
                        y_lim=[0, None],
                        elem_id="gate-weights",
                    )

            with gr.Tab("Evaluate", elem_id="evaluate-tab"):
                with gr.Tab("Your images"):
                    gr.Markdown(
                        "Upload a zip with one folder of images per label (`cat/1.jpg`, `dog/2.png` ...; the folder names "
                        "are the labels). Use other images than the calibration ones."
                    )
                    eval_zip = _quiet(gr.File(label="Zip of class folders", file_types=[".zip"], elem_id="eval-zip"))
                    evaluate_zip = gr.Button("Evaluate on these images", variant="primary", elem_id="evaluate-zip")
                with gr.Tab("Hub dataset"):
                    with gr.Row():
                        eval_dataset = gr.Textbox(label="Dataset id", placeholder="tanganke/eurosat")
                        eval_split = gr.Textbox("test", label="Split")
                        max_images = gr.Number(
                            500, label="At most this many images", precision=0, minimum=1, maximum=MAX_HUB_IMAGES
                        )
                    evaluate = gr.Button("Evaluate", variant="primary")
                table = gr.Markdown(elem_id="evaluation")

            with gr.Tab("Save / load", elem_id="save-tab"):
                gr.Markdown(
                    "Download the calibrated gate (unzip, then `CLIPEnsembleModel.from_pretrained('clip-ensemble-gate')`; "
                    "the backbones load from their own repos) or push it to your Hub account. The zip carries the labels "
                    "and figures of the gate's own calibration."
                )
                download = gr.Button("Download the gate (.zip)", elem_id="download")
                archive = gr.File(label="Gate", interactive=False, elem_id="archive")
                with gr.Row():
                    repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-clip-gate")
                    token = gr.Textbox(label="Access token (write)", type="password", info="used for this push only")
                    private = gr.Checkbox(True, label="Private repo")
                push = gr.Button("Push to the Hub")
                pushed = gr.Markdown()
                gr.Markdown(
                    "**Load a gate back**: the downloaded zip (or its `config.json` and `gate.safetensors`), or a Hub "
                    "repo id. It must be for the backbones loaded here."
                )
                with gr.Row():
                    gate_files = _quiet(
                        gr.File(
                            label="Gate zip, or config.json + gate.safetensors",
                            file_count="multiple",
                            file_types=[".zip", ".json", ".safetensors"],
                            elem_id="gate-files",
                        )
                    )
                    gate_repo = gr.Textbox(label="or a Hub repo id", placeholder="your-name/my-clip-gate")
                load_gate = gr.Button("Load the gate", elem_id="load-gate")

        # The status line and the browser's copy always follow the gate the server holds for this session.
        def refresh(labels_text, request: gr.Request):
            return held(request).describe(split_labels(labels_text))

        def keep(labels_text, request: gr.Request):
            # The session id lets a reload share the gate the server still holds instead of storing a copy.
            return {**ensemble.to_browser(held(request), labels_text), "session": request.session_hash}

        def on_load(payload, labels_text, request: gr.Request):
            gate, kept_labels, problem = held(request), None, ""
            if not gate.calibrated:
                restored, kept_labels, problem = ensemble.from_browser(payload)
                earlier = store.peek(payload.get("session")) if isinstance(payload, dict) else None
                if restored.calibrated and earlier is not None and earlier.report == restored.report:
                    restored = earlier  # the same gate, still held for the earlier page
                if restored.calibrated:
                    try:
                        store.put(request.session_hash, restored)
                        gate = restored
                    except ValueError as error:
                        problem = f"The gate kept in this browser could not be restored: {error}"
            text = gate.describe(split_labels(kept_labels or labels_text))
            # The typed labels are only replaced by the ones this browser kept (a user may have typed meanwhile).
            return kept_labels or gr.update(), f"{problem} {text}" if problem else text, gate.report

        demo.load(on_load, [kept, labels], [labels, status, report], api_visibility="private")

        def on_labels(text, old, aside, *files):
            new = split_labels(text)
            old = first if old is None else old
            files_now, aside, notice = rebind_uploads(old, new, list(files), aside)
            # A box's value is only sent when its files changed, so that an upload in progress is never overwritten.
            return (
                *_cell_updates(new, files_now, files),
                new[:MAX_UPLOAD_LABELS],
                aside,
                f"{notice} {ensemble.upload_summary(text, files_now)}".strip(),
            )

        labels.change(
            on_labels,
            [labels, bound, stash, *boxes],
            [*cells, *boxes, *previews, bound, stash, upload_note],
            api_visibility="private",
        ).then(refresh, labels, status, api_visibility="private")
        labels.blur(keep, labels, kept, api_visibility="private")

        for i, (box, preview) in enumerate(zip(boxes, previews)):

            def on_files(text, files, *all_files, i=i):
                names = split_labels(text)
                title = gr.update(label=_box_title(names[i], files)) if i < len(names) else gr.update()
                return title, list(files or []), ensemble.upload_summary(text, all_files)

            for event in (box.upload, box.delete, box.clear):
                event(on_files, [labels, box, *boxes], [box, preview, upload_note], api_visibility="private")

        @_shown
        def on_calibrate_uploads(labels_text, boxes_labels, request: gr.Request, progress=PROGRESS, **uploads):
            # The upload boxes come by name (images_1, images_2, ...: the API's names for them).
            uploads = [uploads[name] for name in box_names]
            if boxes_labels is not None and boxes_labels != split_labels(labels_text)[:MAX_UPLOAD_LABELS]:
                raise ValueError("The upload boxes are still following the labels you edited; click Calibrate again.")
            gate = ensemble.calibrate_uploads(held(request), labels_text, uploads, progress)
            store.put(request.session_hash, gate)
            return gate.report, gate.describe(split_labels(labels_text))

        @_shown
        def on_calibrate_hub(dataset, split, k, request: gr.Request, progress=PROGRESS):
            gate, label_names = ensemble.calibrate_hub(held(request), dataset, split, int(k), progress)
            store.put(request.session_hash, gate)
            return gate.report, gate.describe(label_names), ", ".join(label_names)

        @_shown
        def on_classify(labels_text, image_file, k, request: gr.Request):
            prediction = ensemble.classify(held(request), labels_text, image_file, int(k))
            rows = pd.DataFrame(prediction.backbones)
            rows["probability"] = rows["probability"].map(lambda p: "" if pd.isna(p) else f"{p:.1%}")
            rows["gate weight"] = rows["gate weight"].map("{:.3f}".format)
            chart = pd.DataFrame(
                {"backbone": list(prediction.gate_weights), "weight": list(prediction.gate_weights.values())}
            )
            return prediction.top, rows, chart, prediction.note

        @_shown
        def on_evaluate(dataset, split, limit, request: gr.Request, progress=PROGRESS):
            result = ensemble.evaluate_hub(held(request), dataset, split, int(limit or 0), progress)
            return f"{verdict(result)}\n\n{result.table()}"

        @_shown
        def on_evaluate_zip(zip_file, request: gr.Request, progress=PROGRESS):
            if not zip_file:
                raise ValueError("Upload a zip with one folder of images per label.")
            result = ensemble.evaluate_uploads(held(request), "", archive=zip_file, progress=progress)
            return f"{verdict(result)}\n\n{result.table()}"

        @_shown
        def on_download(labels_text, request: gr.Request):
            return str(ensemble.save_zip(held(request), labels_text, _download_dir(downloads)))

        @_shown
        def on_push(labels_text, repo, access_token, is_private, request: gr.Request):
            url = ensemble.push(held(request), labels_text, repo, access_token, is_private)
            return f"Pushed: {url}", ""  # the token box is cleared

        @_shown
        def on_load_gate(files, repo, labels_text, request: gr.Request):
            gate = ensemble.load_gate(files or [], repo)
            store.put(request.session_hash, gate)
            return gate.report, gate.describe(split_labels(labels_text))

        def then_keep(event):
            """After a gate-changing event succeeds, the browser keeps the new gate; the status follows in any case."""
            event.success(keep, labels, kept, api_visibility="private")
            event.then(refresh, labels, status, api_visibility="private")

        then_keep(
            calibrate_uploads.click(
                on_calibrate_uploads,
                [labels, bound],
                [report, status],
                inputs_kwargs=dict(zip(box_names, boxes)),
                api_name="calibrate_uploads",
            )
        )
        then_keep(
            calibrate_hub.click(
                on_calibrate_hub, [cal_dataset, cal_split, shots], [report, status, labels], api_name="calibrate_hub"
            )
        )
        then_keep(
            load_gate.click(on_load_gate, [gate_files, gate_repo, labels], [report, status], api_name="load_gate")
        )
        classify.click(
            on_classify, [labels, image, top_k], [top, per_backbone, weights, note], api_name="classify"
        ).then(refresh, labels, status, api_visibility="private")
        evaluate.click(on_evaluate, [eval_dataset, eval_split, max_images], table, api_name="evaluate").then(
            refresh, labels, status, api_visibility="private"
        )
        evaluate_zip.click(on_evaluate_zip, [eval_zip], table, api_name="evaluate_uploads").then(
            refresh, labels, status, api_visibility="private"
        )
        download.click(on_download, labels, archive, api_name="download_gate").then(
            refresh, labels, status, api_visibility="private"
        )
        push.click(on_push, [labels, repo_id, token, private], [pushed, token], api_name="push_to_hub")
        if examples:

            def on_example():
                names = list(examples)
                files = [f[:-1] for f in examples.values()] + [[]] * (MAX_UPLOAD_LABELS - len(names))
                text = ", ".join(names)
                updates = _cell_updates(names, files, [None] * MAX_UPLOAD_LABELS)
                return text, *updates, names, ensemble.upload_summary(text, files)

            use_example.click(
                on_example, None, [labels, *cells, *boxes, *previews, bound, upload_note], api_visibility="private"
            )
    return demo


def toy_examples(folder: Path, per_class: int = 4) -> dict[str, list[str]]:
    """Toy colour images (the task of the toy backbones) saved as PNG files, scaled up for viewing: label -> files.
    The last file of each label is the Classify example; the others are for calibration."""
    from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

    folder.mkdir(parents=True, exist_ok=True)
    data = toy_dataset(per_class=per_class, seed=101)
    files: dict[str, list[str]] = {name: [] for name in TOY_CLASSES}
    for i, (picture, label) in enumerate(zip(data.images, data.labels)):
        path = folder / f"{TOY_CLASSES[label]}-{i}.png"
        picture.save(path)
        files[TOY_CLASSES[label]].append(str(path))
    return files


def build_problem_page(problem: str, backbones: list[str], offline: bool = False) -> gr.Blocks:
    """The page shown when the backbones could not be loaded: the problem and how to start the app instead."""
    cause = (
        "**The Hugging Face Hub cannot be reached from this machine** (or `HF_HUB_OFFLINE` is set), and the backbones "
        "are not in the local cache.\n\n"
        if offline
        else ""
    )
    fix = f"""## The backbones could not be loaded

{cause}Tried `{" ".join(backbones)}`:

```
{problem}
```

**Fixes.** If the Hub cannot be reached from this machine, start the app on CLIP folders saved on disk (each holds a
transformers CLIP model and its processor, e.g. from `CLIPModel.from_pretrained(...).save_pretrained(DIR)`), or on
the offline toy backbones (`clip-ensemble demo --workdir toy`):

```
python app.py --backbones DIR1 DIR2
python app.py --backbones toy/toy-clip-* --examples toy
```

Otherwise check the repo ids (`clip-ensemble configs` lists the curated sets), log in with `hf auth login` for gated
repos, or install the `[open-clip]` extra for `hf-hub:` backbones."""
    with gr.Blocks(title="CLIP ensemble: no backbones", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        gr.Markdown(fix, elem_id="problem")
    return page


def hub_reachable(timeout_s: float = HUB_PROBE_S) -> bool:
    """Whether the Hub answers a TCP connection within `timeout_s` (False at once under HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    answer = []

    def probe():  # DNS can hang past any socket timeout: wait for it in a thread
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer)


def _go_offline() -> None:
    """Load from the local cache only, so that loading fails in seconds instead of retrying the Hub for minutes."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=DEFAULT_BACKBONES,
        help="CLIP repo ids or folders, or one curated set name or .json file (default: small-cpu)",
    )
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=[],
        metavar="ID",
        help="the only Hub dataset ids visitors may name (default: any 'namespace/name' Hub id)",
    )
    parser.add_argument("--examples", choices=["toy"], help="add example images: 'toy' for the toy colour backbones")
    parser.add_argument(
        "--max-gates", type=int, default=1000, help="calibrated gates held on the server (new ones are refused beyond)"
    )
    parser.add_argument(
        "--gate-idle-hours", type=float, default=24.0, help="a gate unused this long is removed from the server"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    local = all(Path(b).is_dir() for b in args.backbones)
    offline = not local and not hub_reachable()
    if offline:
        _go_offline()
    print(f"Loading the backbones {args.backbones}; without the Hub, give local folders: --backbones DIR1 DIR2")
    try:
        ensemble = SharedEnsemble.load(
            args.backbones, labels=parse_labels(DEFAULT_LABELS), allowed_datasets=args.datasets
        )
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"Could not load the backbones: {error}")
        demo = build_problem_page(str(error), args.backbones, offline=offline)
    else:
        downloads = tempfile.TemporaryDirectory(prefix="clip-ensemble-downloads-")
        example_dir = tempfile.TemporaryDirectory(prefix="clip-ensemble-examples-")
        examples = toy_examples(Path(example_dir.name)) if args.examples == "toy" else None
        store = GateStore(max_gates=args.max_gates, idle_s=args.gate_idle_hours * 3600)
        demo = build_demo(ensemble, Path(downloads.name), store, examples)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=MAX_FILE_SIZE,
        run_history=False,  # would keep inputs (the push token among them) in the browser
        footer_links=["api", "gradio"],
        theme=gr.themes.Soft(),
        css=CSS,
    )


if __name__ == "__main__":
    main()
