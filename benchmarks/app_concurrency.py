"""Classify while other visitors calibrate: the app (`python app.py`, the toy backbones, on 127.0.0.1) driven by
`gradio_client` clients, as a visitor's browser drives it.

One client classifies an image `--classifies` times, first on an idle server, then while `--calibrators` other
clients calibrate on the toy uploads in a loop. Prints the Classify latency (median, 90th percentile and worst, in
seconds) in both cases, the calibrations done meanwhile, and how long one calibration takes end to end alone. Calibrations fit on a model of their own, under their own
lock, so a Classify never waits for one; it shares the CPU with them.

    python benchmarks/app_concurrency.py --save
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file
from tables import save_result

from clip_ensemble.app.uploads import MAX_UPLOAD_LABELS
from clip_ensemble.tasks import TOY_CLASSES, toy_backbones, toy_dataset

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
LABELS = ", ".join(TOY_CLASSES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(backbones: list[str], folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = (folder / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "app.py", "--backbones", *backbones, "--port", str(port)], cwd=REPO, stdout=log, stderr=log
    )
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {folder / 'app.log'}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer within 300 s; see {folder / 'app.log'}")


def _uploads(folder: Path, per_class: int) -> list[list]:
    """Toy images saved per label: the calibration upload boxes' values, the spare boxes empty."""
    data, boxes = toy_dataset(per_class=per_class, seed=5), {name: [] for name in TOY_CLASSES}
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        path = folder / f"{TOY_CLASSES[label]}-{i}.png"
        image.save(path)
        boxes[TOY_CLASSES[label]].append(handle_file(str(path)))
    return [boxes[name] for name in TOY_CLASSES] + [[]] * (MAX_UPLOAD_LABELS - len(TOY_CLASSES))


def _classify_times(url: str, image, count: int) -> list[float]:
    client, times = Client(url, verbose=False), []
    for _ in range(count):
        started = time.perf_counter()
        client.predict(LABELS, image, 3, api_name="/classify")
        times.append(time.perf_counter() - started)
    return times


def _summary(times: list[float]) -> str:
    return f"{np.median(times):.2f} | {np.percentile(times, 90):.2f} | {max(times):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrators", type=int, default=4, help="clients calibrating in a loop (default: 4)")
    parser.add_argument("--classifies", type=int, default=20, help="Classify calls per case (default: 20)")
    parser.add_argument("--shots", type=int, default=2, help="uploaded images per label per calibration (default: 2)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/app_concurrency.md")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="clip-ensemble-app-"))
    process, url = _start_app(toy_backbones(folder / "backbones"), folder)
    try:
        uploads = _uploads(folder, args.shots)
        image = uploads[3][0]
        _classify_times(url, image, 2)  # warm-up: heads and GFLOPs measured once
        idle = _classify_times(url, image, args.classifies)
        client, alone = Client(url, verbose=False), []
        for _ in range(3):  # one calibration at a time, end to end as a visitor waits for it
            started = time.perf_counter()
            client.predict(LABELS, *uploads, api_name="/calibrate_uploads")
            alone.append(time.perf_counter() - started)

        stop, calibrations, errors = threading.Event(), [], []

        def calibrate_in_a_loop() -> None:
            client = Client(url, verbose=False)
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    client.predict(LABELS, *uploads, api_name="/calibrate_uploads")
                    calibrations.append(time.perf_counter() - started)
                except Exception as error:  # a failure is reported, not hidden in the latency
                    errors.append(repr(error))

        workers = [threading.Thread(target=calibrate_in_a_loop) for _ in range(args.calibrators)]
        for worker in workers:
            worker.start()
        time.sleep(2)  # the calibrations under way
        busy = _classify_times(url, image, args.classifies)
        stop.set()
        for worker in workers:
            worker.join()
    finally:
        process.terminate()
        process.wait(timeout=30)

    table = "\n".join(
        [
            "| server | Classify s: median | 90th percentile | worst | calibrations done meanwhile (median s each) |",
            "|---|---:|---:|---:|---:|",
            f"| idle | {_summary(idle)} | - (one calibration alone: {np.median(alone):.1f} s, median of 3) |",
            f"| {args.calibrators} clients calibrating in a loop | {_summary(busy)} | {len(calibrations)} "
            f"({np.median(calibrations) if calibrations else float('nan'):.1f}) |",
        ]
    )
    setup = (
        f"The toy backbones; {args.classifies} Classify calls per case by one client; each calibration on "
        f"{args.shots} uploaded images x {len(TOY_CLASSES)} labels; failed calibrations: {len(errors)}"
        + (f" (first: {errors[0]})" if errors else "")
        + "."
    )
    save_result(
        RESULTS / "app_concurrency.md" if args.save else None,
        "Classify while other visitors calibrate",
        "python benchmarks/app_concurrency.py --save",
        setup,
        table,
    )


if __name__ == "__main__":
    main()
