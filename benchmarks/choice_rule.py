"""How calibration chooses, measured: the choice by held-out cross-entropy (now) against the choice by held-out
top-1 it replaced, on the same k-shot draws of more offline tasks than the few-shot benchmark, at the few shots
where the two differ most.

Tasks: colours and digits (tiny trained CLIPs, benchmarks/few_shot_accuracy.py); synthetic features at the paper's
nine widths with 10 and 30 classes (a per-image gate can route: each backbone's head is confused on other classes);
a noise task (`noise_task`: every head right, independent per-image noise, so no gate can route and averaging is
close to the best there is); and three draws of a hard-images task (`hard_images_task`: five similar backbones whose
errors are correlated, averaging about a point above the best one, as with real CLIPs). For k = 1, 2, 4 shots
per class and five draws each, both rules fit on the same support set and are scored on the task's test set. The top-1 rule is kept here, as it was in `clip_ensemble.calibration.fitting` up to
commit 12b43ca, only for this comparison: averaging against the best backbone on all the shots, then static
weights and the gate out of fold, each replacing the one kept so far when right more often by more than one
standard error.

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

from clip_ensemble.calibration.fitting import (
    BEST_BACKBONE,
    GATE,
    MEAN_OF_LOGITS,
    SINGLE_SPLIT_FROM,
    STATIC_WEIGHTS,
    Features,
    _cross_validate,
    cross_validation_folds,
    fit_calibrated_gate,
    fit_choice,
)
from clip_ensemble.models.gate import EnsembleGate, combine_logits
from clip_ensemble.tasks.synthetic import hard_images_task, noise_task, synthetic_task

RESULTS = Path(__file__).parent / "results"
SHORT = {MEAN_OF_LOGITS: "m", BEST_BACKBONE: "b", STATIC_WEIGHTS: "s", GATE: "g"}


def _right_more_often(challenger: torch.Tensor, incumbent: torch.Tensor) -> bool:
    difference = challenger.float() - incumbent.float()
    return bool(difference.mean() > difference.std(correction=0) / math.sqrt(len(difference)))


def fit_by_top1(gate: EnsembleGate, features: Features, seed: int, num_folds: int = 5) -> str:
    """The previous choice by held-out top-1 (see the module docstring); fits `gate` in place, returns the choice."""
    labels, n = features.labels, len(features.labels)
    if n >= SINGLE_SPLIT_FROM:
        raise ValueError(f"The top-1 rule is kept here for k-fold cross-validation only (n < {SINGLE_SPLIT_FROM}).")
    folds = cross_validation_folds(labels, num_folds, seed)
    single_correct = features.logits.argmax(-1) == labels[:, None]  # (n, B)
    best = int(single_correct.float().mean(0).argmax())
    mean_answers = features.logits.mean(1).argmax(-1)
    chosen = BEST_BACKBONE if _right_more_often(single_correct[:, best], mean_answers == labels) else MEAN_OF_LOGITS
    best_out_of_fold = torch.empty_like(labels)
    for fold in folds:
        train = sorted(set(range(n)) - set(fold))
        best_out_of_fold[fold] = features.logits[fold, int(single_correct[train].float().mean(0).argmax())].argmax(-1)
    answers = {MEAN_OF_LOGITS: mean_answers, BEST_BACKBONE: best_out_of_fold}
    everything, steps = torch.arange(n), {}
    for name, static in ((STATIC_WEIGHTS, True), (GATE, False)):
        path = _cross_validate(gate, features, folds, seed=seed, static=static, keep_states=False)
        steps[name] = path.best_steps(everything)
        answers[name] = path.predictions[steps[name]]
        if _right_more_often(answers[name] == labels, answers[chosen] == labels):
            chosen = name
    fit_choice(gate, features, chosen, steps.get(chosen, 0), best, seed=seed)
    return chosen


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
    ]
    started, rows, gains = time.perf_counter(), [], {k: {"top-1": [], "cross-entropy": []} for k in args.shots}
    for task in tasks:
        pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
        test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
        averaging = float((test.logits.mean(1).argmax(-1) == test.labels).float().mean())
        for k in args.shots:
            top1 = {"top-1": [], "cross-entropy": []}
            kept = {"top-1": "", "cross-entropy": ""}
            for seed in range(args.seeds):
                support = pool.subset(few_shot_indices(pool.labels, k, seed))
                for rule in top1:
                    gate = EnsembleGate([e.shape[1] for e in task.pool_embeds])
                    if rule == "top-1":
                        chosen = fit_by_top1(gate, support, seed)
                    else:
                        chosen = fit_calibrated_gate(gate, support, seed=seed).chosen
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
            "| task | k | mean of logits | choice by top-1 (before) | choice by cross-entropy (now) |",
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
        "How calibration chooses: held-out cross-entropy against held-out top-1",
        "python benchmarks/choice_rule.py --save",
        setup,
        table,
    )


if __name__ == "__main__":
    main()
