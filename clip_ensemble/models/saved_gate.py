"""Saved gates: the files `save_pretrained` writes, and the one strict loader that reads them back.

A saved gate is `config.json` (the ensemble's config: backbones by reference, labels, gate settings), the gate's
weights (`gate.safetensors`), when the config has a cascade the cascade's (`cascade.safetensors`), and when it has a
class head the head's (`class_head.safetensors`). The loader reads them from a folder, a zip of that folder, a list
of the files, or a Hub repo id, and checks every tensor's name and shape: `from_pretrained`, the CLI and the app all
load through it. Never unpickles.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ..backbones.base import LOCAL_DIR_PREFIX
from .cascade import Cascade
from .class_head import ClassHead
from .configuration_clip_ensemble import CLIPEnsembleConfig

CONFIG_NAME = "config.json"
GATE_WEIGHTS_NAME = "gate.safetensors"
CASCADE_WEIGHTS_NAME = "cascade.safetensors"
CLASS_HEAD_WEIGHTS_NAME = "class_head.safetensors"
GATE_FILES = (CONFIG_NAME, GATE_WEIGHTS_NAME, CASCADE_WEIGHTS_NAME, CLASS_HEAD_WEIGHTS_NAME)


@dataclass
class SavedGate:
    """A saved gate as read, before it is checked against a model: its config (a dict, as in config.json) and the
    raw bytes of its weight files."""

    config: dict
    gate_bytes: bytes
    cascade_bytes: bytes | None
    source: str  # where it came from, in words ("'gate.zip'", "the Hub repo me/gate")
    class_head_bytes: bytes | None = None

    @property
    def backbones(self) -> list[dict]:
        return [e if isinstance(e, dict) else {"name_or_path": e} for e in self.config.get("backbones") or []]

    @property
    def labels(self) -> list[str] | None:
        labels = self.config.get("labels")
        return [str(label) for label in labels] if isinstance(labels, list) else None

    @property
    def calibration(self) -> dict | None:
        calibration = self.config.get("calibration")
        return calibration if isinstance(calibration, dict) else None

    @property
    def cascade(self) -> dict | None:
        return self.config.get("cascade")

    @property
    def class_head(self) -> dict | None:
        return self.config.get("class_head")


def write_weights(state: dict[str, torch.Tensor], file: Path) -> None:
    """`state` as safetensors at `file`, written then renamed, so an interrupted save never leaves a corrupt file."""
    partial = file.with_name(f".{file.name}.partial")
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, partial, metadata={"format": "pt"})
    os.replace(partial, file)


def _parse_config(data: bytes, source: str) -> dict:
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"The config.json of {source} is not valid JSON ({error}).") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip_ensemble":
        raise ValueError(
            f"The config.json of {source} is not a clip-ensemble gate's (its model_type is not 'clip_ensemble')."
        )
    return config


def _read(path: Path, limit: int | None) -> bytes:
    if limit is not None and path.stat().st_size > limit:
        raise ValueError(
            f"'{path.name}' is too large to be a gate file ({path.stat().st_size} bytes; at most {limit})."
        )
    return path.read_bytes()


def _from_zip(path: Path, limits: dict[str, int | None]) -> dict[str, bytes]:
    """The gate files of a zip (at its top or in one folder), read in memory."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"'{path.name}' is not a zip file; zip the folder `save_pretrained` wrote.") from None
    found = {}
    with archive:
        for info in archive.infolist():
            name = Path(info.filename)
            if name.name not in GATE_FILES or len(name.parts) > 2:
                continue
            if name.name in found:
                raise ValueError(f"'{path.name}' holds more than one {name.name}; zip one gate.")
            limit = limits[name.name]
            if limit is not None and info.file_size > limit:
                raise ValueError(f"'{info.filename}' in the zip is {info.file_size} bytes; at most {limit} are read.")
            found[name.name] = archive.read(info)
    return found


