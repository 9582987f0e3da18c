"""The clip-ensemble demo: calibrate a gate over several CLIP backbones on a few labelled images, in the browser.

    python app.py                                   # the `small-cpu` set of public Hub backbones
    python app.py --backbones ./clip-a ./clip-b     # local folders, no Hub needed
    python app.py --backbones openai-vit --port 7861

The page's logic lives in `clip_ensemble/app_logic.py`; this file only lays it out. Each browser session has its own
gate; the backbones are loaded once and shared.
"""

from __future__ import annotations

import argparse
import functools
import html
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import pandas as pd

from clip_ensemble.app_logic import (
    MAX_HUB_IMAGES,
    MAX_IMAGES_PER_LABEL,
    MAX_SHOTS,
    MAX_UPLOAD_LABELS,
    SessionGate,
    SharedEnsemble,
    parse_labels,
    split_labels,
)

DEFAULT_BACKBONES = ["small-cpu"]
DEFAULT_LABELS = "cat, dog, bird, car, flower"
MAX_FILE_SIZE = "10mb"
CONCURRENCY = 2  # events computing at once; the rest wait in the queue
QUEUE_SIZE = 32
UPLOADS_PER_ROW = 3
# Gradio finds a progress parameter by this default and passes a tracker for the event in its place.
PROGRESS = gr.Progress()
INTRO = """# CLIP ensemble: few-shot calibration
Several CLIP backbones classify each image zero-shot; a small gate, calibrated on a few labelled images, weighs them
per image ([Synergy and Diversity in CLIP, arXiv:2405.17139](https://arxiv.org/abs/2405.17139)). Type your labels,
calibrate on a few images per label (or a Hub dataset), then classify. Your gate is yours alone: it lives in this
browser tab until you download it or push it to the Hub."""


def _shown(fn: Callable) -> Callable:
    """Bad input (ValueError, TypeError) becomes a message in the page; the session state is left as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None

    return wrapper


def _download_dir(root: Path, max_age_s: float = 600) -> Path:
    """A fresh folder for one download; older ones were copied to Gradio's cache long ago and are removed."""
    for old in root.iterdir():
        if time.time() - old.stat().st_mtime > max_age_s:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


def _upload_boxes(labels_text: str) -> list[dict]:
    """Settings of the upload boxes: one per typed label, titled with it; the spare boxes hidden."""
    labels = split_labels(labels_text)
    return [
        {"label": f"Images of '{labels[i]}'", "visible": True} if i < len(labels) else {"visible": False}
        for i in range(MAX_UPLOAD_LABELS)
    ]


