"""The `clip-ensemble` command line: calibrate, evaluate, predict, extract features, and an offline demo.

Heavy modules (torch, transformers, datasets) are imported inside the commands, after the arguments are parsed:
`--help` and argument errors answer at once. Names of sets, folders and Hub ids are checked before any Hub call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  clip-ensemble demo
  clip-ensemble configs paper-openai-9
  clip-ensemble calibrate --backbones openai-vit --dataset tanganke/eurosat --shots 4 --output eurosat-gate
  clip-ensemble calibrate --backbones ./clip-a ./clip-b --dataset ./photos --shots 2 --output my-gate \\
      --push-to-hub me/my-gate
  clip-ensemble evaluate eurosat-gate --dataset tanganke/eurosat --split test --report eurosat-report
  clip-ensemble evaluate eurosat-gate --dataset tanganke/eurosat --split test --clip-benchmark-json results/
  clip-ensemble predict eurosat-gate photo1.jpg photo2.png --top-k 3
  accelerate launch --multi_gpu --num_processes 2 -m clip_ensemble.cli extract-features --backbones openai-vit \\
      --dataset tanganke/eurosat --cache-dir /shared/features

offline (no Hub access): HF_HUB_OFFLINE=1 clip-ensemble ... uses what the Hugging Face cache holds.
"""


def _add_backbones_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbones",
        nargs="+",
        required=True,
        help="CLIP repo ids or folders, or one set from `clip-ensemble configs`",
    )


def _add_placement_arguments(parser: argparse.ArgumentParser, default_device: str) -> None:
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="backbone precision")
    parser.add_argument(
        "--device-map",
        help=f"where to put the backbones: auto, balanced, sequential, cpu, 0, cuda:1, ... (default: {default_device})",
    )


def _placement(args) -> dict:
    """`device_map` and `dtype` keyword arguments from the command line; "0" is accelerator 0."""
    device_map = int(args.device_map) if args.device_map and args.device_map.isdigit() else args.device_map
    return {"device_map": device_map, "dtype": args.dtype}


def _add_data_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    parser.add_argument("--dataset", required=True, help="Hub dataset id, or a folder with one sub-folder per class")
    parser.add_argument("--split", default=default_split, help=f"dataset split (default: {default_split})")
    parser.add_argument("--image-column", help="image column of a Hub dataset (detected if omitted)")
    parser.add_argument("--label-column", help="label column of a Hub dataset (detected if omitted)")
    parser.add_argument(
        "--labels-json",
        help="an image folder's labels, when its class folders are not named by them: a JSON file mapping folder "
        'names to labels, e.g. {"tshirt": "T-shirt/top"}',
    )
    parser.add_argument("--cache-dir", help="feature cache folder (default: $HF_HOME/clip_ensemble/features)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per backbone forward pass")


def _columns(args) -> dict[str, str]:
    """The image and label column names the user gave (others are detected)."""
    return {k: v for k, v in (("image_column", args.image_column), ("label_column", args.label_column)) if v}


