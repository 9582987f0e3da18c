"""Labelled images from a Hub dataset, an image folder or Python lists, and stratified k-shot sampling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.processing_clip_ensemble import ImageInput
from ..sources import check_path_or_hub_id, require_hub

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "img", "picture", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


@dataclass
class LabelledImages:
    """Images with integer labels into `label_names`.

    `images` is any indexable sequence of what `load_image` accepts (PIL images, paths, bytes): a list, or a
    lazily decoded `datasets` column, so large datasets are not held in memory.
    """

    images: Sequence[ImageInput]
    labels: list[int]
    label_names: list[str]
    name: str = "data"

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels.")
        if not self.label_names:
            raise ValueError(f"{self.name}: no label names.")
        bad = sorted({label for label in self.labels if not 0 <= label < len(self.label_names)})
        if bad:
            raise ValueError(f"{self.name}: labels {bad[:10]} are outside 0..{len(self.label_names) - 1}.")

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Images per label name."""
        per_class = np.bincount(self.labels, minlength=len(self.label_names))
        return dict(zip(self.label_names, per_class.tolist()))

    def subset(self, indices: Sequence[int], name: str | None = None) -> LabelledImages:
        return LabelledImages(
            images=[self.images[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            name=name or self.name,
        )


def from_lists(
    images: Sequence[ImageInput], labels: Sequence[int | str], label_names: Sequence[str] | None = None
) -> LabelledImages:
    """Images with labels given as names (label set: sorted unique names, unless given) or as indices."""
    if label_names is None:
        if not all(isinstance(label, str) for label in labels):
            raise ValueError("Integer labels need `label_names`; or pass the labels as class names.")
        label_names = sorted(set(labels))
    label_names = list(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({label for label in labels if isinstance(label, str) and label not in index})
    if unknown:
        raise ValueError(f"Labels {unknown} are not in label_names {label_names}.")
    return LabelledImages(
        list(images), [index[x] if isinstance(x, str) else int(x) for x in labels], label_names, "lists"
    )


def from_image_folder(folder: str | os.PathLike, label_map: dict[str, str] | None = None) -> LabelledImages:
    """`folder/<class name>/<image files>`: one sub-folder per class, named by its label, or by a key of
    `label_map` (folder name -> label) for labels that are not valid folder names ("T-shirt/top")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder; give a folder with one sub-folder of images per class.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = sorted(set(label_map or {}) - set(classes))
    if unknown:
        raise ValueError(
            f"The label map names folders {unknown} that '{folder}' does not have (its class folders: {classes}); "
            "map each class folder's name to its label."
        )
    images, labels = [], []
    for label, class_name in enumerate(classes):
        files = sorted(p for p in (folder / class_name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images += [str(p) for p in files]
        labels += [label] * len(files)
    if not images:
        raise ValueError(
            f"'{folder}' holds no images in class sub-folders; expected e.g. '{folder}/cat/1.jpg' "
            f"(suffixes {', '.join(IMAGE_SUFFIXES)})."
        )
    names = [(label_map or {}).get(name, name) for name in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"The label map gives two class folders of '{folder}' the same label: {names}.")
    return LabelledImages(images, labels, names, folder.name)


def saved_by_datasets(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return (Path(folder) / "state.json").is_file() or (Path(folder) / "dataset_dict.json").is_file()


def images_saved_to_disk(folder: str | os.PathLike, split: str = "test", image_column: str | None = None) -> list:
    """The images of a folder written by `save_to_disk` (the `split` of a DatasetDict), labelled or not."""
    import datasets

    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Split '{split}' not found in '{folder}'; it has the splits {sorted(dataset)}.")
        dataset = dataset[split]
    column = _pick_column(list(dataset.column_names), image_column, _IMAGE_COLUMNS, "image")
    return list(dataset[column])


def _pick_column(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{what} column '{given}' not found; the dataset has the columns {sorted(columns)}.")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"Could not detect the {what} column: expected one of {list(candidates)}, but only the columns "
        f"{sorted(columns)} were found; name it with `{what}_column=`."
    )


def from_hub_dataset(
    dataset,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> LabelledImages:
    """A `datasets.Dataset`, or a Hub dataset id loaded with `datasets.load_dataset(id, split=split)`.

    Image and label columns are detected unless named; a `ClassLabel` column gives the label names.
    """
    import datasets

    name = dataset if isinstance(dataset, str) else None
    if isinstance(dataset, str):
        check_path_or_hub_id(dataset, "dataset")
        require_hub([dataset])
        dataset = datasets.load_dataset(dataset, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Split '{split}' not found; the dataset has the splits {sorted(dataset)}.")
        dataset = dataset[split]
    name = name or dataset.info.dataset_name or "dataset"
    columns = list(dataset.column_names)
    image_column = _pick_column(columns, image_column, _IMAGE_COLUMNS, "image")
    label_column = _pick_column(columns, label_column, _LABEL_COLUMNS, "label")
    feature = dataset.features[label_column]
    labels = list(dataset[label_column])
    if label_names is None and isinstance(feature, datasets.ClassLabel):
        label_names = feature.names
    if label_names is None:
        if not all(isinstance(label, str) for label in labels):
            raise ValueError(
                f"Label column '{label_column}' is not a ClassLabel and holds no names; pass `label_names`."
            )
        data = from_lists(dataset[image_column], labels)
        data.name = name
        return data
    return LabelledImages(dataset[image_column], [int(x) for x in labels], list(label_names), name)


def load_labelled_data(
    source, split: str = "train", label_map: dict[str, str] | None = None, **columns
) -> LabelledImages:
    """Dispatch: `LabelledImages` as is, a folder written by `datasets`' `save_to_disk`, an image folder (with an
    optional `label_map`, folder name -> label), a `datasets` dataset, or a Hub dataset id."""
    if isinstance(source, LabelledImages):
        return source
    image_folder = isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and not saved_by_datasets(source)
    if label_map and not image_folder:
        raise ValueError(
            "A label map renames an image folder's class folders; a dataset names its labels itself (a ClassLabel "
            "column, or `label_names`)."
        )
    if image_folder:
        return from_image_folder(source, label_map)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():  # written by `save_to_disk`
        import datasets

        data = from_hub_dataset(datasets.load_from_disk(str(source)), split=split, **columns)
        data.name = Path(source).name
        return data
    if isinstance(source, os.PathLike):  # a missing folder: said so by `from_hub_dataset`'s check
        source = str(source)
    return from_hub_dataset(source, split=split, **columns)


def sample_few_shot(data: LabelledImages, shots: int, seed: int = 0) -> list[int]:
    """Indices of `shots` images per class, drawn with `seed`; sorted by class, then draw order."""
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots={shots!r}; give a positive number of images per class, e.g. shots=4.")
    labels = np.asarray(data.labels)
    short = {name: count for name, count in data.counts().items() if count < shots}
    if short:
        name, count = next(iter(short.items()))
        raise ValueError(
            f"shots={shots} but class '{name}' has only {count} images in '{data.name}'"
            + (f" ({len(short) - 1} more classes are short too)" if len(short) > 1 else "")
            + "; lower `shots` or pass more data."
        )
    rng = np.random.default_rng(seed)
    return [int(i) for c in range(len(data.label_names)) for i in rng.permutation(np.flatnonzero(labels == c))[:shots]]


__all__ = [
    "LabelledImages",
    "from_hub_dataset",
    "from_image_folder",
    "from_lists",
    "images_saved_to_disk",
    "load_labelled_data",
    "sample_few_shot",
    "saved_by_datasets",
]
