"""How calibration chooses and fits, measured: the current `fit_calibrated_gate` against the previous one, on the
same k-shot draws.

- current: static weights fitted to convergence by full-batch L-BFGS with a penalty toward equal weights chosen out of
  fold, then the paper's AdamW gate trained from them for a number of steps chosen out of fold; a richer candidate
  replaces a simpler one when right more often out of fold (McNemar z > 1), or, for static weights and the gate, as
  often with a cross-entropy lower by more than one standard error;
- previous (a frozen copy below): static weights and the gate trained by AdamW from equal weights for a number of
  steps chosen by cross-validation, the candidates compared by held-out cross-entropy with a one-standard-error guard.

Tasks and draws are those of benchmarks/few_shot_accuracy.py (colours, digits, synthetic-50, hard-images and
dominant; k = 1, 2, 4, 8, 16 shots per class; five draws each): both rules fit on the same support set and are scored
on the task's test set. Per draw the test top-1, the candidate kept and the fitting time go to
benchmarks/results/choice_rule.json; `--rules current` refits only the current rule and takes the previous rule's
draws from that file (the previous rule is frozen, so its results do not change).

    python benchmarks/choice_rule.py --save
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from few_shot_accuracy import SHOTS, TASKS, few_shot_indices, load_tasks
from tables import save_result
from torch import nn

from clip_ensemble.calibration.fitting import (
    BEST_BACKBONE,
    GATE,
    MEAN_OF_LOGITS,
    STATIC_WEIGHTS,
    Features,
    fit_calibrated_gate,
    set_best_backbone,
)
from clip_ensemble.calibration.folds import cross_validation_folds
from clip_ensemble.models.gate import EnsembleGate, combine_logits

RESULTS = Path(__file__).parent / "results"
SHORT = {MEAN_OF_LOGITS: "m", BEST_BACKBONE: "b", STATIC_WEIGHTS: "s", GATE: "g"}
RULES = ("previous", "current")

# The previous rule, frozen (clip_ensemble/calibration/fitting.py before the full-batch fits): AdamW from the
# averaging initialisation for a number of steps chosen by out-of-fold cross-entropy, the candidates compared by
# out-of-fold cross-entropy (a challenger replaces the incumbent when lower by more than one standard error).
STEP_CHOICES = (10, 25, 50, 100, 200, 400, 800)
LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, SINGLE_SPLIT_FROM, PATIENCE = 1e-3, 0.01, 128, 2000, 2


def _combined(gate: EnsembleGate, features: Features, static: bool = False) -> torch.Tensor:
    weights = gate.activate(gate.fc2.bias).expand(len(features.labels), -1) if static else gate(features.gate_inputs)
    return combine_logits(features.logits, weights)


def _train(gate, train: Features, steps: int, *, seed: int, static: bool = False, on_checkpoint=None) -> None:
    torch.manual_seed(seed)
    gate.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    parameters = [gate.fc2.bias] if static else list(gate.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    n = len(train.labels)
    for step in range(1, steps + 1):
        gate.train()
        batch = train.subset(torch.randperm(n, generator=generator)[:BATCH_SIZE]) if n > BATCH_SIZE else train
        loss = nn.functional.cross_entropy(_combined(gate, batch, static), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gate.eval()
        if on_checkpoint is not None and step in STEP_CHOICES and on_checkpoint(step):
            break


def _inverse_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits * log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-10, 10).exp())


def _cross_validate(gate, features: Features, folds, *, seed: int, static: bool, keep_states: bool):
    """Out-of-fold losses per training length, the lengths every fold reached, and the states (single split)."""
    n = len(features.labels)
    losses = {s: torch.zeros(n) for s in STEP_CHOICES}
    states: dict[int, dict] = {}
    last_step = STEP_CHOICES[-1]
    for fold in folds:
        train, val = features.subset(sorted(set(range(n)) - set(fold))), features.subset(fold)
        fold_losses: list[float] = []

        @torch.no_grad()
        def checkpoint(step: int, fold=fold, val=val, fold_losses=fold_losses) -> bool:
            losses[step][fold] = nn.functional.cross_entropy(_combined(gate, val, static), val.labels, reduction="none")
            fold_losses.append(float(losses[step][fold].mean()))
            if keep_states:
                states[step] = copy.deepcopy(gate.state_dict())
            recent = fold_losses[-PATIENCE - 1 :]
            return len(recent) > PATIENCE and all(a < b for a, b in zip(recent, recent[1:]))

        _train(gate, train, last_step, seed=seed, static=static, on_checkpoint=checkpoint)
        last_step = min(last_step, STEP_CHOICES[len(fold_losses) - 1])
    return losses, [s for s in STEP_CHOICES if s <= last_step], states


def previous_fit(gate: EnsembleGate, features: Features, seed: int) -> str:
    """The previous `fit_calibrated_gate`, frozen: fits `gate` in place and returns the candidate it kept."""
    labels, n = features.labels, len(features.labels)
    single_split = n >= SINGLE_SPLIT_FROM
    folds = cross_validation_folds(labels, 4 if single_split else 5, seed)[: 1 if single_split else None]
    scored = torch.tensor(sorted(i for fold in folds for i in fold))
    single_correct = features.logits.argmax(-1) == labels[:, None]
    best = int(single_correct.float().mean(0).argmax())
    mean_logits = features.logits.mean(1)
    losses = {name: torch.zeros(n) for name in (MEAN_OF_LOGITS, BEST_BACKBONE)}
    for fold in folds:
        train = sorted(set(range(n)) - set(fold))
        train_best = int(single_correct[train].float().mean(0).argmax())
        for name, logits in ((MEAN_OF_LOGITS, mean_logits), (BEST_BACKBONE, features.logits[:, train_best])):
            scale = _inverse_temperature(logits[train], labels[train])
            losses[name][fold] = nn.functional.cross_entropy(scale * logits[fold], labels[fold], reduction="none")
    steps, states = {}, {}
    for name, static in ((STATIC_WEIGHTS, True), (GATE, False)):
        path, reached, states[name] = _cross_validate(
            gate, features, folds, seed=seed, static=static, keep_states=single_split
        )
        steps[name] = min(reached, key=lambda s, path=path: float(path[s][scored].mean()))
        losses[name] = path[steps[name]]
    chosen = MEAN_OF_LOGITS
    for name in (BEST_BACKBONE, STATIC_WEIGHTS, GATE):
        gain = losses[chosen][scored] - losses[name][scored]
        if gain.mean() > gain.std(correction=0) / math.sqrt(len(gain)):
            chosen = name
    if chosen in steps and single_split:
        gate.load_state_dict(states[chosen][steps[chosen]])
    elif chosen in steps:
        _train(gate, features, steps[chosen], seed=seed, static=chosen == STATIC_WEIGHTS)
    elif chosen == BEST_BACKBONE:
        set_best_backbone(gate, best)
    else:
        gate.reset_parameters()
    gate.eval()
    return chosen


def fit_with_rule(gate: EnsembleGate, features: Features, seed: int, rule: str) -> str:
    if rule == "previous":
        return previous_fit(gate, features, seed)
    return fit_calibrated_gate(gate, features, seed=seed).chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--rules", nargs="*", default=list(RULES), choices=RULES, help="the rules to refit (none: redraw the table)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--synthetic-classes", type=int, default=50)
    parser.add_argument("--workdir", help="where to keep the trained tiny backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/choice_rule.md and .json")
    parser.add_argument("--store", default=str(RESULTS / "choice_rule.json"), help="per-draw results (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    stored = Path(args.store)
    draws = json.loads(stored.read_text()) if stored.exists() else {}  # "task|k|seed|rule" -> [top-1, kept, seconds]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clip-ensemble-bench-"))
    tasks = load_tasks(args.tasks, workdir, args.synthetic_classes)
    started, rows = time.perf_counter(), []
    for task in tasks:
        pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
        test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
        test_correct = test.logits.argmax(-1) == test.labels[:, None]  # (n, B)
        averaging = float((test.logits.mean(1).argmax(-1) == test.labels).float().mean())
        for k in args.shots:
            reference = []
            for seed in range(args.seeds):
                support = pool.subset(few_shot_indices(pool.labels, k, seed))
                best = int((support.logits.argmax(-1) == support.labels[:, None]).float().mean(0).argmax())
                reference.append(max(averaging, float(test_correct[:, best].float().mean())))
                for rule in args.rules:
                    gate = EnsembleGate([e.shape[1] for e in task.pool_embeds])
                    fit_started = time.perf_counter()
                    chosen = fit_with_rule(gate, support, seed, rule)
                    seconds = time.perf_counter() - fit_started
                    with torch.no_grad():
                        logits = combine_logits(test.logits, gate(test.gate_inputs))
                    top1 = float((logits.argmax(-1) == test.labels).float().mean())
                    draws[f"{task.name}|{k}|{seed}|{rule}"] = [top1, SHORT[chosen], seconds, args.threads]
            got = {r: [draws.get(f"{task.name}|{k}|{s}|{r}") for s in range(args.seeds)] for r in RULES}
            cells = []
            for rule in RULES:
                if None in got[rule]:
                    cells.append("not run")
                    continue
                top1 = 100 * np.array([d[0] for d in got[rule]])
                cells.append(f"{top1.mean():.1f} ± {top1.std():.1f} ({''.join(d[1] for d in got[rule])})")
            diff, times = "", ""
            if None not in got["previous"] and None not in got["current"]:
                change = 100 * np.array([c[0] - p[0] for p, c in zip(got["previous"], got["current"])])
                diff = f"{change.mean():+.1f} ± {change.std(ddof=1) / math.sqrt(len(change)):.1f}"
                times = " / ".join(f"{np.median([d[2] for d in got[r]]):.2f}" for r in RULES)
            rows.append(
                f"| {task.name} | {k} | {len(support.labels)} | {100 * np.mean(reference):.1f} | "
                + " | ".join(cells)
                + f" | {diff} | {times} |"
            )
            print(rows[-1], f"{time.perf_counter() - started:.0f} s", flush=True)
            if args.save:  # after each row, so that a long run keeps what it has
                stored.write_text(json.dumps(draws, indent=0, sort_keys=True) + "\n")
    table = "\n".join(
        [
            "| task | k | images | max(averaging, best single) | previous rule | current rule | current - previous "
            "(paired, ± SE) | fitting s, median: previous / current |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    setup = (
        f"Test top-1 %, mean ± std over {args.seeds} k-shot draws (the draws of few_shot_accuracy.py); in brackets "
        "what each rule kept per draw (m: mean of logits, b: best backbone, s: static weights, g: gate). "
        "max(averaging, best single): the better of plain averaging and the backbone with the best top-1 on the "
        f"draw, mean over draws. Refitted in this run: {', '.join(args.rules) or 'none'} "
        f"({time.perf_counter() - started:.0f} s); fitting times are wall-clock."
    )
    threads = {r: sorted({d[3] for key, d in draws.items() if key.endswith(f"|{r}")}) for r in RULES}
    setup += " Torch threads per rule: " + ", ".join(f"{r} {'/'.join(map(str, t))}" for r, t in threads.items()) + "."
    save_result(
        RESULTS / "choice_rule.md" if args.save else None,
        "How calibration chooses and fits: the current rule against the previous one on the same draws",
        "python benchmarks/choice_rule.py --save",
        setup,
        table,
    )


if __name__ == "__main__":
    main()
