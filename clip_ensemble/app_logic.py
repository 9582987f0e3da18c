"""What the Gradio app (`app.py`) does, without Gradio: shared backbones, one gate per browser session, checked input.

The backbones are loaded once and shared read-only by every session. A session's own state is a `SessionGate` (its
gate weights, the labels and data it was calibrated on), which the app keeps in a `GateStore` on the server (only
idleness ever removes a gate from it) and as a payload in the browser (`SharedEnsemble.to_browser`), so that a page
reload restores it. The shared model is switched to a session's labels and gate only under a lock, and only for the
cheap part of a request: the backbone forward passes over images run before, outside the lock, into a feature cache
that the library call under the lock then reads.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .backbones import LOCAL_DIR_PREFIX
from .calibration import CalibrationReport, calibrate
from .configuration_clip_ensemble import CLIPEnsembleConfig
from .data import LabelledImages, from_lists, load_labelled_data, sample_few_shot
from .evaluation import EvaluationReport, align_labels, evaluate_embeddings
from .features import FeatureCache
from .hub_configs import resolve_backbones
from .modeling_clip_ensemble import CASCADE_WEIGHTS_NAME, GATE_WEIGHTS_NAME, CLIPEnsembleModel
from .processing_clip_ensemble import ImageInput, load_image

MAX_LABELS = 200  # labels typed for classification
MAX_UPLOAD_LABELS = 10  # labels that get an upload box
MAX_IMAGES_PER_LABEL = 32  # uploaded images per label
MAX_SHOTS = 16  # images per label drawn from a Hub dataset
MAX_HUB_IMAGES = 2000  # images of a Hub split embedded by one calibration or evaluation
EMBED_CHUNK = 32  # images per progress step
_HEAD_CACHE_SIZE = 32  # label sets whose zero-shot heads stay cached in the shared model
MAX_EVAL_IMAGES = 2000  # images in an uploaded evaluation zip
MAX_GATE_FILE_BYTES = 200_000_000  # gate.safetensors read from an upload or the Hub (a 9-backbone gate is ~3 MB)
MAX_CONFIG_BYTES = 2_000_000
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # namespace/name, nothing else
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GATE_FOLDER = "clip-ensemble-gate"
BROWSER_PAYLOAD_VERSION = 1

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


def _builtin_loaders() -> set[str]:
    """The `datasets` library's packaged loaders ('imagefolder', 'parquet', 'json' ...): each reads local files."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # a datasets version that moved it: the namespace/name rule below still refuses them
        return set()
    return set(_PACKAGED_DATASETS_MODULES)


def check_dataset_id(dataset: str | None, allowed: Sequence[str] = ()) -> str:
    """A Hub dataset id `namespace/name`, or one of the operator's `allowed` ids when given.

    Never a local path, a URL, or a builtin loader name of `datasets` ('imagefolder', 'parquet', 'json', 'arrow' ...,
    which read files on the server): the app never reads the server's disk on a visitor's request.
    """
    dataset = (dataset or "").strip()
    if not dataset:
        raise ValueError("Give a Hub dataset id, e.g. 'tanganke/eurosat'.")
    if allowed:
        if dataset not in allowed:
            raise ValueError(f"'{dataset}' is not one of the datasets this app serves: {sorted(allowed)}.")
        return dataset
    first = dataset.split("/")[0].lower()
    if (
        not _HUB_ID.match(dataset)
        or ".." in dataset
        or first in _builtin_loaders()
        or dataset.lower() in _builtin_loaders()
        or Path(dataset).exists()
        or Path(first).exists()
    ):
        raise ValueError(
            f"'{dataset}' is not a Hub dataset id; give one like 'tanganke/eurosat' (namespace/name). Local paths, "
            "URLs and the `datasets` library's builtin loaders are not accepted; to use your own images, upload them."
        )
    return dataset


def check_upload(path: str | Path, what: str) -> Image.Image:
    """The uploaded file at `path` decoded as an RGB image, or a ValueError naming the file and `what` it was for."""
    try:
        return load_image(path)
    except (ValueError, OSError):
        # load_image's message holds the server-side path; the user knows the file by its name.
        raise ValueError(
            f"'{Path(path).name}' ({what}) is not an image that can be read; upload JPEG, PNG or WebP files. "
            "Nothing was changed: the session keeps its gate."
        ) from None


def _same_labels(a: Sequence[str] | None, b: Sequence[str] | None) -> bool:
    return set(a or []) == set(b or [])


