"""Accuracy against compute over the offline tasks of the few-shot benchmark: the full ensemble, the best subset at
half its budget, and the cascade at tolerance 0.01, each with top-1 and mean GFLOPs per image on held-out images,
over several k-shot draws (mean ± standard deviation over seeds).

Tasks (benchmarks/few_shot_accuracy.py): colours and digits, whose tiny CLIPs are trained here in seconds and whose
GFLOPs are measured with torch's FLOP counter (`model.backbone_gflops`); synthetic, frozen features at the paper's
nine widths, costed with the GFLOPs of the nine OpenAI CLIPs whose widths it copies (hub_configs/paper-openai-9.json);
hard-images, five similar backbones where averaging beats every one of them, costed in proportion to their widths
(within 2x of one another: the regime where a cascade has the least to gain).
Everything is fitted on `--shots` images per class of the task's pool and scored on its test set.
Wall-clock time per image, full ensemble against cascade, is measured side by side for the image tasks (the first
seed whose cascade stops images, else the first) from pixel values (batches of `--batch-size`, preprocessing
excluded): rounds alternate full and cascade, times are medians over rounds. Target: the cascade keeps top-1 within
1 point of the full ensemble at no more than 60% of its mean GFLOPs (aim: 50%). Prints a table; `--save` also
writes it to benchmarks/results/compute_accuracy.md with a chart per task: every stopping rule the cascade's fitting
tried, scored on the test set, and the one it chose.

    python benchmarks/compute_accuracy.py [--save]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from few_shot_accuracy import few_shot_indices
from tables import save_result

from clip_ensemble import CLIPEnsembleModel, FeatureCache
from clip_ensemble.backbones.hub_configs import load_hub_config
from clip_ensemble.calibration.cascade_fitting import fit_cascade, run_on_features
from clip_ensemble.calibration.fitting import Features, fit_calibrated_gate
from clip_ensemble.calibration.selection import weigh_subsets
from clip_ensemble.models.cascade import cost_order
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset
from clip_ensemble.tasks.digits import DIGIT_CLASSES, digits_backbones, digits_dataset
from clip_ensemble.tasks.synthetic import FeatureTask, feature_task, hard_images_task, synthetic_task

RESULTS = Path(__file__).parent / "results"
TASKS = ("colours", "digits", "synthetic", "hard-images")
TARGET_SHARE = 0.6  # of the full ensemble's GFLOPs, within 1 point of its top-1


def load_task(name: str, workdir: Path, synthetic_classes: int, shots: int):
    """(FeatureTask, GFLOPs per backbone, model and test images for wall-clock timing, or None for synthetic).

    The feature tasks' pools hold twice `shots` images per class, so that each seed draws other calibration images,
    and their test sets a few thousand images, so that a loss of a fraction of a point shows above their noise."""
    cache = FeatureCache(None)
    if name == "colours":
        model = CLIPEnsembleModel.from_backbones(toy_backbones(workdir / "colours"), labels=list(TOY_CLASSES))
        pool, test = toy_dataset(per_class=32, seed=3), toy_dataset(per_class=100, seed=7)
    elif name == "digits":
        model = CLIPEnsembleModel.from_backbones(digits_backbones(workdir / "digits"), labels=list(DIGIT_CLASSES))
        pool, test = digits_dataset("pool"), digits_dataset("test")
    elif name == "synthetic":
        task = synthetic_task(num_classes=synthetic_classes, pool_shots=2 * shots, test_per_class=40, seed=0)
        gflops = [entry["image_gflops"] for entry in load_hub_config("paper-openai-9")["backbones"]]
        return task, gflops, None
    elif name == "hard-images":
        task = hard_images_task(num_classes=20, pool_shots=2 * shots, test_per_class=100, seed=0)
        return task, [e.shape[1] / 64 for e in task.pool_embeds], None  # 4 to 8 GFLOPs, as the widths go
    else:
        raise ValueError(f"Unknown task '{name}'; choose from {', '.join(TASKS)}.")
    return feature_task(name, model, pool, test, cache), model.backbone_gflops, (model, test.images)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def run_seed(task: FeatureTask, gflops: list[float], shots: int, seed: int, tolerance: float) -> dict:
    """One k-shot draw: every method fitted on it, scored on the test set; the fitted gate and cascade for timing."""
    dims = [e.shape[1] for e in task.pool_embeds]
    pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
    test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
    support = pool.subset(few_shot_indices(pool.labels, shots, seed))
    full_gflops = sum(gflops)

    gate = EnsembleGate(dims)
    started = time.perf_counter()
    choice = fit_calibrated_gate(gate, support, seed=seed)
    gate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cascade, report = fit_cascade(support, dims, gflops, choice.out_of_fold, tolerance=tolerance, seed=seed)
    cascade_seconds = time.perf_counter() - started
    costs = torch.tensor([0.0] + [gflops[b] for b in cascade.order]).cumsum(0)  # after running k backbones
    with torch.no_grad():
        full_logits = choice.logits(gate, test)
        points = [{"method": name, "kind": "backbone", "top1": top1(test.logits[:, b], test.labels),
                   "gflops": gflops[b]} for b, name in enumerate(task.backbone_names)]  # fmt: skip
        points.append({"method": "full ensemble", "kind": "full", "top1": top1(full_logits, test.labels),
                       "gflops": full_gflops})  # fmt: skip
        for point in report.tradeoff:  # the whole trade-off: the same stages at every stopping rule tried
            cascade.stop_margins = point["stop_margins"]
            logits, run = run_on_features(cascade, gate, test, dims, choice.class_head)
            points.append({"method": f"cascade, risk {point['risk']}", "kind": "cascade",
                           "top1": top1(logits, test.labels), "gflops": float(costs[run].mean())})  # fmt: skip
        cascade.stop_margins = report.stop_margins
        logits, run = run_on_features(cascade, gate, test, dims, choice.class_head)
        points.append({"method": f"cascade, tolerance {tolerance:g} (chosen)", "kind": "cascade", "chosen": True,
                       "top1": top1(logits, test.labels), "gflops": float(costs[run].mean())})  # fmt: skip

    best, _, _ = weigh_subsets(support, dims, gflops, full_gflops / 2, seed=seed)
    subset = list(best["indices"])
    subset_gate = EnsembleGate([dims[b] for b in subset])
    subset_choice = fit_calibrated_gate(subset_gate, support.of_backbones(dims, subset), seed=seed)
    subset_logits = subset_choice.logits(subset_gate, test.of_backbones(dims, subset))
    points.append({"method": "best subset at half budget", "kind": "subset", "top1": top1(subset_logits, test.labels),
                   "gflops": best["gflops"]})  # fmt: skip
    return {
        "full": top1(full_logits, test.labels),
        "cascade": top1(logits, test.labels),
        "cascade_share": float(costs[run].mean()) / full_gflops,
        "estimated_share": report.mean_gflops / report.full_gflops,
        "estimated_loss": report.full_accuracy - report.accuracy,  # out of fold, on the calibration images
        "stopped_early": float((run < len(dims)).float().mean()),
        "subset": top1(subset_logits, test.labels),
        "subset_share": best["gflops"] / full_gflops,
        "subset_names": "+".join(task.backbone_names[b].removeprefix("synthetic ") for b in subset),
        "gate_seconds": gate_seconds,
        "cascade_seconds": cascade_seconds,
        "never_stops": report.risk is None,
        "images_needed": report.images_needed,
        "gate": gate,
        "class_head": choice.class_head,
        "fitted_cascade": cascade,
        "points": points,
    }


@torch.no_grad()
def wall_clock(
    model: CLIPEnsembleModel, images: list, gate: EnsembleGate, class_head, cascade, batch_size: int, rounds: int
):
    """Median seconds per image from pixel values, full ensemble and cascade, in alternating rounds; the model as
    calibration left it (its gate, and the class head when one was kept)."""
    model.gate.load_state_dict(gate.state_dict())
    model.set_class_head(class_head)
    pixel_values = model.processor(images)["pixel_values"]
    model.eval()

    def seconds_per_image() -> float:
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model(pixel_values=[p[start : start + batch_size] for p in pixel_values])
        return (time.perf_counter() - started) / len(images)

    seconds_per_image()  # warm-up
    full, cascaded = [], []
    for _ in range(rounds):
        model.set_cascade(None)
        full.append(seconds_per_image())
        model.set_cascade(cascade)
        cascaded.append(seconds_per_image())
    model.set_cascade(None)
    return statistics.median(full), statistics.median(cascaded)


def spread(values: list[float], scale: float = 100) -> str:
    return f"{scale * np.mean(values):.1f} ± {scale * np.std(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--synthetic-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", help="where to keep the tiny backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table and charts to benchmarks/results/")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tiny-backbones-"))

    rows, notes, charts = [], [], []
    for name in args.tasks.split(","):
        task, gflops, timing = load_task(name, workdir, args.synthetic_classes, args.shots)
        runs = [run_seed(task, gflops, args.shots, seed, args.tolerance) for seed in range(args.seeds)]
        losses = [r["full"] - r["cascade"] for r in runs]
        shares = [r["cascade_share"] for r in runs]
        met = sum(loss <= 0.01 + 1e-9 and share <= TARGET_SHARE for loss, share in zip(losses, shares))
        clock = ""
        if timing is not None:
            model, images = timing
            # A cascade that never stops runs as the full ensemble: time the first seed whose cascade stops images.
            timed = next((seed for seed, r in enumerate(runs) if r["stopped_early"] > 0), 0)
            run = runs[timed]
            full_s, cascade_s = wall_clock(model, images, run["gate"], run["class_head"], run["fitted_cascade"],
                                           args.batch_size, args.rounds)  # fmt: skip
            clock = f"{1e3 * full_s:.3f} / {1e3 * cascade_s:.3f} (seed {timed})"
        subsets = sorted({r["subset_names"] for r in runs})
        gate_s = statistics.median(r["gate_seconds"] for r in runs)
        cascade_fit_s = statistics.median(r["cascade_seconds"] for r in runs)
        rows.append(
            f"| {name} | {spread([r['full'] for r in runs])} | {spread([r['subset'] for r in runs])} at "
            f"{spread([r['subset_share'] for r in runs], 100)}% | {spread([r['cascade'] for r in runs])} | "
            f"{spread(losses)} | {spread(shares)}% | {spread([r['stopped_early'] for r in runs])}% | {met}/{len(runs)} "
            f"| {clock} |"
        )
        order = " -> ".join(task.backbone_names[b].removeprefix("synthetic ") for b in cost_order(gflops))
        notes.append(
            f"- {name}: {len(task.label_names)} classes, {args.shots * len(task.label_names)} calibration and "
            f"{len(task.test_labels)} test images; cascade order {order} (GFLOPs/image "
            + ", ".join(f"{gflops[b]:.3g}" for b in cost_order(gflops))
            + f"); on the calibration folds, each judged under stop margins fitted on the others: estimated loss "
            f"{spread([r['estimated_loss'] for r in runs])} points at {spread([r['estimated_share'] for r in runs])}% "
            "of the GFLOPs; "
            f"fitting (median over seeds): gate {gate_s:.2f} s, cascade {cascade_fit_s:.2f} s ({cascade_fit_s / gate_s:.2f} x "
            f"the gate's); subsets chosen: {', '.join(subsets)}"
            + "".join(
                f"; never stops early on {count} of {len(runs)} seeds: "
                + (
                    "no stopping rule stays within the tolerance"
                    if needed is None
                    else f"{needed} calibration images would show a saving"
                )
                for needed, count in Counter(r["images_needed"] for r in runs if r["never_stops"]).items()
            )  # fmt: skip
        )
        charts.append((name, runs[0]["points"]))

    table = "\n".join(
        [
            "| task | full ensemble | best subset at half budget (top-1 at % of GFLOPs) | cascade | cascade's loss "
            "(points) | cascade's GFLOPs (% of full) | images stopped early | seeds meeting the target | ms/image "
            "full / cascade (CPU) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *notes,
            "",
            *(f"![{name}: accuracy against compute](compute_accuracy_{name}.png)" for name, _ in charts),
        ]
    )
    setup = (
        f"Top-1 % on held-out images, mean ± std over {args.seeds} seeds (k-shot draws) of {args.shots} shots per "
        f"class; cascade at tolerance {args.tolerance}; target: loss <= 1 point at <= {100 * TARGET_SHARE:.0f}% of "
        "the full ensemble's GFLOPs. Wall clock: the first seed whose cascade stops images (else the first), median of "
        f"{args.rounds} alternating rounds, batches of {args.batch_size}."
    )
    save_result(RESULTS / "compute_accuracy.md" if args.save else None, "Accuracy against compute",
                "python benchmarks/compute_accuracy.py", setup, table)  # fmt: skip
    if args.save:
        from clip_ensemble.evaluation.report import compute_accuracy_chart

        for name, points in charts:
            compute_accuracy_chart(points, RESULTS / f"compute_accuracy_{name}.png",
                                   f"{name}: accuracy against compute (seed 0, {args.shots} shots)")  # fmt: skip


if __name__ == "__main__":
    main()
