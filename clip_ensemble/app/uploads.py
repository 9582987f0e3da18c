"""What visitors type and upload, checked before anything runs: labels, images, zips of class folders, dataset ids.

Every problem is a ValueError whose message the visitor can act on; nothing here touches a session's gate.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..models.processing_clip_ensemble import load_image

MAX_LABELS = 200  # labels typed for classification
MAX_UPLOAD_LABELS = 10  # labels that get an upload box
MAX_IMAGES_PER_LABEL = 32  # uploaded images per label
MAX_SHOTS = 16  # images per label drawn from a Hub dataset
MAX_HUB_IMAGES = 2000  # images of a Hub split embedded by one calibration or evaluation
MAX_EVAL_IMAGES = 2000  # images in an uploaded evaluation zip
MAX_GATE_FILE_BYTES = 200_000_000  # gate.safetensors read from an upload or the Hub (a 9-backbone gate is ~3 MB)
MAX_CONFIG_BYTES = 2_000_000
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # namespace/name, nothing else
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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


def check_repo_id(repo_id: str | None, namespace_required: bool = True) -> str:
    """A Hub repo id as a visitor typed it (`namespace/name`; `name` alone when `namespace_required` is False), never a
    path on the server."""
    repo_id = (repo_id or "").strip()
    pattern = _HUB_ID if namespace_required else _REPO_ID
    if not pattern.match(repo_id) or ".." in repo_id or (namespace_required and Path(repo_id).exists()):
        what = "Hub repo id" if namespace_required else "repo id"
        raise ValueError(f"'{repo_id}' is not a {what}; give one like 'your-name/my-gate'.")
    return repo_id


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ValueError(f"'{info.filename}' in the zip is {info.file_size} bytes; at most {limit} are read.")
    return archive.read(info)


def unzip_class_folders(zip_path: str | Path, limit: int) -> tuple[list[bytes], list[str], list[str]]:
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


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_EVAL_IMAGES",
    "MAX_GATE_FILE_BYTES",
    "MAX_HUB_IMAGES",
    "MAX_IMAGES_PER_LABEL",
    "MAX_LABELS",
    "MAX_SHOTS",
    "MAX_UPLOAD_LABELS",
    "check_dataset_id",
    "check_repo_id",
    "check_upload",
    "parse_labels",
    "split_labels",
    "unzip_class_folders",
]
