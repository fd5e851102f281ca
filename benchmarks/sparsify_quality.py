"""gsae's held-out FVU ÷ EleutherAI sparsify's (eai-sparsify 1.3.3) at equal steps on the same data, in one run:

    /work/scratch/sparsify/venv/bin/python benchmarks/sparsify_quality.py                     # layer 12
    /work/scratch/sparsify/venv/bin/python benchmarks/sparsify_quality.py --layers 3,12,24
    /work/scratch/sparsify/venv/bin/python benchmarks/sparsify_quality.py --layers 12,24 --k 32 --auxk off \
        --init-seeds 0,1,2,3,4,5,6,7                                     # FVUs averaged over 8 init draws

One SAE (batch 1024, 2 epochs of 95 steps) takes about 15 s on this project's 2-core CPU when it is idle and
2–3.5 min when it is busy; a configuration trains one per tool and init seed. docs/benchmarks.md has the
tables.

Run it with the venv of benchmarks/sparsify_speed.py (gsae's dependencies plus eai-sparsify 1.3.3; see
docs/benchmarks.md). The ratio's target is ≤ 1.0: per token trained, gsae at least as good as the reference.

For each layer, k and AuxK setting, both tools train a TopK SAE d_in → expansion·d_in, float32, batch 1024,
with the training steps of sparsify_speed.py: gsae runs `pipeline.train.train_step` as `gsae train` does
(b_dec at the data mean, Adam at 2e-4 / sqrt(M / 2^14), gradient clipping at 1); sparsify runs its
`Trainer.fit` step for the "fvu" loss with Adam at the same rate, no warm-up and no decay (its Trainer decays
the rate linearly to 0 over the run; gsae keeps it constant), b_dec at the first batch's mean. Each SAE starts
from its tool's own seeded init. The data: the layer's training rows of the cache (every chunk but the
held-out tail, `split_chunks(store, 0.05)` as `gsae train`), scaled by 1 / the layer's mean norm, shuffled once
per epoch by one seeded permutation shared by both tools: the same batches in the same order. A last partial
batch of each epoch is dropped.

AuxK off: no latent is ever dead (sparsify's default auxk_alpha 0). AuxK on: alpha 1/32 and the same dead-token
threshold for both, `gsae train`'s default max(batch, tokens / 10). The dead fraction printed for every run
uses that threshold, so the AuxK-off rows show how many latents AuxK had to revive.

Held-out FVU: Σ‖x − x̂‖² / Σ‖x − mean‖² over all held-out rows (mean of the held-out rows), sums in float64,
x̂ from each SAE's own forward pass without gradients.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Iterator

import torch
from sparsify_speed import NEVER_DEAD, gsae_step, matmul_precision, sparsify_step  # also puts gsae on sys.path

from pipeline.sae import default_lr
from stores import ActivationStore, to_float32
from stores.held_out import split_chunks

TARGET = 1.0
TOOLS = ("gsae", "sparsify")


def layer_rows(store: ActivationStore, layer: int, chunks: list[int]) -> torch.Tensor:
    """The rows of consecutive ``chunks`` of a layer as float32, scaled by 1 / the layer's mean norm."""
    start, stop = store.readable_rows(chunks[0])[0], store.readable_rows(chunks[-1])[1]
    return torch.from_numpy(to_float32(store.read_rows(layer, start, stop), store.dtype)) / float(store.norm[layer])


