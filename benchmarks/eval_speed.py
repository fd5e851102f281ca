"""`gsae eval`'s time with the spliced and zero-ablated passes run from the replaced block on (the default,
pipeline.block_replay) ÷ with every pass through the whole model, on a trained run, in one process; and the
largest difference between the two evaluations' metrics (the same logits: 0 expected).

    python benchmarks/eval_speed.py --run runs/smollm2-135m-g7              # 4 windows, 100 rows per layer
    python benchmarks/eval_speed.py --run runs/x --windows 8 --repeats 2

The run is copied to a temporary folder (its eval.json is left alone). Reconstruction rows are few by default
(``--tokens 100``) so that the forward passes dominate, as they do at the defaults (16,384 rows, 32 windows).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it (see cli.py)
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a raw bar per load

import pipeline.block_replay as block_replay  # noqa: E402
from pipeline.evaluate import evaluate_run  # noqa: E402

_METRICS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_ce_percent", "ce_recovered", "kl_divergence",
            "explained_variance", "l0")


def timed_eval(run: str, replay: bool, args: argparse.Namespace) -> tuple[float, list[dict]]:
    kept = block_replay.KEPT_BYTES
    block_replay.KEPT_BYTES = kept if replay else 0
    try:
        start = time.perf_counter()
        records = evaluate_run(run, tokens=args.tokens, windows=args.windows, context_length=args.context_length,
                               device=args.device)
        return time.perf_counter() - start, records
    finally:
        block_replay.KEPT_BYTES = kept


def largest_difference(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for key in _METRICS:
            if key not in x or (math.isnan(x[key]) and math.isnan(y[key])):
                continue
            if math.isnan(x[key]) or math.isnan(y[key]):
                return math.inf
            worst = max(worst, abs(x[key] - y[key]) / max(1e-12, abs(x[key])))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run (gsae train's --out)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = os.path.join(folder, "run")
        shutil.copytree(args.run, run)
        timeline = []
        for repeat in range(args.repeats):
            for replay in (False, True) if repeat % 2 == 0 else (True, False):
                seconds, records = timed_eval(run, replay, args)
                timeline.append((replay, seconds, records))
                print(f"{'from the replaced block' if replay else 'whole model':24s}: {seconds:8.2f} s")
    whole = min(s for r, s, _ in timeline if not r)
    replayed = min(s for r, s, _ in timeline if r)
    difference = largest_difference(timeline[0][2], timeline[1][2])
    layers = len(timeline[0][2])
    print(f"{layers} layers, {args.windows} windows, {args.tokens} rows per layer; best of {args.repeats}")
    print(f"ratio eval time from the replaced block ÷ whole model = {replayed / whole:.3f}")
    print(f"largest relative difference between the two evaluations' metrics = {difference:.2e}")


if __name__ == "__main__":
    main()
