"""Evaluation on one labelled split: every backbone, the baselines, the gate and the oracle, side by side."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.baselines import Baseline, fit_baselines
from ..calibration.calibrate import CalibrationReport
from ..calibration.folds import Features
from ..data.features import FeatureCache
from ..data.labelled import LabelledImages, load_labelled_data
from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from .metrics import confusion_matrix, mean_per_class_recall, per_class_recall, top_k_accuracy

ORACLE = "oracle (any backbone right)"
TIE = "tie (equal weights)"


@dataclass
class EvaluationReport:
    """Metrics per method on one split; `ranked[method]` holds each image's top-5 label indices.

    The oracle has no ranking: `oracle_correct` holds its (n, 2) top-1 / top-5 hits. `gate_method` names the gate's
    entry in `ranked`; `split` is the dataset split when the data was loaded from a `datasets` dataset or Hub id.
    `baselines` maps each baseline fitted on the calibration data (see `clip_ensemble.calibration.baselines`) to its
    hyper-parameters chosen by cross-validation there; empty when `evaluate` was given no `support`.
    """

    dataset: str
    label_names: list[str]
    labels: torch.Tensor  # (n,)
    ranked: dict[str, torch.Tensor]  # method -> (n, min(5, C)) label indices, best first
    oracle_correct: torch.Tensor  # (n, 2) bool
    gate_weights: torch.Tensor  # (n, B)
    backbones: list[str]
    best_single: str | None  # the backbone chosen on calibration data
    gate_method: str
    split: str | None = None
    baselines: dict[str, dict] = field(default_factory=dict)
    compute: list[dict] | None = None  # `accuracy_against_compute`: top-1 and mean GFLOPs per image per point

    def rows(self) -> list[dict]:
        """One dict per method: top-1, top-5 accuracy and mean per-class recall (fractions)."""
        num_classes = len(self.label_names)
        rows = [
            {
                "method": method,
                "top1": top_k_accuracy(ranked, self.labels, 1),
                "top5": top_k_accuracy(ranked, self.labels, 5),
                "mean_per_class_recall": mean_per_class_recall(ranked[:, 0], self.labels, num_classes),
            }
            for method, ranked in self.ranked.items()
        ]
        top1, top5 = self.oracle_correct.float().mean(0).tolist()
        # The oracle's prediction is the label itself wherever some backbone is right.
        oracle_pred = torch.where(self.oracle_correct[:, 0], self.labels, -1)
        recall = mean_per_class_recall(oracle_pred, self.labels, num_classes)
        return [*rows, {"method": ORACLE, "top1": top1, "top5": top5, "mean_per_class_recall": recall}]

    def per_class_accuracy(self, method: str) -> dict[str, float]:
        """Label name -> top-1 recall of `method` on that label's images (NaN for a label with no image)."""
        recall = per_class_recall(self.ranked[method][:, 0], self.labels, len(self.label_names))
        return dict(zip(self.label_names, recall.tolist()))

    def confusion_matrix(self, method: str | None = None) -> torch.Tensor:
        """(C, C) image counts of `method` (default: the gate): row = true label, column = top-1 prediction."""
        method = self.gate_method if method is None else method
        return confusion_matrix(self.ranked[method][:, 0], self.labels, len(self.label_names))

    def largest_gate_weight_share(self) -> dict[str, float]:
        """Backbone -> share of images on which the gate gives it the strictly largest weight; `TIE` collects the
        images on which two or more backbones share the largest weight (all of them for an uncalibrated gate)."""
        is_max = self.gate_weights == self.gate_weights.max(dim=1, keepdim=True).values  # (n, B)
        unique = is_max.sum(dim=1) == 1
        shares = dict(zip(self.backbones, (is_max & unique[:, None]).double().mean(0).tolist()))
        tie = float((~unique).double().mean())
        return {**shares, TIE: tie} if tie > 0 else shares

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_images": len(self.labels),
            "num_labels": len(self.label_names),
            "backbones": self.backbones,
            "best_single_backbone": self.best_single,
            "gate_method": self.gate_method,
            "results": self.rows(),
            "largest_gate_weight_share": self.largest_gate_weight_share(),
            **({"baselines": self.baselines} if self.baselines else {}),
            "accuracy_against_compute": self.compute,
        }

    def card_entry(self) -> dict:
        """What a model card shows of this evaluation (see `clip_ensemble.models.modelcard.CardEvaluation`)."""
        return {**self.to_dict(), "label_names": list(self.label_names), "table": self.table()}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def table(self) -> str:
        """A Markdown table, accuracies in percent."""
        lines = [
            f"{self.dataset}{f' ({self.split})' if self.split else ''}: {len(self.labels)} images, "
            f"{len(self.label_names)} labels",
            "",
            "| method | top-1 | top-5 | mean per-class recall |",
            "|---|---:|---:|---:|",
        ]
        for row in self.rows():
            lines.append(
                f"| {row['method']} | {100 * row['top1']:.2f} | {100 * row['top5']:.2f} "
                f"| {100 * row['mean_per_class_recall']:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def align_labels(model: CLIPEnsembleModel, data: LabelledImages) -> list[int]:
    """The data's labels as indices into the model's labels; every data label must be a model label."""
    index = {name: i for i, name in enumerate(model.labels)}
    unknown = sorted(set(data.label_names) - set(index))
    if unknown:
        raise ValueError(
            f"The data has labels the model does not know: {unknown[:10]}"
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            + f". The model's labels are {model.labels[:10]}{' ...' if len(model.labels) > 10 else ''}; "
            "call `model.set_labels(data.label_names)` (and calibrate again) to switch label sets."
        )
    return [index[data.label_names[label]] for label in data.labels]


def _split_of(source, split: str) -> str | None:
    """The split the data came from: named for a Hub id or a `DatasetDict`, read from a `Dataset`, else None."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return None if source.split is None else str(source.split)
    if isinstance(source, datasets.DatasetDict) or (isinstance(source, str) and not Path(source).is_dir()):
        return split
    return None


def _support_data(support) -> LabelledImages:
    """The calibration images from a `CalibrationReport` (its k-shot `support`) or any data form `evaluate` takes
    (a Hub id or `DatasetDict` is read at its "train" split, where `calibrate` draws from by default)."""
    if isinstance(support, CalibrationReport):
        if support.support is None:
            raise ValueError(
                "This CalibrationReport holds no calibration images (`support` is None); pass the calibration data "
                "itself as `support`."
            )
        return support.support
    return load_labelled_data(support, split="train")


@torch.no_grad()
def evaluate(
    model: CLIPEnsembleModel,
    data,
    *,
    split: str = "test",
    support=None,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    progress: bool = True,
) -> EvaluationReport:
    """Every backbone alone, the best single backbone (chosen on calibration data), mean of logits, mean of
    probabilities, majority vote, the gate, and the oracle, on one labelled split.

    `data` is a `LabelledImages`, an image folder, a `datasets.Dataset` or a Hub dataset id (with `split`).
    `support` is the calibration data: a `CalibrationReport` (its k-shot images are used), or a `LabelledImages`,
    folder, `Dataset` or Hub id ("train" split). When given, the baselines a user would pick instead of the gate
    (`clip_ensemble.calibration.baselines`: stacking, a linear probe, Tip-Adapter) are fitted on its cached features, their
    hyper-parameters chosen by cross-validation on it, and reported beside the gate.
    """
    source, data = data, load_labelled_data(data, split=split)
    labels = torch.tensor(align_labels(model, data))
    cache = FeatureCache() if cache is None else cache
    embeds = cache.embed(model.backbones, data.images, batch_size=batch_size, progress=progress)
    support_embeds = None
    if support is not None:
        support_data = _support_data(support)
        support_labels = torch.tensor(align_labels(model, support_data))
        support_embeds = cache.embed(model.backbones, support_data.images, batch_size=batch_size, progress=progress)
        support_embeds = (support_embeds, support_labels)
    return evaluate_embeddings(
        model,
        embeds,
        labels,
        dataset=data.name,
        split=_split_of(source, split),
        chunk_size=chunk_size,
        support=support_embeds,
    )


def _features(model: CLIPEnsembleModel, image_embeds: Sequence[torch.Tensor], labels: torch.Tensor) -> Features:
    """Cached `Features` (on the CPU) of one batch of embeddings, as calibration builds them."""
    out = model(image_embeds=image_embeds)
    return Features(torch.cat(out.image_embeds, dim=-1).cpu(), out.per_backbone_logits.cpu(), labels.cpu())


@torch.no_grad()
def evaluate_embeddings(
    model: CLIPEnsembleModel,
    image_embeds: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    dataset: str = "data",
    split: str | None = None,
    chunk_size: int = 1024,
    support: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None,
) -> EvaluationReport:
    """`evaluate` on image embeddings already computed (one (n, embed_dim_b) tensor per backbone, e.g. from a
    `FeatureCache`) with `labels` (n,) indices into `model.labels`: scoring several gates on one split embeds it once.
    `support` is the calibration data as (embeddings per backbone, labels); when given, the baselines are fitted on
    it and reported.
    """
    names = model.config.backbone_names
    model.eval()
    gate_name = "gate" if model.config.calibration else "gate (uncalibrated: mean of logits)"
    baselines: dict[str, Baseline] = {}
    if support is not None:
        support_embeds, support_labels = support
        seed = (model.config.calibration or {}).get("seed", 0)
        support_features = _features(model, support_embeds, torch.as_tensor(support_labels))
        baselines = fit_baselines(support_features, model.embed_dims, model.logit_scales, seed=seed)
    methods = [*names, "mean of logits", "mean of probabilities", "majority vote", *baselines, gate_name]
    ranked: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    oracle, gate_weights = [], []
    k = min(5, len(model.labels))
    for start in range(0, len(labels), chunk_size):
        chunk_embeds = [e[start : start + chunk_size] for e in image_embeds]
        out = model(image_embeds=chunk_embeds)
        logits = out.per_backbone_logits.cpu()  # (chunk, B, C)
        y = labels[start : start + chunk_size]
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(1).float()  # (chunk, C)
        mean_probs = logits.softmax(-1).mean(1)
        features = Features(torch.cat(out.image_embeds, dim=-1).cpu(), logits, y)
        scores = {
            **{name: logits[:, b] for b, name in enumerate(names)},
            "mean of logits": logits.mean(1),
            "mean of probabilities": mean_probs,
            "majority vote": votes + 0.5 * mean_probs,  # ties between vote counts go to the higher mean probability
            **{name: baseline.scores(features) for name, baseline in baselines.items()},
            gate_name: out.logits.cpu(),
        }
        for method, score in scores.items():
            ranked[method].append(score.topk(k, dim=-1).indices)
        per_backbone_top = logits.topk(k, dim=-1).indices  # (chunk, B, k)
        hits = per_backbone_top == y[:, None, None]
        oracle.append(torch.stack([hits[..., 0].any(1), hits.any(-1).any(1)], dim=1))
        gate_weights.append(out.gate_weights.cpu())

    calibration = model.config.calibration or {}
    best_single = calibration.get("best_single_backbone")
    ranked_tensors = {m: torch.cat(r) for m, r in ranked.items()}
    if best_single in names:
        ranked_tensors = {
            **{m: ranked_tensors[m] for m in names},
            f"best single ({best_single}, chosen on calibration data)": ranked_tensors[best_single],
            **{m: ranked_tensors[m] for m in methods[len(names) :]},
        }
    return EvaluationReport(
        dataset=dataset,
        label_names=model.labels,
        labels=labels,
        ranked=ranked_tensors,
        oracle_correct=torch.cat(oracle),
        gate_weights=torch.cat(gate_weights),
        backbones=names,
        best_single=best_single if best_single in names else None,
        gate_method=gate_name,
        split=split,
        baselines={name: baseline.to_dict() for name, baseline in baselines.items()},
        compute=accuracy_against_compute(model, image_embeds, labels),
    )


# Accuracy against compute: each backbone, subsets, the full ensemble and its cascade at several tolerances.

_MAX_CHARTED_SUBSETS = 6  # backbones up to which every subset (mean of logits) is charted


@torch.no_grad()
def accuracy_against_compute(
    model: CLIPEnsembleModel, image_embeds: Sequence[torch.Tensor], labels: torch.Tensor, *, chunk_size: int = 1024
) -> list[dict]:
    """Top-1 and mean GFLOPs per image on cached embeddings: each backbone alone; every subset of two or more
    backbones by the mean of logits (up to 6 backbones); the full ensemble (the gate, every backbone run); and, for a
    model with a cascade, the cascade at its own stop margins and at those other tolerances would have chosen
    (`config.cascade["stop_margins_by_tolerance"]`). One dict per point: method, kind, top1, gflops. Runs
    `chunk_size` images at a time."""
    names, gflops = model.config.backbone_names, model.backbone_gflops
    subsets = [
        subset
        for size in range(2, len(names))
        for subset in itertools.combinations(range(len(names)), size)
        if len(names) <= _MAX_CHARTED_SUBSETS
    ]
    points = [{"method": name, "kind": "backbone", "gflops": gflops[b]} for b, name in enumerate(names)]
    points += [
        {
            "method": " + ".join(names[b] for b in subset) + " (mean of logits)",
            "kind": "subset",
            "gflops": sum(gflops[b] for b in subset),
        }
        for subset in subsets
    ]
    points.append({"method": "full ensemble (gate)", "kind": "full", "gflops": sum(gflops)})
    cascade, info = model.cascade, dict(model.config.cascade or {})
    replays = {}  # point index -> cascade stop margins
    if cascade is not None:
        chosen = info.get("tolerance")
        by_tolerance = {**info.get("stop_margins_by_tolerance", {}), str(chosen): cascade.stop_margins}
        for tolerance, stop_margins in sorted(by_tolerance.items(), key=lambda item: float(item[0])):
            mark = " (chosen)" if float(tolerance) == chosen else ""
            replays[len(points)] = stop_margins
            points.append(
                {
                    "method": f"cascade, tolerance {float(tolerance):g}{mark}",
                    "kind": "cascade",
                    "gflops": 0.0,
                    "chosen": bool(mark),
                }
            )
    correct = [0] * len(points)
    try:
        for start in range(0, len(labels), chunk_size):
            chunk = [e[start : start + chunk_size] for e in image_embeds]
            y = labels[start : start + chunk_size].cpu()
            model.set_cascade(None)
            full = model(image_embeds=chunk)
            logits = full.per_backbone_logits.cpu()  # (chunk, B, C)
            scores = [*logits.unbind(1), *(logits[:, list(s)].mean(1) for s in subsets), full.logits.cpu()]
            for index, score in enumerate(scores):
                correct[index] += int((score.argmax(-1) == y).sum())
            for index, stop_margins in replays.items():
                replay = copy.copy(cascade)  # shares the gates; only the stop margins differ
                replay.stop_margins = stop_margins
                model.set_cascade(replay)
                out = model(image_embeds=chunk)
                correct[index] += int((out.logits.argmax(-1).cpu() == y).sum())
                points[index]["gflops"] += float(out.gflops.sum()) / len(labels)
    finally:
        model.set_cascade(cascade, **info) if cascade is not None else model.set_cascade(None)
    return [{**point, "top1": hits / len(labels)} for point, hits in zip(points, correct)]


def compute_table(points: list[dict]) -> str:
    """A Markdown table of `accuracy_against_compute`'s points: top-1 (%) beside mean GFLOPs per image."""
    lines = ["| method | top-1 | GFLOPs/image |", "|---|---:|---:|"]
    lines += [f"| {p['method']} | {100 * p['top1']:.2f} | {p['gflops']:.4g} |" for p in points]
    return "\n".join(lines)


__all__ = [
    "ORACLE",
    "TIE",
    "EvaluationReport",
    "accuracy_against_compute",
    "align_labels",
    "compute_table",
    "evaluate",
    "evaluate_embeddings",
]
