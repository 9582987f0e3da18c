"""A benchmark's result: its table printed, and saved as Markdown with the command and the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """The machine and how busy it was: timings on a shared machine move with its load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, load average {load} (1, 5, 15 min) at the end"
    )


def save_result(output: str | Path | None, title: str, command: str, setup: str, table: str) -> None:
    """Print `setup` and `table`; write them under `title` with `command` to `output`, unless it is None (the
    benchmarks pass it only with `--save`, so that a run does not rewrite the results kept in the repo)."""
    text = f"{setup}\n{machine()}\n\n{table}"
    print(text)
    if output is None:
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(f"# {title}\n\n`{command}`\n\n{text}\n")
    print(f"Saved to {output}")


__all__ = ["machine", "save_result"]
