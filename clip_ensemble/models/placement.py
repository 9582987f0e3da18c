"""Device placement: each backbone whole on one device, planned from its size against a memory budget.

A backbone is never split: CLIP towers are small enough for one device each, and whole backbones on different
devices can run at the same time. `plan_placement` is the pure planning step; `load_backbones` measures the
backbones (on the meta device, or from the safetensors header), plans, then loads them one at a time onto their
devices, so at most one backbone is ever in CPU memory on its way to an accelerator.

Devices follow accelerate's naming: an int is an accelerator (CUDA, XPU, ...), then "mps", "cpu" and "disk". The
main device is the first accelerator (else "cpu"): the gate sits there and the ensemble's logits are gathered there.
A backbone on "cpu" while the main device is an accelerator, or on "disk", is offloaded with accelerate's hooks: its
weights stay in CPU memory or in memory-mapped files and are brought whole to the main device for each call.

Backbones on different accelerators run at the same time (`run_per_device`: one thread per device, each device's
backbones in turn); backbones on the CPU run one after the other, since each already uses every core.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.hooks import attach_align_device_hook
from accelerate.utils import (
    OffloadedWeightsLoader,
    compute_module_sizes,
    convert_file_size_to_int,
    get_max_memory,
    offload_state_dict,
)

from ..backbones.base import Backbone
from ..backbones.loading import backbone_class, load_backbone

STRATEGIES = ("auto", "balanced", "sequential")
Device = int | str  # an accelerator index, "mps", "cpu" or "disk"
# Without `max_memory`, this share of each device's free memory is planned for weights; the rest is for activations.
DEFAULT_MEMORY_FRACTION = 0.9
_T = TypeVar("_T")


def normalize_device(device: Any) -> Device:
    """0, "cuda:0", torch.device("cuda", 0) -> 0; "cpu", "mps" and "disk" as they are."""
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"Device {device} is negative; accelerators are numbered from 0.")
        return device
    if device == "disk":
        return "disk"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{device!r} is not a device; use an accelerator index (0), 'cuda:1', 'mps', 'cpu' or 'disk'."
        ) from error
    if device.type in ("cpu", "mps"):
        return device.type
    if device.type == "meta":
        raise ValueError("'meta' holds no weights; place backbones on an accelerator, 'cpu' or 'disk'.")
    return device.index or 0


def torch_device(device: Device) -> torch.device:
    """The torch device a placement computes on ("disk" computes on the CPU)."""
    return torch.device("cpu" if device == "disk" else device)


def _rank(device: Device) -> tuple[int, int]:
    # accelerate's order: accelerators by index, then mps, cpu, disk.
    return (0, device) if isinstance(device, int) else ({"mps": 1, "cpu": 2, "disk": 3}[device], 0)


def _format_bytes(size: float) -> str:
    if math.isinf(size):
        return "unlimited"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def _budget(max_memory: Mapping) -> dict[Device, float]:
    budget: dict[Device, float] = {}
    for key, value in max_memory.items():
        device = normalize_device(key)
        if isinstance(value, str):
            value = convert_file_size_to_int(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"max_memory[{key!r}] = {value!r}; give bytes (an int) or a size such as '10GiB'.")
        budget[device] = value
    return dict(sorted(budget.items(), key=lambda item: _rank(item[0])))


def main_device(placement: Sequence[Device], max_memory: Mapping | None = None) -> Device:
    """Where the gate sits and offloaded backbones run: the first accelerator of `max_memory` (when planned against
    it) or of the placement, else "mps" or the CPU."""
    candidates = [normalize_device(key) for key in max_memory] if max_memory is not None else list(placement)
    computing = sorted((d for d in candidates if d != "disk"), key=_rank)
    return computing[0] if computing else "cpu"


def is_offloaded(device: Device, main: Device) -> bool:
    """Stored on CPU or disk while computing on the main device."""
    return device == "disk" or (device == "cpu" and main != "cpu")


def _greedy(
    sizes: Sequence[int], free: dict[Device, float], strategy: str
) -> tuple[list[Device | None], int | None, dict[Device, float]]:
    """Whole backbones onto devices with room: the placement, the first backbone that fits nowhere (or None), and
    the room left on each device."""
    free = dict(free)
    placement: list[Device | None] = [None] * len(sizes)
    # Balanced: biggest first, each onto the accelerator with the most room left (ties: the lowest index).
    order = range(len(sizes)) if strategy == "sequential" else sorted(range(len(sizes)), key=lambda i: -sizes[i])
    for i in order:
        fits = [device for device, room in free.items() if room >= sizes[i]]
        if not fits:
            return placement, i, free
        accelerators = [device for device in fits if device not in ("cpu", "disk")]
        device = max(accelerators, key=free.get) if strategy != "sequential" and accelerators else fits[0]
        free[device] -= sizes[i]
        placement[i] = device
    return placement, None, free


def plan_placement(
    sizes: Sequence[int],
    device_map: str | int | torch.device | Mapping,
    max_memory: Mapping | None = None,
    names: Sequence[str] | None = None,
) -> list[Device]:
    """One device per backbone, from the backbones' weight sizes in bytes.

    `device_map` is one of:
        - "balanced" (or "auto"): biggest backbone first, each onto the accelerator with the most room left, then
          the CPU, then the disk: spreads memory and compute over the accelerators;
        - "sequential": in order, each backbone onto the first device with room (fills accelerator 0 first);
        - a single device (0, "cuda:1", "mps", "cpu", "disk"): every backbone there;
        - a dict from backbone index or name (`name_or_path`) to device, covering every backbone.
    `max_memory` maps devices to bytes (or sizes such as "10GiB") and is what the strategies plan against; devices
    not in it are not used; "disk" offloading is allowed when it is in it. Room for the largest offloaded backbone is
    kept on the main device, which runs it. Raises `ValueError` saying how much memory is missing, and where.
    """
    names = list(names) if names is not None else [f"backbone {i}" for i in range(len(sizes))]
    if isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ValueError(
                "max_memory plans device_map='auto', 'balanced' or 'sequential'; an explicit device_map dict is used "
                "as given: drop max_memory, or pass a strategy instead of the dict."
            )
        return _explicit_placement(device_map, names)
    if not (isinstance(device_map, str) and device_map in STRATEGIES):
        if max_memory is not None:
            raise ValueError(
                f"max_memory plans device_map='auto', 'balanced' or 'sequential'; device_map={device_map!r} puts "
                "every backbone on one device: drop max_memory, or use a strategy."
            )
        return [normalize_device(device_map)] * len(sizes)
    if max_memory is None:
        raise ValueError(f"device_map={device_map!r} needs max_memory, e.g. {{0: '20GiB', 'cpu': '30GiB'}}.")
    budget = _budget(max_memory)
    main = main_device([], budget)
    if main not in budget:
        raise ValueError(f"max_memory {dict(max_memory)} names no device to compute on; add 'cpu' or an accelerator.")
    reserve = 0  # kept free on the main device, to run the largest offloaded backbone
    while True:
        free = {**budget, main: budget[main] - reserve}
        placement, misfit, room = _greedy(sizes, free, "sequential" if device_map == "sequential" else "balanced")
        if misfit is not None:
            left = ", ".join(f"{d!r}: {_format_bytes(r)} left" for d, r in room.items())
            kept = f"; {_format_bytes(reserve)} kept on {main!r} to run offloaded backbones" if reserve else ""
            hint = "" if "disk" in budget else ", pass offload_folder to offload backbones to disk"
            raise ValueError(
                f"Backbone {misfit} '{names[misfit]}' needs {sizes[misfit]} bytes ({_format_bytes(sizes[misfit])}), "
                f"more than any device has under max_memory ({left}{kept}). Raise max_memory{hint}, or load in half "
                "precision (dtype=torch.bfloat16 halves the weights)."
            )
        offloaded = [i for i, device in enumerate(placement) if is_offloaded(device, main)]
        largest = max(offloaded, key=lambda i: sizes[i], default=None)
        if largest is None or sizes[largest] <= reserve:
            return placement
        if sizes[largest] > budget[main]:
            raise ValueError(
                f"Backbone {largest} '{names[largest]}' does not fit beside the others, so it is offloaded to "
                f"{placement[largest]!r} and brought whole to {main!r} for each call, which needs "
                f"{_format_bytes(sizes[largest])} there; max_memory gives {main!r} {_format_bytes(budget[main])}. "
                f"Raise max_memory[{main!r}] to at least {sizes[largest]} bytes, or load in half precision "
                "(dtype=torch.bfloat16)."
            )
        reserve = sizes[largest]


def _explicit_placement(device_map: Mapping, names: list[str]) -> list[Device]:
    placement: list[Device | None] = [None] * len(names)
    for key, device in device_map.items():
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
            index = key
        elif isinstance(key, str) and names.count(key) == 1:
            index = names.index(key)
        else:
            raise ValueError(
                f"device_map key {key!r} is not a backbone: use an index 0..{len(names) - 1} or one of the names "
                f"{names}" + (" (this name is listed twice: use the index)" if names.count(key) > 1 else "") + "."
            )
        if placement[index] is not None:
            raise ValueError(f"device_map places backbone {index} '{names[index]}' twice.")
        placement[index] = normalize_device(device)
    missing = [f"{i} '{name}'" for i, (name, device) in enumerate(zip(names, placement)) if device is None]
    if missing:
        raise ValueError(
            f"device_map does not place the backbones {', '.join(missing)}; add them, or use device_map='auto'."
        )
    return placement


def default_max_memory(offload_folder: str | None = None) -> dict[Device, float]:
    """`DEFAULT_MEMORY_FRACTION` of the free memory of each accelerator and of the CPU; disk if a folder is given."""
    budget = {device: int(DEFAULT_MEMORY_FRACTION * free) for device, free in get_max_memory().items()}
    return {**budget, "disk": math.inf} if offload_folder is not None else budget


def offload_backbone(backbone: Backbone, execution_device: torch.device, folder: str | None = None) -> None:
    """Keep `backbone`'s weights in CPU memory (`folder=None`) or in memory-mapped files under `folder`; each call
    brings them whole to `execution_device` (`Backbone.onloaded`) and frees them after.

    The files go to a new sub-folder of `folder`, removed when the backbone is garbage-collected.
    """
    model = backbone.model
    state = model.state_dict()
    if folder is None:
        weights = {name: tensor.cpu() for name, tensor in state.items()}
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)
        own = tempfile.mkdtemp(prefix="clip-ensemble-offload-", dir=folder)
        offload_state_dict(own, state)
        weights = OffloadedWeightsLoader(save_folder=own)
        weakref.finalize(backbone, shutil.rmtree, own, ignore_errors=True)
    del state
    # One hook on the whole model (its class "preloads" every submodule): CLIP models read some weights outside
    # their submodules' forward (logit_scale, projections, attention pools), so per-layer hooks would miss them.
    attach_align_device_hook(
        model,
        execution_device=execution_device,
        offload=True,
        weights_map=weights,
        preload_module_classes=[type(model).__name__],
    )
    backbone.execution_device = execution_device


def _resolve_dtype(dtype: Any, torch_dtype: Any) -> torch.dtype | None:
    """`dtype` (transformers 5's name) or its old alias `torch_dtype`, as a torch dtype; "auto"/None: the default."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only `dtype`.")
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use e.g. torch.bfloat16 or 'float16'.")
    return resolved


def backbone_size(backbone: Backbone | dict, dtype: torch.dtype | None = None) -> int:
    """Bytes of a backbone's weights in `dtype`: from a loaded backbone, or measured without loading its weights."""
    if isinstance(backbone, Backbone):
        return compute_module_sizes(backbone.model, dtype=dtype)[""]
    name = backbone["name_or_path"]
    return backbone_class(name).weight_bytes(name, revision=backbone.get("revision"), dtype=dtype)


def load_backbones(
    backbones: Sequence[dict | Backbone],
    *,
    device_map: str | int | torch.device | Mapping | None = None,
    max_memory: Mapping | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    offload_folder: str | None = None,
    **model_kwargs,
) -> tuple[list[Backbone], list[Device] | None, Device | None]:
    """Load config entries (and place given `Backbone`s) per `device_map` (see `plan_placement`) in `dtype`.

    Without `max_memory`, the strategies plan against 90% of each device's free memory. Returns the backbones, their
    devices and the main device (both None without a `device_map`: the backbones stay where their libraries load
    them, the CPU).
    """
    dtype = _resolve_dtype(dtype, torch_dtype)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder plan a device_map: pass device_map='auto' with them.")
        loaded = [b.to(dtype) if isinstance(b, Backbone) else load_backbone(b, **model_kwargs) for b in backbones]
        return loaded, None, None
    names = [b.name_or_path if isinstance(b, Backbone) else b["name_or_path"] for b in backbones]
    sizes = [backbone_size(b, dtype) for b in backbones]
    if isinstance(device_map, str) and device_map in STRATEGIES:
        if max_memory is None:
            max_memory = default_max_memory(offload_folder)
        elif offload_folder is not None:
            max_memory = {"disk": math.inf, **max_memory}
    placement = plan_placement(sizes, device_map, max_memory, names)
    if "disk" in placement and offload_folder is None:
        disk = [f"{i} '{names[i]}'" for i, device in enumerate(placement) if device == "disk"]
        raise ValueError(f"Backbones {', '.join(disk)} are placed on 'disk'; pass offload_folder= for their weights.")
    main = main_device(placement, max_memory)
    loaded = []
    # One at a time, each onto its device before the next is read: CPU memory holds at most one backbone in transit.
    for backbone, device in zip(backbones, placement):
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, **model_kwargs)
        elif dtype is not None:
            backbone.to(dtype)
        if is_offloaded(device, main):
            offload_backbone(backbone, torch_device(main), offload_folder if device == "disk" else None)
        else:
            backbone.to(torch_device(device))
        loaded.append(backbone)
    return loaded, placement, main


def run_per_device(fn: Callable[[int], _T], devices: Sequence[torch.device]) -> list[_T]:
    """`[fn(i) for i in range(len(devices))]`, with the backbones of each device in turn, and different devices at
    the same time (one thread each) when there is an accelerator among them. CPU-only: one after the other, since
    each backbone already uses every core."""
    groups: dict[torch.device, list[int]] = {}
    for index, device in enumerate(devices):
        groups.setdefault(torch.device(device), []).append(index)
    results: list[Any] = [None] * len(devices)

    def run(indices: list[int]) -> None:
        for index in indices:
            results[index] = fn(index)

    if len(groups) > 1 and any(device.type != "cpu" for device in groups):
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            list(pool.map(run, groups.values()))  # list() re-raises a worker's exception
    else:
        for indices in groups.values():
            run(indices)
    return results


__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "Device",
    "STRATEGIES",
    "backbone_size",
    "default_max_memory",
    "is_offloaded",
    "load_backbones",
    "main_device",
    "normalize_device",
    "offload_backbone",
    "plan_placement",
    "run_per_device",
    "torch_device",
]
