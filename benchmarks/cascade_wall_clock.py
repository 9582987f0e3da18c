"""Does a cascade's GFLOPs saving show up in wall-clock time at real backbone sizes? ViT-B/32 and ViT-B/16
architectures with random weights (benchmarks/realistic_clips.py), run cheapest first: after ViT-B/32 a share of
the images stops (`--stop-shares`; the stop margin is set to the quantile of their ViT-B/32 margins that stops that
share; 0: none, the cascade's overhead alone) and the others go on to ViT-B/16. Random weights make the stopping
decisions meaningless, so this measures the mechanics only: the cascade runs each backbone on the images still going,
batched.

Per image from pixel values (preprocessing excluded), full ensemble against cascade, side by side: rounds alternate
the two, times are medians over rounds. Prints a table; `--save` writes it to benchmarks/results/.

    python benchmarks/cascade_wall_clock.py [--save]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from realistic_clips import vit_clip
from tables import save_result

from clip_ensemble import CLIPEnsembleModel, TransformersBackbone
from clip_ensemble.models.cascade import Cascade, cost_order, margins
from clip_ensemble.tasks import TOY_CLASSES, toy_dataset


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--stop-shares", default="0,0.5,0.9", help="shares of images that stop after ViT-B/32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    backbones = [
        TransformersBackbone(*vit_clip(patch, seed=i), f"{name} (random weights)")
        for i, (name, patch) in enumerate((("ViT-B/32", 32), ("ViT-B/16", 16)))
    ]
    model = CLIPEnsembleModel.from_backbones(backbones, labels=list(TOY_CLASSES)).eval()
    images = [image.resize((224, 224)) for image in toy_dataset(per_class=args.images, seed=0).images[: args.images]]
    pixel_values = model.processor(images)["pixel_values"]
    order = cost_order(model.backbone_gflops)
    first = model(pixel_values=pixel_values).per_backbone_logits[:, order[0]]  # (n, C): the first stage's logits
    full_gflops = sum(model.backbone_gflops)

    def seconds_per_image() -> tuple[float, float]:
        started = time.perf_counter()
        out = model(pixel_values=pixel_values)
        return (time.perf_counter() - started) / len(images), float(out.gflops.mean())

    rows, gflops = [], 0.0
    for share in (float(s) for s in args.stop_shares.split(",")):
        # Images whose margin reaches the (1 - share) quantile stop: about `share` of them (none: the cascade's cost of
        # combining after ViT-B/32 alone).
        margin = float(margins(first).quantile(1 - share)) if share > 0 else float("inf")
        cascade = Cascade(model.embed_dims, order, [margin])
        seconds_per_image()  # warm-up
        full, cascaded = [], []
        for round_ in range(args.rounds):  # which goes first alternates too
            for run_cascade in (False, True) if round_ % 2 == 0 else (True, False):
                model.set_cascade(cascade if run_cascade else None)
                seconds, cost = seconds_per_image()
                (cascaded if run_cascade else full).append(seconds)
                gflops = cost if run_cascade else gflops
        model.set_cascade(None)
        full_s, cascade_s = statistics.median(full), statistics.median(cascaded)
        rows.append(
            f"| {100 * share:.0f}% | {1e3 * full_s:.0f} | {1e3 * cascade_s:.0f} | {100 * cascade_s / full_s:.0f}% | "
            f"{100 * gflops / full_gflops:.0f}% |"
        )
    # What the cascade does besides running backbones: the same batch from cached embeddings (no backbone runs), the
    # cascade (half the images stopping) against the full ensemble, median of 200 calls each.
    embeds = model.encode_images(pixel_values)

    def seconds_without_backbones(cascade: Cascade | None) -> float:
        model.set_cascade(cascade)
        times = []
        for _ in range(200):
            started = time.perf_counter()
            model(image_embeds=embeds)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    half = Cascade(model.embed_dims, order, [float(margins(first).quantile(0.5))])
    full_rest, cascade_rest = seconds_without_backbones(None), seconds_without_backbones(half)
    model.set_cascade(None)
    table = "\n".join(
        [
            "| images stopping after ViT-B/32 | ms/image, full | ms/image, cascade | cascade's time (% of full) | "
            "cascade's GFLOPs (% of full) |",
            "|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Besides the backbones (the same {args.images} images from cached embeddings, median of 200 calls): "
            f"{1e3 * full_rest:.2f} ms per batch for the full ensemble, {1e3 * cascade_rest:.2f} ms for the cascade.",
        ]
    )
    setup = (
        f"ViT-B/32 ({model.backbone_gflops[order[0]]:.2f} GFLOPs) then ViT-B/16 ({model.backbone_gflops[order[1]]:.2f}"
        f" GFLOPs), random weights, float32; {args.images} images of 224 px in one batch; median of {args.rounds} "
        "rounds, the two in each, which goes first alternating."
    )
    output = Path(__file__).parent / "results" / "cascade_wall_clock.md" if args.save else None
    save_result(output, "Cascade wall clock at ViT-B sizes", "python benchmarks/cascade_wall_clock.py", setup, table)


if __name__ == "__main__":
    main()
