"""What the Gradio app (`app.py`) does, without Gradio: shared backbones, one gate per browser session, checked input.

The backbones are loaded once and shared read-only by every session. A session's own state is a `SessionGate` (its
gate weights and calibration record), which the app keeps per browser session. The shared model is switched to a
session's labels and gate only under a lock, and only for the cheap part of a request: the backbone forward passes
over images run before, outside the lock, into a feature cache that the library call under the lock then reads.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .calibration import calibrate
from .data import LabelledImages, from_lists, load_labelled_data, sample_few_shot
from .evaluation import EvaluationReport, align_labels, evaluate_embeddings
from .features import FeatureCache
from .hub_configs import resolve_backbones
from .modeling_clip_ensemble import CLIPEnsembleModel
from .processing_clip_ensemble import ImageInput, load_image

MAX_LABELS = 200  # labels typed for classification
MAX_UPLOAD_LABELS = 10  # labels that get an upload box
MAX_IMAGES_PER_LABEL = 32  # uploaded images per label
MAX_SHOTS = 16  # images per label drawn from a Hub dataset
MAX_HUB_IMAGES = 2000  # images of a Hub split embedded by one calibration or evaluation
EMBED_CHUNK = 32  # images per progress step
_HEAD_CACHE_SIZE = 32  # label sets whose zero-shot heads stay cached in the shared model
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GATE_FOLDER = "clip-ensemble-gate"

# Called as progress(fraction done, description); `gr.Progress` instances fit.
ProgressCallback = Callable[[float, str], object]


def _no_progress(fraction: float, description: str) -> None:
    pass


def split_labels(text: str | None) -> list[str]:
    """Labels typed comma-separated or one per line, stripped, empty entries dropped; not checked."""
    return [label.strip() for label in re.split(r"[,\n]", text or "") if label.strip()]


def parse_labels(text: str | None, max_labels: int = MAX_LABELS) -> list[str]:
    """`split_labels`, checked: at least two labels, at most `max_labels`, each once."""
    labels = split_labels(text)
    if len(labels) < 2:
        raise ValueError(f"Type at least two labels, comma-separated or one per line (got {labels}), e.g. 'cat, dog'.")
    if len(labels) > max_labels:
        raise ValueError(f"{len(labels)} labels typed; this takes at most {max_labels}.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"The labels {duplicates} are typed more than once; each label needs one entry.")
    return labels


def check_dataset_id(dataset: str | None) -> str:
    """A Hub dataset id ('name' or 'org/name'); local paths are refused, so the app never reads the server's disk."""
    dataset = (dataset or "").strip()
    if not dataset:
        raise ValueError("Give a Hub dataset id, e.g. 'tanganke/eurosat'.")
    if not _REPO_ID.match(dataset) or ".." in dataset or Path(dataset).exists():
        raise ValueError(
            f"'{dataset}' is not a Hub dataset id; give one like 'tanganke/eurosat' (local paths are not accepted)."
        )
    return dataset


def check_upload(path: str | Path, what: str) -> Image.Image:
    """The uploaded file at `path` decoded as an RGB image, or a ValueError naming the file and `what` it was for."""
    try:
        return load_image(path)
    except ValueError:
        # load_image's message holds the server-side path; the user knows the file by its name.
        raise ValueError(
            f"'{Path(path).name}' ({what}) is not an image that can be read; upload JPEG, PNG or WebP files. "
            "Nothing was changed: the session keeps its gate."
        ) from None


@dataclass
class SessionGate:
    """One browser session's gate: its weights and what it was calibrated on. `weights=None` is the uncalibrated gate,
    which equals plain logit averaging."""

    weights: dict[str, torch.Tensor] | None = None  # the gate's state_dict
    calibration: dict | None = None  # `model.config.calibration` after calibrating
    report: str = ""  # the calibration report, as shown

    @property
    def calibrated(self) -> bool:
        return self.weights is not None

    def describe(self) -> str:
        if not self.calibrated:
            return "Gate: **not calibrated**: plain logit averaging, every backbone weighs the same."
        info = self.calibration
        return (
            f"Gate: **calibrated** on {info['dataset']} ({info['shots']} images per label, "
            f"{info['images']} images); the gate weighs the backbones per image."
        )


