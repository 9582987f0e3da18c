"""Gate training time on cached features at paper scale: 9 backbones of real widths, 1000 classes, 16 shots.

Features are synthetic (random class prototypes per backbone, noisy image embeddings, zero-shot heads of
different quality per backbone) so the benchmark runs offline; the gate, its inputs and its training loop are
the ones `calibrate` uses. Prints a table; with --save, saves it to benchmarks/results/gate_training.md.

    python benchmarks/gate_training.py
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn

from clip_ensemble.calibration import _split_validation, fit_gate
from clip_ensemble.gate import EnsembleGate, combine_logits

WIDTHS = (
    1024,
    512,
    640,
    768,
    1024,
    512,
    512,
    768,
    768,
)  # RN50, RN101, RN50x4, RN50x16, RN50x64, B/32, B/16, L/14, L/14@336


def synthetic_features(num_classes: int, shots: int, seed: int = 0):
    """Per backbone: class prototypes, image embeddings scattered around them, and zero-shot heads that are
    right for some classes and confused for the others (the head of class c points at another class's images),
    a different set per backbone, as real CLIPs disagree."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(shots)
    embeds, logits = [], []
    for width in WIDTHS:
        prototypes = nn.functional.normalize(torch.randn(num_classes, width, generator=generator), dim=-1)
        confused = torch.rand(num_classes, generator=generator) < 0.6
        targets = torch.where(confused, torch.randperm(num_classes, generator=generator), torch.arange(num_classes))
        heads = prototypes[targets]  # (C, width)
        scatter = 3.0 * torch.randn(len(labels), width, generator=generator) / width**0.5
        image = nn.functional.normalize(prototypes[labels] + scatter, dim=-1)
        embeds.append(image)
        logits.append(100.0 * image @ heads.T)
    return torch.cat(embeds, dim=-1), torch.stack(logits, dim=1), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gate_training.md"))
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    args = parser.parse_args()

    started = time.perf_counter()
    gate_inputs, per_backbone_logits, labels = synthetic_features(args.classes, args.shots)
    setup_seconds = time.perf_counter() - started
    train_index, val_index = _split_validation(labels.tolist(), args.shots, seed=0)
    features = (gate_inputs, per_backbone_logits, labels)
    train, val = (tuple(t[index] for t in features) for index in (train_index, val_index))
    gate = EnsembleGate(list(WIDTHS))
    started = time.perf_counter()
    best_step, train_losses, _ = fit_gate(gate, train, val, steps=args.steps, lr=args.lr)
    seconds = time.perf_counter() - started

    val_inputs, val_logits, val_labels = val
    with torch.no_grad():
        gate_acc = (combine_logits(val_logits, gate(val_inputs)).argmax(-1) == val_labels).float().mean()
    mean_acc = (val_logits.mean(1).argmax(-1) == val_labels).float().mean()
    single_acc = (val_logits.argmax(-1) == val_labels[:, None]).float().mean(0).max()
    oracle_acc = (val_logits.argmax(-1) == val_labels[:, None]).any(1).float().mean()

    rows = [
        ("backbones (widths)", f"{len(WIDTHS)} ({', '.join(map(str, WIDTHS))})"),
        (
            "classes x shots",
            f"{args.classes} x {args.shots} = {len(labels)} images ({len(train_index)} train, {len(val_index)} held out)",
        ),
        ("gate parameters", f"{sum(p.numel() for p in gate.parameters()):,}"),
        ("steps run (early stopping) / best step", f"{len(train_losses)} / {best_step}"),
        ("gate training time", f"{seconds:.1f} s"),
        (
            "held-out top-1: best single / mean of logits / gate / oracle",
            f"{100 * single_acc:.1f}% / {100 * mean_acc:.1f}% / {100 * gate_acc:.1f}% / {100 * oracle_acc:.1f}%",
        ),
        (
            "machine",
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        ),
        ("synthetic feature setup (not counted)", f"{setup_seconds:.1f} s"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.save:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            f"# Gate training on cached features\n\n`python benchmarks/gate_training.py`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