@dataclass
class SessionGate:
    """One browser session's gate: its weights and what it was calibrated on. `weights=None` is the uncalibrated gate,
    which equals plain logit averaging; `expired` then says why a gate this session had is gone."""

    weights: dict[str, torch.Tensor] | None = None  # the gate's state_dict
    calibration: dict | None = None  # `model.config.calibration` after calibrating
    report: str = ""  # the calibration report, as shown
    labels: list[str] | None = None  # the label set the gate was calibrated on
    source: str = ""  # where the gate came from, in words ("loaded from gate.zip"); empty when calibrated here
    expired: str = ""  # for an uncalibrated gate: why this session's gate is gone
    cascade: dict | None = None  # a loaded gate's cascade: its `config.cascade` entry (order, stop margins, ...)
    cascade_weights: dict[str, torch.Tensor] | None = None  # and its gates' state_dict

    @property
    def calibrated(self) -> bool:
        return self.weights is not None

    def describe(self, current_labels: Sequence[str] | None = None) -> str:
        """The status line: always derived from the gate actually held."""
        if not self.calibrated:
            text = "Gate: **not calibrated**: plain logit averaging, every backbone weighs the same."
            return f"{self.expired} {text}" if self.expired else text
        info = self.calibration or {}
        if info:
            text = (
                f"Gate: **calibrated** on {info.get('dataset', 'unknown data')} ({info.get('shots', '?')} images per "
                f"label, {info.get('images', '?')} images)"
            )
        else:
            text = "Gate: **calibrated** (its calibration data is not recorded)"
        text += f", {self.source}; " if self.source else "; "
        chosen = info.get("chosen")
        if chosen and chosen != "gate":  # calibration kept a baseline: say which, not that the gate weighs anything
            text += f"calibration kept {chosen} (the trained gate did not beat it)."
        else:
            text += "the gate weighs the backbones per image."
        if self.cascade is not None:
            tolerance = self.cascade.get("tolerance")
            within = f" (top-1 within {tolerance} of all of them on its calibration data)" if tolerance else ""
            text += (
                " With a cascade: backbones run cheapest first, and an image stops once the rest are unlikely to "
                f"change its answer{within}."
            )
        if self.labels and current_labels is not None and not _same_labels(self.labels, current_labels):
            text += (
                f" It was calibrated on the labels {', '.join(self.labels)} and now serves your current labels "
                "(the gate weighs backbones, not labels, so it carries over; its calibration figures are for its own "
                "labels)."
            )
        return text


class GateStore:
    """Calibrated gates on the server, by session id. Only idleness removes one: a gate unused for `idle_s` expires;
    when `max_gates` gates are held, a new one is refused with a message (nobody's gate is dropped to make room), so
    anonymous traffic can never evict a user's gate. A session whose gate expired is told so (`SessionGate.expired`).
    Uncalibrated gates are not stored: they cost nothing to make again.
    """

    def __init__(self, max_gates: int = 1000, idle_s: float = 24 * 3600, clock: Callable[[], float] = time.monotonic):
        self.max_gates, self.idle_s, self._clock = max_gates, idle_s, clock
        self._gates: OrderedDict[str, tuple[SessionGate, float]] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[str, str] = OrderedDict()  # session id -> why its gate is gone
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of distinct gates held."""
        return len({id(gate) for gate, _ in self._gates.values()})

    def peek(self, key: str) -> SessionGate | None:
        """The gate held for `key`, if any, without counting it as used."""
        with self._lock:
            entry = self._gates.get(key)
            return entry[0] if entry else None

    def _expire_idle(self, now: float) -> None:
        while self._gates:
            key, (_, used) = next(iter(self._gates.items()))
            if now - used < self.idle_s:
                break
            del self._gates[key]
            self._expired[key] = (
                f"Your calibrated gate expired after {self.idle_s / 3600:g} h unused and was removed from the server: "
                "reload the page to restore it from this browser, or load your downloaded gate (Save tab)."
            )
        while len(self._expired) > 10 * self.max_gates:  # only expiries add here, and only gates expire
            self._expired.popitem(last=False)

    def get(self, key: str) -> SessionGate:
        with self._lock:
            now = self._clock()
            self._expire_idle(now)
            if key in self._gates:
                gate, _ = self._gates.pop(key)
                self._gates[key] = (gate, now)
                return gate
            return SessionGate(expired=self._expired.get(key, ""))

    def put(self, key: str, gate: SessionGate) -> None:
        with self._lock:
            now = self._clock()
            self._expire_idle(now)
            self._expired.pop(key, None)
            if not gate.calibrated:
                self._gates.pop(key, None)
                return
            # Several sessions may share one gate (a page reloaded, or opened in two tabs): it counts once.
            held = {id(g) for g, _ in self._gates.values()}
            if id(gate) not in held and len(held) >= self.max_gates:
                raise ValueError(
                    f"The server holds {self.max_gates} calibrated gates already, its limit; try again later (gates "
                    "unused for a while are removed), or run the app yourself. Nothing was changed."
                )
            self._gates.pop(key, None)
            self._gates[key] = (gate, now)


@dataclass
class Prediction:
    """One image's classification by a session's gate."""

    top: dict[str, float]  # the top-k labels -> probability
    backbones: list[dict]  # per backbone: name, its own top label and probability, its gate weight
    gate_weights: dict[str, float]  # backbone name -> gate weight
    note: str  # which gate classified, in words


def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def calibration_verdict(report: CalibrationReport) -> str:
    """The calibration report's verdict in plain words, first: what calibration kept and why."""
    return f"Verdict: {report.verdict()}"


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ValueError(f"'{info.filename}' in the zip is {info.file_size} bytes; at most {limit} are read.")
    return archive.read(info)