@dataclass
class Prediction:
    """One image's classification by a session's gate."""

    top: dict[str, float]  # the top-k labels -> probability
    backbones: list[dict]  # per backbone: name, its own top label and probability, its gate weight
    gate_weights: dict[str, float]  # backbone name -> gate weight
    note: str  # which gate classified, in words


def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


class SharedEnsemble:
    """One loaded `CLIPEnsembleModel` serving every session; each request brings the session's labels and gate.

    `hub_cache` keeps embeddings of Hub dataset images (on disk by default: public data, reused across sessions);
    uploads go through a cache that lives for one request only, so nothing of them stays on the server.
    """

    def __init__(self, model: CLIPEnsembleModel, hub_cache: FeatureCache | None = None):
        self.model = model.eval()
        self.hub_cache = FeatureCache() if hub_cache is None else hub_cache
        self._lock = threading.Lock()
        self._initial_gate = _state_copy(model.gate)  # the averaging initialisation
        self.names = model.config.backbone_names  # local folders by their last part

    @classmethod
    def load(cls, backbones: Sequence[str], labels: Sequence[str], **kwargs) -> SharedEnsemble:
        """Load the backbones given as `--backbones` takes them (see `resolve_backbones`)."""
        return cls(CLIPEnsembleModel.from_backbones(resolve_backbones(backbones), labels=labels), **kwargs)

    def describe(self) -> str:
        """The loaded backbones as a Markdown list."""
        lines = [
            f"- `{entry['name_or_path']}`"
            + (f" @ `{entry['revision'][:12]}`" if entry["revision"] else "")
            + f": {entry['embed_dim']}-d embeddings"
            for entry in self.model.config.backbones
        ]
        return f"**{len(lines)} backbones loaded** (shared by all sessions):\n" + "\n".join(lines)

    @contextmanager
    def _session(self, session: SessionGate, labels: Sequence[str]) -> Iterator[CLIPEnsembleModel]:
        """The shared model with this session's labels and gate, held for this session alone."""
        with self._lock:
            model = self.model
            model.gate.load_state_dict(session.weights if session.calibrated else self._initial_gate)
            model.config.calibration = session.calibration
            model.set_labels(labels)
            heads = model._head_cache  # one entry per label set ever used: keep the newest few
            while len(heads) > _HEAD_CACHE_SIZE:
                del heads[next(iter(heads))]
            yield model

    def _embed(
        self, cache: FeatureCache, images: Sequence[ImageInput], progress: ProgressCallback
    ) -> tuple[list[torch.Tensor], float, int]:
        """Every backbone's embeddings of `images` through `cache`, outside the lock, reporting progress.

        Returns one (n, embed_dim_b) tensor per backbone, the seconds it took, and the number of images a backbone
        ran on (cache misses; with the shared Hub cache a concurrent request can blur that count).
        """
        started, computed, chunks = time.perf_counter(), 0, []
        for start in range(0, len(images), EMBED_CHUNK):
            progress(start / len(images), f"Embedding images: {start} of {len(images)}")
            chunks.append(cache.embed(self.model.backbones, images[start : start + EMBED_CHUNK], progress=False))
            computed += max(cache.last_computed, default=0)
        embeds = [torch.cat(per_backbone) for per_backbone in zip(*chunks)]
        return embeds, time.perf_counter() - started, computed

    def _calibrate(
        self, session: SessionGate, data: LabelledImages, shots: int, cache: FeatureCache, progress: ProgressCallback
    ) -> SessionGate:
        _, seconds, computed = self._embed(cache, data.images, progress)
        progress(1.0, "Training the gate")
        with self._session(session, data.label_names) as model:
            report = calibrate(model, data, shots=shots, seed=0, cache=cache, progress=False)
            weights, calibration = _state_copy(model.gate), dict(model.config.calibration)
        # The backbones ran before the lock; count that work in the report.
        report.feature_seconds += seconds
        report.images_embedded = computed
        return SessionGate(weights, calibration, str(report))

    def calibrate_uploads(
        self,
        session: SessionGate,
        labels_text: str,
        uploads: Sequence[Sequence[str | Path] | None],
        progress: ProgressCallback = _no_progress,
    ) -> SessionGate:
        """A new gate calibrated on uploaded images; `uploads[i]` holds the files of the i-th typed label.

        Every label needs at least one image; with unequal counts, each label gets as many shots as the smallest.
        """
        labels = parse_labels(labels_text, max_labels=MAX_UPLOAD_LABELS)
        images, targets = [], []
        for label, files in zip(labels, list(uploads) + [None] * len(labels)):
            files = list(files or [])
            if not files:
                raise ValueError(f"No images uploaded for '{label}'; upload at least one image for every label.")
            if len(files) > MAX_IMAGES_PER_LABEL:
                raise ValueError(f"{len(files)} images uploaded for '{label}'; upload at most {MAX_IMAGES_PER_LABEL}.")
            images += [check_upload(file, f"uploaded for '{label}'") for file in files]
            targets += [label] * len(files)
        data = from_lists(images, targets, label_names=labels)
        data.name = "uploaded images"
        shots = min(data.counts().values())
        return self._calibrate(session, data, shots, FeatureCache(None), progress)

    def load_hub_split(self, dataset: str, split: str) -> LabelledImages:
        """A Hub dataset split, with errors (no network, unknown id or split, undetectable columns) as ValueError."""
        dataset, split = check_dataset_id(dataset), (split or "").strip()
        if not split:
            raise ValueError("Give the split to use, e.g. 'train' or 'test'.")
        try:
            return load_labelled_data(dataset, split=split)
        except ValueError:
            raise
        except Exception as error:  # datasets raises many types: connection, not found, bad split
            raise ValueError(
                f"Could not load split '{split}' of the Hub dataset '{dataset}': {error}. Check the id and the split "
                "on huggingface.co/datasets; offline, this needs the dataset in the local cache."
            ) from None

    def calibrate_hub(
        self, session: SessionGate, dataset: str, split: str, shots: int, progress: ProgressCallback = _no_progress
    ) -> tuple[SessionGate, list[str]]:
        """A new gate calibrated on `shots` images per label of a Hub split; also returns the split's labels."""
        if not isinstance(shots, int) or not 1 <= shots <= MAX_SHOTS:
            raise ValueError(f"shots={shots!r}; give a whole number of images per label from 1 to {MAX_SHOTS}.")
        progress(0.0, f"Loading {dataset} ({split})")
        data = self.load_hub_split(dataset, split)
        if shots * len(data.label_names) > MAX_HUB_IMAGES:
            raise ValueError(
                f"{shots} shots x {len(data.label_names)} labels is more than {MAX_HUB_IMAGES} images; lower the shots."
            )
        support = data.subset(sample_few_shot(data, shots, seed=0))
        return self._calibrate(session, support, shots, self.hub_cache, progress), list(data.label_names)

    def evaluate_hub(
        self,
        session: SessionGate,
        dataset: str,
        split: str,
        max_images: int = 500,
        progress: ProgressCallback = _no_progress,
    ) -> EvaluationReport:
        """The session's gate beside every backbone and the baselines on (a seeded sample of) a Hub split."""
        if not isinstance(max_images, int) or not 1 <= max_images <= MAX_HUB_IMAGES:
            raise ValueError(f"max_images={max_images!r}; give a whole number of images from 1 to {MAX_HUB_IMAGES}.")
        progress(0.0, f"Loading {dataset} ({split})")
        data = self.load_hub_split(dataset, split)
        if len(data) > max_images:
            picked = np.sort(np.random.default_rng(0).choice(len(data), max_images, replace=False))
            data = data.subset(picked.tolist(), name=f"{data.name}, a sample of {max_images} of {len(data)} images")
        embeds, _, _ = self._embed(self.hub_cache, data.images, progress)
        progress(1.0, "Scoring")
        with self._session(session, data.label_names) as model:
            labels = torch.tensor(align_labels(model, data))
            return evaluate_embeddings(model, embeds, labels, dataset=data.name, split=split)

    def classify(self, session: SessionGate, labels_text: str, image: ImageInput | None, top_k: int = 5) -> Prediction:
        """The session's gate on one image: top-k labels, each backbone's own top label, and the gate weights."""
        labels = parse_labels(labels_text)
        if image is None:
            raise ValueError("Upload an image to classify.")
        pil_image = (
            check_upload(image, "the image to classify") if isinstance(image, (str, Path)) else load_image(image)
        )
        pixel_values = self.model.processor([pil_image])["pixel_values"]
        embeds = self.model.encode_images(pixel_values)  # backbones only: no lock needed
        with self._session(session, labels) as model, torch.no_grad():
            out = model(image_embeds=embeds)
        probs = out.logits.softmax(-1)[0]  # (num_labels,)
        per_backbone = out.per_backbone_logits[0].softmax(-1)  # (num_backbones, num_labels)
        weights = out.gate_weights[0].tolist()  # (num_backbones,)
        top = probs.topk(min(top_k, len(labels)))
        rows = [
            {"backbone": name, "top label": labels[int(p.argmax())], "probability": float(p.max()), "gate weight": w}
            for name, p, w in zip(self.names, per_backbone, weights)
        ]
        note = session.describe()
        if not session.calibrated:
            note += " Calibrate it on a few labelled images to weigh each backbone per image."
        return Prediction(
            top={labels[i]: float(s) for s, i in zip(top.values, top.indices.tolist())},
            backbones=rows,
            gate_weights=dict(zip(self.names, weights)),
            note=note,
        )

    def _require_calibrated(self, session: SessionGate) -> None:
        if not session.calibrated:
            raise ValueError("This session's gate is not calibrated yet: calibrate it first, then save it.")

    def save_zip(self, session: SessionGate, labels_text: str, directory: str | Path) -> Path:
        """`directory/clip-ensemble-gate.zip`: the saved folder (config.json, gate.safetensors, README.md), which
        `CLIPEnsembleModel.from_pretrained` loads once unzipped."""
        self._require_calibrated(session)
        labels = parse_labels(labels_text)
        folder = Path(directory) / GATE_FOLDER
        with self._session(session, labels) as model:
            model.save_pretrained(folder)
        archive = shutil.make_archive(str(folder), "zip", root_dir=directory, base_dir=GATE_FOLDER)
        shutil.rmtree(folder)
        return Path(archive)

    def push(self, session: SessionGate, labels_text: str, repo_id: str, token: str, private: bool = True) -> str:
        """Push the session's gate to `repo_id` with the user's `token`; returns the commit URL.

        The token is used for this call only, and is kept out of every error message.
        """
        self._require_calibrated(session)
        labels = parse_labels(labels_text)
        repo_id, token = (repo_id or "").strip(), (token or "").strip()
        if not _REPO_ID.match(repo_id) or ".." in repo_id:
            raise ValueError(f"'{repo_id}' is not a repo id; give one like 'your-name/my-gate'.")
        if not token:
            # Never fall back to a token of the server's (HF_TOKEN): the gate goes to the user's account.
            raise ValueError(
                "Paste a Hugging Face access token with write permission (huggingface.co/settings/tokens)."
            )
        try:
            with self._session(session, labels) as model:
                commit = model.push_to_hub(repo_id, token=token, private=private)
        except Exception as error:  # any Hub or network failure: report it without the token
            message = str(error).replace(token, "***")
            raise ValueError(
                f"Pushing to '{repo_id}' failed: {message}. Check that the token has write permission and that "
                "the repo name is yours or your organisation's."
            ) from None
        return commit.commit_url


__all__ = [
    "GATE_FOLDER",
    "MAX_HUB_IMAGES",
    "MAX_IMAGES_PER_LABEL",
    "MAX_LABELS",
    "MAX_SHOTS",
    "MAX_UPLOAD_LABELS",
    "Prediction",
    "SessionGate",
    "SharedEnsemble",
    "check_dataset_id",
    "check_upload",
    "parse_labels",
    "split_labels",
]
