"""Feature extraction at scale: every image of a data set embedded once by every backbone, into the feature cache,
split over processes, GPUs or machines with `accelerate launch`:

    accelerate launch --num_processes 4 -m clip_ensemble.cli extract-features \\
        --backbones openai-vit --dataset tanganke/eurosat --split train --cache-dir /shared/features

Process k of n takes the images k, k + n, k + 2n, ... and embeds them on its own device (`PartialState().device`)
in chunks; each chunk's embeddings are written to the cache folder as soon as they are computed (shards are written
atomically under unique names, so processes never overwrite each other), and a rerun skips what is already there.
The main process then checks, from the folder itself, that every image is cached for every backbone: a later
`calibrate` or `evaluate` with that cache runs no backbone on these images. Across machines the cache folder must be
on storage that all of them see; the check says so when it is not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..models.configuration_clip_ensemble import _normalize_backbone
from ..models.placement import load_backbones
from .features import FeatureCache, image_fingerprint
from .labelled import load_labelled_data


@dataclass
class ExtractionReport:
    """What each process embedded; `images_embedded[k]` counts images that process k had to run backbones on."""

    dataset: str
    num_images: int
    backbones: list[str]
    cache_dir: str
    images_embedded: list[int]  # per process
    seconds: list[float]  # per process, embedding only (not loading)

    @property
    def num_processes(self) -> int:
        return len(self.seconds)

    @property
    def images_per_second(self) -> float:
        """Images embedded by all processes per second of the slowest one (every backbone run on each image)."""
        slowest = max(self.seconds)
        return sum(self.images_embedded) / slowest if slowest > 0 else 0.0

    def __str__(self) -> str:
        per_process = ", ".join(f"{n} in {s:.1f} s" for n, s in zip(self.images_embedded, self.seconds))
        return "\n".join(
            [
                f"Extracted features of {self.dataset}: {self.num_images} images x {len(self.backbones)} backbones, "
                f"{self.num_processes} process(es)",
                f"  embedded per process: {per_process} (the rest were already cached)",
                f"  throughput: {self.images_per_second:.1f} images/s",
                f"  cache: {self.cache_dir}",
            ]
        )


def extract_features(
    backbones: Sequence[str | dict | Backbone],
    data,
    *,
    split: str = "train",
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    device_map: str | int | torch.device | dict | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    **columns,
) -> ExtractionReport:
    """Embed every image of `data` with every backbone into `cache`; this process's share when run under
    `accelerate launch` (or `torchrun`), all of it otherwise.

    `data` is what `calibrate` takes (a `LabelledImages`, an image folder, a `datasets.Dataset` or a Hub id, with
    `split` and `image_column`/`label_column`). Backbones are loaded onto this process's device unless `device_map`
    says otherwise, in `dtype`. `chunk_size` images are embedded and saved at a time. Returns the same report on
    every process; raises `ValueError` on the main process if some image is missing from the cache afterwards.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; give a positive number of images, e.g. 1024.")
    cache = FeatureCache() if cache is None else cache
    if cache.directory is None:
        raise ValueError("extract_features fills an on-disk cache; pass FeatureCache(folder) (or the default cache).")
    # Without an accelerator, processes started by `torchrun` or `accelerate launch --multi_gpu` share the work on
    # the CPU (gloo); `accelerate launch --cpu` sets ACCELERATE_USE_CPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available())
    entries = [b if isinstance(b, Backbone) else _normalize_backbone(i, b) for i, b in enumerate(backbones)]
    # The main process downloads (data, weights) first; the others then read them from the Hugging Face cache.
    with state.main_process_first():
        data = load_labelled_data(data, split=split, **columns)
        loaded, _, _ = load_backbones(
            entries, device_map=state.device if device_map is None else device_map, dtype=dtype
        )

    share = range(state.process_index, len(data), state.num_processes)
    digests: list[str] = []
    embedded = 0
    bar = tqdm(
        total=len(share), desc="Extracting features", unit="img", disable=not (progress and state.is_main_process)
    )
    started = time.perf_counter()
    for start in range(0, len(share), chunk_size):
        images = [data.images[i] for i in share[start : start + chunk_size]]  # decoded once per chunk
        digests += [image_fingerprint(image) for image in images]
        cache.embed(loaded, images, batch_size=batch_size, progress=False)  # writes this chunk's shards
        embedded += max(cache.last_computed, default=0)
        bar.update(len(images))
    seconds = time.perf_counter() - started
    bar.close()

    stats = gather_object([(embedded, seconds)])
    all_digests = gather_object(digests)
    state.wait_for_everyone()  # every process has written its shards
    if state.is_main_process:
        on_disk = FeatureCache(cache.directory)  # a fresh read of the folder, not this process's memory
        for backbone in loaded:
            missing = len(all_digests) - sum(on_disk.contains(backbone, all_digests))
            if missing:
                raise ValueError(
                    f"{missing} of {len(all_digests)} images are missing from the cache '{cache.directory}' for "
                    f"backbone '{backbone.name_or_path}' after extraction: the processes do not share that folder. "
                    "Put --cache-dir on storage that every machine sees (a shared filesystem), or run on one machine."
                )
    return ExtractionReport(
        dataset=data.name,
        num_images=len(data),
        backbones=[backbone.name_or_path for backbone in loaded],
        cache_dir=str(cache.directory),
        images_embedded=[n for n, _ in stats],
        seconds=[s for _, s in stats],
    )


__all__ = ["ExtractionReport", "extract_features"]