def build_demo(ensemble: SharedEnsemble, downloads: Path) -> gr.Blocks:
    # Uploads and downloads leave Gradio's cache after two hours; no usage statistics are sent.
    with gr.Blocks(title="CLIP ensemble", delete_cache=(3600, 7200), analytics_enabled=False) as demo:
        session = gr.State(SessionGate())
        gr.Markdown(INTRO)
        with gr.Accordion("Backbones", open=True):
            gr.Markdown(ensemble.describe())
        labels = gr.Textbox(
            DEFAULT_LABELS, label="Labels", info="comma-separated or one per line", elem_id="labels", max_lines=6
        )
        status = gr.Markdown(SessionGate().describe(), elem_id="status")

        with gr.Tab("Calibrate", elem_id="calibrate-tab"):
            with gr.Tab("Upload images"):
                gr.Markdown(
                    f"Upload a few images for each label (at most {MAX_UPLOAD_LABELS} labels, "
                    f"{MAX_IMAGES_PER_LABEL} images each, {MAX_FILE_SIZE} a file)."
                )
                boxes = []
                settings = _upload_boxes(DEFAULT_LABELS)
                for row in range(0, MAX_UPLOAD_LABELS, UPLOADS_PER_ROW):
                    with gr.Row(equal_height=True):
                        boxes += [
                            gr.File(
                                file_count="multiple",
                                file_types=["image"],
                                elem_id=f"upload-{i}",
                                height=150,
                                **settings[i],
                            )
                            for i in range(row, min(row + UPLOADS_PER_ROW, MAX_UPLOAD_LABELS))
                        ]
                calibrate_uploads = gr.Button("Calibrate on the uploads", variant="primary", elem_id="calibrate")
            with gr.Tab("Hub dataset"):
                with gr.Row():
                    cal_dataset = gr.Textbox(label="Dataset id", placeholder="tanganke/eurosat")
                    cal_split = gr.Textbox("train", label="Split")
                    shots = gr.Slider(1, MAX_SHOTS, value=4, step=1, label="Images per label (k)")
                calibrate_hub = gr.Button("Calibrate on the dataset", variant="primary")
            report = gr.Textbox(label="Calibration report", lines=9, interactive=False, elem_id="report")

        with gr.Tab("Classify", elem_id="classify-tab"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", elem_id="classify-image", height=280)
                    top_k = gr.Slider(1, 10, value=5, step=1, label="Top k")
                    classify = gr.Button("Classify", variant="primary", elem_id="classify")
                with gr.Column():
                    top = gr.Label(label="Ensemble", elem_id="prediction")
                    note = gr.Markdown()
            with gr.Row():
                per_backbone = gr.Dataframe(label="Each backbone", interactive=False, elem_id="per-backbone")
                weights = gr.BarPlot(
                    x="backbone",
                    y="weight",
                    label="Gate weights for this image",
                    y_lim=[0, None],
                    elem_id="gate-weights",
                )

        with gr.Tab("Evaluate"):
            with gr.Row():
                eval_dataset = gr.Textbox(label="Dataset id", placeholder="tanganke/eurosat")
                eval_split = gr.Textbox("test", label="Split")
                max_images = gr.Number(
                    500, label="At most this many images", precision=0, minimum=1, maximum=MAX_HUB_IMAGES
                )
            evaluate = gr.Button("Evaluate", variant="primary")
            table = gr.Markdown()

        with gr.Tab("Save"):
            gr.Markdown(
                "Download the calibrated gate (unzip, then `CLIPEnsembleModel.from_pretrained('clip-ensemble-gate')`; "
                "the backbones load from their own repos) or push it to your Hub account."
            )
            download = gr.Button("Download the gate (.zip)", elem_id="download")
            archive = gr.File(label="Gate", interactive=False, elem_id="archive")
            with gr.Row():
                repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-clip-gate")
                token = gr.Textbox(label="Access token (write)", type="password", info="used for this push only")
                private = gr.Checkbox(True, label="Private repo")
            push = gr.Button("Push to the Hub")
            pushed = gr.Markdown()

        labels.change(
            lambda text: [gr.update(**box) for box in _upload_boxes(text)],
            labels,
            boxes,
            queue=False,
            api_visibility="private",
        )

        @_shown
        def on_calibrate_uploads(gate, labels_text, progress=PROGRESS, *uploads):
            # `progress` precedes the uploads: Gradio looks for it among the named positional parameters only.
            gate = ensemble.calibrate_uploads(gate, labels_text, uploads, progress)
            return gate, gate.report, gate.describe()

        @_shown
        def on_calibrate_hub(gate, dataset, split, k, progress=PROGRESS):
            gate, label_names = ensemble.calibrate_hub(gate, dataset, split, int(k), progress)
            return gate, gate.report, gate.describe(), ", ".join(label_names)

        @_shown
        def on_classify(gate, labels_text, image_file, k):
            prediction = ensemble.classify(gate, labels_text, image_file, int(k))
            rows = pd.DataFrame(prediction.backbones)
            rows["probability"] = rows["probability"].map("{:.1%}".format)
            rows["gate weight"] = rows["gate weight"].map("{:.3f}".format)
            chart = pd.DataFrame(
                {"backbone": list(prediction.gate_weights), "weight": list(prediction.gate_weights.values())}
            )
            return prediction.top, rows, chart, prediction.note

        @_shown
        def on_evaluate(gate, dataset, split, limit, progress=PROGRESS):
            return ensemble.evaluate_hub(gate, dataset, split, int(limit or 0), progress).table()

        @_shown
        def on_download(gate, labels_text):
            return str(ensemble.save_zip(gate, labels_text, _download_dir(downloads)))

        @_shown
        def on_push(gate, labels_text, repo, access_token, is_private):
            url = ensemble.push(gate, labels_text, repo, access_token, is_private)
            return f"Pushed: {url}", ""  # the token box is cleared

        calibrate_uploads.click(
            on_calibrate_uploads, [session, labels, *boxes], [session, report, status], api_name="calibrate_uploads"
        )
        calibrate_hub.click(
            on_calibrate_hub,
            [session, cal_dataset, cal_split, shots],
            [session, report, status, labels],
            api_name="calibrate_hub",
        )
        classify.click(
            on_classify, [session, labels, image, top_k], [top, per_backbone, weights, note], api_name="classify"
        )
        evaluate.click(on_evaluate, [session, eval_dataset, eval_split, max_images], table, api_name="evaluate")
        download.click(on_download, [session, labels], archive, api_name="download_gate")
        push.click(on_push, [session, labels, repo_id, token, private], [pushed, token], api_name="push_to_hub")
    return demo


def build_problem_page(problem: str, backbones: list[str]) -> gr.Blocks:
    """The page shown when the backbones could not be loaded: the problem and how to start the app instead."""
    fix = f"""## The backbones could not be loaded

Tried `{" ".join(backbones)}`:

```
{problem}
```

**Fixes.** If the Hub cannot be reached from this machine, start the app on CLIP folders saved on disk (each holds a
transformers CLIP model and its processor, e.g. from `CLIPModel.from_pretrained(...).save_pretrained(DIR)`):

```
python app.py --backbones DIR1 DIR2
```

Otherwise check the repo ids (`clip-ensemble configs` lists the curated sets), log in with `hf auth login` for gated
repos, or install the `[open-clip]` extra for `hf-hub:` backbones."""
    with gr.Blocks(title="CLIP ensemble: no backbones", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        gr.Markdown(fix, elem_id="problem")
    return page


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(f"Loading the backbones {args.backbones}; without the Hub, give local folders: --backbones DIR1 DIR2")
    try:
        ensemble = SharedEnsemble.load(args.backbones, labels=parse_labels(DEFAULT_LABELS))
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"Could not load the backbones: {error}")
        demo = build_problem_page(str(error), args.backbones)
    else:
        downloads = tempfile.TemporaryDirectory(prefix="clip-ensemble-downloads-")
        demo = build_demo(ensemble, Path(downloads.name))
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=MAX_FILE_SIZE,
        run_history=False,  # would keep inputs (the push token among them) in the browser
        state_session_capacity=500,  # sessions whose gate is kept in memory; the oldest go first
        footer_links=["api", "gradio"],
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
