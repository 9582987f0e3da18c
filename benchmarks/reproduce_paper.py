"""The paper's main comparison (arXiv:2405.17139): for a backbone set and a list of datasets, calibrate a gate on
k = 1, 2, 4, 8, 16 labelled images per class and score it on the test split beside the best single backbone (chosen
on the same k-shot data), the mean of logits and the oracle. Prints the table; with --save, saves it as Markdown and
JSON under benchmarks/results/ (or --output-dir).

Datasets are Hub ids (or local folders that `datasets.load_dataset` reads, e.g. `train/<class>/*.png` and
`test/<class>/*.png`), given as `ID`, `ID:TRAIN_SPLIT:TEST_SPLIT`, or a .json file listing objects with `id` and
optionally `train_split`, `test_split`, `image_column`, `label_column`. Backbones run on the GPU when there is one;
their image embeddings go to the feature cache, so a second run (or more seeds) embeds nothing again.

    python benchmarks/reproduce_paper.py --backbones paper-openai-9 tanganke/eurosat:train:test --save
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate, evaluate_embeddings
from clip_ensemble.backbones.hub_configs import backbone_entries, load_hub_config
from clip_ensemble.backbones.loading import load_backbone
from clip_ensemble.data.labelled import from_hub_dataset
from clip_ensemble.evaluation.evaluate import ORACLE, align_labels

SHOTS = (1, 2, 4, 8, 16)
COLUMNS = ("best single", "mean of logits", "gate", "oracle")  # top-1 accuracies in the table
RESULTS = Path(__file__).parent / "results"


@dataclass
class DatasetSpec:
    """One dataset of the comparison: where it is and which splits and columns to read."""

    id: str
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None


def parse_datasets(values: list[str]) -> list[DatasetSpec]:
    """`ID`, `ID:TRAIN_SPLIT:TEST_SPLIT`, or a .json file with a list of `DatasetSpec` fields, per value."""
    specs = []
    for value in values:
        if value.endswith(".json"):
            try:
                entries = json.loads(Path(value).read_text())
                specs += [DatasetSpec(**entry) for entry in entries]
            except (OSError, json.JSONDecodeError, TypeError) as error:
                raise ValueError(
                    f"Datasets file '{value}' could not be read ({error}); it must hold a JSON list of objects with "
                    f"'id' and optionally {[name for name in DatasetSpec.__dataclass_fields__ if name != 'id']}."
                ) from error
            continue
        parts = value.split(":")
        if len(parts) not in (1, 3) or not all(parts):
            raise ValueError(
                f"Dataset '{value}': give ID or ID:TRAIN_SPLIT:TEST_SPLIT, e.g. tanganke/eurosat:train:test."
            )
        specs.append(DatasetSpec(*parts))
    return specs


def run(
    backbones: str,
    datasets: list[DatasetSpec],
    shots: tuple[int, ...] = SHOTS,
    seeds: tuple[int, ...] = (0,),
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """One result per (dataset, k, seed): top-1 accuracy of every method on the test split.

    `backbones` is a curated set name or .json file (see `clip-ensemble configs`).
    """
    cache = FeatureCache() if cache is None else cache
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = [load_backbone(entry).to(device) for entry in backbone_entries(backbones)]
    results = []
    for spec in datasets:
        columns = {"image_column": spec.image_column, "label_column": spec.label_column}
        train = from_hub_dataset(spec.id, split=spec.train_split, **columns)
        test = from_hub_dataset(spec.id, split=spec.test_split, **columns)
        model = CLIPEnsembleModel.from_backbones(loaded, labels=train.label_names)
        labels = torch.tensor(align_labels(model, test))
        # Embedded once per dataset; each gate below only reads these.
        embeds = cache.embed(model.backbones, test.images, batch_size=batch_size, progress=progress)
        for k in shots:
            for seed in seeds:
                calibrate(model, train, shots=k, seed=seed, cache=cache, batch_size=batch_size, progress=progress)
                report = evaluate_embeddings(model, embeds, labels, dataset=spec.id, split=spec.test_split)
                top1 = {row["method"]: row["top1"] for row in report.rows()}
                results.append(
                    {
                        "dataset": spec.id,
                        "test_split": spec.test_split,
                        "test_images": len(test),
                        "shots": k,
                        "seed": seed,
                        "best_single_backbone": report.best_single,
                        "best single": top1[report.best_single],
                        "mean of logits": top1["mean of logits"],
                        "gate": top1[report.gate_method],
                        "oracle": top1[ORACLE],
                        "backbones": {name: top1[name] for name in report.backbones},
                    }
                )
    return results


def summarise(results: list[dict]) -> list[dict]:
    """Mean over seeds per (dataset, k), then the mean over datasets per k (dataset 'average')."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        groups.setdefault((result["dataset"], result["shots"]), []).append(result)
    rows = [
        {
            "dataset": dataset,
            "shots": k,
            "seeds": len(group),
            **{c: statistics.fmean(r[c] for r in group) for c in COLUMNS},
        }
        for (dataset, k), group in groups.items()
    ]
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    if len(datasets) > 1:
        for k in dict.fromkeys(row["shots"] for row in rows):
            per_k = [row for row in rows if row["shots"] == k]
            rows.append(
                {
                    "dataset": "average",
                    "shots": k,
                    "seeds": min(row["seeds"] for row in per_k),
                    **{c: statistics.fmean(row[c] for row in per_k) for c in COLUMNS},
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown, top-1 accuracy in percent; the last column is the gate's gain over the best single backbone."""
    lines = [
        "| dataset | k | seeds | " + " | ".join(COLUMNS) + " | gate - best single |",
        "|---|---:|---:|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = " | ".join(f"{100 * row[c]:.2f}" for c in COLUMNS)
        gain = 100 * (row["gate"] - row["best single"])
        lines.append(f"| {row['dataset']} | {row['shots']} | {row['seeds']} | {cells} | {gain:+.2f} |")
    return "\n".join(lines)


def write_results(
    backbones: str, results: list[dict], output_dir: str | Path = RESULTS, command: str = ""
) -> tuple[Path, Path]:
    """`reproduce_paper_<set>.md` (the table) and `.json` (every run and the table's rows) in `output_dir`."""
    name = load_hub_config(backbones)["name"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    markdown = output_dir / f"reproduce_paper_{name}.md"
    markdown.write_text(
        f"# Gate vs. baselines, backbone set `{name}`\n\n`{command}`\n\n"
        "Top-1 accuracy (%) on each test split; the gate is calibrated on k images per class of the train split, the "
        "best single backbone is chosen on the same k-shot images, the oracle counts an image as right when any "
        f"backbone is. Means over seeds. torch {torch.__version__}, {device}.\n\n{format_table(rows)}\n"
    )
    data = output_dir / f"reproduce_paper_{name}.json"
    data.write_text(
        json.dumps({"backbones": name, "command": command, "table": rows, "runs": results}, indent=2) + "\n"
    )
    return markdown, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="ID, ID:TRAIN_SPLIT:TEST_SPLIT, or a .json file of datasets")
    parser.add_argument("--backbones", default="paper-openai-9", help="curated set name or .json file")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS), help="k values (default: 1 2 4 8 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="k-shot draws to average (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", help="feature cache folder (default: $HF_HOME/clip_ensemble/features)")
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--save", action="store_true", help="also write the table and the runs to --output-dir")
    args = parser.parse_args(argv)

    cache = FeatureCache(args.cache_dir) if args.cache_dir else FeatureCache()
    specs = parse_datasets(args.datasets)
    results = run(args.backbones, specs, tuple(args.shots), tuple(args.seeds), cache, args.batch_size)
    command = "python benchmarks/reproduce_paper.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(summarise(results)))
    if args.save:
        markdown, data = write_results(args.backbones, results, args.output_dir, command)
        print(f"\nWrote {markdown} and {data}")


if __name__ == "__main__":
    main()
