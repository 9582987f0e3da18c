"""Few-shot accuracy over several offline tasks: the calibrated ensemble against every method a user could pick.

Tasks, each with its own trained, deliberately different backbones:
- colours: three tiny CLIPs, each confidently wrong on a different pair of look-alike colours (averaging fails);
- digits: three tiny CLIP specialists on scikit-learn's real handwritten digits (different resolutions, widths and
  training data), calibrated on digits of their training pool;
- digits-unseen: the same backbones calibrated on digits none of them trained on: half of the held-out digits per
  class (about 30) are the pool to draw shots from, the other half the test set;
- synthetic: frozen features with the paper's nine backbone widths (50 classes by default), each head confused on
  other classes: averaging wins and a per-image gate can route;
- hard-images: five similar backbones with correlated errors, averaging a point above the best (the real-CLIP regime);
- dominant: one strong backbone about 4 points above averaging among weaker specialists, each right on its own domain;
- leading: one backbone about 1.5 points above averaging, the others weaker, errors shared through one latent space
  (static weights in hindsight gain only half a point over the leader: the held-out benchmark's regime);
- averaging: the same latent space, four backbones with noise of their own of similar size: averaging about 7 points
  above every backbone (the held-out benchmark's other regime).
For k = 1, 2, 4, 8, 16 shots per class and several seeds, a k-shot support set is drawn from the task's pool; every
method is fitted on it alone and scored on the task's held-out test set. Prints mean ± standard deviation over seeds
of the test top-1; with --save, writes the table and a chart (accuracy against k per task) to benchmarks/results/.

    python benchmarks/few_shot_accuracy.py --save
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clip_ensemble import CLIPEnsembleModel, FeatureCache
from clip_ensemble.calibration.baselines import LINEAR_PROBE, STACKING, TIP_ADAPTER, fit_baselines
from clip_ensemble.calibration.fitting import Features, fit_calibrated_gate
from clip_ensemble.models.gate import EnsembleGate
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset
from clip_ensemble.tasks.digits import DIGIT_CLASSES, digits_backbones, digits_dataset
from clip_ensemble.tasks.synthetic import (
    FeatureTask,
    averaging_task,
    dominant_backbone_task,
    feature_task,
    hard_images_task,
    leading_backbone_task,
    synthetic_task,
)

RESULTS = Path(__file__).parent / "results"
SHOTS = (1, 2, 4, 8, 16)
TASKS = ("colours", "digits", "digits-unseen", "synthetic", "hard-images", "dominant", "leading", "averaging")
GATE = "calibrated ensemble (ours)"
BEST_SINGLE = "best single (chosen on the shots)"
ORACLE = "oracle (any backbone right)"
CHART_METHODS = (GATE, "mean of logits", BEST_SINGLE)  # and the oracle, dashed
BASELINES = (STACKING, LINEAR_PROBE, TIP_ADAPTER)


def load_tasks(names: list[str], workdir: Path, synthetic_classes: int) -> list[FeatureTask]:
    """The feature tasks' pools hold twice the largest k per class, so that each seed draws other shots at every k, and
    their test sets 2,000 images, so that a difference of a few tenths of a point is more than one test image."""
    tasks = []
    pool_shots = 2 * max(SHOTS)
    cache = FeatureCache(None)
    for name in names:
        if name == "colours":
            model = CLIPEnsembleModel.from_backbones(toy_backbones(workdir / "colours"), labels=list(TOY_CLASSES))
            pool, test = toy_dataset(per_class=32, seed=3), toy_dataset(per_class=100, seed=7)
            tasks.append(feature_task("colours", model, pool, test, cache))
        elif name in ("digits", "digits-unseen"):
            model = CLIPEnsembleModel.from_backbones(digits_backbones(workdir / "digits"), labels=list(DIGIT_CLASSES))
            task = feature_task("digits", model, digits_dataset("pool"), digits_dataset("test"), cache)
            tasks.append(task if name == "digits" else held_out_halves(task, "digits-unseen"))
        elif name == "synthetic":
            tasks.append(
                synthetic_task(
                    num_classes=synthetic_classes,
                    pool_shots=pool_shots,
                    test_per_class=2000 // synthetic_classes,
                    seed=0,
                )
            )
        elif name == "hard-images":
            tasks.append(hard_images_task(num_classes=20, pool_shots=pool_shots, test_per_class=100, seed=0))
        elif name == "dominant":
            tasks.append(dominant_backbone_task(num_classes=20, pool_shots=pool_shots, test_per_class=100, seed=0))
        elif name == "leading":
            tasks.append(leading_backbone_task(num_classes=20, pool_shots=pool_shots, test_per_class=100, seed=0))
        elif name == "averaging":
            tasks.append(averaging_task(num_classes=20, pool_shots=pool_shots, test_per_class=100, seed=0))
        else:
            raise ValueError(f"Unknown task '{name}'; choose from {', '.join(TASKS)}.")
    return tasks


def held_out_halves(task: FeatureTask, name: str, seed: int = 0) -> FeatureTask:
    """`task` calibrated on images its backbones never trained on: half of its test images per class (drawn with
    `seed`) become the pool to draw shots from, the other half the test set."""
    rng = np.random.default_rng(seed)
    labels = task.test_labels.numpy()
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    pool = torch.tensor(sorted(int(i) for indices in per_class for i in indices[: len(indices) // 2]))
    test = torch.tensor(sorted(int(i) for indices in per_class for i in indices[len(indices) // 2 :]))
    return dataclasses.replace(
        task,
        name=name,
        pool_embeds=[embeds[pool] for embeds in task.test_embeds],
        pool_labels=task.test_labels[pool],
        test_embeds=[embeds[test] for embeds in task.test_embeds],
        test_labels=task.test_labels[test],
    )


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> list[int]:
    """`shots` pool indices per class, drawn with `seed` (as `clip_ensemble.sample_few_shot` draws images)."""
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    return [int(i) for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:shots]]


@torch.no_grad()
def score_methods(
    task: FeatureTask, support: Features, test: Features, seed: int
) -> tuple[dict[str, float], str, float]:
    """Test top-1 of every method fitted on `support` (one k-shot draw), what calibration kept, and its fitting time."""
    logits, labels = test.logits, test.labels  # (n, B, C), (n,)
    top1 = {}
    correct = logits.argmax(-1) == labels[:, None]  # (n, B)
    for b, name in enumerate(task.backbone_names):
        top1[name] = float(correct[:, b].float().mean())
    best = int((support.logits.argmax(-1) == support.labels[:, None]).float().mean(0).argmax())
    top1[BEST_SINGLE] = top1[task.backbone_names[best]]
    top1["mean of logits"] = float((logits.mean(1).argmax(-1) == labels).float().mean())
    mean_probs = logits.softmax(-1).mean(1)
    top1["mean of probabilities"] = float((mean_probs.argmax(-1) == labels).float().mean())
    votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(1) + 0.5 * mean_probs
    top1["majority vote"] = float((votes.argmax(-1) == labels).float().mean())
    with torch.enable_grad():
        gate = EnsembleGate([e.shape[1] for e in task.pool_embeds])
        started = time.perf_counter()
        choice = fit_calibrated_gate(gate, support, seed=seed)
        fit_seconds = time.perf_counter() - started
        baselines = fit_baselines(support, [e.shape[1] for e in task.pool_embeds], task.logit_scales, seed=seed)
    top1[GATE] = float((choice.logits(gate, test).argmax(-1) == labels).float().mean())
    for name, baseline in baselines.items():
        top1[name] = float((baseline.scores(test).argmax(-1) == labels).float().mean())
    top1[ORACLE] = float(correct.any(1).float().mean())
    return top1, choice.chosen, fit_seconds


def run(task: FeatureTask, shots: tuple[int, ...], seeds: int) -> tuple[dict, dict, dict]:
    """k -> method -> test top-1 per seed, k -> what calibration kept per seed, and k -> its fitting seconds."""
    pool = Features(torch.cat(task.pool_embeds, -1), task.logits(task.pool_embeds), task.pool_labels)
    test = Features(torch.cat(task.test_embeds, -1), task.logits(task.test_embeds), task.test_labels)
    results, kept, seconds = {}, {}, {}
    for k in shots:
        started = time.perf_counter()
        per_seed = [
            score_methods(task, pool.subset(few_shot_indices(pool.labels, k, s)), test, s) for s in range(seeds)
        ]
        results[k] = {method: [r[method] for r, _, _ in per_seed] for method in per_seed[0][0]}
        kept[k] = [chosen for _, chosen, _ in per_seed]
        seconds[k] = [s for _, _, s in per_seed]
        gate, mean = np.mean(results[k][GATE]), np.mean(results[k]["mean of logits"])
        print(
            f"  {task.name} k={k}: ours {100 * gate:.1f}, mean of logits {100 * mean:.1f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return results, kept, seconds


def table(
    task: FeatureTask,
    results: dict[int, dict[str, list[float]]],
    kept: dict[int, list[str]],
    seconds: dict[int, list[float]],
    seeds: int,
) -> str:
    shots = list(results)
    lines = [
        f"### {task.name}: {len(task.test_labels)} test images, {len(task.label_names)} classes, "
        f"{len(task.backbone_names)} backbones; top-1 %, mean ± std over {seeds} seeds",
        "",
        "| method | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for method in results[shots[0]]:
        cells = [f"{100 * np.mean(results[k][method]):.1f} ± {100 * np.std(results[k][method]):.1f}" for k in shots]
        if method == GATE:
            cells = [f"**{cell}**" for cell in cells]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    counts = [", ".join(f"{name} x{kept[k].count(name)}" for name in dict.fromkeys(kept[k])) for k in shots]
    lines += ["", "Calibration kept, over the seeds: " + "; ".join(f"k={k}: {c}" for k, c in zip(shots, counts)) + "."]
    times = ", ".join(f"k={k}: {np.median(seconds[k]):.2f} s" for k in shots)
    lines += ["", f"Calibration fitting time (median over seeds, {torch.get_num_threads()} threads): {times}."]
    return "\n".join(lines)


def chart(all_results: dict[str, dict[int, dict[str, list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 4), squeeze=False)
    for ax, (name, results) in zip(axes[0], all_results.items()):
        shots = list(results)
        methods = [m for m in results[shots[0]] if m in (*CHART_METHODS, *BASELINES)]
        for method in [*methods, ORACLE]:
            means = np.array([np.mean(results[k][method]) for k in shots]) * 100
            stds = np.array([np.std(results[k][method]) for k in shots]) * 100
            style = {"linestyle": "--", "color": "grey"} if method == ORACLE else {}
            width = 2.5 if method == GATE else 1.2
            ax.errorbar(shots, means, yerr=stds, label=method, linewidth=width, capsize=2, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_title(name)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--seeds", type=int, default=5, help="k-shot draws per k (default: 5)")
    parser.add_argument("--synthetic-classes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--workdir", help="where to keep the trained tiny backbones (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table, JSON and chart to benchmarks/results/")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clip-ensemble-bench-"))
    started = time.perf_counter()
    tasks = load_tasks(args.tasks, workdir, args.synthetic_classes)
    runs = {task.name: run(task, tuple(args.shots), args.seeds) for task in tasks}
    all_results = {name: results for name, (results, _, _) in runs.items()}
    tables = "\n\n".join(table(task, *runs[task.name], args.seeds) for task in tasks)
    text = f"{tables}\n\nTotal time {time.perf_counter() - started:.0f} s."
    print(text)
    if args.save:
        from tables import machine

        RESULTS.mkdir(exist_ok=True)
        command = "python benchmarks/few_shot_accuracy.py --save"
        (RESULTS / "few_shot_accuracy.md").write_text(
            f"# Few-shot accuracy on offline tasks\n\n`{command}`\n\n{machine()}\n\n{text}\n"
        )
        (RESULTS / "few_shot_accuracy.json").write_text(json.dumps(all_results, indent=1) + "\n")
        chart(all_results, RESULTS / "few_shot_accuracy.png")
        print(f"Saved to {RESULTS}/few_shot_accuracy.md, .json and .png")


if __name__ == "__main__":
    main()