def batches(rows: torch.Tensor, orders: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Full batches of ``rows``, epoch after epoch, each epoch in its order."""
    for order in orders:
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[start:start + batch_size]]


@torch.no_grad()
def held_out_fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, batch_size: int) -> float:
    """Pooled FVU of ``reconstruct`` on ``rows``: Σ‖x − x̂‖² / Σ‖x − mean(rows)‖², summed in float64."""
    mean = rows.double().mean(0)
    error = variance = 0.0
    for x in rows.split(batch_size):
        error += float((x.double() - reconstruct(x).double()).pow(2).sum())
        variance += float((x.double() - mean).pow(2).sum())
    return error / variance


def run_tool(tool: str, train: torch.Tensor, held_out: torch.Tensor, orders: list[torch.Tensor], k: int,
             args: argparse.Namespace, dead_tokens: int, dead_report: int, init_seed: int) -> tuple[float, float, float]:
    """Train one SAE of ``tool`` on the shared batches: (held-out FVU, dead fraction, seconds)."""
    d_in, n_latents = train.shape[1], int(train.shape[1] * args.expansion)
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    if tool == "gsae":
        step, sae = gsae_step(d_in, n_latents, k, train.mean(0, dtype=torch.float64).float(), dead_tokens, since_fired,
                              init_seed)
        reconstruct = sae
    else:
        first = next(batches(train, orders, args.batch_size))
        step, sae = sparsify_step(d_in, n_latents, k, first.mean(0), dead_tokens, since_fired, init_seed)
        reconstruct = lambda x: sae(x).sae_out  # noqa: E731
    start = time.perf_counter()
    with matmul_precision(tool, train.device):  # the CPU: gsae at full float32, sparsify at "high", as each trains
        for x in batches(train, orders, args.batch_size):
            step(x)
        fvu = held_out_fvu(reconstruct, held_out, args.batch_size)
    return fvu, float((since_fired > dead_report).float().mean()), time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    try:
        import sparsify
    except ImportError:
        raise SystemExit("sparsify is not importable: run this with the venv that has eai-sparsify 1.3.3: "
                         "see docs/benchmarks.md") from None
    wall = time.perf_counter()
    store = ActivationStore.open(args.cache)
    train_chunks, eval_chunks = split_chunks(store, 0.05)
    n_train = store.readable_rows(train_chunks[-1])[1] - store.readable_rows(train_chunks[0])[0]
    steps_per_epoch = n_train // args.batch_size
    steps = steps_per_epoch * args.epochs
    dead_on = args.dead_tokens or max(args.batch_size, steps * args.batch_size // 10)
    generator = torch.Generator().manual_seed(args.seed)
    orders = [torch.randperm(n_train, generator=generator) for _ in range(args.epochs)]
    n_latents = int(store.d_model * args.expansion)
    print(f"data: {args.cache}, {n_train:,} training rows per layer, {store.n_tokens - n_train:,} held-out rows "
          f"(the tail), scaled by 1/mean norm; {args.epochs} epochs × {steps_per_epoch} steps of {args.batch_size} "
          f"= {steps} steps, order seed {args.seed}")
    print(f"SAE {store.d_model}→{n_latents}, float32, Adam lr {default_lr(n_latents):.3g}; AuxK on: alpha 1/32, "
          f"dead after {dead_on:,} tokens (also the dead % threshold of every run); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sparsify {sparsify.__version__}", flush=True)
    results = []
    for layer in args.layers:
        train, held_out = layer_rows(store, layer, train_chunks), layer_rows(store, layer, eval_chunks)
        for auxk in args.auxk:
            for k in args.k:
                runs = {tool: [run_tool(tool, train, held_out, orders, k, args,
                                        dead_on if auxk == "on" else NEVER_DEAD, dead_on, seed)
                               for seed in args.init_seeds] for tool in TOOLS}
                if len(args.init_seeds) > 1:
                    for tool in TOOLS:
                        print(f"  {tool:8s} held-out FVU per init seed {args.init_seeds}: "
                              + ", ".join(f"{r[0]:.4f}" for r in runs[tool]), flush=True)
                out = {tool: tuple(sum(r[i] for r in runs[tool]) / len(runs[tool]) for i in range(3)) for tool in TOOLS}
                (fvu, dead, seconds), (ref_fvu, ref_dead, ref_seconds) = out["gsae"], out["sparsify"]
                results.append((layer, k, auxk, fvu, ref_fvu, fvu / ref_fvu, dead, ref_dead))
                print(f"layer {layer:2}  k {k:3}  AuxK {auxk:3}  held-out FVU gsae {fvu:.4f}  sparsify {ref_fvu:.4f}  "
                      f"ratio {fvu / ref_fvu:.3f} (target ≤ {TARGET})  dead {100 * dead:.1f}% / {100 * ref_dead:.1f}%  "
                      f"({seconds:.0f} s / {ref_seconds:.0f} s)", flush=True)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s\n")
    print("| layer | k | AuxK | gsae FVU | sparsify FVU | ratio (target ≤ 1.0) | dead % gsae / sparsify |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for layer, k, auxk, fvu, ref_fvu, ratio, dead, ref_dead in results:
        print(f"| {layer} | {k} | {auxk} | {fvu:.4f} | {ref_fvu:.4f} | {ratio:.3f} | "
              f"{100 * dead:.1f} / {100 * ref_dead:.1f} |")


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def auxk_list(text: str) -> list[str]:
    if not set(text.split(",")) <= {"off", "on"}:
        raise argparse.ArgumentTypeError("off, on or off,on")
    return text.split(",")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="gsae-cache/smollm2-135m", help="a gsae activation cache")
    parser.add_argument("--layers", type=int_list, default=[12], help="comma-separated layers (3,12,24: ≈ 65 min)")
    parser.add_argument("--k", type=int_list, default=[32, 128], help="comma-separated k values")
    parser.add_argument("--auxk", type=auxk_list, default=["off", "on"], help="off, on or off,on")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=float, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order (both tools)")
    parser.add_argument("--init-seeds", type=int_list, default=[0],
                        help="comma-separated SAE init seeds; FVUs are averaged over them (each tool's own init)")
    parser.add_argument("--dead-tokens", type=int, help="AuxK on: dead-token threshold (default max(batch, tokens/10))")
    main(parser.parse_args())