def read_saved_gate(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_config_bytes: int | None = None,
    max_weights_bytes: int | None = None,
    **hub_kwargs,
) -> SavedGate:
    """Read a saved gate from a folder, a zip of it, a list of its files (config.json, gate.safetensors and, with a
    cascade or a class head, cascade.safetensors or class_head.safetensors), or a Hub repo id (`hub_kwargs`:
    revision, token, cache_dir, local_files_only).

    Files over `max_config_bytes` / `max_weights_bytes` are refused before they are read. A Hub that cannot be
    reached raises the Hub's own error; anything wrong with the files raises a ValueError naming the file and the fix.
    """
    limits = {
        CONFIG_NAME: max_config_bytes,
        GATE_WEIGHTS_NAME: max_weights_bytes,
        CASCADE_WEIGHTS_NAME: max_weights_bytes,
        CLASS_HEAD_WEIGHTS_NAME: max_weights_bytes,
    }
    fix = "save the ensemble with `save_pretrained`"
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder, source_name = Path(source), f"'{source}'"
        files = {name: folder / name for name in GATE_FILES if (folder / name).is_file()}
        found = {name: _read(path, limits[name]) for name, path in files.items()}
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix.lower() == ".zip":
        source_name = f"'{Path(source).name}'"
        found = _from_zip(Path(source), limits)
        fix = "zip the folder `save_pretrained` wrote"
    elif isinstance(source, (str, os.PathLike)):  # a Hub repo id
        from huggingface_hub import hf_hub_download

        source_name = f"the Hub repo {source}"
        found = {CONFIG_NAME: _read(Path(hf_hub_download(str(source), CONFIG_NAME, **hub_kwargs)), max_config_bytes)}
        weights, config = [GATE_WEIGHTS_NAME], _parse_config(found[CONFIG_NAME], source_name)
        if config.get("cascade") is not None:
            weights.append(CASCADE_WEIGHTS_NAME)
        if config.get("class_head") is not None:
            weights.append(CLASS_HEAD_WEIGHTS_NAME)
        for name in weights:
            found[name] = _read(Path(hf_hub_download(str(source), name, **hub_kwargs)), max_weights_bytes)
    else:
        files = [Path(f) for f in source if Path(f).name != "README.md"]  # the model card, if picked with the rest
        names = sorted(f.name for f in files)
        if len(set(names)) != len(names) or not {CONFIG_NAME, GATE_WEIGHTS_NAME} <= set(names) <= set(GATE_FILES):
            raise ValueError(
                f"Give the files {CONFIG_NAME} and {GATE_WEIGHTS_NAME} (and {CASCADE_WEIGHTS_NAME} or "
                f"{CLASS_HEAD_WEIGHTS_NAME} for a gate with a cascade or a class head), or the saved folder or its zip "
                f"(got {names})."
            )
        source_name = f"{CONFIG_NAME} and {GATE_WEIGHTS_NAME}"
        found = {f.name: _read(f, limits[f.name]) for f in files}
    missing = [name for name in (CONFIG_NAME, GATE_WEIGHTS_NAME) if name not in found]
    if missing:
        raise ValueError(f"{source_name} has no {' or '.join(missing)}; {fix}.")
    config = _parse_config(found[CONFIG_NAME], source_name)
    return SavedGate(
        config,
        found[GATE_WEIGHTS_NAME],
        found.get(CASCADE_WEIGHTS_NAME),
        source_name,
        found.get(CLASS_HEAD_WEIGHTS_NAME),
    )


