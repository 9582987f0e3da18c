"""An evaluation written out for people: a Markdown report with charts, and the numbers as JSON and CSV.

Charts need matplotlib (the `[report]` extra). They are drawn on `matplotlib.figure.Figure` objects and saved with
the Agg renderer, never through pyplot, so writing a report leaves an interactive session's backend alone.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from ..calibration.baselines import STACKING
from .evaluate import ORACLE, EvaluationReport, compute_table

REPORT_FILES = (
    "report.md",
    "results.json",
    "per_class_accuracy.csv",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "accuracy.png",
    "gate_weights.png",
    "compute_accuracy.png",
)
_LABEL_WIDTH = 42  # characters of a method, backbone or class name shown on a chart axis


def require_matplotlib() -> None:
    """Raise an ImportError naming the extra when matplotlib is missing (check before a long evaluation)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Writing an evaluation report draws charts with matplotlib, which is not installed; "
            'install it with `pip install "clip-ensemble[report]"` (or `pip install matplotlib`).'
        ) from error


def _short(name: str, width: int = _LABEL_WIDTH) -> str:
    """Long names (folders, repo ids) keep their start and end: 'best single (/tmp/…/toy-clip-1, chosen …)'."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[-(width - 1 - head) :]


def check_report_folder(folder: str | os.PathLike) -> None:
    """A new or empty folder, or an earlier report's (whose files are replaced); never a folder of other files."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"Report folder '{folder}' is a file; give a folder.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "results.json").is_file():
        raise ValueError(
            f"Report folder '{folder}' already holds other files; give a new or empty folder, or an earlier "
            "report's folder to replace that report."
        )


