"""Accuracy against compute on the offline colour task: the full ensemble, the best subset at half its budget, and
the cascade at tolerance 0.01, each with top-1 and mean GFLOPs per image on held-out images.

The three toy CLIPs (clip_ensemble/tasks/colours.py) are trained here in seconds; calibration uses `--shots` images
per class, the test split is separate images. GFLOPs are measured with torch's FLOP counter (`model.backbone_gflops`).
Wall-clock time per image, full ensemble against cascade, is measured side by side from pixel values (batches of
`--batch-size`, preprocessing excluded): rounds alternate full and cascade, times are medians over rounds. Target: the
cascade keeps top-1 within 1 point of the full ensemble at no more than half of its mean GFLOPs.
Prints a table; `--save` also writes it to benchmarks/results/compute_accuracy.md and the chart beside it.

    python benchmarks/compute_accuracy.py [--save]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tables import machine, save_result

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate, select_backbones
from clip_ensemble.evaluation import accuracy_against_compute, compute_table
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def top1_and_gflops(model: CLIPEnsembleModel, embeds: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, float]:
    out = model(image_embeds=embeds)
    return float((out.logits.argmax(-1) == labels).float().mean()), float(out.gflops.mean())


@torch.no_grad()
def seconds_per_image(model: CLIPEnsembleModel, pixel_values: list[torch.Tensor], batch_size: int) -> float:
    started = time.perf_counter()
    n = len(pixel_values[0])
    for start in range(0, n, batch_size):
        model(pixel_values=[p[start : start + batch_size] for p in pixel_values])
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", help="where to keep the toy backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table and chart to benchmarks/results/")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="toy-backbones-"))
    model = CLIPEnsembleModel.from_backbones(toy_backbones(workdir), labels=list(TOY_CLASSES))
    cache = FeatureCache(None)
    calibration_data = toy_dataset(per_class=args.shots, seed=3)
    test = toy_dataset(per_class=args.test_per_class, seed=7)
    labels = torch.tensor(test.labels)

    started = time.perf_counter()
    report = calibrate(
        model, calibration_data, shots=args.shots, cache=cache, progress=False, cascade_tolerance=args.tolerance
    )
    calibration_seconds = time.perf_counter() - started
    embeds = cache.embed(model.backbones, test.images, progress=False)

    cascade, info = model.cascade, dict(model.config.cascade)
    cascade_top1, cascade_gflops = top1_and_gflops(model, embeds, labels)
    points = accuracy_against_compute(model, embeds, labels)
    model.set_cascade(None)
    full_top1, full_gflops = top1_and_gflops(model, embeds, labels)

    started = time.perf_counter()
    subset, selection = select_backbones(
        model, calibration_data, args.shots, budget_gflops=full_gflops / 2, cache=cache, progress=False
    )
    selection_seconds = time.perf_counter() - started
    # The subset model shares the full model's backbone modules: its embeddings are columns of the full ones.
    subset_embeds = [embeds[next(i for i, full in enumerate(model.backbones) if full is b)] for b in subset.backbones]
    subset_top1, subset_gflops = top1_and_gflops(subset, subset_embeds, labels)
    points.append({"method": f"best subset at half budget ({' + '.join(selection.chosen)}, gate)", "kind": "subset",
                   "top1": subset_top1, "gflops": subset_gflops})  # fmt: skip

    # Wall clock, side by side: the same pixel values through the full ensemble and the cascade, rounds alternating.
    pixel_values = model.processor(test.images)["pixel_values"]
    model.eval()
    seconds_per_image(model, pixel_values, args.batch_size)  # warm-up
    full_times, cascade_times = [], []
    for _ in range(args.rounds):
        model.set_cascade(None)
        full_times.append(seconds_per_image(model, pixel_values, args.batch_size))
        model.set_cascade(cascade, **info)
        cascade_times.append(seconds_per_image(model, pixel_values, args.batch_size))
    full_ms, cascade_ms = 1000 * statistics.median(full_times), 1000 * statistics.median(cascade_times)

    def row(name: str, top1: float, gflops: float, ms: str = "") -> str:
        return f"| {name} | {100 * top1:.2f} | {1e3 * gflops:.3f} | {100 * gflops / full_gflops:.0f}% | {ms} |"

    table = "\n".join(
        [
            "| method | top-1 (%) | MFLOPs/image | of full | ms/image (CPU) |",
            "|---|---:|---:|---:|---:|",
            row("full ensemble (gate)", full_top1, full_gflops, f"{full_ms:.3f}"),
            row(f"best subset at half budget: {' + '.join(selection.chosen)}", subset_top1, subset_gflops),
            row(f"cascade, tolerance {args.tolerance}", cascade_top1, cascade_gflops, f"{cascade_ms:.3f}"),
            "",
            f"Cascade on the calibration folds (estimate): {report.cascade}",
            f"Calibration with the cascade: {calibration_seconds:.1f} s (gate {report.gate_seconds:.1f} s, cascade "
            f"{report.cascade.seconds:.1f} s); subset selection: {selection_seconds:.1f} s.",
            "",
            "Every point of the chart:",
            "",
            compute_table(points),
        ]
    )
    setup = (
        f"Colour task: 3 toy CLIPs, {len(TOY_CLASSES)} classes, {args.shots} calibration shots per class, "
        f"{len(labels)} test images; backbone MFLOPs/image "
        + ", ".join(f"{n} {1e3 * g:.3f}" for n, g in zip(model.config.backbone_names, model.backbone_gflops))
        + f"; wall clock: median of {args.rounds} alternating rounds, batches of {args.batch_size}."
    )
    if args.save:
        save_result(RESULTS / "compute_accuracy.md", "Accuracy against compute", "python benchmarks/compute_accuracy.py",
                    setup, table + "\n\n![Accuracy against compute](compute_accuracy.png)")  # fmt: skip
        try:
            from clip_ensemble.report import compute_accuracy_chart

            compute_accuracy_chart(points, RESULTS / "compute_accuracy.png", "Colour task: accuracy against compute")
        except ImportError:
            print("matplotlib is missing: no chart (pip install 'clip-ensemble[report]')")
    else:
        print(f"{setup}\n{machine()}\n\n{table}")


if __name__ == "__main__":
    main()
