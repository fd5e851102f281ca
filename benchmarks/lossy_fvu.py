"""How much the lossy cache changes a trained SAE: held-out FVU after training on lossless vs lossy rows.

    python benchmarks/lossy_fvu.py --cache gsae-cache/smollm2-135m --layer 12 --tokens 300000

The lossy codec (`--compression lossy`) is a BitRound filter on the stored float16 values before the
lossless chain, so a lossy cache holds exactly BitRound(lossless values). This script applies the store's
own filter (`stores.codecs.activation_codecs("lossy", ...)`, numcodecs' BitRound) to one layer's training
rows of a lossless cache, trains the same TopK SAE (same seed, same batches, `gsae train`'s step and
init) on both versions, and measures FVU on the held-out rows as stored losslessly — the model's real
activations. A second lossless run with another seed gives the seed-to-seed noise for scale.
Target (DESIGN §5): |FVU(lossy) − FVU(lossless)| ≤ 0.005.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numcodecs import get_codec  # noqa: E402

from pipeline.evaluate import layer_reconstruction  # noqa: E402
from pipeline.sae import SparseAutoencoder, default_k, default_lr  # noqa: E402
from pipeline.train import make_optimizer, train_step  # noqa: E402
from stores import ActivationStore  # noqa: E402
from stores.codecs import activation_codecs  # noqa: E402
from stores.held_out import split_chunks  # noqa: E402


def train_on(rows: np.ndarray, scale: float, args: argparse.Namespace, seed: int) -> SparseAutoencoder:
    """`gsae train`'s init and step on ``rows`` (float16), in seeded random batches, for ``args.tokens``."""
    x_all = torch.from_numpy(rows.astype(np.float32)) * scale
    n_latents = int(rows.shape[1] * args.expansion)
    sae = SparseAutoencoder(rows.shape[1], n_latents, "topk", k=args.k, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(x_all.mean(0))
    optimizer = make_optimizer(sae, default_lr(n_latents))
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(args.tokens // args.batch_size):
        if len(order) < args.batch_size:
            order = torch.cat([order, torch.randperm(len(x_all), generator=generator)])
        batch, order = order[: args.batch_size], order[args.batch_size :]
        train_step(sae, optimizer, x_all[batch], since_fired, dead_tokens=min(10_000_000, args.tokens // 10))
    return sae


def main(args: argparse.Namespace) -> None:
    store = ActivationStore.open(args.cache)
    if store.dtype != "float16" or store.attrs["codec"]["compression"] != "lossless":
        sys.exit("this needs a lossless float16 cache (the lossy version is made from it)")
    train_chunks, held_out = split_chunks(store, 0.05)
    stop = store.chunk_rows(train_chunks[-1])[1]
    held_start, held_stop = store.chunk_rows(held_out[0])[0], store.n_tokens
    lossless = store.read_rows(args.layer, 0, stop)
    (store_filter,) = activation_codecs("lossy", "float16", args.keep_bits).filters
    bitround = get_codec(store_filter.codec_config)  # the numcodecs codec behind the store's zarr filter
    lossy = bitround.decode(bitround.encode(lossless)).reshape(lossless.shape)
    exact = lossless.astype(np.float64)
    rounding = float(((lossy - exact) ** 2).sum() / ((exact - exact.mean(0)) ** 2).sum())
    scale = float(1 / store.norm[args.layer])
    args.k = args.k or default_k(lossless.shape[1])
    print(f"layer {args.layer}: {stop:,} training rows, held-out rows {held_start:,}–{held_stop - 1:,}; "
          f"bitround({args.keep_bits}) error energy = {rounding:.5f} of the variance")
    print(f"SAE {lossless.shape[1]}→{int(lossless.shape[1] * args.expansion)}, k {args.k}, batch {args.batch_size}, "
          f"{args.tokens:,} tokens")
    results = {}
    for name, rows, seed in (("lossless", lossless, 0), ("lossy", lossy, 0), ("lossless, seed 1", lossless, 1)):
        start = time.perf_counter()
        sae = train_on(rows, scale, args, seed)
        with torch.no_grad():
            metrics = layer_reconstruction(sae, store, args.layer, scale, held_start, held_stop, torch.device("cpu"))
        results[name] = metrics["fvu"]
        print(f"  trained on {name:<17} held-out FVU {metrics['fvu']:.5f}   ({time.perf_counter() - start:.0f} s)")
    change = results["lossy"] - results["lossless"]
    noise = results["lossless, seed 1"] - results["lossless"]
    print(f"FVU change lossy − lossless (same seed and batches): {change:+.5f} (target |Δ| ≤ 0.005); "
          f"seed-to-seed difference: {noise:+.5f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--expansion", type=float, default=8)
    parser.add_argument("--k", type=int, default=None, help="default: gsae's (≈ d_model / 6)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--keep-bits", type=int, default=3)
    main(parser.parse_args())
