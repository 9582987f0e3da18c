"""What fitting a cascade costs at paper scale, and what it saves: 9 backbones of the paper's widths, 1000 classes x
16 shots of synthetic features (clip_ensemble.tasks.synthetic), costed with the GFLOPs of the nine OpenAI CLIPs
(hub_configs/paper-openai-9.json).

Times calibration's `fit_calibrated_gate` (the full gate) and then `fit_cascade`, which reuses the full gate's
out-of-fold answers and chooses a static combination (`fit_calibrated_gate(per_image=False)`) for each prefix of 2..8
backbones; scores both on the held-out test images. Prints a table; `--save` writes it to
benchmarks/results/cascade_fitting.md.

    python benchmarks/cascade_fitting.py [--save]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tables import save_result

from clip_ensemble.backbones.hub_configs import load_hub_config
from clip_ensemble.calibration.cascade_fitting import fit_cascade, run_on_features
from clip_ensemble.calibration.fitting import Features, fit_calibrated_gate
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.tasks.synthetic import WIDTHS, synthetic_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    task = synthetic_task(num_classes=args.classes, pool_shots=args.shots, test_per_class=10)
    support = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
    test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
    gflops = [entry["image_gflops"] for entry in load_hub_config("paper-openai-9")["backbones"]]
    dims = list(WIDTHS)

    gate = EnsembleGate(dims)
    started = time.perf_counter()
    choice = fit_calibrated_gate(gate, support, seed=0)
    gate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cascade, report = fit_cascade(support, dims, gflops, choice.out_of_fold, tolerance=args.tolerance, seed=0,
                                  names=[n.removeprefix("synthetic ") for n in task.backbone_names])  # fmt: skip
    cascade_seconds = time.perf_counter() - started
    with torch.no_grad():
        full = choice.logits(gate, test)
        logits, run = run_on_features(cascade, gate, test, dims, choice.class_head)
    costs = torch.tensor([0.0] + [gflops[b] for b in cascade.order]).cumsum(0)
    full_top1 = float((full.argmax(-1) == test.labels).float().mean())
    cascade_top1 = float((logits.argmax(-1) == test.labels).float().mean())
    share = float(costs[run].mean()) / sum(gflops)
    stops = ", ".join(
        f"{name} {100 * float((run == k + 1).float().mean()):.0f}%" for k, name in enumerate(report.order)
    )
    table = "\n".join(
        [
            "| measure | value |",
            "|---|---|",
            f"| calibration of the full gate ({choice.chosen}) | {gate_seconds:.1f} s |",
            f"| cascade fitting (prefix combinations and stopping rule) | {cascade_seconds:.1f} s "
            f"({cascade_seconds / gate_seconds:.2f} x the gate's) |",
            f"| test top-1, full ensemble | {100 * full_top1:.2f}% at {sum(gflops):.0f} GFLOPs/image |",
            f"| test top-1, cascade at tolerance {args.tolerance} | {100 * cascade_top1:.2f}% at "
            f"{share * sum(gflops):.0f} GFLOPs/image ({100 * share:.0f}% of full) |",
            f"| estimate on the calibration folds ({report.num_scored} images) | {100 * report.accuracy:.2f}% against "
            f"{100 * report.full_accuracy:.2f}% at {100 * report.mean_gflops / report.full_gflops:.0f}% of the GFLOPs |",
            f"| test images stopping after each backbone | {stops} |",
            f"| what calibration chose per prefix | {', '.join(report.stage_choices)} |",
        ]
    )
    setup = (
        f"{args.classes} classes x {args.shots} shots ({len(support.labels)} calibration images, {len(test.labels)} "
        f"test images), widths {WIDTHS}, synthetic features; GFLOPs/image {gflops}."
    )
    output = Path(__file__).parent / "results" / "cascade_fitting.md" if args.save else None
    save_result(output, "Cascade fitting at paper scale", "python benchmarks/cascade_fitting.py", setup, table)


if __name__ == "__main__":
    main()
