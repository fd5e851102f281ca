"""`gsae verify`'s chunk checks ÷ zarr decoding the same chunks one at a time (what it did before), in one run:

    python benchmarks/verify_speed.py --cache gsae-cache/smollm2-135m [--repeats 2]

Every chunk of every layer and of the tokens, as `gsae verify` reads them (the statistics' check left out):
zarr's ``array[rows]`` chunk by chunk on one thread, then gsae's checks (``ActivationStore._iter_array_checks``:
each chunk decoded on its thread's own event loop, a whole local chunk straight from its file) with one thread
and with one per usable core.  Each is run once to warm the page cache, then timed, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stores.activation_store as activation_store  # noqa: E402
from stores import ActivationStore  # noqa: E402


def _arrays(store: ActivationStore) -> list:
    return [*((f"layers/{layer}", layer, array) for layer, array in enumerate(store._layers)),
            ("tokens", -1, store._tokens)]


def _zarr_one_by_one(store: ActivationStore) -> int:
    n = 0
    for chunk in range(store.n_chunks):
        start, stop = store.readable_rows(chunk)
        for _, _, array in _arrays(store):
            array[start:stop]
            n += 1
    return n


def _gsae(store: ActivationStore, threads: int) -> int:
    cores = activation_store.usable_cores
    activation_store.usable_cores = lambda: threads
    try:
        return sum(1 for _ in store._iter_array_checks(_arrays(store)))
    finally:
        activation_store.usable_cores = cores


def _best(run, repeats: int) -> tuple[float, int]:
    n = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    store = ActivationStore.open(args.cache)
    cores = activation_store.usable_cores()
    zarr_s, n = _best(lambda: _zarr_one_by_one(store), args.repeats)
    one_s, _ = _best(lambda: _gsae(store, 1), args.repeats)
    all_s, _ = _best(lambda: _gsae(store, cores), args.repeats)
    print(f"{n:,} chunks of {args.cache}")
    print(f"zarr, one chunk at a time      {zarr_s:6.2f} s")
    print(f"gsae verify's checks, 1 thread {one_s:6.2f} s")
    print(f"gsae verify's checks, {cores} threads {all_s:6.2f} s")
    print(f"ratio zarr one by one / gsae verify ({cores} threads) = {zarr_s / all_s:.2f}")


if __name__ == "__main__":
    main()