def _unzip_class_folders(zip_path: str | Path, limit: int) -> tuple[list[bytes], list[str], list[str]]:
    """Images of a zip of class folders (`cat/1.jpg`, or `photos/cat/1.jpg` under one root folder), read in memory:
    returns the encoded images, their labels and the file names. Nothing is written to disk."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"'{Path(zip_path).name}' is not a zip file; zip one folder per label.") from None
    with archive:
        members = [
            info
            for info in archive.infolist()
            if not info.is_dir()
            and Path(info.filename).suffix.lower() in _IMAGE_SUFFIXES
            and not any(part.startswith((".", "__MACOSX")) for part in Path(info.filename).parts)
        ]
        parents = {Path(info.filename).parent for info in members}
        roots = {parent.parts[0] for parent in parents if parent.parts}
        depth = 2 if len(roots) == 1 and all(len(parent.parts) == 2 for parent in parents) else 1
        if not members or any(len(Path(info.filename).parent.parts) != depth for info in members):
            raise ValueError(
                f"'{Path(zip_path).name}' must hold one folder of images per label, e.g. 'cat/1.jpg', 'dog/2.png' "
                "(and no images outside them)."
            )
        if len(members) > limit:
            raise ValueError(f"'{Path(zip_path).name}' holds {len(members)} images; at most {limit} are evaluated.")
        images = [_read_zip_member(archive, info, 20_000_000) for info in members]
    labels = [Path(info.filename).parent.parts[depth - 1] for info in members]
    return images, labels, [Path(info.filename).name for info in members]


class SharedEnsemble:
    """One loaded `CLIPEnsembleModel` serving every session; each request brings the session's labels and gate.

    `hub_cache` keeps embeddings of Hub dataset images (on disk by default: public data, reused across sessions);
    uploads go through a cache that lives for one request only, so nothing of them stays on the server.
    `allowed_datasets`, when given, are the only Hub dataset ids a visitor may name.
    """

    def __init__(
        self,
        model: CLIPEnsembleModel,
        hub_cache: FeatureCache | None = None,
        allowed_datasets: Sequence[str] = (),
    ):
        self.model = model.eval()
        self.hub_cache = FeatureCache() if hub_cache is None else hub_cache
        self.allowed_datasets = tuple(allowed_datasets)
        self._lock = threading.Lock()
        self._initial_gate = _state_copy(model.gate)  # the averaging initialisation
        self.names = model.config.backbone_names  # local folders by their last part

    @classmethod
    def load(cls, backbones: Sequence[str], labels: Sequence[str], **kwargs) -> SharedEnsemble:
        """Load the backbones given as `--backbones` takes them (see `resolve_backbones`)."""
        return cls(CLIPEnsembleModel.from_backbones(resolve_backbones(backbones), labels=labels), **kwargs)

    @property
    def local_backbones(self) -> list[str]:
        """Names of the backbones loaded from local folders: a gate over them loads only where those folders are."""
        return [
            name
            for name, entry in zip(self.names, self.model.config.backbones)
            if entry["name_or_path"].startswith(LOCAL_DIR_PREFIX) or os.path.isdir(entry["name_or_path"])
        ]

    def describe(self) -> str:
        """The loaded backbones as a Markdown list, by name (a local folder by its last part, never its path), with each
        one's compute per image."""
        lines = [
            f"- `{name}`"
            + (f" @ `{entry['revision'][:12]}`" if entry["revision"] else "")
            + f": {entry['embed_dim']}-d embeddings, {gflops:.3g} GFLOPs per image"
            + (" (a local folder)" if name in self.local_backbones else "")
            for name, entry, gflops in zip(self.names, self.model.config.backbones, self.model.backbone_gflops)
        ]
        return f"**{len(lines)} backbones loaded** (shared by all sessions):\n" + "\n".join(lines)

    @contextmanager
    def _session(self, session: SessionGate, labels: Sequence[str]) -> Iterator[CLIPEnsembleModel]:
        """The shared model with this session's labels and gate, held for this session alone."""
        with self._lock:
            model = self.model
            model.gate.load_state_dict(session.weights if session.calibrated else self._initial_gate)
            model.config.calibration = session.calibration
            if session.cascade is None:
                model.set_cascade(None)
            else:
                cascade = model._cascade_from_config(session.cascade)
                cascade.load_state_dict(session.cascade_weights)
                model.set_cascade(cascade, **session.cascade)
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
        self,
        session: SessionGate,
        data: LabelledImages,
        shots: int,
        cache: FeatureCache,
        progress: ProgressCallback,
        notes: Sequence[str] = (),
    ) -> SessionGate:
        _, seconds, computed = self._embed(cache, data.images, progress)
        progress(1.0, "Training the gate")
        with self._session(session, data.label_names) as model:
            report = calibrate(model, data, shots=shots, seed=0, cache=cache, progress=False)
            weights, calibration = _state_copy(model.gate), dict(model.config.calibration)
        # The backbones ran before the lock; count that work in the report.
        report.feature_seconds += seconds
        report.images_embedded = computed
        text = "\n\n".join([calibration_verdict(report), *notes, "Details:\n" + str(report)])
        return SessionGate(weights, calibration, text, labels=list(data.label_names))

    def upload_summary(self, labels_text: str, uploads: Sequence[Sequence[str | Path] | None]) -> str:
        """What calibrating on these uploads would use, said before it runs: files per label, and those left out."""
        labels = split_labels(labels_text)[:MAX_UPLOAD_LABELS]
        counts = [len(files or []) for files in list(uploads)[: len(labels)]]
        counts += [0] * (len(labels) - len(counts))
        if not labels:
            return "Type the labels first."
        parts = [f"'{label}': {count}" for label, count in zip(labels, counts)]
        text = "Images per label: " + ", ".join(parts) + "."
        missing = [label for label, count in zip(labels, counts) if count == 0]
        over = [label for label, count in zip(labels, counts) if count > MAX_IMAGES_PER_LABEL]
        if missing:
            text += f" Still to upload: {', '.join(repr(label) for label in missing)}."
        elif over:
            text += f" At most {MAX_IMAGES_PER_LABEL} images per label: remove some from {', '.join(over)}."
        elif len(set(counts)) > 1:
            shots = min(counts)
            unused = sum(count - shots for count in counts)
            text += (
                f" Uneven counts: calibration takes {shots} per label (as many as the smallest), so {unused} "
                "image(s) will not be used; upload more for the short labels to use them all."
            )
        return text

    def _uploaded_data(
        self, labels: list[str], uploads: Sequence[Sequence[str | Path] | None], what: str
    ) -> LabelledImages:
        images, targets = [], []
        for label, files in zip(labels, list(uploads) + [None] * len(labels)):
            files = list(files or [])
            if not files:
                raise ValueError(f"No images uploaded for '{label}'; upload at least one image for every label.")
            if len(files) > MAX_IMAGES_PER_LABEL:
                raise ValueError(f"{len(files)} images uploaded for '{label}'; upload at most {MAX_IMAGES_PER_LABEL}.")
            images += [check_upload(file, f"{what} '{label}'") for file in files]
            targets += [label] * len(files)
        data = from_lists(images, targets, label_names=labels)
        data.name = "uploaded images"
        return data

    def calibrate_uploads(
        self,
        session: SessionGate,
        labels_text: str,
        uploads: Sequence[Sequence[str | Path] | None],
        progress: ProgressCallback = _no_progress,
    ) -> SessionGate:
        """A new gate calibrated on uploaded images; `uploads[i]` holds the files of the i-th typed label.

        Every label needs at least one image; with unequal counts, each label gets as many shots as the smallest
        (the report says how many images were left out).
        """
        labels = parse_labels(labels_text, max_labels=MAX_UPLOAD_LABELS)
        data = self._uploaded_data(labels, uploads, "uploaded for")
        shots = min(data.counts().values())
        unused = len(data) - shots * len(labels)
        notes = (
            [f"Uneven counts: {shots} images per label were used (as many as the smallest); {unused} left out."]
            if unused
            else []
        )
        return self._calibrate(session, data, shots, FeatureCache(None), progress, notes)

    def load_hub_split(self, dataset: str, split: str) -> LabelledImages:
        """A Hub dataset split, with errors (no network, unknown id or split, undetectable columns) as ValueError."""
        dataset, split = check_dataset_id(dataset, self.allowed_datasets), (split or "").strip()
        if not re.fullmatch(r"[\w.\-\[\]:%+]+", split):
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

    def _evaluate(
        self, session: SessionGate, data: LabelledImages, cache: FeatureCache, split: str | None, progress
    ) -> EvaluationReport:
        embeds, _, _ = self._embed(cache, data.images, progress)
        progress(1.0, "Scoring")
        with self._session(session, data.label_names) as model:
            labels = torch.tensor(align_labels(model, data))
            return evaluate_embeddings(model, embeds, labels, dataset=data.name, split=split)

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
        return self._evaluate(session, data, self.hub_cache, split, progress)

    def evaluate_uploads(
        self,
        session: SessionGate,
        labels_text: str,
        uploads: Sequence[Sequence[str | Path] | None] = (),
        archive: str | Path | None = None,
        progress: ProgressCallback = _no_progress,
    ) -> EvaluationReport:
        """The session's gate beside every backbone and the baselines on the user's own labelled images: a zip of
        class folders (`archive`, its folder names are the labels) or else one list of files per typed label."""
        if archive:
            images, targets, names = _unzip_class_folders(archive, MAX_EVAL_IMAGES)
            pil = []
            for data_bytes, name, label in zip(images, names, targets):
                try:
                    pil.append(load_image(data_bytes))
                except ValueError:
                    raise ValueError(
                        f"'{label}/{name}' in the zip is not an image that can be read; remove it or re-export it."
                    ) from None
            labels = sorted(set(targets))
            if len(labels) < 2:
                raise ValueError(f"The zip holds one label folder ({labels}); evaluation needs two or more.")
            data = from_lists(pil, targets, label_names=labels)
            data.name = f"images of {Path(archive).name}"
        else:
            labels = parse_labels(labels_text, max_labels=MAX_UPLOAD_LABELS)
            data = self._uploaded_data(labels, uploads, "to evaluate on, for")
        return self._evaluate(session, data, FeatureCache(None), None, progress)

    def classify(self, session: SessionGate, labels_text: str, image: ImageInput | None, top_k: int = 5) -> Prediction:
        """The session's gate on one image: top-k labels, each backbone's own top label, and the gate weights."""
        labels = parse_labels(labels_text)
        if image is None:
            raise ValueError("Upload an image to classify.")
        pil_image = (
            check_upload(image, "the image to classify") if isinstance(image, (str, Path)) else load_image(image)
        )
        pixel_values = self.model.processor([pil_image])["pixel_values"]
        if session.cascade is None:
            inputs = {"image_embeds": self.model.encode_images(pixel_values)}  # backbones before the lock
        else:  # the cascade runs, under the lock, only the backbones this image needs
            inputs = {"pixel_values": pixel_values}
        with self._session(session, labels) as model, torch.no_grad():
            out = model(**inputs)
        probs = out.logits.softmax(-1)[0]  # (num_labels,)
        per_backbone = out.per_backbone_logits[0].softmax(-1)  # (num_backbones, num_labels); NaN: not run
        weights = out.gate_weights[0].tolist()  # (num_backbones,)
        top = probs.topk(min(top_k, len(labels)))
        rows = [
            {"backbone": name, "top label": labels[int(p.argmax())], "probability": float(p.max()), "gate weight": w}
            if not p.isnan().any()
            else {
                "backbone": name,
                "top label": "(not run: the image stopped before it)",
                "probability": None,
                "gate weight": w,
            }
            for name, p, w in zip(self.names, per_backbone, weights)
        ]
        note = session.describe(labels)
        if not session.calibrated:
            note += " Calibrate it on a few labelled images to weigh each backbone per image."
        note += (
            f" This image needed {int(out.num_backbones_run[0])} of {len(self.names)} backbones, "
            f"{float(out.gflops[0]):.3g} GFLOPs."
        )
        return Prediction(
            top={labels[i]: float(s) for s, i in zip(top.values, top.indices.tolist())},
            backbones=rows,
            gate_weights=dict(zip(self.names, weights)),
            note=note,
        )

    # Keeping a gate: in the browser, and loaded back from a download or the Hub.

    def to_browser(self, session: SessionGate, labels_text: str) -> dict:
        """What the browser keeps (JSON): the typed labels and, when calibrated, the gate with its record and report.

        The weights travel as base64 safetensors (about 700 kB for two 512-d backbones); `from_browser` checks them.
        """
        payload = {"version": BROWSER_PAYLOAD_VERSION, "labels_text": labels_text or ""}
        if session.calibrated:
            payload["gate"] = {
                "backbones": self._backbone_keys(),
                "weights": base64.b64encode(save_safetensors(session.weights)).decode("ascii"),
                "calibration": session.calibration,
                "report": session.report,
                "labels": session.labels,
                "source": session.source,
            }
            if session.cascade is not None:
                payload["gate"]["cascade"] = session.cascade
                payload["gate"]["cascade_weights"] = base64.b64encode(
                    save_safetensors(session.cascade_weights)
                ).decode()
        return payload

    def from_browser(self, payload) -> tuple[SessionGate, str | None, str]:
        """The gate and typed labels a browser kept, checked as strictly as an upload.

        Returns (gate, labels text or None, a message: empty, or why a kept gate could not be restored).
        """
        if not isinstance(payload, dict) or payload.get("version") != BROWSER_PAYLOAD_VERSION:
            return SessionGate(), None, ""
        labels_text = payload.get("labels_text") if isinstance(payload.get("labels_text"), str) else None
        kept = payload.get("gate")
        if not isinstance(kept, dict):
            return SessionGate(), labels_text, ""
        try:
            self._check_backbones(
                [dict(entry) for entry in kept.get("backbones") or []], "the gate kept in this browser"
            )
            weights = self._check_weights(base64.b64decode(kept.get("weights") or ""), "the gate kept in this browser")
            cascade, cascade_weights = kept.get("cascade"), None
            if cascade is not None:
                data = base64.b64decode(kept.get("cascade_weights") or "")
                cascade_weights = self._check_cascade(cascade, data, "its cascade")
        except (ValueError, TypeError) as error:
            return SessionGate(), labels_text, f"The gate kept in this browser could not be restored: {error}"
        labels = kept.get("labels")
        gate = SessionGate(
            weights,
            kept.get("calibration") if isinstance(kept.get("calibration"), dict) else None,
            str(kept.get("report") or ""),
            labels=[str(label) for label in labels] if isinstance(labels, list) else None,
            source=str(kept.get("source") or ""),
            cascade=cascade,
            cascade_weights=cascade_weights,
        )
        return gate, labels_text, ""

    def _backbone_keys(self) -> list[dict]:
        return [
            {"name_or_path": entry["name_or_path"], "revision": entry["revision"], "embed_dim": entry["embed_dim"]}
            for entry in self.model.config.backbones
        ]

    def _check_backbones(self, saved: list[dict], what: str) -> None:
        """`saved` backbones must be the loaded ones, in order, by id (and revision when both pin one) and width."""
        loaded = self._backbone_keys()
        fix = (
            "Load a gate calibrated on these backbones, or calibrate a new one here; to use this gate, start the app "
            "with its backbones (`python app.py --backbones ...`)."
        )
        if len(saved) != len(loaded):
            raise ValueError(
                f"{what} is for {len(saved)} backbones ({', '.join(_short(e.get('name_or_path')) for e in saved)}), "
                f"but {len(loaded)} are loaded ({', '.join(self.names)}). {fix}"
            )
        for i, (mine, theirs) in enumerate(zip(loaded, saved)):
            name, width = theirs.get("name_or_path"), theirs.get("embed_dim")
            if name != mine["name_or_path"]:
                raise ValueError(
                    f"Backbone {i + 1} of {what} is '{_short(name)}', but '{self.names[i]}' is loaded in its place. {fix}"
                )
            if theirs.get("revision") and mine["revision"] and theirs["revision"] != mine["revision"]:
                raise ValueError(
                    f"Backbone {i + 1} ('{self.names[i]}') of {what} is at revision {theirs['revision']}, but "
                    f"revision {mine['revision']} is loaded. {fix}"
                )
            if width is not None and width != mine["embed_dim"]:
                raise ValueError(
                    f"Backbone {i + 1} ('{self.names[i]}') of {what} has {width}-d embeddings, but the loaded one has "
                    f"{mine['embed_dim']}-d. {fix}"
                )

    def _check_weights(self, data: bytes, what: str) -> dict[str, torch.Tensor]:
        """Gate weights from safetensors bytes, strictly: the same tensor names and shapes as this app's gate."""
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, OSError) as error:
            raise ValueError(f"{what}: the gate weights are not a readable safetensors file ({error}).") from None
        expected = self._initial_gate
        if set(state) != set(expected):
            raise ValueError(
                f"{what}: the gate weights hold {sorted(state)}, but this app's gate has {sorted(expected)}; it was "
                "saved by another model."
            )
        wrong = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(
                f"{what}: the gate weights have other shapes than this app's gate ({'; '.join(wrong)}): another "
                "gate size or other backbones."
            )
        return {k: state[k].to(v.dtype) for k, v in expected.items()}

    def _check_cascade(self, entry, data: bytes | None, what: str) -> dict[str, torch.Tensor]:
        """A saved cascade (its `config.cascade` entry and cascade.safetensors bytes) checked strictly against the
        loaded backbones and gate: returns its gates' weights."""
        if data is None:
            raise ValueError(f"{what}: the config has a cascade but no {CASCADE_WEIGHTS_NAME} came with it.")
        config = self.model.config
        try:  # the config's own checks: order, stop margins
            CLIPEnsembleConfig(backbones=config.backbones, labels=["a"], cascade=entry)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{what}: {error}") from None
        cascade = self.model._cascade_from_config(entry)
        expected = cascade.state_dict()
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, OSError) as error:
            raise ValueError(f"{what}: {CASCADE_WEIGHTS_NAME} is not a readable safetensors file ({error}).") from None
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(f"{what}: {CASCADE_WEIGHTS_NAME} does not hold the gates its config describes.")
        return {k: state[k].to(v.dtype) for k, v in expected.items()}

    def load_gate(self, files: Sequence[str | Path] | None = None, repo_id: str | None = None) -> SessionGate:
        """A gate saved by this app or `save_pretrained`: the downloaded zip, its `config.json` + `gate.safetensors`,
        or a Hub repo id; checked strictly against the loaded backbones and gate."""
        files = [Path(f) for f in files or []]
        repo_id = (repo_id or "").strip()
        if files and repo_id:
            raise ValueError("Give either files or a Hub repo id, not both.")
        if repo_id:
            config_bytes, gate_bytes, cascade_bytes = self._download_gate(repo_id)
            source = f"loaded from the Hub repo {repo_id}"
        elif len(files) == 1 and files[0].suffix.lower() == ".zip":
            config_bytes, gate_bytes, cascade_bytes = _gate_from_zip(files[0])
            source = f"loaded from {files[0].name}"
        elif files:
            by_name = {f.name: f for f in files}
            required = {"config.json", GATE_WEIGHTS_NAME}
            if len(files) != len(by_name) or not required <= set(by_name) <= required | {CASCADE_WEIGHTS_NAME}:
                raise ValueError(
                    f"Upload the downloaded gate zip, or the files config.json and {GATE_WEIGHTS_NAME} (and "
                    f"{CASCADE_WEIGHTS_NAME} for a gate with a cascade) (got {sorted(f.name for f in files)})."
                )
            for f in files:
                if f.stat().st_size > (MAX_CONFIG_BYTES if f.name == "config.json" else MAX_GATE_FILE_BYTES):
                    raise ValueError(f"'{f.name}' is too large to be a gate file.")
            config_bytes, gate_bytes = by_name["config.json"].read_bytes(), by_name[GATE_WEIGHTS_NAME].read_bytes()
            cascade_bytes = by_name[CASCADE_WEIGHTS_NAME].read_bytes() if CASCADE_WEIGHTS_NAME in by_name else None
            source = f"loaded from config.json and {GATE_WEIGHTS_NAME}"
        else:
            raise ValueError(
                "Upload the downloaded gate zip (or its config.json and gate.safetensors), or give a Hub repo id."
            )
        try:
            config = json.loads(config_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"The gate's config.json is not valid JSON ({error}).") from None
        if not isinstance(config, dict) or config.get("model_type") != "clip_ensemble":
            raise ValueError("The config.json is not a clip-ensemble gate's (its model_type is not 'clip_ensemble').")
        self._check_backbones(
            [e if isinstance(e, dict) else {"name_or_path": e} for e in config.get("backbones") or []], "the gate"
        )
        mine = self.model.config
        for key, value in (("combination", mine.combination), ("gate_hidden_size", mine.gate_hidden_size)):
            if config.get(key, value) != value:
                raise ValueError(
                    f"The gate uses {key}={config.get(key)!r}, but this app's gate uses {value!r}; calibrate a new gate "
                    "here, or load this one with `CLIPEnsembleModel.from_pretrained`."
                )
        if config.get("templates", mine.templates) != mine.templates:
            raise ValueError(
                f"The gate's prompt templates ({config.get('templates')!r}) differ from this app's ({mine.templates!r}), "
                "so it would classify differently here; load it with `CLIPEnsembleModel.from_pretrained`."
            )
        weights = self._check_weights(gate_bytes, "the gate")
        cascade, cascade_weights = config.get("cascade"), None
        if cascade is not None:
            cascade_weights = self._check_cascade(cascade, cascade_bytes, "the gate's cascade")
        labels = config.get("labels")
        calibration = config.get("calibration") if isinstance(config.get("calibration"), dict) else None
        report = f"Gate {source}" + (f", calibrated on {calibration.get('dataset')}" if calibration else "") + "."
        if calibration:
            report += "\n\nIts calibration record:\n" + json.dumps(calibration, indent=2)
        return SessionGate(
            weights,
            calibration,
            report,
            labels=[str(label) for label in labels] if isinstance(labels, list) else None,
            source=source,
            cascade=cascade,
            cascade_weights=cascade_weights,
        )

    def _download_gate(self, repo_id: str) -> tuple[bytes, bytes, bytes | None]:
        """config.json, gate.safetensors and, when the config has a cascade, cascade.safetensors from the Hub."""
        if not _HUB_ID.match(repo_id) or ".." in repo_id or Path(repo_id).exists():
            raise ValueError(f"'{repo_id}' is not a Hub repo id; give one like 'your-name/my-gate'.")
        from huggingface_hub import hf_hub_download

        try:
            paths = [Path(hf_hub_download(repo_id, name)) for name in ("config.json", GATE_WEIGHTS_NAME)]
            if _has_cascade(paths[0].read_bytes()):
                paths.append(Path(hf_hub_download(repo_id, CASCADE_WEIGHTS_NAME)))
        except Exception as error:  # offline, not found, gated: the Hub raises many types
            raise ValueError(
                f"Could not download the gate from the Hub repo '{repo_id}': {type(error).__name__}. Check the id "
                "(and that the repo is public); offline, upload the downloaded zip instead."
            ) from None
        for path in paths[1:]:
            if path.stat().st_size > MAX_GATE_FILE_BYTES:
                raise ValueError(f"'{repo_id}' holds a {path.name} too large to be a gate's.")
        return paths[0].read_bytes(), paths[1].read_bytes(), paths[2].read_bytes() if len(paths) > 2 else None

    def _require_calibrated(self, session: SessionGate) -> None:
        if not session.calibrated:
            raise ValueError(
                (session.expired + " " if session.expired else "")
                + "This session's gate is not calibrated yet: calibrate it first, then save it."
            )

    def _saved(self, session: SessionGate, labels_text: str, folder: Path, repo_id: str | None = None) -> None:
        """`save_pretrained` with the calibration's own labels; the card notes the current labels and local
        backbones."""
        current = split_labels(labels_text)
        labels = session.labels or parse_labels(labels_text)
        with self._session(session, labels) as model:
            if repo_id is None:
                model.save_pretrained(folder)
            else:
                model.save_pretrained(folder, repo_id=repo_id)
        notes = []
        if session.labels and current and not _same_labels(current, session.labels):
            notes.append(
                f"- This gate was calibrated on the labels {', '.join(session.labels)} (saved as its labels, with "
                f"their calibration figures). In the app it was last used with other labels: {', '.join(current)}; "
                "the gate weighs backbones, not labels, so `model.set_labels([...])` serves any label set."
            )
        if self.local_backbones:
            notes.append(
                f"- Warning: the backbones {', '.join(self.local_backbones)} were loaded from local folders of the "
                "machine that made this gate; others cannot load it unless they have the same folders at the same "
                "paths. Prefer Hub backbones to share a gate."
            )
        if notes:
            card = folder / "README.md"
            card.write_text(card.read_text() + "\n## Notes from the app\n\n" + "\n".join(notes) + "\n")

    def save_zip(self, session: SessionGate, labels_text: str, directory: str | Path) -> Path:
        """`directory/clip-ensemble-gate.zip`: the saved folder (config.json, gate.safetensors, README.md), which
        `CLIPEnsembleModel.from_pretrained` loads once unzipped and the app's "Load a gate" takes back."""
        self._require_calibrated(session)
        folder = Path(directory) / GATE_FOLDER
        self._saved(session, labels_text, folder)
        archive = shutil.make_archive(str(folder), "zip", root_dir=directory, base_dir=GATE_FOLDER)
        shutil.rmtree(folder)
        return Path(archive)

    def push(self, session: SessionGate, labels_text: str, repo_id: str, token: str, private: bool = True) -> str:
        """Push the session's gate to `repo_id` with the user's `token`; returns the commit URL.

        The token is used for this call only, and is kept out of every error message.
        """
        self._require_calibrated(session)
        repo_id, token = (repo_id or "").strip(), (token or "").strip()
        if not _REPO_ID.match(repo_id) or ".." in repo_id:
            raise ValueError(f"'{repo_id}' is not a repo id; give one like 'your-name/my-gate'.")
        if not token:
            # Never fall back to a token of the server's (HF_TOKEN): the gate goes to the user's account.
            raise ValueError(
                "Paste a Hugging Face access token with write permission (huggingface.co/settings/tokens)."
            )
        from huggingface_hub import CommitOperationAdd, HfApi

        try:
            api = HfApi(token=token)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            with tempfile.TemporaryDirectory() as folder:
                self._saved(session, labels_text, Path(folder), repo_id=repo_id)
                operations = [
                    CommitOperationAdd(path_in_repo=file.name, path_or_fileobj=str(file))
                    for file in sorted(Path(folder).iterdir())
                ]
                commit = api.create_commit(repo_id, operations=operations, commit_message="Upload CLIP ensemble gate")
        except Exception as error:  # any Hub or network failure: report it without the token
            message = str(error).replace(token, "***")
            raise ValueError(
                f"Pushing to '{repo_id}' failed: {message}. Check that the token has write permission and that "
                "the repo name is yours or your organisation's."
            ) from None
        return commit.commit_url


