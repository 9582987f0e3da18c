"""What a choice among calibration's candidates can reach, on the same evidence: choice rules replayed on recorded draws.

`fit_calibrated_gate` scores its candidates out of fold (the mean of logits, the best backbone, static weights, the
gate and the class head) and keeps one (see its `_beats`). To compare choice rules without refitting, this benchmark
fits every k-shot draw of benchmarks/few_shot_accuracy.py once per candidate, each time with that candidate forced
(the module's `_beats` replaced for the call, as below), and records every candidate's out-of-fold evidence (per
scored image: right or not, cross-entropy) and each candidate's test top-1. Rules are then replayed on the records:
- landed: the rule `fit_calibrated_gate` runs, each candidate in turn against the one kept so far (`_beats`);
- most hits: the candidate right most often out of fold, ties by the lower cross-entropy;
- most hits, ties to the simplest: ties keep the simplest (mean, best backbone, static weights, gate, class head);
- averaging or best backbone by hits: the better of the two untrained candidates by out-of-fold hits (ties to the
  mean), then static weights, the gate and the class head by the landed rule against it;
- ... ties by cross-entropy: the same, a tie in hits going to the lower out-of-fold cross-entropy;
- ... by cross-entropy: the same, the two untrained candidates compared by out-of-fold cross-entropy alone;
- the calibrated mean alone: a sixth candidate, not one calibration offers: each backbone's logits at its own inverse
  temperature (fitted on the calibration images, or out of fold on the fold's training part; one convex fit per
  backbone), summed;
- the calibrated mean first: it as the starting point instead of the mean of logits, then the best backbone, static
  weights, the gate and the class head as landed;
- ... richer ones by a clear margin: the same, static weights too judged as the gate is (more hits by more than one
  standard error, or as many with a cross-entropy lower by one);
- the class head judged as static weights: the landed rule, but the class head kept when right more often than the
  one kept so far, or as often with a lower cross-entropy (cross-validation has already weighed its penalty against
  an infinite one, its anchor, as for static weights);
- the class head on the mean instead: a seventh candidate, not one calibration offers: a class head fitted as
  calibration fits its own but anchored at the mean of logits instead of the static weights (the linear probe
  baseline, with calibration's choice of penalty), in the class head's place in the landed rule;
- ... judged as static weights: the same, that head judged as static weights are;
- the oracle's choice: the candidate (of all seven) with the best test top-1 on each draw, the most any rule on these
  candidates can reach.
Per task and k: mean test top-1 over the draws (20 by default, against the few-shot benchmark's 5) and its gap to
the target (the larger of averaging and the best single backbone chosen on the shots, minus 0.3 points); a cell under
it, or more than 0.3 under the same rule at a smaller k, is marked.

    python benchmarks/choice_replay.py --save
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from few_shot_accuracy import SHOTS, TASKS, few_shot_indices, load_tasks
from tables import save_result
from torch import nn

from clip_ensemble.calibration import fitting
from clip_ensemble.calibration.class_head_fits import HEAD_PENALTIES, head_basis, head_path
from clip_ensemble.calibration.fitting import BEST_BACKBONE, CLASS_HEAD, GATE, MEAN_OF_LOGITS, STATIC_WEIGHTS, Features
from clip_ensemble.calibration.folds import CalibrationData
from clip_ensemble.calibration.static_fits import fit_inverse_temperature
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.tasks.synthetic import FeatureTask

RESULTS = Path(__file__).parent / "results"
CANDIDATES = (MEAN_OF_LOGITS, BEST_BACKBONE, STATIC_WEIGHTS, GATE, CLASS_HEAD)  # simplest first
CALIBRATED_MEAN = "mean of calibrated logits"  # measured here only
MEAN_HEAD = "class head on the mean of logits"  # measured here only
SHORT = {
    MEAN_OF_LOGITS: "m",
    BEST_BACKBONE: "b",
    STATIC_WEIGHTS: "s",
    GATE: "g",
    CLASS_HEAD: "h",
    CALIBRATED_MEAN: "c",
    MEAN_HEAD: "p",
}


def _calibrated_sum(logits: torch.Tensor, fitted_on: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, C): each backbone's (n, B, C) `logits` at the inverse temperature that fits it alone on (m, B, K)
    `fitted_on` logits with `labels`, summed over backbones."""
    temperatures = torch.tensor([fit_inverse_temperature(fitted_on[:, b], labels) for b in range(logits.shape[1])])
    return (logits * temperatures[:, None]).sum(1)


