"""Options shared by the benchmarks that measure threads against the GIL (cache_write.py, train_speed.py)."""

from __future__ import annotations

import argparse
import sys


def add_gil_options(parser: argparse.ArgumentParser) -> None:
    """``--checksum-gil`` and ``--switch-interval``."""
    parser.add_argument("--checksum-gil", choices=["held", "released"],
                        help="whether the chunk checksum (stores.chunk_files.chunk_checksum) holds the GIL or releases it; "
                             "default: gsae's rule, released where this process has more than 2 cores")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval in seconds (CPython's default 0.005): how long a thread that "
                             "wants the GIL back waits before it asks the holder to drop it")


def apply_gil_options(args: argparse.Namespace) -> None:
    """Set them up for this process, and say so in the output."""
    from stores import chunk_files

    if args.checksum_gil is not None:
        chunk_files.CHECKSUM_RELEASES_GIL = args.checksum_gil == "released"
    print(f"chunk checksums: the GIL {'released' if chunk_files.CHECKSUM_RELEASES_GIL else 'held'}"
          f"{'' if args.checksum_gil else ' (gsae default here)'}")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
        print(f"GIL switch interval {args.switch_interval * 1e3:g} ms")
