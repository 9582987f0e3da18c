"""What the Gradio app (`app.py`) does, without Gradio: shared backbones, one gate per browser session, checked input.

The backbones are loaded once and shared read-only by every session. A session's own state is a `SessionGate` (its
gate weights, the labels and data it was calibrated on), which the app keeps in a `GateStore` on the server (only
idleness ever removes a gate from it) and as a payload in the browser (`SharedEnsemble.to_browser`), so that a page
reload restores it. The shared model is switched to a session's labels and gate only under a lock, and only for the
cheap part of a request: the backbone forward passes over images run before, outside the lock, into a feature cache
that the library call under the lock then reads. Calibrations fit on a second model over the same backbones, under
a lock of their own, so that classifying never waits for another visitor's calibration.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..backbones.base import LOCAL_DIR_PREFIX
from ..backbones.hub_configs import resolve_backbones
from ..calibration.calibrate import calibrate
from ..calibration.cascade_fitting import images_to_show_a_saving
from ..data.features import FeatureCache
from ..data.labelled import LabelledImages, from_lists, load_labelled_data, sample_few_shot
from ..evaluation.evaluate import EvaluationReport, align_labels, evaluate_embeddings
from ..models.class_head import ClassHead
from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from ..models.processing_clip_ensemble import ImageInput, load_image, too_large
from ..sources import HubUnreachable
from .keeping import GateKeeping
from .sessions import SessionGate, same_labels
from .uploads import (
    MAX_EVAL_IMAGES,
    MAX_HUB_IMAGES,
    MAX_IMAGES_PER_LABEL,
    MAX_SHOTS,
    MAX_UPLOAD_LABELS,
    check_dataset_id,
    check_upload,
    parse_labels,
    split_labels,
    unzip_class_folders,
)
from .wording import calibration_verdict

EMBED_CHUNK = 32  # images per progress step
logger = logging.getLogger(__name__)
CASCADE_TOLERANCE = 0.01  # a cascade may cost at most this much cross-validated top-1 (one point), as in the CLI
COSTS_DIFFER = 1.5  # backbones differ in cost when the dearest needs this many times the cheapest's GFLOPs
_HEAD_CACHE_SIZE = 32  # label sets whose zero-shot heads stay cached in the shared model

# Called as progress(fraction done, description); `gr.Progress` instances fit.
ProgressCallback = Callable[[float, str], object]


def _no_progress(fraction: float, description: str) -> None:
    pass


@dataclass
class Prediction:
    """One image's classification by a session's gate."""

    top: dict[str, float]  # the top-k labels -> probability
    backbones: list[dict]  # per backbone: name, its own top label and probability, its gate weight
    gate_weights: dict[str, float]  # backbone name -> gate weight
    note: str  # which gate classified, in words


def _trim_heads(model: CLIPEnsembleModel) -> None:
    """Keep the zero-shot heads of the newest `_HEAD_CACHE_SIZE` label sets (one entry per label set ever used)."""
    heads = model._head_cache
    while len(heads) > _HEAD_CACHE_SIZE:
        del heads[next(iter(heads))]


def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


class SharedEnsemble(GateKeeping):
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
        # Calibration's own model: the same backbone modules (no copy of their weights), its own gate, labels and
        # heads; fitting takes seconds, and holds only this lock.
        self._fitting_model = CLIPEnsembleModel(copy.deepcopy(model.config), list(model.backbones)).eval()
        self._fitting_model.gate.to(model.gate.fc1.weight.device)
        self._fitting_lock = threading.Lock()
        gflops = model.backbone_gflops  # measured once, a forward per backbone
        # A cascade (cheapest backbone first, an image stops once the rest would not change its answer) is fitted
        # with each calibration when the backbones differ in cost: then stopping early saves the dear ones.
        self.costs_differ = max(gflops) >= COSTS_DIFFER * min(gflops)
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
            model.set_class_head(None)
            model.set_labels(labels)
            if session.class_head is not None and same_labels(session.labels, model.config.labels):
                # The head's rows follow the labels it was calibrated on; the session may list them in another order.
                rows = [session.labels.index(label) for label in model.config.labels]
                head = ClassHead.of(**session.class_head_weights).reordered(rows)
                model.set_class_head(head, **session.class_head)
            _trim_heads(model)
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
        # Fewer images than this cannot show that stopping early loses at most the tolerance: no cascade is fitted.
        needed = images_to_show_a_saving(CASCADE_TOLERANCE)
        can_save = len(data) >= needed
        if self.costs_differ and not can_save:
            notes = [
                *notes,
                f"No cascade: the backbones differ in cost, but showing that stopping early keeps top-1 within "
                f"{100 * CASCADE_TOLERANCE:g} point{'' if CASCADE_TOLERANCE == 0.01 else 's'} takes at least {needed} "
                f"calibration images; these are {len(data)}. "
                "Calibrate on more images to get one.",
            ]
        progress(0.0, "Training the gate")
        with self._fitting_lock:  # not the shared model's lock: Classify goes on meanwhile
            model = self._fitting_model
            report = calibrate(
                model,
                data,
                shots=shots,
                seed=0,
                cache=cache,
                progress=lambda fraction, what: progress(fraction, f"Training the gate: {what}"),
                cascade_tolerance=CASCADE_TOLERANCE if self.costs_differ and can_save else None,
            )
            weights, calibration = _state_copy(model.gate), dict(model.config.calibration)
            cascade = copy.deepcopy(model.config.cascade)
            cascade_weights = None if model.cascade is None else _state_copy(model.cascade)
            class_head = copy.deepcopy(model.config.class_head)
            class_head_weights = None if model.class_head is None else _state_copy(model.class_head)
            _trim_heads(model)
        # The backbones ran before the lock; count that work in the report.
        report.feature_seconds += seconds
        report.images_embedded = computed
        text = "\n\n".join([calibration_verdict(report), *notes, "Details:\n" + str(report)])
        return SessionGate(
            weights,
            calibration,
            text,
            labels=list(data.label_names),
            cascade=cascade,
            cascade_weights=cascade_weights,
            class_head=class_head,
            class_head_weights=class_head_weights,
        )

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
        except HubUnreachable as error:  # the fix is the operator's: the log has it, the visitor gets what they can do
            logger.warning("A visitor asked for the Hub dataset '%s': %s", dataset, error)
            raise ValueError(
                f"This server cannot reach the Hugging Face Hub right now, so the dataset '{dataset}' cannot be "
                "loaded. Use your own images instead (upload them per label), or try again later."
            ) from None
        except ValueError:
            raise
        except Exception as error:  # datasets raises many types: connection, not found, bad split
            logger.warning("Loading split '%s' of the Hub dataset '%s' failed: %r", split, dataset, error)
            raise ValueError(
                f"Could not load split '{split}' of the Hub dataset '{dataset}': {error}. Check the id and the split "
                "on huggingface.co/datasets; if they are right, upload your own images instead, or try again later."
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
            images, targets, names, skipped = unzip_class_folders(archive, MAX_EVAL_IMAGES)
            pil = []
            for data_bytes, name, label in zip(images, names, targets):
                try:
                    pil.append(load_image(data_bytes))
                except ValueError as error:
                    if isinstance(error.__cause__, Image.DecompressionBombError):
                        raise ValueError(f"'{label}/{name}' in the zip {too_large(error.__cause__)}") from None
                    raise ValueError(
                        f"'{label}/{name}' in the zip is not an image that can be read; remove it or re-export it."
                    ) from None
            labels = sorted(set(targets))
            if len(labels) < 2:
                raise ValueError(f"The zip holds one label folder ({labels}); evaluation needs two or more.")
            data = from_lists(pil, targets, label_names=labels)
            data.name = f"images of {Path(archive).name}"
            if skipped:  # said, not hidden: the report's heading names the files that did not count
                named = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                data.name += f" ({len(skipped)} other {'entry' if len(skipped) == 1 else 'entries'} skipped: {named})"
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


__all__ = ["Prediction", "ProgressCallback", "SharedEnsemble"]