def strict_state(data: bytes, expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors `data`, checked against `expected`'s names and shapes, in `expected`'s dtypes."""
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(
            f"{what} is corrupted or not a readable safetensors file ({error}); re-download it or save the ensemble "
            "again."
        ) from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{name}: file {tuple(state[name].shape)} vs config {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what} does not match the config: missing keys {missing}, unexpected keys {unexpected}, mis-shaped "
            f"{mismatched}. It was saved by another version or another model, or the config's backbones, their "
            "embedding widths or gate_hidden_size differ from the file's."
        )
    return {name: state[name].to(tensor.dtype) for name, tensor in expected.items()}


def cascade_state(
    saved: SavedGate, config: CLIPEnsembleConfig, entry: dict | None = None
) -> dict[str, torch.Tensor] | None:
    """The saved cascade's weights, checked against its config entry (`entry`, by default the saved config's) on
    `config`'s backbones and gate settings; None when there is no cascade."""
    entry = saved.cascade if entry is None else entry
    if entry is None:
        return None
    if saved.cascade_bytes is None:
        raise ValueError(
            f"{saved.source}: the config has a cascade but no {CASCADE_WEIGHTS_NAME} came with it; save the ensemble "
            "again with `save_pretrained`, or remove 'cascade' from its config.json."
        )
    try:  # the config's own checks: order, stop margins
        CLIPEnsembleConfig(backbones=config.backbones, labels=["a"], cascade=entry)
    except (ValueError, TypeError) as error:
        raise ValueError(f"The cascade of {saved.source}: {error}") from None
    embed_dims = [backbone["embed_dim"] for backbone in config.backbones]
    cascade = Cascade(embed_dims, entry["order"], entry["stop_margins"], config.gate_hidden_size, config.combination)
    return strict_state(saved.cascade_bytes, cascade.state_dict(), f"The {CASCADE_WEIGHTS_NAME} of {saved.source}")


def class_head_state(saved: SavedGate, config: CLIPEnsembleConfig) -> dict[str, torch.Tensor] | None:
    """The saved class head's weights, checked against its config entry on `config`'s backbones and the saved
    labels; None when there is no class head."""
    entry = saved.class_head
    if entry is None:
        return None
    if saved.class_head_bytes is None:
        raise ValueError(
            f"{saved.source}: the config has a class head but no {CLASS_HEAD_WEIGHTS_NAME} came with it; save the "
            "ensemble again with `save_pretrained`, or remove 'class_head' from its config.json."
        )
    try:  # the config's own checks: a positive rank, labels
        checked = CLIPEnsembleConfig(backbones=config.backbones, labels=saved.labels, class_head=entry)
    except (ValueError, TypeError) as error:
        raise ValueError(f"The class head of {saved.source}: {error}") from None
    head = ClassHead(sum(b["embed_dim"] for b in config.backbones), entry["rank"], len(checked.labels))
    return strict_state(saved.class_head_bytes, head.state_dict(), f"The {CLASS_HEAD_WEIGHTS_NAME} of {saved.source}")


def short_name(name) -> str:
    """A backbone id for messages: a local folder by its last part, never its path on someone's disk."""
    name = str(name or "?")
    return Path(name.removeprefix(LOCAL_DIR_PREFIX)).name if name.startswith(("/", ".", LOCAL_DIR_PREFIX)) else name


def _describe(entry: dict) -> str:
    name = f"'{short_name(entry.get('name_or_path'))}'"
    return f"{name} at revision {entry['revision']}" if entry.get("revision") else name


def match_backbones(saved: list[dict], config: CLIPEnsembleConfig, what: str, fix: str) -> list[int]:
    """For each of `config`'s backbones, the index of the same backbone among `saved` (config entries): the same id,
    the same revision where both pin one, and the same embedding width. The order may differ (a gate calibrated on
    the same backbones, listed in another order); anything else is refused naming the missing and the extra
    backbones. `fix` ends each message."""
    loaded, unused = config.backbones, list(range(len(saved)))
    order, extra = [], []
    for mine in loaded:
        same = [
            j
            for j in unused
            if saved[j].get("name_or_path") == mine["name_or_path"]
            and not (saved[j].get("revision") and mine["revision"] and saved[j]["revision"] != mine["revision"])
        ]
        if not same:
            extra.append(mine)
            continue
        order.append(same[0])
        unused.remove(same[0])
        width = saved[same[0]].get("embed_dim")
        if width is not None and width != mine["embed_dim"]:
            raise ValueError(
                f"Backbone {_describe(mine)} of {what} has {width}-d embeddings, but the loaded one has "
                f"{mine['embed_dim']}-d. {fix}"
            )
    if extra or unused:
        problems = []
        if unused:
            problems.append(
                f"it needs {', '.join(_describe(saved[j]) for j in unused)}, which {'is' if len(unused) == 1 else 'are'} not loaded"
            )
        if extra:
            problems.append(
                f"{', '.join(_describe(e) for e in extra)} {'is' if len(extra) == 1 else 'are'} loaded but not in it"
            )
        raise ValueError(
            f"{what[0].upper()}{what[1:]} was calibrated on {len(saved)} backbones "
            f"({', '.join(_describe(e) for e in saved)}), but {len(loaded)} are loaded ({', '.join(config.backbone_names)}): "
            f"{'; '.join(problems)}. {fix}"
        )
    return order


