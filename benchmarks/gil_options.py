"""Options shared by the benchmarks that measure threads against the GIL (cache_write.py, train_speed.py)."""

from __future__ import annotations

import argparse
import sys


def add_gil_options(parser: argparse.ArgumentParser) -> None:
    """``--gil-free-crc`` and ``--switch-interval``."""
    parser.add_argument("--gil-free-crc", action="store_true",
                        help="checksum with the crc32c package (GIL released; same values) instead of google_crc32c, "
                             "which holds the GIL: replaces google_crc32c.value in this process")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval in seconds (CPython's default 0.005): how long a thread that "
                             "wants the GIL back waits before it asks the holder to drop it")


def apply_gil_options(args: argparse.Namespace) -> None:
    """Set them up for this process, and say so in the output."""
    if args.gil_free_crc:  # zarr and gsae's direct paths both call google_crc32c.value at run time
        import crc32c
        import google_crc32c

        google_crc32c.value = crc32c.crc32c
        print("checksums: crc32c (GIL released)")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
        print(f"GIL switch interval {args.switch_interval * 1e3:g} ms")
