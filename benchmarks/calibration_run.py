"""One calibration split into feature extraction and gate training, with backbones of real size.

The backbones have the architectures of openai/clip-vit-base-patch32 and -patch16 (CLIP's default config and
patch 16) with random weights, so the compute is real and the run is offline; the images are toy images resized
to 224 px. The second run over the same images reads every embedding from the feature cache.
Prints a table; with --save, saves it to benchmarks/results/calibration_run.md.

    python benchmarks/calibration_run.py
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from clip_ensemble import CLIPEnsembleModel, FeatureCache, calibrate
from clip_ensemble.backbones.transformers_backbone import TransformersBackbone
from clip_ensemble.tasks import TOY_CLASSES, tiny_tokenizer, toy_dataset

ARCHITECTURES = {"ViT-B/32 (random weights)": 32, "ViT-B/16 (random weights)": 16}


def vit_b_backbone(name: str, patch_size: int) -> TransformersBackbone:
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"patch_size": patch_size},
    )
    torch.manual_seed(0)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    return TransformersBackbone(CLIPModel(config).eval(), processor, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "calibration_run.md"))
    parser.add_argument("--save", action="store_true", help="also write the table to --output")
    args = parser.parse_args()

    backbones = [vit_b_backbone(name, patch) for name, patch in ARCHITECTURES.items()]
    model = CLIPEnsembleModel.from_backbones(backbones, labels=list(TOY_CLASSES))
    data = toy_dataset(per_class=args.shots, seed=0)
    data.images = [image.resize((224, 224)) for image in data.images]
    with tempfile.TemporaryDirectory() as folder:
        first = calibrate(model, data, shots=args.shots, cache=FeatureCache(folder), progress=False)
        second = calibrate(model, data, shots=args.shots, cache=FeatureCache(folder), progress=False)

    images = len(data)
    rows = [
        ("backbones", ", ".join(ARCHITECTURES)),
        ("images", f"{images} ({len(TOY_CLASSES)} classes x {args.shots} shots), 224 px"),
        (
            "first run: feature extraction",
            f"{first.feature_seconds:.1f} s ({images * len(backbones) / first.feature_seconds:.1f} backbone-images/s)",
        ),
        ("first run: gate training", f"{first.gate_seconds:.2f} s ({first.steps} steps)"),
        (
            "second run: feature extraction (cache)",
            f"{second.feature_seconds:.2f} s, {second.images_embedded} images embedded",
        ),
        ("second run: gate training", f"{second.gate_seconds:.2f} s"),
        ("machine", f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.save:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            f"# A calibration run, split\n\n`python benchmarks/calibration_run.py`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
