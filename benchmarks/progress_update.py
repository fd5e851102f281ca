"""What `gsae train`'s bars cost per step: one rich ``Progress.update`` per SAE and step (the counts move every
step; the figures come at log steps), against the step it rides on.

    python benchmarks/progress_update.py                 # 20,000 steps of 5 SAEs, into a file and a terminal
    python benchmarks/progress_update.py --steps 50000 --saes 29 --step-ms 3

Prints µs per update for a console that is a file (a batch job's log: plain lines every 15 s) and one that
is a terminal (the bar drawn), and their share of a step of ``--step-ms`` milliseconds (3 ms: the 512 → 8192,
k 32, batch 8192 step on the H200).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn  # noqa: E402

from pipeline.progress import LoggedProgress, RateColumn, RemainingColumn  # noqa: E402


def per_update(terminal: bool, steps: int, saes: int, batch: int) -> float:
    """Seconds per update, the columns of `gsae train`'s bars."""
    console = Console(file=io.StringIO(), force_terminal=terminal)
    progress = LoggedProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn("tok"),
                              TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                              RemainingColumn(), console=console)
    with progress:
        tasks = [progress.add_task(f"SAE {i}", total=steps * batch, stats="") for i in range(saes)]
        start = time.perf_counter()
        for step in range(steps):
            for task in tasks:
                progress.update(task, completed=(step + 1) * batch)
        return (time.perf_counter() - start) / (steps * saes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--saes", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--step-ms", type=float, default=3.0)
    args = parser.parse_args()
    for terminal in (False, True):
        seconds = per_update(terminal, args.steps, args.saes, args.batch_size)
        print(f"{'terminal' if terminal else 'file':8s}: {seconds * 1e6:.2f} µs per update; "
              f"ratio update / step ({args.step_ms:g} ms) = {seconds * 1e3 / args.step_ms:.5f}")


if __name__ == "__main__":
    main()
