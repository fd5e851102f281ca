"""Where Python threads held the GIL: a summary of ``py-spy record --gil --format raw`` output.

    py-spy record --gil --rate 250 --format raw -o gil.raw -- python benchmarks/cache_write.py --writer-only ...
    python benchmarks/gil_summary.py gil.raw [--rate 250] [--seconds S]

py-spy's ``--gil`` keeps only the samples of the thread holding the GIL, so samples ÷ (rate × seconds)
is the share of the time the GIL was held at all, and the frames say by what.  Prints that share (when
``--seconds`` is given), the split between thread-pool threads and the others, and the frames that held
it most: the innermost frame, the innermost frame of this repository's code (stores/, pipeline/), and the
innermost frame of the thread-pool threads alone (the jobs, without the imports and the main loop).
"""

from __future__ import annotations

import argparse
import collections
import re

_OURS = re.compile(r"\((?:stores|pipeline|benchmarks)/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="py-spy's raw (collapsed stacks) output")
    parser.add_argument("--rate", type=float, default=250.0, help="py-spy's --rate")
    parser.add_argument("--seconds", type=float, default=None, help="wall seconds of the profiled run")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    leaf, ours, roles, pool = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(args.raw) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            in_pool = any("concurrent/futures/thread.py" in f for f in frames)
            roles["thread pool" if in_pool else "other threads (imports, the main loop)"] += n
            if in_pool:
                pool[frames[-1].strip()] += n
            leaf[frames[-1].strip()] += n
            mine = [f for f in frames if _OURS.search(f)]
            ours[mine[-1].strip() if mine else "(outside this repository)"] += n
    if not total:
        print("no samples")
        return
    held = (f"; the GIL was held {100 * total / (args.rate * args.seconds):.0f}% of the time (the whole process, "
            "imports included)") if args.seconds else ""
    print(f"{total:,} samples with the GIL held ({total / args.rate:.2f} s at {args.rate:g} Hz){held}")
    print("by thread: " + ", ".join(f"{role} {100 * n / total:.0f}%" for role, n in roles.most_common()))
    for title, counter in (("innermost frames", leaf), ("innermost frames of this repository", ours),
                           ("innermost frames in the thread pool (the writer's or decoder's jobs)", pool)):
        print(f"{title}:")
        for frame, n in counter.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