def _label_map(args) -> dict[str, str] | None:
    """`--labels-json`: a JSON object of class folder name -> label."""
    if not args.labels_json:
        return None
    try:
        label_map = json.loads(Path(args.labels_json).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--labels-json '{args.labels_json}' could not be read as JSON ({error}).") from None
    if not isinstance(label_map, dict) or not all(isinstance(v, str) and v.strip() for v in label_map.values()):
        raise ValueError(
            f"--labels-json '{args.labels_json}' must hold one JSON object of folder name -> label, e.g. "
            '{"tshirt": "T-shirt/top"}.'
        )
    return label_map


def _load_data(args):
    from .data.labelled import load_labelled_data
    from .sources import OFFLINE_FIX

    try:
        return load_labelled_data(args.dataset, split=args.split, label_map=_label_map(args), **_columns(args))
    except ConnectionError as error:  # `datasets`: offline and not in the cache, or no answer from the Hub
        raise ValueError(
            f"The dataset '{args.dataset}' is not a local folder and could not be loaded from the Hub ({error}). "
            f"Check the name, or give a folder with one sub-folder of images per class. Offline: {OFFLINE_FIX}"
        ) from None


def _check_dataset(args) -> None:
    """The dataset argument, checked before any backbone is loaded: a missing folder is said to be one."""
    from .sources import check_path_or_hub_id

    check_path_or_hub_id(args.dataset, "dataset")


def _check_model(name: str) -> None:
    """A saved ensemble's folder or Hub id, checked before loading: missing folder, malformed id, unreachable Hub."""
    from .sources import check_path_or_hub_id, require_hub

    check_path_or_hub_id(name, "model")
    if not Path(name).expanduser().exists():
        require_hub([name])


def _resolve_backbones(values: list[str]) -> list:
    """Set names, folders and repo ids checked (`hub_configs.resolve_backbones`), then the Hub reached once."""
    from .backbones.hub_configs import resolve_backbones
    from .sources import require_hub

    backbones = resolve_backbones(values)
    names = [b["name_or_path"] if isinstance(b, dict) else b for b in backbones]
    require_hub([n.removeprefix("hf-hub:") for n in names if not Path(n.removeprefix("local-dir:")).exists()])
    return backbones


def _cache(args):
    from .data.features import FeatureCache

    return FeatureCache(args.cache_dir) if args.cache_dir else FeatureCache()


def _calibrate(args) -> None:
    backbones = _resolve_backbones(args.backbones)
    _check_dataset(args)

    from .calibration.calibrate import calibrate
    from .evaluation.evaluate import evaluate
    from .models.modeling_clip_ensemble import CLIPEnsembleModel

    data = _load_data(args)
    model = CLIPEnsembleModel.from_backbones(
        backbones,
        labels=data.label_names,
        templates=args.templates,
        combination=args.combination,
        **_placement(args),
    )
    if args.budget_gflops is not None:
        from .calibration.selection import select_backbones

        model, selection = select_backbones(
            model,
            data,
            args.shots,
            args.budget_gflops,
            args.seed,
            cache=_cache(args),
            batch_size=args.batch_size,
            cascade_tolerance=args.cascade_tolerance,
        )
        print(selection)
        report = selection.calibration
    else:
        report = calibrate(
            model,
            data,
            shots=args.shots,
            seed=args.seed,
            cache=_cache(args),
            batch_size=args.batch_size,
            cascade_tolerance=args.cascade_tolerance,
        )
        print(report)
    model.save_pretrained(args.output)
    print(f"Saved the gate and config to {args.output}")
    evaluations = []
    if args.eval_split:
        args.split = args.eval_split
        evaluations.append(
            evaluate(model, _load_data(args), support=report, cache=_cache(args), batch_size=args.batch_size)
        )
        print(evaluations[0].table())
        # Saved again (the gate is small), now with the evaluation in the card as model-index metadata.
        model.save_pretrained(args.output, evaluations=evaluations)
    if args.push_to_hub:
        commit = model.push_to_hub(args.push_to_hub, evaluations=evaluations)
        print(f"Pushed to {commit.commit_url}")


def _evaluate(args) -> None:
    _check_model(args.model)
    _check_dataset(args)
    if args.clip_benchmark_json and Path(args.clip_benchmark_json).is_file():
        raise ValueError(f"--clip-benchmark-json '{args.clip_benchmark_json}' is a file; give a folder.")

    from .evaluation.evaluate import evaluate
    from .models.modeling_clip_ensemble import CLIPEnsembleModel

    if args.report:
        from .evaluation.report import check_report_folder, require_matplotlib

        # Before the evaluation, which can take long: a missing extra or an unusable folder fails at once.
        require_matplotlib()
        check_report_folder(args.report)
    model = CLIPEnsembleModel.from_pretrained(args.model)
    data = _load_data(args)
    support = _support(args, model) if args.support_split else None
    report = evaluate(model, data, support=support, cache=_cache(args), batch_size=args.batch_size)
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print(f"Wrote {args.json}")
    if args.clip_benchmark_json:
        from .evaluation.clip_benchmark import write_clip_benchmark_results

        paths = write_clip_benchmark_results(
            report, args.clip_benchmark_json, pretrained=args.model, dataset=args.clip_benchmark_dataset
        )
        print(f"Wrote {len(paths)} CLIP_benchmark result files (one per method) to {args.clip_benchmark_json}")
    if args.report:
        from .evaluation.report import write_report

        write_report(report, args.report)
        print(f"Wrote the report to {args.report}/report.md (with charts, per-class accuracy, confusion matrix)")


def _support(args, model):
    """The gate's own k-shot calibration images, redrawn from `--support-split` with its recorded shots and seed."""
    from .data.labelled import sample_few_shot

    calibration = model.config.calibration
    if not calibration:
        raise ValueError(
            f"--support-split {args.support_split}: the model '{args.model}' was never calibrated, so there are no "
            "recorded shots and seed to redraw its calibration images; drop --support-split or calibrate it first."
        )
    args.split = args.support_split
    data = _load_data(args)
    return data.subset(sample_few_shot(data, calibration["shots"], calibration["seed"]), name=data.name)


def _images_to_classify(paths: list[str], split: str):
    """(name, image) pairs: image files as given; a folder's image files, recursively; the rows of a folder written
    by `datasets`' `save_to_disk` (its `split`, if it holds several), named `folder[i]`."""
    from .data.labelled import IMAGE_SUFFIXES, images_saved_to_disk, saved_by_datasets

    for path in paths:
        if Path(path).is_dir() and saved_by_datasets(path):
            yield from ((f"{path}[{i}]", image) for i, image in enumerate(images_saved_to_disk(path, split)))
        elif Path(path).is_dir():
            files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"The folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            yield from ((str(f), str(f)) for f in files)
        else:
            yield path, path


def _predict(args) -> int:
    """Classify every readable image; each unreadable one is reported (stderr, and in --json as an error entry)
    and makes the exit status 1."""
    _check_model(args.model)

    from .models.modeling_clip_ensemble import CLIPEnsembleModel
    from .models.processing_clip_ensemble import load_image

    images, errors, names = {}, {}, []
    for path, image in _images_to_classify(args.images, args.split):
        names.append(path)
        try:
            images[path] = load_image(image, name="image")
        except ValueError as error:
            errors[path] = str(error)
            print(f"error: {path}: {error}", file=sys.stderr)
    results: dict[str, list[dict] | dict] = {}
    if images:
        model = CLIPEnsembleModel.from_pretrained(args.model)
        classified = model.classify(list(images.values()), top_k=args.top_k, return_cost=True)
        results.update(zip(images, (c["top"] for c in classified)))
        costs = dict(zip(images, classified))
    results.update({path: {"error": message} for path, message in errors.items()})
    ordered = {path: results[path] for path in dict.fromkeys(names)}
    if args.json:
        print(json.dumps(ordered, indent=2))
    else:
        for path, top in ordered.items():
            if path in images:
                cost = ""
                if model.cascade is not None:  # how far down the cascade the image went
                    ran = len(costs[path]["backbones_run"])
                    cost = f" [{ran} of {len(model.backbones)} backbones, {costs[path]['gflops']:.3g} GFLOPs]"
                print(f"{path}: " + ", ".join(f"{p['label']} ({100 * p['score']:.1f}%)" for p in top) + cost)
    if errors:
        print(f"error: {len(errors)} of {len(ordered)} images could not be read.", file=sys.stderr)
        return 1
    return 0


def _demo(args) -> None:
    """Offline: train three tiny CLIPs on handwritten digits, each imperfect in its own way, calibrate a gate on a
    few shots per class, compare on held-out digits."""
    from huggingface_hub import constants

    from .calibration.calibrate import calibrate
    from .data.features import FeatureCache
    from .evaluation.evaluate import evaluate
    from .models.modeling_clip_ensemble import CLIPEnsembleModel
    from .tasks import DIGIT_CLASSES, digits_backbones, digits_backbones_ready, digits_dataset

    root = Path(args.workdir or Path(constants.HF_HOME) / "clip_ensemble" / "digits-backbones")
    pool, test = digits_dataset("pool"), digits_dataset("test")  # scikit-learn's digits; no download
    if digits_backbones_ready(root):
        print(f"Using the cached digit backbones in {root}")
    else:
        print(f"Training three tiny CLIP backbones on {len(pool)} handwritten digits in {root} (once, seconds)...")
    folders = digits_backbones(root)
    model = CLIPEnsembleModel.from_backbones(folders, labels=list(DIGIT_CLASSES))
    cache = FeatureCache(None)
    print(f"\nBefore calibration (the gate is the mean of logits), on {len(test)} held-out digits:")
    print(f"{evaluate(model, test, cache=cache).table()}\n")
    report = calibrate(model, pool, shots=args.shots, seed=0, cache=cache)
    after = evaluate(model, test, cache=cache, support=report)  # with the baselines fitted on the same shots
    print(f"{report}\n\nAfter calibration, on the {len(test)} held-out digits:\n{after.table()}")
    model.save_pretrained(args.output)
    print(f"\nSaved the calibrated gate to {args.output}; load it with CLIPEnsembleModel.from_pretrained.")


def _extract_features(args) -> None:
    backbones = _resolve_backbones(args.backbones)
    _check_dataset(args)

    from accelerate import PartialState

    from .data.extraction import extract_features

    report = extract_features(
        backbones,
        args.dataset,
        split=args.split,
        cache=_cache(args),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        **_placement(args),
        **_columns(args),
    )
    if PartialState().is_main_process:
        print(report)


def _configs(args) -> None:
    from .backbones.hub_configs import format_config_table

    print(format_config_table(args.name))
    if args.measure:
        from .backbones.hub_configs import load_hub_config
        from .models.cost import measure_gflops_from_config

        if args.name is None:
            raise ValueError("--measure needs a set name: `clip-ensemble configs NAME --measure`.")
        print("\nGFLOPs/image measured with torch's FLOP counter from each backbone's config (no weights read):")
        for entry in load_hub_config(args.name)["backbones"]:
            try:
                measured = f"{measure_gflops_from_config(entry['name_or_path'], entry['revision']):.2f}"
            except (OSError, ValueError) as error:
                measured = f"n/a ({str(error).splitlines()[0]})"
            listed = "n/a" if entry["image_gflops"] is None else f"{entry['image_gflops']:.2f}"
            print(f"  {entry['name_or_path']}: measured {measured}, listed {listed}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-ensemble",
        description="Adaptive ensembles of CLIP backbones: calibrate a gate on a few labelled images per class.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = commands.add_parser("calibrate", help="train a gate on k labelled images per class and save it")
    _add_backbones_argument(calibrate)
    _add_data_arguments(calibrate, default_split="train")
    calibrate.add_argument("--shots", type=int, default=4, help="labelled images per class (default: 4)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the k-shot draw and the gate (default: 0)")
    calibrate.add_argument("--templates", default="short", help="prompt template set (default: short)")
    calibrate.add_argument(
        "--combination",
        default="softplus",
        choices=["softplus", "softmax", "top1"],
        help="how the gate combines the backbones' logits: softplus (a learned inverse temperature per backbone, "
        "the paper's), softmax (a convex mixture) or top1 (the largest weight only, at inference) "
        "(default: softplus)",
    )
    calibrate.add_argument("--output", required=True, help="folder for config.json, gate.safetensors, README.md")
    calibrate.add_argument("--eval-split", help="also evaluate on this split of the dataset")
    calibrate.add_argument(
        "--budget-gflops",
        type=float,
        help="keep the subset of backbones with the best cross-validated top-1 within this many GFLOPs per image",
    )
    calibrate.add_argument(
        "--cascade-tolerance",
        type=float,
        metavar="FRACTION",
        help="also fit a cascade: backbones run cheapest first and an image stops once the rest are unlikely to "
        "change its answer, saving the most GFLOPs whose estimated top-1 stays within this fraction of the full "
        "ensemble's (e.g. 0.01, one point)",
    )
    calibrate.add_argument("--push-to-hub", metavar="REPO", help="push the gate to this Hub repo")
    _add_placement_arguments(calibrate, default_device="the CPU")
    calibrate.set_defaults(run=_calibrate)

    evaluate = commands.add_parser("evaluate", help="compare the gate with every backbone and the baselines")
    evaluate.add_argument("model", help="a saved ensemble: folder or Hub repo id")
    _add_data_arguments(evaluate, default_split="test")
    evaluate.add_argument(
        "--support-split",
        metavar="SPLIT",
        help="also fit the baselines (stacking, linear probe, Tip-Adapter) on the gate's own calibration images, "
        "redrawn from this split with the shots and seed recorded in the model",
    )
    evaluate.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    evaluate.add_argument(
        "--clip-benchmark-json",
        metavar="DIR",
        help="also write one CLIP_benchmark result file per method (each backbone, baseline, the gate) to DIR, "
        "for `clip_benchmark build`",
    )
    evaluate.add_argument(
        "--clip-benchmark-dataset",
        metavar="NAME",
        help="the dataset name in those files, e.g. CLIP_benchmark's 'wds/vtab/eurosat' (default: --dataset)",
    )
    evaluate.add_argument(
        "--report",
        metavar="DIR",
        help="also write a report folder: Markdown, JSON, per-class accuracy, confusion matrix, charts "
        "(needs the [report] extra)",
    )
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="classify images with a saved ensemble")
    predict.add_argument("model", help="a saved ensemble: folder or Hub repo id")
    predict.add_argument(
        "images",
        nargs="+",
        help="image files, folders of them, or folders written by datasets' save_to_disk; unreadable images are "
        "reported, the others classified",
    )
    predict.add_argument("--split", default="test", help="the split of a save_to_disk folder with several")
    predict.add_argument("--top-k", type=int, default=5, help="labels to show per image (default: 5)")
    predict.add_argument("--json", action="store_true", help="print JSON: image -> top labels, or {'error': ...}")
    predict.set_defaults(run=_predict)

    extract = commands.add_parser(
        "extract-features",
        help="embed a dataset with every backbone into the feature cache; run under `accelerate launch --multi_gpu "
        "--num_processes N` (or `torchrun --nproc_per_node N`) to split it over N processes, on CPU too",
    )
    _add_backbones_argument(extract)
    _add_data_arguments(extract, default_split="train")
    extract.add_argument("--chunk-size", type=int, default=1024, help="images embedded and saved at a time")
    _add_placement_arguments(extract, default_device="each process's own device")
    extract.set_defaults(run=_extract_features)

    configs = commands.add_parser("configs", help="list the curated backbone sets, or show one")
    configs.add_argument("name", nargs="?", help="a set name or a .json file")
    configs.add_argument(
        "--measure", action="store_true", help="also measure each backbone's GFLOPs/image from its config"
    )
    configs.set_defaults(run=_configs)

    demo = commands.add_parser("demo", help="offline demo on toy backbones trained in seconds")
    demo.add_argument("--shots", type=int, default=4, help="labelled images per class to calibrate on (default: 4)")
    demo.add_argument("--output", default="clip-ensemble-demo", help="where to save the calibrated gate")
    demo.add_argument("--workdir", help="where to keep the toy backbones")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