def _short(name) -> str:
    """A backbone id for messages: a local folder by its last part, never its path on someone's disk."""
    name = str(name or "?")
    return Path(name.removeprefix(LOCAL_DIR_PREFIX)).name if name.startswith(("/", ".", LOCAL_DIR_PREFIX)) else name


def _has_cascade(config_bytes: bytes) -> bool:
    """Whether a saved config.json describes a cascade (then cascade.safetensors belongs with it)."""
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # load_gate reports the bad JSON
    return isinstance(config, dict) and config.get("cascade") is not None


def _gate_from_zip(path: Path) -> tuple[bytes, bytes, bytes | None]:
    """config.json, gate.safetensors and cascade.safetensors (None when absent) from a downloaded gate zip (at its
    top or in one folder), read in memory."""
    names = ("config.json", GATE_WEIGHTS_NAME, CASCADE_WEIGHTS_NAME)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"'{path.name}' is not a zip file; upload the zip the Save tab downloads.") from None
    with archive:
        found = {}
        for info in archive.infolist():
            name = Path(info.filename)
            if name.name in names and len(name.parts) <= 2:
                if name.name in found:
                    raise ValueError(f"'{path.name}' holds more than one {name.name}; zip one gate.")
                limit = MAX_CONFIG_BYTES if name.name == "config.json" else MAX_GATE_FILE_BYTES
                found[name.name] = _read_zip_member(archive, info, limit)
    missing = sorted({"config.json", GATE_WEIGHTS_NAME} - set(found))
    if missing:
        raise ValueError(f"'{path.name}' has no {' or '.join(missing)}; upload the zip the Save tab downloads.")
    return found["config.json"], found[GATE_WEIGHTS_NAME], found.get(CASCADE_WEIGHTS_NAME)


