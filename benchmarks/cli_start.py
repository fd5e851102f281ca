"""How long `gsae --help` (and a command's --help) takes ÷ how long importing torch takes, in one run:

    python benchmarks/cli_start.py [--repeats 5] [--cache gsae-cache/smollm2-135m]

Each is a fresh process (`python -c ...`, as the `gsae` program starts), best of ``--repeats``; a bare
`python -c pass` is printed beside them for the interpreter's own start.  Before the options' defaults came from
the torch-free ``pipeline.requests``, `gsae --help` imported torch and took longer than torch's import alone.
With ``--cache``, `gsae info` on it too (it reads the store and imports no torch).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GSAE = "import sys; sys.argv[0] = 'gsae'; import cli; cli.entry()"


def _best(code: str, args: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", help="also time `gsae info --cache CACHE`")
    args = parser.parse_args()
    python = _best("pass", [], args.repeats)
    torch_import = _best("import torch", [], args.repeats)
    help_top = _best(_GSAE, ["--help"], args.repeats)
    help_train = _best(_GSAE, ["train", "--help"], args.repeats)
    print(f"python -c pass        {python:6.2f} s")
    print(f"import torch          {torch_import:6.2f} s")
    print(f"gsae --help           {help_top:6.2f} s")
    print(f"gsae train --help     {help_train:6.2f} s")
    if args.cache:
        info = _best(_GSAE, ["info", "--cache", os.path.abspath(args.cache)], args.repeats)
        print(f"gsae info             {info:6.2f} s")
        print(f"ratio gsae info / import torch = {info / torch_import:.3f}")
    print(f"ratio gsae --help / import torch = {help_top / torch_import:.3f}   (below 1: --help loads no torch)")


if __name__ == "__main__":
    main()
