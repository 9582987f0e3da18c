"""How calibration chooses, measured: the choice by held-out top-1 (now: a McNemar z above
`clip_ensemble.calibration.fitting.MIN_WIN_Z`, cross-entropy breaking exact ties) against the choice by held-out cross-entropy
with a one-standard-error guard (before), on the same k-shot draws and the same fitted candidates, at the few shots
where the two differ most.

Tasks: colours and digits (tiny trained CLIPs, benchmarks/few_shot_accuracy.py); synthetic features at the paper's
nine widths with 10 and 30 classes (a per-image gate can route); a noise task (`noise_task`: no routing signal,
averaging close to the best there is); three draws of a hard-images task (`hard_images_task`: averaging about a
point above the best backbone); and the dominant-backbone task (`dominant_backbone_task`: one backbone about 2
points above averaging). For k = 1, 2, 4 shots per class and five draws each, both rules fit on the same support
set and are scored on the task's test set.

    python benchmarks/choice_rule.py [--save]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from few_shot_accuracy import few_shot_indices, load_tasks
from tables import save_result

import clip_ensemble.calibration.fitting as fitting
from clip_ensemble.calibration.fitting import (
    BEST_BACKBONE,
    GATE,
    MEAN_OF_LOGITS,
    STATIC_WEIGHTS,
    Features,
    fit_calibrated_gate,
)
from clip_ensemble.models.gate import EnsembleGate, combine_logits
from clip_ensemble.tasks.synthetic import dominant_backbone_task, hard_images_task, noise_task, synthetic_task

RESULTS = Path(__file__).parent / "results"
SHORT = {MEAN_OF_LOGITS: "m", BEST_BACKBONE: "b", STATIC_WEIGHTS: "s", GATE: "g"}


def _beats_by_cross_entropy(correct, incumbent_correct, loss, incumbent_loss) -> bool:
    """The previous rule: a held-out cross-entropy lower by more than one standard error of the paired difference."""
    gain = incumbent_loss - loss
    return bool(gain.mean() > gain.std(correction=0) / math.sqrt(len(gain)))


def fit_with_rule(gate: EnsembleGate, features: Features, seed: int, rule: str) -> str:
    """`fit_calibrated_gate` with the candidates compared by `rule` ("top-1" or "cross-entropy"); the choice."""
    if rule == "top-1":
        return fit_calibrated_gate(gate, features, seed=seed).chosen
    kept, fitting._beats = fitting._beats, _beats_by_cross_entropy
    try:
        return fit_calibrated_gate(gate, features, seed=seed).chosen
    finally:
        fitting._beats = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir", help="where to keep the trained tiny backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/choice_rule.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clip-ensemble-bench-"))
    tasks = load_tasks(["colours", "digits"], workdir, 100) + [
        synthetic_task(num_classes=10, pool_shots=16, test_per_class=10, seed=2),
        synthetic_task(num_classes=30, pool_shots=16, test_per_class=10, seed=1),
        noise_task(num_classes=30, seed=0),
        *(hard_images_task(num_classes=20, seed=seed) for seed in range(3)),
        dominant_backbone_task(num_classes=20, seed=0),
    ]
    started, rows, gains = time.perf_counter(), [], {k: {"top-1": [], "cross-entropy": []} for k in args.shots}
    for task in tasks:
        pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
        test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
        averaging = float((test.logits.mean(1).argmax(-1) == test.labels).float().mean())
        for k in args.shots:
            top1 = {"cross-entropy": [], "top-1": []}
            kept = {"cross-entropy": "", "top-1": ""}
            for seed in range(args.seeds):
                support = pool.subset(few_shot_indices(pool.labels, k, seed))
                for rule in top1:
                    gate = EnsembleGate([e.shape[1] for e in task.pool_embeds])
                    chosen = fit_with_rule(gate, support, seed, rule)
                    with torch.no_grad():
                        logits = combine_logits(test.logits, gate(test.gate_inputs))
                    top1[rule].append(float((logits.argmax(-1) == test.labels).float().mean()))
                    kept[rule] += SHORT[chosen]
            for rule, values in top1.items():
                gains[k][rule] += [100 * (v - averaging) for v in values]
            cells = [f"{100 * np.mean(top1[r]):.1f} ± {100 * np.std(top1[r]):.1f} ({kept[r]})" for r in top1]
            rows.append(f"| {task.name} | {k} | {100 * averaging:.1f} | " + " | ".join(cells) + " |")
            print(rows[-1], f"{time.perf_counter() - started:.0f} s", flush=True)
    summary = [
        f"| all {len(tasks)} tasks: gain over averaging (points) | {k} | | "
        + " | ".join(f"{np.mean(gains[k][r]):+.1f} (worst draw {min(gains[k][r]):+.1f})" for r in gains[k])
        + " |"
        for k in args.shots
    ]
    table = "\n".join(
        [
            "| task | k | mean of logits | choice by cross-entropy (before) | choice by top-1 (now) |",
            "|---|---:|---:|---:|---:|",
            *rows,
            *summary,
        ]
    )
    setup = (
        f"Test top-1 %, mean ± std over {args.seeds} k-shot draws; in brackets what each rule kept per draw (m: mean "
        f"of logits, b: best backbone, s: static weights, g: gate). Total time {time.perf_counter() - started:.0f} s."
    )
    save_result(
        RESULTS / "choice_rule.md" if args.save else None,
        "How calibration chooses: held-out top-1 against held-out cross-entropy",
        "python benchmarks/choice_rule.py --save",
        setup,
        table,
    )


if __name__ == "__main__":
    main()
