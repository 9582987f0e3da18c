"""What a per-image gate can gain on each offline task, and what a gate fitted on the test images only memorises.

A "gate fitted on the test images themselves" is often quoted as the headroom of the gate family. On the few-shot
benchmark's tasks this script fits the same gate three ways and scores each on the task's test images:
- calibration (`fit_calibrated_gate`, what `calibrate` runs) on the task's whole pool, far more images than k shots;
- the gate alone, trained on the whole pool by full-batch AdamW at calibration's learning rate for 100 and 1,000
  steps from equal weights (no cross-validation, no early stopping);
- the same on the test images themselves (hindsight): the number quoted as headroom.
Beside them: the best backbone on the test images, the mean of logits, static weights fitted on the test images
themselves (the project's stacking baseline, its penalty cross-validated there) and the oracle (some backbone right).

    python benchmarks/gate_headroom.py --save
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from few_shot_accuracy import TASKS, load_tasks
from tables import save_result
from torch import nn

from clip_ensemble.calibration.baselines import fit_stacking
from clip_ensemble.calibration.fitting import Features, fit_calibrated_gate
from clip_ensemble.calibration.gate_training import learning_rate
from clip_ensemble.models.gate import EnsembleGate, combine_logits

STEPS = (100, 1000)


def top1(gate: EnsembleGate, features: Features) -> float:
    with torch.no_grad():
        logits = combine_logits(features.logits, gate(features.gate_inputs))
    return 100 * float((logits.argmax(-1) == features.labels).float().mean())


def trained_gate(dims: list[int], features: Features, steps: int, lr: float) -> EnsembleGate:
    """The gate from equal weights (seed 0), full-batch AdamW on `features` for `steps` steps."""
    torch.manual_seed(0)
    gate = EnsembleGate(dims)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.01)
    gate.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(combine_logits(features.logits, gate(features.gate_inputs)), features.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return gate.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--workdir", help="where to keep the tiny backbones (default: a temporary folder)")
    parser.add_argument("--synthetic-classes", type=int, default=50)
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/gate_headroom.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    header = (
        "| task | pool / test images | best backbone | mean of logits | calibrated on the pool (kept) | "
        + " | ".join(f"gate on the pool, {s} steps" for s in STEPS)
        + " | "
        + " | ".join(f"gate on the test images, {s} steps" for s in STEPS)
        + " | static weights on the test images | oracle |"
    )
    rows = [header, "|---|---:|" + "---:|" * (5 + 2 * len(STEPS))]
    with tempfile.TemporaryDirectory() as scratch:
        for task in load_tasks(args.tasks, Path(args.workdir or scratch), args.synthetic_classes):
            pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
            test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
            dims = [e.shape[1] for e in task.pool_embeds]
            correct = test.logits.argmax(-1) == test.labels[:, None]  # (n, B)
            calibrated = EnsembleGate(dims)
            choice = fit_calibrated_gate(calibrated, pool, seed=0)
            lr = learning_rate(pool.gate_inputs)
            on_pool = [top1(trained_gate(dims, pool, s, lr), test) for s in STEPS]
            on_test = [top1(trained_gate(dims, test, s, lr), test) for s in STEPS]
            static_on_test = fit_stacking(test, seed=0).scores(test).argmax(-1) == test.labels
            cells = [
                f"{len(pool.labels)} / {len(test.labels)}",
                f"{100 * float(correct.float().mean(0).max()):.1f}",
                f"{100 * float((test.logits.mean(1).argmax(-1) == test.labels).float().mean()):.1f}",
                f"{100 * float((choice.logits(calibrated, test).argmax(-1) == test.labels).float().mean()):.1f} ({choice.chosen})",
                *(f"{a:.1f}" for a in on_pool),
                *(f"{a:.1f}" for a in on_test),
                f"{100 * float(static_on_test.float().mean()):.1f}",
                f"{100 * float(correct.any(1).float().mean()):.1f}",
            ]
            rows.append(f"| {task.name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    setup = (
        f"Test top-1 %; one run per task (seed 0); pools of 32 images per class (digits: its 1,198-image pool); "
        f"{time.perf_counter() - started:.0f} s in all."
    )
    output = Path(__file__).parent / "results" / "gate_headroom.md" if args.save else None
    save_result(output, "What a per-image gate can gain", "python benchmarks/gate_headroom.py --save", setup,
                "\n".join(rows))  # fmt: skip


if __name__ == "__main__":
    main()
