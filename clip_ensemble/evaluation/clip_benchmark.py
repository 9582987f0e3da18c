"""Results in CLIP_benchmark's format (github.com/LAION-AI/CLIP_benchmark), so that its `build` command merges ours
with theirs into one CSV: one JSON file per method of an `EvaluationReport` (each backbone, each baseline, the gate,
the oracle), whatever methods the report holds.

CLIP_benchmark 1.6.2, `clip_benchmark/cli.py`, `run()`, writes each result as

    dump = {
        "dataset": args.dataset,
        "model": args.model,
        "pretrained": args.pretrained,
        "task": task,
        "metrics": metrics,
        "language": args.language,
    }

with, for zero-shot classification (`clip_benchmark/metrics/zeroshot_classification.py`, `evaluate()`),
`metrics = {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall}` as fractions, and
`acc5 = float("nan")` when the dataset has fewer than 5 classes. Its `build` reads each file's `metrics` and other
keys into one CSV row, adding `model_fullname = model + " " + pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # evaluation.py imports torch; this module needs only the report's rows
    from .evaluate import EvaluationReport

TASK = "zeroshot_classification"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "method"


def clip_benchmark_results(
    report: EvaluationReport, *, pretrained: str = "clip-ensemble", dataset: str | None = None, language: str = "en"
) -> list[dict]:
    """One CLIP_benchmark result dict per row of `report.rows()`.

    `model` is the method as the evaluation table names it (a backbone id, "mean of logits", "gate", ...);
    `pretrained` names the ensemble the evaluation ran with (its folder or Hub id), so `build`'s `model_fullname`
    tells apart the same method in two ensembles; `dataset` defaults to the report's dataset name.
    """
    few_classes = len(report.label_names) < 5  # CLIP_benchmark reports no top-5 accuracy then
    return [
        {
            "dataset": report.dataset if dataset is None else dataset,
            "model": row["method"],
            "pretrained": pretrained,
            "task": TASK,
            "metrics": {
                "acc1": float(row["top1"]),
                "acc5": float("nan") if few_classes else float(row["top5"]),
                "mean_per_class_recall": float(row["mean_per_class_recall"]),
            },
            "language": language,
        }
        for row in report.rows()
    ]


def write_clip_benchmark_results(
    report: EvaluationReport,
    folder: str | os.PathLike,
    *,
    pretrained: str = "clip-ensemble",
    dataset: str | None = None,
    language: str = "en",
) -> list[Path]:
    """Write `clip_benchmark_results(report, ...)` to `folder`, one file per method, named as CLIP_benchmark's
    `--output '{dataset}_{pretrained}_{model}_{language}_{task}.json'` names them; returns the paths.

    Merge them with CLIP_benchmark's own results: `clip_benchmark build folder/*.json theirs/*.json`.
    """
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"'{folder}' is a file; give a folder for the CLIP_benchmark JSON files.")
    results = clip_benchmark_results(report, pretrained=pretrained, dataset=dataset, language=language)
    names: list[str] = []
    for result in results:
        parts = (result["dataset"], result["pretrained"], result["model"], result["language"], TASK)
        name = "_".join(_slug(part) for part in parts)
        while name in names:  # two methods with the same slug keep a file each
            name += "-"
        names.append(name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.json" for name in names]
    for path, result in zip(paths, results):
        path.write_text(json.dumps(result) + "\n")
    return paths


__all__ = ["TASK", "clip_benchmark_results", "write_clip_benchmark_results"]
