"""Configuration of a CLIP backbone ensemble: which backbones, which labels, and the gate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..backbones.base import LOCAL_DIR_PREFIX
from ..backbones.templates import TEMPLATE_SETS

COMBINATIONS = ("softplus", "softmax", "top1")


def _normalize_backbone(index: int, entry: Any) -> dict[str, Any]:
    """A backbone entry as a dict with `name_or_path`, `revision` and `embed_dim`."""
    if isinstance(entry, str):
        entry = {"name_or_path": entry}
    if not isinstance(entry, dict):
        raise TypeError(
            f"backbones[{index}] must be a repo id, a local folder or a dict with 'name_or_path', "
            f"got {type(entry).__name__}."
        )
    name = entry.get("name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbones[{index}] has no 'name_or_path': give a Hub repo id or a local folder.")
    embed_dim = entry.get("embed_dim")
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim <= 0):
        raise ValueError(f"backbones[{index}] ('{name}') has embed_dim={embed_dim!r}; it must be a positive int.")
    return {**entry, "name_or_path": name, "revision": entry.get("revision"), "embed_dim": embed_dim}


class CLIPEnsembleConfig(PretrainedConfig):
    r"""
    Configuration of a [`CLIPEnsembleModel`]: the backbones it wraps (by reference, like a PEFT adapter), the
    labels and prompt templates of its zero-shot heads, and the gate that weighs the backbones per image.

    Args:
        backbones (`list[str | dict]`):
            The CLIP backbones, each a Hub repo id, a local folder, or a dict with `name_or_path`, `revision`
            (a branch, tag or commit; pin a commit for reproducible gates) and `embed_dim` (filled in when the
            backbone is loaded). Ids starting with `hf-hub:` or `local-dir:` are OpenCLIP models (the
            `[open-clip]` extra), e.g. `hf-hub:timm/resnet50_clip.openai`. The order is the order of the gate's
            outputs.
        labels (`list[str]`):
            The class names, unique and non-empty. `id2label` and `label2id` follow them.
        templates (`list[str] | str`, *optional*, defaults to `"short"`):
            Prompt templates with one `{}` each, or the name of a set in `clip_ensemble.backbones.templates.TEMPLATE_SETS`.
        gate_hidden_size (`int`, *optional*, defaults to 128):
            Width of the gate's hidden layer (the paper uses 128).
        combination (`str`, *optional*, defaults to `"softplus"`):
            How gate outputs `t` weigh the backbones' logits: `"softplus"` (the paper: `w = softplus(t)`, a learned
            inverse temperature per backbone), `"softmax"` (a convex mixture) or `"top1"` (softmax while
            training, hard routing to the highest-weighted backbone at inference).
        calibration (`dict`, *optional*):
            What the gate was calibrated on (dataset, shots, seed, accuracies); written by calibration and shown in
            the model card. `None` for an uncalibrated gate.
        cascade (`dict`, *optional*):
            A cascade that runs backbones cheapest first and lets confident images stop early: `order` (backbone
            indices in run order), `stop_margins` (per stage but the last, the margin, top-1 minus top-2 logit, at
            which an image stops there; `None` where none stops) and what its fitting estimated (`tolerance`,
            `mean_gflops`, ...). Its gates are saved in `cascade.safetensors`. `None` (the default) runs every
            backbone on every image.
        class_head (`dict`, *optional*):
            A per-class correction of the combined logits that calibration kept (see
            `clip_ensemble.models.class_head.ClassHead`): its `rank` and how it was fitted (`penalty`). Its weights
            are saved in `class_head.safetensors`; it holds one row per label, so it serves these labels only.
            `None` (the default): the gate's combination alone.

    Example:

    ```python
    >>> from clip_ensemble import CLIPEnsembleConfig

    >>> config = CLIPEnsembleConfig(
    ...     backbones=["openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"],
    ...     labels=["cat", "dog"],
    ... )
    >>> config.num_backbones
    2
    ```
    """

    model_type = "clip_ensemble"

    backbones: list[Any] | None = None
    labels: list[str] | None = None
    templates: list[str] | str | None = "short"
    gate_hidden_size: int = 128
    combination: str = "softplus"
    calibration: dict | None = None
    cascade: dict | None = None
    class_head: dict | None = None

    def __post_init__(self, **kwargs):
        # id2label / label2id always follow `labels`; saved copies of them are redundant.
        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        self.id2label = None
        if self.backbones is not None:
            self._validate()
            self.id2label = dict(enumerate(self.labels))
            self.label2id = {label: i for i, label in enumerate(self.labels)}
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        if not self.backbones:
            raise ValueError("`backbones` is empty: give at least one CLIP repo id or local folder.")
        self.backbones = [_normalize_backbone(i, entry) for i, entry in enumerate(self.backbones)]
        names = [(b["name_or_path"], b["revision"]) for b in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"`backbones` lists the same backbone twice: {sorted(names, key=str)}.")

        if self.labels is None or len(self.labels) == 0:
            raise ValueError("`labels` is empty: give the class names, e.g. labels=['cat', 'dog'].")
        self.labels = [str(label).strip() for label in self.labels]
        if any(not label for label in self.labels):
            raise ValueError("`labels` contains an empty label; every class needs a name.")
        duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"`labels` are not unique: {duplicates} appear more than once.")

        if isinstance(self.templates, str):
            if self.templates not in TEMPLATE_SETS:
                raise ValueError(
                    f"Unknown template set '{self.templates}'; choose one of {sorted(TEMPLATE_SETS)} "
                    "or pass a list of templates."
                )
        elif not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("`templates` must be non-empty and each template must contain '{}' for the label.")
        else:
            self.templates = list(self.templates)

        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination='{self.combination}' is not supported; choose one of {list(COMBINATIONS)}.")
        if not isinstance(self.gate_hidden_size, int) or self.gate_hidden_size <= 0:
            raise ValueError(f"gate_hidden_size={self.gate_hidden_size!r} must be a positive int.")
        if self.cascade is not None:
            self._validate_cascade()
        if self.class_head is not None:
            rank = self.class_head.get("rank") if isinstance(self.class_head, dict) else None
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(
                    f"class_head={self.class_head!r} needs a positive int 'rank'; calibration writes it, or set "
                    "class_head=None for the gate's combination alone."
                )

    def _validate_cascade(self) -> None:
        cascade = self.cascade
        if not isinstance(cascade, dict) or "order" not in cascade or "stop_margins" not in cascade:
            raise ValueError(
                f"cascade={cascade!r} needs 'order' and 'stop_margins'; fit one with "
                "`calibrate(..., cascade_tolerance=...)`."
            )
        if sorted(cascade["order"]) != list(range(len(self.backbones))):
            raise ValueError(
                f"cascade order {cascade['order']} must list each of the {len(self.backbones)} backbones once."
            )
        margins = cascade["stop_margins"]
        if not isinstance(margins, list) or len(margins) != len(self.backbones) - 1:
            raise ValueError(
                f"cascade stop_margins {margins!r} must list one margin per backbone but the last "
                f"({len(self.backbones) - 1}); null where no image stops."
            )
        for margin in margins:
            if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0):
                raise ValueError(f"cascade stop margin {margin!r} must be a number >= 0, or null where none stops.")

    @property
    def num_backbones(self) -> int:
        return len(self.backbones or [])

    @property
    def backbone_names(self) -> list[str]:
        """Names for tables: repo ids as they are, local folders by their last component when that stays unique."""
        names = [entry["name_or_path"] for entry in self.backbones or []]
        short = [
            Path(name.removeprefix(LOCAL_DIR_PREFIX)).name
            if name.startswith(LOCAL_DIR_PREFIX) or os.path.isdir(name)
            else name
            for name in names
        ]
        return short if len(set(short)) == len(short) else names

    @property
    def template_list(self) -> list[str]:
        """The prompt templates, with a named set resolved."""
        return list(TEMPLATE_SETS[self.templates]) if isinstance(self.templates, str) else list(self.templates)


__all__ = ["CLIPEnsembleConfig", "COMBINATIONS"]
