"""Feature-extraction throughput with 1 and 2 processes: `clip-ensemble extract-features` under `torchrun`.

One ViT-B/32 backbone (random weights, benchmarks/realistic_clips.py) embeds an image folder of toy images at
224 px into a fresh feature cache, started by `python -m torch.distributed.run --standalone --nproc_per_node N`
(what `accelerate launch --multi_gpu --num_processes N` runs too), each process with the given number of CPU
threads (OMP_NUM_THREADS): one process with every core, one with a single thread, and two with one thread each.
Throughput is images embedded by all processes per second of the slowest one's embedding loop (as the command reports
it); wall time includes starting the processes, importing and loading. Prints a table; with --save, saves it to benchmarks/results/extraction_throughput.md.

    python benchmarks/extraction_throughput.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from realistic_clips import save_vit_clip
from tables import save_result

from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


def run(processes: int, threads: int, backbone: str, images: Path, cache: Path, batch_size: int) -> tuple:
    """Throughput (images/s), wall time (s) and the per-process line of one extraction."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += ["-m", "clip_ensemble.cli", "extract-features", "--backbones", backbone, "--dataset", str(images)]
    command += ["--cache-dir", str(cache), "--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    throughput = float(re.search(r"throughput: ([\d.]+) images/s", result.stdout).group(1))
    per_process = re.search(r"embedded per process: (.*) \(", result.stdout).group(1)
    return throughput, wall, per_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", nargs="+", default=["1x2", "1x1", "2x1"], help="processes x threads each, e.g. 2x1")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "extraction_throughput.md"))
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        backbone = save_vit_clip(root / "vit-b-32")
        per_class = -(-args.images // len(TOY_CLASSES))
        data = toy_dataset(per_class=per_class, seed=0)
        for i, (image, label) in enumerate(list(zip(data.images, data.labels))[: args.images]):
            (root / "images" / TOY_CLASSES[label]).mkdir(parents=True, exist_ok=True)
            image.resize((224, 224)).save(root / "images" / TOY_CLASSES[label] / f"{i}.png")
        for spec in args.runs:
            processes, threads = (int(n) for n in spec.split("x"))
            measured = run(processes, threads, backbone, root / "images", root / f"cache-{spec}", args.batch_size)
            rows.append((processes, threads, *measured))

    lines = [
        "| processes | threads each | throughput (images/s) | vs first row | wall time incl. start-up (s) | per process |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for processes, threads, throughput, wall, per_process in rows:
        lines.append(
            f"| {processes} | {threads} | {throughput:.1f} | {throughput / rows[0][2]:.2f}x | {wall:.1f} | "
            f"{per_process} |"
        )
    setup = f"ViT-B/32 (random weights, float32), {args.images} images of 224 px, batch {args.batch_size}"
    title = "Feature extraction with 1 and 2 processes"
    save_result(
        args.output if args.save else None, title, "python benchmarks/extraction_throughput.py", setup, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
