"""Ensemble forward time against the sum of its backbones' standalone forward times: same inputs, same dtype.

Standalone is each transformers model's own `get_image_features(pixel_values)`; the ensemble is
`CLIPEnsembleModel(pixel_values=...)`, which adds moving inputs to each backbone's device, normalising, the zero-shot
logits, the gate and the combination. Backbones: ViT-B/32 and ViT-B/16 architectures with random weights
(benchmarks/realistic_clips.py). After one warm-up, each round times every backbone alone and then the ensemble, back
to back; the overhead is the median over rounds of (ensemble / sum of the backbones alone) - 1, which cancels slow
drifts in the machine's speed; times are medians over rounds. The last column times the ensemble's own work alone
(`model(image_embeds=...)`: zero-shot logits, gate, combination), a floor for the overhead that load does not blur.
Target: overhead at most 5%.
Prints a table; with --save, saves it to benchmarks/results/ensemble_overhead.md.

    python benchmarks/ensemble_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from realistic_clips import vit_clip
from tables import save_result

from clip_ensemble import CLIPEnsembleModel, TransformersBackbone
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset

ARCHITECTURES = {"ViT-B/32": 32, "ViT-B/16": 16}


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.no_grad()
def measure(dtype: torch.dtype, batch_size: int, rounds: int) -> dict:
    backbones = [
        TransformersBackbone(*vit_clip(patch, seed=i), f"{name} (random weights)")
        for i, (name, patch) in enumerate(ARCHITECTURES.items())
    ]
    model = CLIPEnsembleModel.from_backbones(backbones, labels=list(TOY_CLASSES), dtype=dtype).eval()
    images = [image.resize((224, 224)) for image in toy_dataset(per_class=batch_size, seed=0).images[:batch_size]]
    pixel_values = [pixels.to(dtype) for pixels in model.processor(images)["pixel_values"]]
    standalone = [
        (lambda b=b, p=p: b.model.get_image_features(pixel_values=p)) for b, p in zip(model.backbones, pixel_values)
    ]
    ensemble = lambda: model(pixel_values=pixel_values)  # noqa: E731
    embeds = ensemble().image_embeds  # also the warm-up of the ensemble
    # The ensemble's own work, without the backbones: zero-shot logits, gate, combination, gathering.
    own = lambda: model(image_embeds=embeds)  # noqa: E731
    for fn in [*standalone, own]:
        fn()  # warm-up
    alone: list[list[float]] = [[] for _ in standalone]
    together: list[float] = []
    ratios: list[float] = []  # per round: ensemble / sum of the backbones alone, measured back to back
    for _ in range(rounds):
        for times, fn in zip(alone, standalone):
            times.append(seconds(fn))
        together.append(seconds(ensemble))
        ratios.append(together[-1] / sum(times[-1] for times in alone))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "own": statistics.median(seconds(own) for _ in range(10 * rounds)),
        "standalone": [statistics.median(times) for times in alone],
        "ensemble": statistics.median(together),
        "overhead": statistics.median(ratios) - 1,
        "spread": (min(ratios) - 1, max(ratios) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "ensemble_overhead.md"))
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    args = parser.parse_args()

    rows = [measure(getattr(torch, dtype), args.batch_size, args.rounds) for dtype in args.dtypes]
    names = " + ".join(ARCHITECTURES)
    lines = [
        f"| dtype | {' | '.join(f'{name} alone (s)' for name in ARCHITECTURES)} | sum (s) | ensemble (s) "
        "| overhead (median of rounds) | overhead, lowest and highest round | ensemble without backbones (ms) |",
        "|---|" + "---:|" * (len(ARCHITECTURES) + 5),
    ]
    for row in rows:
        low, high = row["spread"]
        lines.append(
            f"| {row['dtype']} | {' | '.join(f'{t:.3f}' for t in row['standalone'])} | {sum(row['standalone']):.3f} | "
            f"{row['ensemble']:.3f} | {100 * row['overhead']:+.1f}% | {100 * low:+.1f}% to {100 * high:+.1f}% | "
            f"{1000 * row['own']:.2f} |"
        )
    setup = f"{names} (random weights), {args.batch_size} images of 224 px, {args.rounds} rounds"
    save_result(
        args.output if args.save else None,
        "Ensemble forward overhead",
        "python benchmarks/ensemble_overhead.py",
        setup,
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
