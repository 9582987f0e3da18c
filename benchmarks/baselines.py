"""The baselines a user would pick instead of the gate (stacking, linear probe, Tip-Adapter), two ways:

- colours: held-out top-1 on the toy colour task (three toy CLIPs trained here) at k = 1, 4, 16 shots and a few
  seeds, beside the gate, the mean of logits and the best single backbone; every method fitted on the same k-shot
  calibration images, hyper-parameters chosen by cross-validation on them;
- paper scale: fitting time (cross-validation included) on synthetic cached features of 9 backbones of real widths,
  1000 classes x 16 shots (`clip_ensemble.tasks.synthetic.synthetic_features`), and top-1 on 4 held-out images per class.

Prints a table; `--save` also writes benchmarks/results/baselines.md.

    python benchmarks/baselines.py [--part colours|paper|both] [--save]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tables import save_result

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate, evaluate
from clip_ensemble.calibration.baselines import (
    LINEAR_PROBE,
    STACKING,
    TIP_ADAPTER,
    fit_linear_probe,
    fit_stacking,
    fit_tip_adapter,
)
from clip_ensemble.calibration.fitting import Features
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset
from clip_ensemble.tasks.synthetic import WIDTHS, synthetic_features

BASELINES = [STACKING, LINEAR_PROBE, TIP_ADAPTER]


def colours(shots: list[int], seeds: list[int], workdir: Path) -> str:
    folders = toy_backbones(workdir)
    cache = FeatureCache(None)
    calibration_data, test_data = toy_dataset(per_class=16, seed=3), toy_dataset(per_class=50, seed=7)
    methods = ["best single", "mean of logits", *BASELINES, "gate"]
    lines = [
        "| shots | " + " | ".join(methods) + " |",
        "|---:|" + "---:|" * len(methods),
    ]
    for k in shots:
        results: dict[str, list[float]] = {m: [] for m in methods}
        for seed in seeds:
            model = CLIPEnsembleModel.from_backbones(folders, labels=list(TOY_CLASSES))
            report = calibrate(model, calibration_data, shots=k, seed=seed, cache=cache, progress=False)
            evaluation = evaluate(model, test_data, support=report, cache=cache, progress=False)
            top1 = {row["method"]: row["top1"] for row in evaluation.rows()}
            top1["best single"] = top1[f"best single ({evaluation.best_single}, chosen on calibration data)"]
            for m in methods:
                results[m].append(100 * top1[m])
        cells = [f"{np.mean(v):.1f} ({' / '.join(f'{x:.0f}' for x in v)})" for v in results.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return (
        f"Colour task: held-out top-1 (%) on {len(test_data)} images, mean over seeds {seeds} (each seed in brackets); "
        f"calibration images drawn from {len(calibration_data)}.\n\n" + "\n".join(lines)
    )


def paper_scale(classes: int, shots: int, held_out: int) -> str:
    gate_inputs, logits, labels = synthetic_features(classes, shots + held_out)
    rank = torch.arange(len(labels)) % (shots + held_out)  # position within its class
    support = Features(gate_inputs[rank < shots], logits[rank < shots], labels[rank < shots])
    test = Features(gate_inputs[rank >= shots], logits[rank >= shots], labels[rank >= shots])
    fits = {
        STACKING: lambda: fit_stacking(support),
        LINEAR_PROBE: lambda: fit_linear_probe(support),
        TIP_ADAPTER: lambda: fit_tip_adapter(support, WIDTHS, [100.0] * len(WIDTHS)),
    }
    lines = [
        "| method | fitting time (5-fold CV + final fit): wall / CPU | scoring time: wall / CPU | chosen | "
        "held-out top-1 |",
        "|---|---:|---:|---|---:|",
    ]
    mean_top1 = (test.logits.mean(1).argmax(-1) == test.labels).float().mean()
    lines.append(f"| mean of logits | - | - | - | {100 * mean_top1:.1f}% |")
    for name, fit in fits.items():
        wall, cpu = time.perf_counter(), time.process_time()
        baseline = fit()
        fit_seconds = f"{time.perf_counter() - wall:.1f} s / {time.process_time() - cpu:.1f} s"
        wall, cpu = time.perf_counter(), time.process_time()
        scores = baseline.scores(test)
        score_seconds = f"{time.perf_counter() - wall:.1f} s / {time.process_time() - cpu:.1f} s"
        top1 = (scores.argmax(-1) == test.labels).float().mean()
        chosen = ", ".join(f"{k} {v}" for k, v in baseline.settings.items() if k != "weights")
        lines.append(f"| {name} | {fit_seconds} | {score_seconds} | {chosen} | {100 * top1:.1f}% |")
        print(lines[-1], flush=True)
    return (
        f"Paper scale: {len(WIDTHS)} backbones (widths {', '.join(map(str, WIDTHS))}), {classes} classes x {shots} "
        f"shots = {len(support.labels)} support images, {len(test.labels)} held out; synthetic features.\n\n"
        + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["colours", "paper", "both"], default="both")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--paper-shots", type=int, default=16)
    parser.add_argument("--workdir", help="where to keep the toy backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="also write benchmarks/results/baselines.md")
    args = parser.parse_args()

    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("colours", "both"):
            parts.append(colours(args.shots, args.seeds, Path(args.workdir or tmp)))
        if args.part in ("paper", "both"):
            parts.append(paper_scale(args.classes, args.paper_shots, held_out=4))
    table = "\n\n".join(parts)
    command = "python benchmarks/baselines.py"
    if args.save:
        save_result(Path(__file__).parent / "results" / "baselines.md", "Baselines", command, "", table)
    else:
        print(table)


if __name__ == "__main__":
    main()