def verdict(report: EvaluationReport) -> str:
    """Plain words on an evaluation: does the gate beat plain averaging and the best single backbone here, by how much."""
    top1 = {row["method"]: row["top1"] for row in report.rows()}
    gate = top1.get(report.gate_method)
    averaging = top1.get("mean of logits")
    backbones = {name: top1[name] for name in report.backbones if name in top1}
    if report.best_single in backbones:
        best_name, best_what = report.best_single, "the backbone chosen on the calibration data"
    else:
        best_name = max(backbones, key=backbones.get)
        best_what = "the best backbone on these images (picked with their labels: a generous comparison)"
    best = backbones[best_name]
    n = len(report.labels)

    def versus(name: str, accuracy: float) -> str:
        diff = 100 * (gate - accuracy)
        if abs(diff) < 1e-9:
            return f"ties with {name} ({_percent(accuracy)})"
        return f"{'beats' if diff > 0 else 'loses to'} {name} ({_percent(accuracy)}) by {abs(diff):.1f} points"

    head = (
        f"**Verdict on {n} images:** the gate scores {_percent(gate)} top-1; it {versus('plain averaging', averaging)}"
    )
    head += f" and {versus(f'{best_what}, {best_name},', best)}."
    if report.gate_method != "gate":
        head += " The gate is not calibrated: it is plain averaging. Calibrate it first to compare."
    if n < 50:
        head += f" With {n} images, one image is {100 / n:.1f} points: treat small differences as noise."
    return head


__all__ = [
    "BROWSER_PAYLOAD_VERSION",
    "GATE_FOLDER",
    "MAX_EVAL_IMAGES",
    "MAX_HUB_IMAGES",
    "MAX_IMAGES_PER_LABEL",
    "MAX_LABELS",
    "MAX_SHOTS",
    "MAX_UPLOAD_LABELS",
    "GateStore",
    "Prediction",
    "SessionGate",
    "SharedEnsemble",
    "calibration_verdict",
    "check_dataset_id",
    "check_upload",
    "parse_labels",
    "split_labels",
    "verdict",
]
