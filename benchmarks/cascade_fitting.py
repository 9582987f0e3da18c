"""What fitting a cascade costs at paper scale: 9 backbones of the real widths, 1000 classes x 16 shots, synthetic
features (benchmarks/gate_training.py's generator).

`fit_cascade` calls calibration's `fit_calibrated_gate` once per prefix of 2..B-1 backbones on all calibration
examples, and on each of its folds' training parts once per prefix of 2..B backbones (the out-of-fold estimate of
the stopping rule). This times `fit_calibrated_gate` over the first 2 widths and over all 9, and prints
how many calls of each size a cascade makes. Prints a table; `--save` writes it to benchmarks/results/.

    python benchmarks/cascade_fitting.py [--save]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gate_training import WIDTHS, synthetic_features
from tables import machine, save_result

from clip_ensemble.fitting import Features, fit_calibrated_gate
from clip_ensemble.gate import EnsembleGate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--folds", type=int, default=3, help="fit_cascade's out-of-fold folds (its default: 3)")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    gate_inputs, logits, labels = synthetic_features(args.classes, args.shots)
    rows = []
    for k in (2, len(WIDTHS)):
        width = sum(WIDTHS[:k])
        features = Features(gate_inputs[:, :width].contiguous(), logits[:, :k].contiguous(), labels)
        started = time.perf_counter()
        choice = fit_calibrated_gate(EnsembleGate(list(WIDTHS[:k])), features, seed=0)
        rows.append((k, time.perf_counter() - started, choice.chosen))
    b = len(WIDTHS)
    calls = f"{b - 2} prefixes (2..{b - 1} backbones) x ({args.folds} folds + 1) and the full gate x {args.folds} folds"
    table = "\n".join(
        [
            "| fit_calibrated_gate over | seconds | chosen |",
            "|---|---:|---|",
            *(f"| {k} backbones | {seconds:.1f} | {chosen} |" for k, seconds, chosen in rows),
            "",
            f"fit_cascade calls fit_calibrated_gate for {calls}.",
        ]
    )
    setup = f"{args.classes} classes x {args.shots} shots, widths {WIDTHS}, synthetic features."
    if args.save:
        save_result(
            Path(__file__).parent / "results" / "cascade_fitting.md",
            "Cascade fitting at paper scale",
            "python benchmarks/cascade_fitting.py",
            setup,
            table,
        )
    else:
        print(f"{setup}\n{machine()}\n\n{table}")


if __name__ == "__main__":
    main()
