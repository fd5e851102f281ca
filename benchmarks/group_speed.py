"""`gsae group` time ÷ time to just read its sampled chunks, and peak memory as the sample grows.

    python benchmarks/group_speed.py --cache gsae-cache/smollm2-135m [--tokens N]
    python benchmarks/group_speed.py --gram-sweep     # the per-token Gram product's time against n
    python benchmarks/group_speed.py --cache C --device cuda --compare-cpu   # on a GPU machine


Both timings use the same chunks, the same Dask threaded scheduler and the same graph (one task per
chunk that reads every layer's chunk through the store, then a tree sum); "read" replaces the distance
computation of each chunk task by nothing. They alternate (read, group, read, group) and the best of each is kept. Peak RSS is measured
in fresh subprocesses computing D over a quarter of the tokens and over all of them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it (see cli.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dask  # noqa: E402
import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.grouping import _opened, distance_matrix, parse_layers, sample_chunks  # noqa: E402
from stores import ActivationStore  # noqa: E402


def _read_task(url: str, layers: list[int], chunk: int, n_tokens: int) -> np.ndarray:
    store, _ = _opened(url, False, n_tokens)
    start, stop = store.readable_rows(chunk)
    for layer in layers:
        store.read_rows(layer, start, stop)
    return np.zeros((len(layers), len(layers)))


def read_only(store: ActivationStore, layers: list[int], chunks: list[int]) -> None:
    """distance_matrix's graph with the distance computation left out."""
    task = dask.delayed(_read_task, pure=True)
    n = len(layers)
    parts = [da.from_delayed(task(store.path, layers, c, store.n_tokens), shape=(n, n), dtype=np.float64)
             for c in chunks]
    da.stack(parts).sum(axis=0).compute()


def peak_rss_mib(cache: str, tokens: int) -> float:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r});"
            "from pipeline.grouping import compute_distances, parse_layers; from stores import ActivationStore;"
            f"s = ActivationStore.open({cache!r}); compute_distances(s, parse_layers(None, s.n_layers), {tokens}, 0);"
            "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def gram_seconds(slots: int, width: int, rows: int = 256, repeats: int = 5) -> float:
    """Best time of one step's Gram products with ``slots`` layer slots, as the chunk task lays them out."""
    layers = torch.ones(slots, rows, width).transpose(0, 1)
    out = torch.empty(rows, slots, slots)
    torch.bmm(layers, layers.transpose(1, 2), out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.bmm(layers, layers.transpose(1, 2), out=out)
        best = min(best, time.perf_counter() - start)
    return best


def gram_sweep(widths: list[int]) -> None:
    """For each n: the product's time at n ÷ at n padded with zero layers to a multiple of 8 (> 1: padding
    would be faster on this CPU).  gsae group does not pad: it helped on one CPU and hurt on another."""
    torch.set_num_threads(1)
    print("one thread, 256 tokens a step; per n: time at n ÷ time padded to a multiple of 8 (> 1: padding is faster here)")
    for width in widths:
        cells = []
        for n in range(9, 49):
            eight = -(-n // 8) * 8
            if eight != n:
                cells.append(f"{n}→{eight}: {gram_seconds(n, width) / gram_seconds(eight, width):.2f}")
        print(f"d = {width}:  " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="gsae-cache/smollm2-135m")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one-torch-thread", action="store_true",
                        help="also time D with torch limited to one thread (Dask already runs a task per core; "
                             "each task's torch ops otherwise start a thread team of their own)")
    parser.add_argument("--no-rss", action="store_true", help="leave out the peak-RSS subprocesses")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where D's products run, as `gsae group --device` (auto: the GPU where there is one)")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="also time D on the CPU, and print the largest difference from it")
    parser.add_argument("--gram-sweep", action="store_true",
                        help="only time the per-token Gram product for 9-48 layers against its padding")
    parser.add_argument("--widths", default="512,576,768,1024", help="d_model values of --gram-sweep")
    args = parser.parse_args()
    if args.gram_sweep:
        gram_sweep([int(w) for w in args.widths.split(",")])
        return

    store = ActivationStore.open(args.cache)
    layers = parse_layers(None, store.n_layers)
    chunks = sample_chunks(store, min(args.tokens, store.n_tokens), seed=0)
    reads, groups, single, on_cpu = [], [], [], []
    threads = torch.get_num_threads()
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    with dask.config.set(scheduler="threads"):
        for _ in range(args.repeats):
            start = time.perf_counter()
            read_only(store, layers, chunks)
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            distance = distance_matrix(store, layers, chunks, device)
            groups.append(time.perf_counter() - start)
            if args.compare_cpu and device != "cpu":
                start = time.perf_counter()
                reference = distance_matrix(store, layers, chunks, "cpu")
                on_cpu.append(time.perf_counter() - start)
            if args.one_torch_thread and device == "cpu":
                torch.set_num_threads(1)
                try:
                    start = time.perf_counter()
                    distance_matrix(store, layers, chunks)
                    single.append(time.perf_counter() - start)
                finally:
                    torch.set_num_threads(threads)
    rows = sum(stop - start for start, stop in map(store.readable_rows, chunks))
    print(f"cache {args.cache}: {len(layers)} layers, {len(chunks)} chunks, {rows:,} tokens sampled")
    print(f"read only      {min(reads):7.2f} s   (runs: {', '.join(f'{r:.2f}' for r in reads)})")
    print(f"group (D)      {min(groups):7.2f} s   (runs: {', '.join(f'{g:.2f}' for g in groups)}; products on {device})")
    print(f"ratio group / read = {min(groups) / min(reads):.2f}   (target <= 1.5)")
    if on_cpu:
        print(f"group (D), products on the CPU {min(on_cpu):7.2f} s   (runs: {', '.join(f'{g:.2f}' for g in on_cpu)}); "
              f"{device} ÷ CPU = {min(groups) / min(on_cpu):.2f}; largest |D difference| {np.abs(distance - reference).max():.2e}")
    if single:
        print(f"group (D), 1 torch thread {min(single):7.2f} s   (runs: {', '.join(f'{g:.2f}' for g in single)}); "
              f"÷ {threads} torch threads = {min(single) / min(groups):.2f}")
    if args.no_rss:
        return

    quarter = max(1, rows // 4)
    small, large = peak_rss_mib(args.cache, quarter), peak_rss_mib(args.cache, rows)
    print(f"peak RSS computing D over {quarter:,} tokens: {small:,.0f} MiB; over {rows:,} tokens: {large:,.0f} MiB "
          f"(growth {100 * (large / small - 1):+.1f}% for 4x the data; target < 10%)")


if __name__ == "__main__":
    main()