def _bar_chart(path: Path, names: list[str], values: list[float], title: str, xlabel: str, colours: list[str]) -> None:
    """Horizontal bars, first name on top, each labelled with its value in percent."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.2 + 0.42 * len(names)), layout="constrained")
    ax = fig.subplots()
    positions = range(len(names))[::-1]
    bars = ax.barh(list(positions), [100 * v for v in values], color=colours)
    ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in values], padding=3, fontsize=9)
    ax.set_yticks(list(positions), [_short(name) for name in names], fontsize=9)
    ax.set_xlim(0, 112)  # room for the value labels
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def _accuracy_chart(report: EvaluationReport, path: Path) -> None:
    rows = report.rows()
    colour = {report.gate_method: "tab:orange", ORACLE: "tab:grey", **dict.fromkeys(report.baselines, "tab:purple")}
    _bar_chart(
        path,
        [row["method"] for row in rows],
        [row["top1"] for row in rows],
        f"Top-1 accuracy per method: {report.dataset}, {len(report.labels)} images",
        "top-1 accuracy (%)",
        [colour.get(row["method"], "tab:blue") for row in rows],
    )


def _gate_chart(report: EvaluationReport, path: Path) -> None:
    shares = report.largest_gate_weight_share()
    _bar_chart(
        path,
        list(shares),
        list(shares.values()),
        "Which backbone the gate weighs most, per image",
        "share of images where it has the largest gate weight (%)",
        ["tab:green" if name in report.backbones else "tab:grey" for name in shares],
    )


def _confusion_chart(report: EvaluationReport, path: Path) -> None:
    """Rows normalised to each true label's images, on a square-root colour scale so that confusions of a few
    percent show; counts in the cells up to 20 labels, label names on the axes up to 150."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    counts = report.confusion_matrix()  # (C, C)
    num_classes = len(report.label_names)
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(18.0, 4.0 + 0.14 * num_classes)  # inches: about 17 px per label at 100 labels
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    if num_classes <= 150:
        fontsize = min(9.0, max(5.0, 700 / num_classes))
        names = [_short(name, 24) for name in report.label_names]
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(num_classes), names, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted label" + ("" if num_classes <= 150 else " (in the order of confusion_matrix.csv)"))
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix of the {report.gate_method}: {report.dataset}", fontsize=11)
    if num_classes <= 20:
        for (true, predicted), count in zip(counts.nonzero().tolist(), counts[counts > 0].tolist()):
            dark = shares[true, predicted] > 0.5
            ax.text(
                predicted, true, str(count), ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true label's images (square-root scale)")
    fig.savefig(path, dpi=110)


_KIND_STYLE = {  # kind of an accuracy-against-compute point -> (colour, marker)
    "backbone": ("tab:blue", "o"),
    "subset": ("tab:green", "s"),
    "full": ("tab:red", "*"),
    "cascade": ("tab:orange", "D"),
}


def compute_accuracy_chart(points: list[dict], path: str | os.PathLike, title: str) -> None:
    """Top-1 against mean GFLOPs per image for `evaluation.accuracy_against_compute`'s points (each backbone, the
    subsets, the full ensemble, the cascade's trade-off at several stopping rules, joined by a line, with the one
    chosen (`"chosen": True`) ringed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for kind, (colour, marker) in _KIND_STYLE.items():
        chosen = [p for p in points if p["kind"] == kind]
        if not chosen:
            continue
        xs, ys = [p["gflops"] for p in chosen], [100 * p["top1"] for p in chosen]
        if kind == "cascade":
            line = sorted(zip(xs, ys))
            ax.plot([x for x, _ in line], [y for _, y in line], color=colour, alpha=0.5)
        ax.scatter(xs, ys, color=colour, marker=marker, s=90 if kind == "full" else 40, label=kind, zorder=3)
        if kind in ("backbone", "full"):
            for p in chosen:
                ax.annotate(_short(p["method"], 24), (p["gflops"], 100 * p["top1"]), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")  # fmt: skip
    for p in (p for p in points if p.get("chosen")):
        ax.scatter([p["gflops"]], [100 * p["top1"]], s=260, facecolors="none", edgecolors="black", linewidths=1.5,
                   label="cascade as fitted", zorder=4)  # fmt: skip
        ax.annotate(_short(p["method"], 32), (p["gflops"], 100 * p["top1"]), fontsize=8, xytext=(8, -12),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("mean GFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    if points:  # a report built by hand may have none
        ax.legend(fontsize=9)
    fig.savefig(path, dpi=110)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _settings(settings: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def _baselines_markdown(report: EvaluationReport) -> list[str]:
    """How the baselines fitted on the calibration data chose their hyper-parameters; nothing without them."""
    if not report.baselines:
        return []
    stacking = report.baselines.get(STACKING)
    return [
        "## Baselines fitted on the calibration data",
        "",
        "What a user would pick instead of the gate (purple in the accuracy chart), fitted on the same calibration "
        "images' cached features: "
        "stacking (one static non-negative weight per backbone, fitted by cross-entropy from equal weights, a penalty "
        "toward equal weights), a linear probe (logistic regression on the concatenated normalised embeddings, "
        "starting from the mean of logits' zero-shot heads with an L2 penalty pulling it back to them, its correction "
        "in the top principal directions of the calibration embeddings), and Tip-Adapter (training-free: a cache of "
        "the calibration embeddings per backbone, zero-shot logits + alpha x cache logits, averaged over backbones). "
        "Each chose its hyper-parameters from a small grid by cross-validation on the calibration images alone "
        "(never on this split); ties go to the setting closest to the mean of logits.",
        "",
        "| method | chosen by cross-validation | cross-validated top-1 (%) |",
        "|---|---|---:|",
        *(
            f"| {name} | {_settings({k: v for k, v in fitted['settings'].items() if k != 'weights'})} "
            f"| {_percent(max(fitted['cross_validated_accuracy'].values()))} |"
            for name, fitted in report.baselines.items()
        ),
        "",
        *(
            [
                f"Stacking's weight per backbone: {_settings(dict(zip(report.backbones, stacking['settings']['weights'])))}.",
                "",
            ]
            if stacking
            else []
        ),
    ]


def _markdown(report: EvaluationReport) -> str:
    shares = report.largest_gate_weight_share()
    # The gate beside the baselines it must beat.
    methods = [report.gate_method, *(m for m in report.ranked if m.startswith("best single") or m == "mean of logits")]
    per_class = {method: report.per_class_accuracy(method) for method in methods}
    support = report.labels.bincount(minlength=len(report.label_names)).tolist()
    lines = [
        f"# Evaluation: {report.dataset}",
        "",
        report.table(),
        "",
        "Accuracies in percent; the best single backbone is chosen on the calibration data, the oracle counts an image "
        "as right when any backbone is.",
        "",
        "![Top-1 accuracy per method](accuracy.png)",
        "",
        *_baselines_markdown(report),
        "## The gate",
        "",
        "| backbone | images where it has the largest weight (%) |",
        "|---|---:|",
        *(f"| {name} | {_percent(share)} |" for name, share in shares.items()),
        "",
        "![Which backbone the gate weighs most](gate_weights.png)",
        "",
        "## Per class",
        "",
        "Top-1 accuracy (%) on each label's images; all methods in `per_class_accuracy.csv`, the gate's confusion "
        "matrix in `confusion_matrix.csv`.",
        "",
        "| label | images | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
        *(
            f"| {name} | {count} | " + " | ".join(_percent(per_class[m][name]) for m in methods) + " |"
            for name, count in zip(report.label_names, support)
        ),
        "",
        "![Confusion matrix of the gate](confusion_matrix.png)",
        "",
        *_compute_section(report),
    ]
    return "\n".join(lines)


def _compute_section(report: EvaluationReport) -> list[str]:
    """Accuracy against compute: each backbone, subsets, the full ensemble, the cascade at several tolerances."""
    if not report.compute:
        return []
    return [
        "## Accuracy against compute",
        "",
        "Top-1 (%) and mean GFLOPs per image (image towers, measured with torch's FLOP counter); a cascade runs "
        "backbones cheapest first and stops early on confident images.",
        "",
        compute_table(report.compute),
        "",
        "![Accuracy against compute](compute_accuracy.png)",
        "",
    ]


def write_report(report: EvaluationReport, folder: str | os.PathLike) -> list[Path]:
    """Write `REPORT_FILES` into `folder` (created; an earlier report there is replaced); returns their paths.

    report.md       the table, charts and per-class accuracies, for reading
    results.json    `report.to_dict()`: every method's top-1, top-5, mean per-class recall, and the gate's choices
    per_class_accuracy.csv   label, images, then each method's top-1 accuracy on that label (fractions)
    confusion_matrix.csv     the gate's confusion matrix: row = true label, column = predicted label (counts)
    *.png           accuracy per method, the gate's most weighted backbone, the gate's confusion matrix,
                    accuracy against compute (backbones, subsets, full ensemble, cascade)
    """
    require_matplotlib()
    folder = Path(folder)
    check_report_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)

    report.to_json(folder / "results.json")
    methods = [row["method"] for row in report.rows() if row["method"] != ORACLE]
    per_class = {method: report.per_class_accuracy(method) for method in methods}
    support = report.labels.bincount(minlength=len(report.label_names)).tolist()
    with open(folder / "per_class_accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "images", *methods])
        for name, count in zip(report.label_names, support):
            writer.writerow([name, count, *(f"{per_class[m][name]:.6f}" for m in methods)])
    with open(folder / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *report.label_names])
        for name, row in zip(report.label_names, report.confusion_matrix().tolist()):
            writer.writerow([name, *row])
    _accuracy_chart(report, folder / "accuracy.png")
    _gate_chart(report, folder / "gate_weights.png")
    _confusion_chart(report, folder / "confusion_matrix.png")
    compute_accuracy_chart(
        report.compute or [], folder / "compute_accuracy.png", f"Accuracy against compute: {report.dataset}"
    )
    (folder / "report.md").write_text(_markdown(report))
    return [folder / name for name in REPORT_FILES]


__all__ = ["REPORT_FILES", "check_report_folder", "compute_accuracy_chart", "require_matplotlib", "write_report"]