def _input_order(embed_dims: list[int], order: list[int]) -> torch.Tensor:
    """The gate input's positions for backbones saved with widths `embed_dims`, loaded in `order` (loaded backbone i
    is saved backbone `order[i]`): its embedding blocks moved."""
    starts = [0, *torch.tensor(embed_dims).cumsum(0).tolist()]
    return torch.cat([torch.arange(starts[j], starts[j + 1]) for j in order])


def reorder_gate(weights: dict[str, torch.Tensor], embed_dims: list[int], order: list[int]) -> dict[str, torch.Tensor]:
    """An `EnsembleGate`'s weights saved for backbones in one order, for the same backbones in another: loaded
    backbone i is saved backbone `order[i]`; `embed_dims` are the saved backbones' widths. The hidden layer's input
    columns move by embedding block, the output layer's rows by backbone."""
    columns = _input_order(embed_dims, order)
    return {
        name: tensor[:, columns] if name == "fc1.weight" else tensor[order] if name.startswith("fc2.") else tensor
        for name, tensor in weights.items()
    }


class FittingGate(NamedTuple):
    """A saved gate's weights, checked and put in the loaded backbones' order (`check_fits`)."""

    weights: dict[str, torch.Tensor]  # the gate's
    cascade: dict | None  # the cascade's config entry, None without one
    cascade_weights: dict[str, torch.Tensor] | None
    class_head_weights: dict[str, torch.Tensor] | None  # a class head's (for the saved labels), None without one


def check_fits(
    saved: SavedGate, config: CLIPEnsembleConfig, gate: dict[str, torch.Tensor], fix: str, what: str = "the gate"
) -> FittingGate:
    """A saved gate checked against an ensemble already loaded (`config`, and its gate's state_dict `gate`): the same
    backbones (in any order), gate settings and prompt templates. Returns its weights, in the loaded backbones'
    order; `what` names the gate in messages, `fix` ends them."""
    order = match_backbones(saved.backbones, config, what, fix)
    for key in ("combination", "gate_hidden_size", "templates"):
        mine = getattr(config, key)
        if saved.config.get(key, mine) != mine:
            raise ValueError(
                f"The gate of {saved.source} uses {key}={saved.config.get(key)!r}, but the loaded ensemble uses "
                f"{mine!r}, so it would classify differently here. {fix}"
            )
    weights = strict_state(saved.gate_bytes, gate, f"The {GATE_WEIGHTS_NAME} of {saved.source}")
    cascade, class_head = saved.cascade, class_head_state(saved, config)
    if order != sorted(order):
        saved_dims = [config.backbones[order.index(j)]["embed_dim"] for j in range(len(order))]
        weights = reorder_gate(weights, saved_dims, order)
        if isinstance(cascade, dict) and isinstance(cascade.get("order"), list):  # run order: saved -> loaded indices
            cascade = {**cascade, "order": [order.index(j) if j in order else j for j in cascade["order"]]}
        if class_head is not None:  # its basis reads the gate input: rows move by embedding block
            class_head = {**class_head, "basis": class_head["basis"][_input_order(saved_dims, order)]}
    return FittingGate(weights, cascade, cascade_state(saved, config, cascade), class_head)


__all__ = [
    "CASCADE_WEIGHTS_NAME",
    "CLASS_HEAD_WEIGHTS_NAME",
    "CONFIG_NAME",
    "FittingGate",
    "GATE_FILES",
    "GATE_WEIGHTS_NAME",
    "SavedGate",
    "cascade_state",
    "check_fits",
    "class_head_state",
    "match_backbones",
    "read_saved_gate",
    "reorder_gate",
    "short_name",
    "strict_state",
    "write_weights",
]
