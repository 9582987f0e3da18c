"""A gate calibrated on one label set, reused on another label set of the same kind of images, against plain logit
averaging on that label set: the gate reads image embeddings only, so it does not depend on the labels.

Offline colour task (clip_ensemble/tasks): three toy CLIPs, each confidently wrong on a different pair of
look-alike colours. For each transfer, over --seeds seeds (k-shot draw, gate initialisation and held-out images
change with the seed): the gate is calibrated with --shots images per class on the calibration labels, switched to
the evaluation labels with `model.set_labels` (new zero-shot heads, same gate), and scored on held-out images of the
evaluation classes, beside the mean of logits, the best single backbone and a gate calibrated on the evaluation
labels themselves. Prints top-1 accuracy (mean ± standard deviation over seeds); saves the table to
benchmarks/results/label_transfer.md only with --save.

    python benchmarks/label_transfer.py [--seeds 5] [--shots 4] [--save]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from tables import save_result

from clip_ensemble import CLIPEnsembleModel, FeatureCache, LabelledImages, calibrate, evaluate
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset

RED, ORANGE, GREEN, TEAL, BLUE, PURPLE = TOY_CLASSES
# (calibration labels, evaluation labels): a superset, subsets, and label sets that share no class.
TRANSFERS = (
    (TOY_CLASSES, (RED, ORANGE, GREEN, TEAL)),
    (TOY_CLASSES, (GREEN, TEAL, BLUE, PURPLE)),
    ((RED, ORANGE, GREEN, TEAL), TOY_CLASSES),
    ((GREEN, TEAL, BLUE, PURPLE), TOY_CLASSES),
    ((RED, ORANGE, GREEN, TEAL), (BLUE, PURPLE)),
    ((RED, ORANGE), (GREEN, TEAL, BLUE, PURPLE)),
)


def labelled(names: tuple[str, ...], per_class: int, seed: int) -> LabelledImages:
    """Toy images of the classes `names`, labelled with those names only (the label set the model is given)."""
    data = toy_dataset(per_class, seed, classes=tuple(TOY_CLASSES.index(n) for n in names))
    labels = [names.index(TOY_CLASSES[label]) for label in data.labels]
    return LabelledImages(data.images, labels, list(names), name=f"toy colours {', '.join(names)}")


def top1(report, method: str) -> float:
    return next(100 * row["top1"] for row in report.rows() if row["method"] == method)


def run(folders: list[str], seeds: int, shots: int) -> list[dict[str, list[float]]]:
    cache = FeatureCache(None)
    model = CLIPEnsembleModel.from_backbones(folders, labels=list(TOY_CLASSES))
    untrained = {name: tensor.clone() for name, tensor in model.gate.state_dict().items()}
    label_sets = list(dict.fromkeys(names for transfer in TRANSFERS for names in transfer))
    results = [{"best single": [], "mean of logits": [], "reused": [], "own": []} for _ in TRANSFERS]
    for seed in range(seeds):
        gates = {}  # label set -> the gate calibrated on it (from the same untrained gate each time)
        for names in label_sets:
            model.gate.load_state_dict(untrained)
            calibrate(model, labelled(names, 16, 100 + seed), shots=shots, seed=seed, cache=cache, progress=False)
            gates[names] = {name: tensor.clone() for name, tensor in model.gate.state_dict().items()}
        for scores, (calibration_labels, evaluation_labels) in zip(results, TRANSFERS):
            test = labelled(evaluation_labels, per_class=50, seed=200 + seed)
            model.set_labels(list(evaluation_labels))  # new zero-shot heads; the gate is kept
            model.gate.load_state_dict(gates[calibration_labels])
            report = evaluate(model, test, cache=cache, progress=False)
            scores["reused"].append(top1(report, report.gate_method))
            scores["mean of logits"].append(top1(report, "mean of logits"))
            scores["best single"].append(max(top1(report, name) for name in report.backbones))
            model.gate.load_state_dict(gates[evaluation_labels])
            own = evaluate(model, test, cache=cache, progress=False)
            scores["own"].append(top1(own, own.gate_method))
    return results


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--workdir", help="where the toy backbones are (trained there once); default: a temp folder")
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "label_transfer.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folders = toy_backbones(Path(args.workdir or scratch))
        results = run(folders, args.seeds, args.shots)
    lines = [
        "| calibrated on | evaluated on | best single backbone | mean of logits | gate reused | gate calibrated on "
        "the evaluation labels |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (calibration_labels, evaluation_labels), scores in zip(TRANSFERS, results):
        lines.append(
            f"| {', '.join(calibration_labels)} | {', '.join(evaluation_labels)} | {_cell(scores['best single'])} "
            f"| {_cell(scores['mean of logits'])} | {_cell(scores['reused'])} | {_cell(scores['own'])} |"
        )
    setup = (
        f"Toy colour task, three toy CLIPs, {args.shots} shots per calibration class, 50 held-out images per "
        f"evaluation class; top-1 accuracy in %, mean ± standard deviation over {args.seeds} seeds."
    )
    command = "python benchmarks/label_transfer.py" + (f" --seeds {args.seeds}" if args.seeds != 5 else "")
    save_result(
        args.output if args.save else None,
        "A calibrated gate reused on a new label set",
        command,
        setup,
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
