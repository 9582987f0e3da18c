"""Calibration time on cached features at paper scale: 9 backbones of real widths, 1000 classes, 16 shots.

Features are synthetic (random class prototypes per backbone, noisy image embeddings, zero-shot heads of
different quality per backbone) so the benchmark runs offline; the fitting is the one `calibrate` runs (the
cross-validated choice between the gate, the mean of logits and the best backbone, then the final fit), timed whole.
Prints a table; with --save, writes it to benchmarks/results/gate_training.md.

    python benchmarks/gate_training.py --save
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from clip_ensemble.calibration.fitting import Features, fit_calibrated_gate
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.tasks.synthetic import WIDTHS, synthetic_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/gate_training.md")
    args = parser.parse_args()

    started = time.perf_counter()
    task = synthetic_task(num_classes=args.classes, pool_shots=args.shots, test_per_class=10)
    support = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
    test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
    setup_seconds = time.perf_counter() - started
    gate = EnsembleGate(list(WIDTHS))
    started = time.perf_counter()
    choice = fit_calibrated_gate(gate, support, seed=0)
    seconds = time.perf_counter() - started

    with torch.no_grad():
        gate_acc = (choice.logits(gate, test).argmax(-1) == test.labels).float().mean()
    correct = test.logits.argmax(-1) == test.labels[:, None]  # (n, B)
    mean_acc = (test.logits.mean(1).argmax(-1) == test.labels).float().mean()
    rows = [
        ("backbones (widths)", f"{len(WIDTHS)} ({', '.join(map(str, WIDTHS))})"),
        ("classes x shots", f"{args.classes} x {args.shots} = {len(support.labels)} calibration images"),
        ("gate parameters", f"{sum(p.numel() for p in gate.parameters()):,}"),
        ("chosen (settings)", f"{choice.chosen} ({choice.settings})"),
        ("calibration fitting time (cross-validation and final fit)", f"{seconds:.1f} s"),
        (
            f"test top-1 ({len(test.labels)} images): best single / mean of logits / calibrated / oracle",
            f"{100 * correct.float().mean(0).max():.1f}% / {100 * mean_acc:.1f}% / {100 * gate_acc:.1f}% / "
            f"{100 * correct.any(1).float().mean():.1f}%",
        ),
        (
            "machine",
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        ),
        ("synthetic feature setup (not counted)", f"{setup_seconds:.1f} s"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.save:
        output = Path(__file__).parent / "results" / "gate_training.md"
        output.write_text(
            f"# Calibration on cached features at paper scale\n\n`python benchmarks/gate_training.py --save`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