def calibrated_mean_draw(
    support: Features, test: Features, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The mean of calibrated logits' out-of-fold (hits, losses) on calibration's own folds (its cross-entropy at an
    inverse temperature fitted on each training part, as the untrained candidates'), and its test top-1 fitted on
    every calibration example."""
    data = CalibrationData.of(support, seed)
    scored = sorted(i for fold in data.folds for i in fold)
    row = {example: r for r, example in enumerate(scored)}
    hits, losses = torch.zeros(len(scored), dtype=torch.bool), torch.zeros(len(scored))
    for fold, held_out in zip(data.folds, data.held_out_logits):
        train = sorted(set(range(len(support.labels))) - set(fold))
        view, view_labels = data.view_logits[train], data.view_labels[train]
        scale = fit_inverse_temperature(_calibrated_sum(view, view, view_labels), view_labels)
        combined, rows = _calibrated_sum(held_out, view, view_labels), torch.tensor([row[i] for i in fold])
        hits[rows] = combined.argmax(-1) == support.labels[fold]
        losses[rows] = nn.functional.cross_entropy(scale * combined, support.labels[fold], reduction="none")
    combined = _calibrated_sum(test.logits, data.view_logits, data.view_labels)
    return (hits, losses), float((combined.argmax(-1) == test.labels).float().mean())


def mean_head_draw(
    support: Features, test: Features, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], float] | None:
    """A class head fitted as calibration fits its own, but anchored at the mean of logits instead of the static
    weights (the linear probe baseline, its penalty chosen as calibration chooses the class head's): its out-of-fold
    (hits, losses) on calibration's own folds and its test top-1 fitted on every calibration example; None when
    cross-validation keeps its infinite penalty (the mean of logits itself, never offered)."""
    data = CalibrationData.of(support, seed)
    basis = head_basis(support.gate_inputs, seed)  # (sum d_b, r), as calibration's
    inputs = support.gate_inputs @ basis  # (n, r)
    scored = torch.tensor(sorted(i for fold in data.folds for i in fold))
    row = torch.empty(len(support.labels), dtype=torch.long)
    row[scored] = torch.arange(len(scored))
    hits = torch.zeros(len(HEAD_PENALTIES), len(scored), dtype=torch.bool)
    losses = torch.zeros(len(HEAD_PENALTIES), len(scored))
    for fold, held_out in zip(data.folds, data.held_out_logits):
        train, rows = sorted(set(range(len(support.labels))) - set(fold)), row[fold]
        fitted = head_path(inputs[train], support.logits[train].mean(1), support.labels[train], HEAD_PENALTIES)
        for p, (weight, bias) in enumerate(fitted):
            combined = torch.addmm(held_out.mean(1) + bias, inputs[fold], weight.T)
            hits[p, rows] = combined.argmax(-1) == support.labels[fold]
            losses[p, rows] = nn.functional.cross_entropy(combined, support.labels[fold], reduction="none")
    index = fitting._pick(hits, losses)
    if index == 0:
        return None
    weight, bias = head_path(inputs, support.logits.mean(1), support.labels, HEAD_PENALTIES[: index + 1])[-1]
    combined = torch.addmm(test.logits.mean(1) + bias, test.gate_inputs @ basis, weight.T)
    return (hits[index], losses[index]), float((combined.argmax(-1) == test.labels).float().mean())


MARGIN = 0.003  # the target's 0.3 points


def record_draw(task: FeatureTask, support: Features, test: Features, seed: int) -> dict:
    """One draw: every candidate's out-of-fold (hits, losses), each candidate's test top-1 when kept, and the
    references (averaging, and the backbone best on the shots)."""
    landed_beats = fitting._beats
    evidence: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    test_top1 = {}
    for forced in CANDIDATES:

        def beats(challenger, correct, incumbent_correct, loss, incumbent_loss, forced=forced) -> bool:
            evidence.setdefault(MEAN_OF_LOGITS, (incumbent_correct.clone(), incumbent_loss.clone()))
            evidence[challenger] = (correct.clone(), loss.clone())
            return challenger == forced

        gate = EnsembleGate([e.shape[1] for e in task.pool_embeds])
        fitting._beats = beats
        try:
            choice = fitting.fit_calibrated_gate(gate, support, seed=seed)
        finally:
            fitting._beats = landed_beats
        # Never offered: static weights at the infinite penalty (the mean), a class head at it (the static weights).
        if choice.chosen == forced:
            with torch.no_grad():
                combined = choice.logits(gate, test)
            test_top1[forced] = float((combined.argmax(-1) == test.labels).float().mean())
    evidence[CALIBRATED_MEAN], test_top1[CALIBRATED_MEAN] = calibrated_mean_draw(support, test, seed)
    mean_head = mean_head_draw(support, test, seed)
    if mean_head is not None:
        evidence[MEAN_HEAD], test_top1[MEAN_HEAD] = mean_head
    best = int((support.logits.argmax(-1) == support.labels[:, None]).float().mean(0).argmax())
    return {
        "evidence": evidence,
        "test": test_top1,
        "averaging": float((test.logits.mean(1).argmax(-1) == test.labels).float().mean()),
        "best single": float((test.logits[:, best].argmax(-1) == test.labels).float().mean()),
    }


def _offered(draw: dict) -> list[str]:
    return [name for name in CANDIDATES if name in draw["test"]]


def _hits(draw: dict, name: str) -> int:
    return int(draw["evidence"][name][0].sum())


def _loss(draw: dict, name: str) -> float:
    return float(draw["evidence"][name][1].mean())


def _landed_from(draw: dict, chosen: str, challengers: tuple[str, ...], judged_as: dict[str, str] | None = None) -> str:
    """Each challenger in turn against the one kept so far, by the landed `_beats` (of `judged_as[name]` if given)."""
    for name in challengers:
        if name in draw["test"]:
            correct, loss = draw["evidence"][name]
            incumbent_correct, incumbent_loss = draw["evidence"][chosen]
            if fitting._beats((judged_as or {}).get(name, name), correct, incumbent_correct, loss, incumbent_loss):
                chosen = name
    return chosen


def landed_rule(
    start: str = MEAN_OF_LOGITS, head: str = CLASS_HEAD, judged_as: dict[str, str] | None = None
) -> Callable[[dict], str]:
    """The landed rule from `start`, with `head` as the last challenger, each judged as `judged_as` says."""
    return lambda draw: _landed_from(draw, start, (BEST_BACKBONE, STATIC_WEIGHTS, GATE, head), judged_as)


def most_hits(draw: dict) -> str:
    return max(_offered(draw), key=lambda name: (_hits(draw, name), -_loss(draw, name)))


def most_hits_simplest(draw: dict) -> str:
    return max(_offered(draw), key=lambda name: _hits(draw, name))  # max keeps the first of equals


def untrained_by_hits(draw: dict) -> str:
    start = BEST_BACKBONE if _hits(draw, BEST_BACKBONE) > _hits(draw, MEAN_OF_LOGITS) else MEAN_OF_LOGITS
    return _landed_from(draw, start, (STATIC_WEIGHTS, GATE, CLASS_HEAD))


def untrained_by_hits_then_loss(draw: dict) -> str:
    start = max((MEAN_OF_LOGITS, BEST_BACKBONE), key=lambda name: (_hits(draw, name), -_loss(draw, name)))
    return _landed_from(draw, start, (STATIC_WEIGHTS, GATE, CLASS_HEAD))


def untrained_by_loss(draw: dict) -> str:
    start = min((MEAN_OF_LOGITS, BEST_BACKBONE), key=lambda name: _loss(draw, name))
    return _landed_from(draw, start, (STATIC_WEIGHTS, GATE, CLASS_HEAD))


def oracle_choice(draw: dict) -> str:
    return max(draw["test"], key=draw["test"].get)  # every candidate offered on this draw, first on ties


RULES: dict[str, Callable[[dict], str]] = {
    "landed": landed_rule(),
    "most hits": most_hits,
    "most hits, ties to the simplest": most_hits_simplest,
    "averaging or best backbone by hits": untrained_by_hits,
    "... ties by cross-entropy": untrained_by_hits_then_loss,
    "... by cross-entropy": untrained_by_loss,
    "the calibrated mean alone": lambda draw: CALIBRATED_MEAN,
    "the calibrated mean first": landed_rule(start=CALIBRATED_MEAN),
    "... richer ones by a clear margin": landed_rule(start=CALIBRATED_MEAN, judged_as={STATIC_WEIGHTS: GATE}),
    "the class head judged as static weights": landed_rule(judged_as={CLASS_HEAD: STATIC_WEIGHTS}),
    "the class head on the mean instead": landed_rule(head=MEAN_HEAD, judged_as={MEAN_HEAD: CLASS_HEAD}),
    "... judged as static weights": landed_rule(head=MEAN_HEAD, judged_as={MEAN_HEAD: STATIC_WEIGHTS}),
    "the oracle's choice": oracle_choice,
}


def table(records: dict[str, dict[int, list[dict]]]) -> str:
    """Markdown rows per task and k: the target, then each rule's mean test top-1 (gap to the target) and what it
    kept per draw; and per rule the number of cells it misses."""
    rows = ["| task | k | target | " + " | ".join(RULES) + " |", "|---|---:|---:|" + "---|" * len(RULES)]
    misses = dict.fromkeys(RULES, 0)
    for task, per_k in records.items():
        earlier: dict[str, list[float]] = {rule: [] for rule in RULES}
        for k, draws in per_k.items():
            target = max(np.mean([d["averaging"] for d in draws]), np.mean([d["best single"] for d in draws])) - MARGIN
            cells = []
            for rule, choose in RULES.items():
                kept = [choose(d) for d in draws]
                mean = float(np.mean([d["test"][name] for d, name in zip(draws, kept)]))
                missed = mean < target - 1e-9 or any(mean < e - MARGIN - 1e-9 for e in earlier[rule])
                misses[rule] += missed and rule != "the oracle's choice"
                earlier[rule].append(mean)
                bold = "**" if missed else ""
                letters = "".join(SHORT[name] for name in kept)
                cells.append(f"{bold}{100 * mean:.1f} ({100 * (mean - target):+.2f}){bold} {letters}")
            rows.append(f"| {task} | {k} | {100 * target:.1f} | " + " | ".join(cells) + " |")
    rows.append("| cells missed | | | " + " | ".join(str(misses[rule]) for rule in RULES) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The saved table's six tasks: synthetic-50 takes long, digits-unseen came after it (--tasks adds them).
    default_tasks = [t for t in TASKS if t not in ("synthetic", "digits-unseen")]
    parser.add_argument("--tasks", nargs="+", default=default_tasks, choices=TASKS)
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--draws", type=int, default=20, help="k-shot draws per k (default: 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--workdir", help="where to keep the trained tiny backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records: dict[str, dict[int, list[dict]]] = {}
        for task in load_tasks(args.tasks, Path(args.workdir or tmp), synthetic_classes=50):
            pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
            test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
            records[task.name] = {}
            for k in args.shots:
                records[task.name][k] = [
                    record_draw(task, pool.subset(few_shot_indices(pool.labels, k, seed)), test, seed)
                    for seed in range(args.draws)
                ]
                print(f"  {task.name} k={k}: {time.perf_counter() - started:.0f} s", flush=True)
    rows = table(records)
    setup = (
        f"Test top-1 %, mean over {args.draws} k-shot draws (seeds 0-{args.draws - 1}; the few-shot benchmark's "
        "draws are seeds 0-4), each rule replayed on the same recorded evidence; (gap to the target) in points; "
        "letters: what the rule kept per draw (m: mean of logits, b: best backbone, s: static weights, g: gate, "
        "h: class head, c: the mean of calibrated logits, p: the class head on the mean of logits). "
        "Target: max(averaging, best single chosen on the shots) - 0.3. In bold: under the target, or more than 0.3 "
        f"under the same rule at a smaller k. Recording took {time.perf_counter() - started:.0f} s (five fits per "
        "draw, and the two candidates measured here only)."
    )
    output = RESULTS / "choice_replay.md" if args.save else None
    title = "Choice rules replayed on the same evidence"
    save_result(output, title, "python benchmarks/choice_replay.py --save", setup, rows)


if __name__ == "__main__":
    main()
