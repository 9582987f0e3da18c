"""Curated backbone sets: the JSON files in the repo's `hub_configs/`, validated when read.

Each file is one set, named by its file name: a `description`, the `sources` of its figures, and `backbones`, each
with `name_or_path`, `revision`, `license`, `params_millions` and `image_gflops` (numbers, or null with a `note` that
says why; figures are never guessed), and optionally `profile` (the row of OpenCLIP's model profile table used) and
`note`.

```python
>>> from clip_ensemble import CLIPEnsembleModel
>>> from clip_ensemble.backbones.hub_configs import backbone_entries

>>> model = CLIPEnsembleModel.from_backbones(backbone_entries("small-cpu"), labels=["cat", "dog"])
```
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..sources import check_path_or_hub_id

# `clip_ensemble.backbones.base.HF_HUB_PREFIX` and `LOCAL_DIR_PREFIX` (OpenCLIP ids), spelt here so that listing and
# resolving sets imports no torch: `clip-ensemble configs` and argument errors answer at once.
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

# The repo's top-level hub_configs/, linked into the package so that a wheel ships it too.
CONFIG_DIR = Path(__file__).parents[1] / "_hub_configs"  # clip_ensemble/_hub_configs, a link to hub_configs/

_NUMBER = (int, float)
_SET_FIELDS = {"description": str, "sources": str, "backbones": list}
_BACKBONE_FIELDS = {
    "name_or_path": str,
    "revision": (str, type(None)),
    "license": str,
    "params_millions": (*_NUMBER, type(None)),
    "image_gflops": (*_NUMBER, type(None)),
}
_OPTIONAL_BACKBONE_FIELDS = {"profile": str, "note": str}


def list_configs() -> list[str]:
    """The names of the curated backbone sets, sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def _config_file(name_or_file: str | os.PathLike) -> Path:
    if str(name_or_file).endswith(".json"):
        path = Path(name_or_file)
        if not path.is_file():
            raise ValueError(f"No backbone set file at '{path}'; check the path.")
        return path
    path = CONFIG_DIR / f"{name_or_file}.json"
    if not path.is_file():
        raise ValueError(
            f"Unknown backbone set '{name_or_file}'; choose one of {list_configs()} or pass the path of a .json "
            f"file.{_did_you_mean(str(name_or_file))}"
        )
    return path


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list_configs(), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {str: "a string", list: "a list", int: "a number", float: "a number", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_fields(data: Any, required: dict, optional: dict, where: str) -> None:
    """Raise a ValueError naming `where` and the field for a missing, unknown or mistyped field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}.")
    missing = sorted(set(required) - set(data))
    if missing:
        raise ValueError(f"{where} has no field '{missing[0]}'; it needs {sorted(required)}.")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{where} has an unknown field '{unknown[0]}'; allowed: {sorted({**required, **optional})}.")
    for field, value in data.items():
        expected = {**required, **optional}[field]
        # bool is an int subclass in Python but not a figure.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValueError(f"{where}: field '{field}' must be {_type_name(expected)}, got {value!r}.")


def load_hub_config(name_or_file: str | os.PathLike) -> dict[str, Any]:
    """One backbone set, validated: a name from `list_configs()` or the path of a .json file in the same schema.

    Returns the file's content with `name` (the file name without `.json`) added.
    """
    path = _config_file(name_or_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Backbone set file '{path}' is not valid JSON: {error}.") from error
    _check_fields(data, _SET_FIELDS, {}, f"Backbone set file '{path}'")
    if not data["backbones"]:
        raise ValueError(f"Backbone set file '{path}' lists no backbones.")
    for index, entry in enumerate(data["backbones"]):
        label = f" ('{entry['name_or_path']}')" if isinstance(entry, dict) and "name_or_path" in entry else ""
        where = f"Backbone set file '{path}', backbones[{index}]{label}"
        _check_fields(entry, _BACKBONE_FIELDS, _OPTIONAL_BACKBONE_FIELDS, where)
        unknown_figures = [f for f in ("params_millions", "image_gflops") if entry[f] is None]
        if unknown_figures and "note" not in entry:
            raise ValueError(f"{where}: {unknown_figures[0]} is null; add a 'note' that says why it is unknown.")
    names = [entry["name_or_path"] for entry in data["backbones"]]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Backbone set file '{path}' lists {duplicates} more than once.")
    return {"name": path.stem, **data}


def backbone_entries(name_or_file: str | os.PathLike) -> list[dict[str, str | None]]:
    """The set's backbones as `CLIPEnsembleModel.from_backbones` takes them: `name_or_path` and `revision`."""
    return [
        {"name_or_path": entry["name_or_path"], "revision": entry["revision"]}
        for entry in load_hub_config(name_or_file)["backbones"]
    ]


def _check_backbone(value: str, sets: list[str]) -> None:
    """A ValueError for a value of `--backbones` that cannot be a backbone, before any Hub call."""
    if value in sets:
        raise ValueError(
            f"'{value}' is a backbone set: give it alone (`--backbones {value}`), or list repo ids and folders."
        )
    if value.startswith(HF_HUB_PREFIX):
        check_path_or_hub_id(value[len(HF_HUB_PREFIX) :], "OpenCLIP backbone")
    elif value.startswith(LOCAL_DIR_PREFIX):
        if not Path(value[len(LOCAL_DIR_PREFIX) :]).expanduser().is_dir():
            raise ValueError(f"The OpenCLIP backbone folder '{value[len(LOCAL_DIR_PREFIX) :]}' does not exist.")
    elif "/" not in value and not Path(value).expanduser().exists():
        # CLIP repo ids are "org/name": a bare word is a set name or a folder, mistyped.
        raise ValueError(
            f"'{value}' is not a backbone set, an existing folder or a Hub repo id ('org/name').{_did_you_mean(value)} "
            f"`clip-ensemble configs` lists the sets: {sets}."
        )
    else:
        check_path_or_hub_id(value, "backbone")


def resolve_backbones(values: Sequence[str]) -> list[str | dict[str, str | None]]:
    """What `--backbones` takes, for `from_backbones`: one curated set name or .json file, or repo ids and folders.

    Checked without any Hub call: an unknown set name (with the close ones), a missing folder or a malformed repo
    id raises a ValueError.
    """
    values = list(values)
    sets = list_configs()
    if len(values) == 1 and (values[0] in sets or values[0].endswith(".json")):
        return backbone_entries(values[0])
    for value in values:
        _check_backbone(value, sets)
    return values


def _total(backbones: list[dict], field: str) -> str:
    values = [entry[field] for entry in backbones]
    return "n/a" if None in values else f"{sum(values):.1f}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_config_table(name_or_file: str | os.PathLike | None = None) -> str:
    """What `clip-ensemble configs [NAME]` prints: every set with its totals, or one set's backbones."""
    if name_or_file is None:
        rows = []
        for name in list_configs():
            config = load_hub_config(name)
            backbones = config["backbones"]
            needs = any(b["name_or_path"].startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) for b in backbones)
            rows.append(
                [
                    name,
                    str(len(backbones)),
                    _total(backbones, "params_millions"),
                    _total(backbones, "image_gflops"),
                    "[open-clip]" if needs else "",
                    config["description"],
                ]
            )
        header = ["set", "backbones", "params (M)", "GFLOPs/image", "extra", "description"]
        return _table(header, rows, right={1, 2, 3})
    config = load_hub_config(name_or_file)
    backbones = config["backbones"]
    rows = [
        [
            b["name_or_path"],
            b["revision"] or "",
            b["license"],
            "n/a" if b["params_millions"] is None else f"{b['params_millions']:.1f}",
            "n/a" if b["image_gflops"] is None else f"{b['image_gflops']:.1f}",
            b.get("profile", ""),
            b.get("note", ""),
        ]
        for b in backbones
    ]
    rows.append(["total", "", "", _total(backbones, "params_millions"), _total(backbones, "image_gflops"), "", ""])
    header = ["backbone", "revision", "license", "params (M)", "GFLOPs/image", "profile", "note"]
    table = _table(header, rows, right={3, 4})
    return f"{config['name']}: {config['description']}\n\n{table}\n\nSources: {config['sources']}"


__all__ = [
    "CONFIG_DIR",
    "backbone_entries",
    "format_config_table",
    "list_configs",
    "load_hub_config",
    "resolve_backbones",
]
