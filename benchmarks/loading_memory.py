"""Peak memory while loading an ensemble of B backbones, against the sum of their weights (target: at most 1.15x).

Method. Each measurement runs in a fresh process, after the imports and a warm-up load of a tiny CLIP (modules
imported on first use, one-time allocations). It resets the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`,
Linux), reads the resident set size (RSS), loads the ensemble with `CLIPEnsembleModel.from_backbones(folders, labels,
device_map=...)` (weights from safetensors, zero-shot heads for 6 labels) and reads the RSS; then it reads every
weight once and reads the RSS and the peak RSS since the reset (`VmHWM`). transformers maps the safetensors files into
memory, so right after loading only the pages that building the zero-shot heads touched are resident; reading every
tensor, as forward passes over all towers would, makes all of them resident. RSS readings come after `malloc_trim`,
so memory already freed (the text towers' activations) is not counted as held; the peak counts everything. RSS is
what the process holds in RAM whoever allocated it (torch's CPU allocator, memory-mapped files, Python), so unlike
tracemalloc it sees tensor storage. Weights: the bytes of every parameter and buffer of the loaded backbones.
Backbones: ViT-B/32 architectures with random weights (benchmarks/realistic_clips.py), saved once to a temporary
folder. Prints a table; with --save, saves it to benchmarks/results/loading_memory.md.

    python benchmarks/loading_memory.py
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux.")


def _held_bytes() -> int:
    """RSS once freed memory is given back: glibc keeps freed blocks (e.g. activations) mapped until trimmed."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_bytes("VmRSS")


def child(device_map: str, folders: list[str]) -> None:
    """Load the ensemble in this process and print its memory figures as JSON."""
    from accelerate.utils import compute_module_sizes

    from clip_ensemble import CLIPEnsembleModel
    from clip_ensemble.tasks import TOY_CLASSES, save_tiny_clip

    device_map = None if device_map == "none" else device_map
    with tempfile.TemporaryDirectory() as tiny:
        # Warm-up on a tiny CLIP, so that modules imported on first use are not counted as the ensemble's memory.
        CLIPEnsembleModel.from_backbones([str(save_tiny_clip(tiny))], labels=list(TOY_CLASSES), device_map=device_map)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS mark restarts from the current RSS
    before = _status_bytes("VmRSS")
    model = CLIPEnsembleModel.from_backbones(folders, labels=list(TOY_CLASSES), device_map=device_map)
    loaded = _held_bytes()
    # Weights are memory-mapped from the safetensors files: a page is only read into RAM when first used.
    # Read every tensor once, as a forward pass over all towers would, so all of them are resident.
    for backbone in model.backbones:
        for tensor in backbone.model.state_dict().values():
            tensor.sum()
    peak, after = _status_bytes("VmHWM"), _held_bytes()
    weights = sum(compute_module_sizes(backbone.model)[""] for backbone in model.backbones)
    print(json.dumps({"weights": weights, "loaded": loaded - before, "peak": peak - before, "after": after - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", type=int, nargs="+", default=[1, 2, 3], help="ensemble sizes to measure")
    parser.add_argument("--device-maps", nargs="+", default=["none", "auto"], help="'none': plain loading")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "loading_memory.md"))
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return

    from realistic_clips import save_vit_clip
    from tables import save_result

    rows = []
    with tempfile.TemporaryDirectory() as root:
        folders = [save_vit_clip(Path(root) / f"vit-b-32-{i}", seed=i) for i in range(max(args.backbones))]
        for device_map in args.device_maps:
            for count in args.backbones:
                command = [sys.executable, __file__, "--child", device_map, *folders[:count]]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append((device_map, count, json.loads(result.stdout.strip().splitlines()[-1])))

    mib = 2**20
    lines = [
        "| device_map | backbones | weights (MiB) | RSS right after loading (MiB) | RSS with all weights read (MiB) "
        "| peak RSS (MiB) | peak / weights |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for device_map, count, m in rows:
        lines.append(
            f"| {device_map} | {count} | {m['weights'] / mib:.0f} | {m['loaded'] / mib:.0f} | {m['after'] / mib:.0f} | "
            f"{m['peak'] / mib:.0f} | {m['peak'] / m['weights']:.3f} |"
        )
    setup = "ViT-B/32 (random weights, float32) x B"
    save_result(
        args.output if args.save else None,
        "Memory while loading",
        "python benchmarks/loading_memory.py",
        setup,
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
