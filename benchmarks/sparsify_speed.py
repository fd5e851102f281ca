"""gsae's SAE training step ÷ EleutherAI sparsify's (eai-sparsify 1.3.3), in tokens/s, measured in one run:

    /work/scratch/sparsify/venv/bin/python benchmarks/sparsify_speed.py                    # Gaussian data
    /work/scratch/sparsify/venv/bin/python benchmarks/sparsify_speed.py --cache C --layer L  # a cached layer
    python benchmarks/sparsify_speed.py --device cuda --d-in 768 --k 32 128 --batch-size 8192  # on a GPU

Run it with a venv that sees gsae's dependencies and has eai-sparsify 1.3.3 (docs/benchmarks.md):

    python -m venv --system-site-packages /work/scratch/sparsify/venv
    /work/scratch/sparsify/venv/bin/pip install --no-deps eai-sparsify==1.3.3 einops natsort \
        simple-parsing docstring-parser schedulefree

Both train a TopK SAE d_in → expansion·d_in on the same in-memory batches, float32, Adam at
2e-4 / sqrt(M / 2^14) (both tools' default). gsae runs `pipeline.train.train_step`, as `gsae train`
does. sparsify runs what its `Trainer.fit` does per step for the "fvu" loss (its activation hook and
the update after it), with `optimizer="adam"` (its default is SignSGD) and `lr_warmup_steps=0`; on a
CPU it picks torch.optim.Adam (no bitsandbytes) and the eager embedding_bag decoder (no Triton).
Neither side's data feed (store stream, LM forward and hook copies) is timed. The tools alternate
(gsae, sparsify, gsae, …), each run a fresh SAE with warm-up steps, and the best run of each is kept.

With ``--device cuda`` both train on the GPU with TF32 float32 matmuls (sparsify's fit() sets
"high"; `gsae train` turns TF32 on by default on CUDA), sparsify with its Triton decoder and its
SparseCoder's own bfloat16 autocast, gsae as `gsae train` runs there: no host sync per step (the
non-finite check and the metrics are read back at the end), float32 or ``--precision bfloat16``.
The device is synchronised before and after each timed run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import types
from typing import Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import pipeline.sae as sae_module  # noqa: E402
from pipeline.sae import AUXK_ALPHA, SparseAutoencoder, default_lr  # noqa: E402
from pipeline.train import make_optimizer, train_step  # noqa: E402

Step = Callable[[torch.Tensor], float]  # one training step on a batch → the batch's FVU
NEVER_DEAD, ALL_DEAD = 10_000_000, -1  # dead-token thresholds: AuxK off, AuxK on every latent
DEAD_AFTER = 10**9  # --dead-fraction: the threshold, with the chosen latents' counters started past it
TARGETS = {32: 1.3, 64: 1.2, 128: 1.5}  # 64: the GPU target at 2048 → 32768


def load_batches(args: argparse.Namespace) -> tuple[list[torch.Tensor], str]:
    """warm-up + timed batches of (batch_size, d_in) float32 rows on ``args.device``, and a line describing them."""
    n_rows = args.batch_size * (args.warmup + args.steps)
    if args.cache:
        from stores import ActivationStore, to_float32

        store = ActivationStore.open(args.cache)
        layer = store.n_layers // 2 if args.layer is None else args.layer
        n_rows = min(n_rows, store.n_tokens - store.n_tokens % args.batch_size)
        rows = torch.from_numpy(to_float32(store.read_rows(layer, 0, n_rows), store.dtype)) / float(store.norm[layer])
        what = f"{args.cache} layer {layer}, first {n_rows:,} rows scaled by 1/mean norm (as gsae train)"
    else:
        generator = torch.Generator().manual_seed(0)
        rows = torch.randn(args.d_in, generator=generator) + torch.randn(n_rows, args.d_in, generator=generator)
        rows /= rows.norm(dim=1).mean()
        what = "random Gaussian: per-dimension mean ~ N(0, 1), noise N(0, 1), scaled to mean row norm 1"
    return [batch.to(args.device) for batch in rows.split(args.batch_size)], what


def gsae_step(d_in: int, n_latents: int, k: int, mean: torch.Tensor, dead_tokens: int,
              since_fired: torch.Tensor | None = None, init_seed: int = 0,
              bf16: bool = False, compile_mode: str | None = None,
              n_dead: int | None = None) -> tuple[Step, SparseAutoencoder]:
    """`gsae train`'s step: b_dec at the data mean, Adam, dead counters (AuxK when latents are dead).
    ``since_fired`` (n_latents, long zeros), when given, is the step's tokens-since-fired counter.
    ``compile_mode``: the SAE's forward and loss under torch.compile(mode=compile_mode) (an experiment:
    `gsae train` runs eagerly).
    On CUDA the step returns its FVU as a device tensor and never waits for the device, as in `gsae train`,
    with ``n_dead`` as the host's dead count (default: none with NEVER_DEAD, else every latent)."""
    device = mean.device
    sae = SparseAutoencoder(d_in, n_latents, "topk", k=k, seed=init_seed).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    if compile_mode:
        sae.loss = torch.compile(sae.loss, mode=compile_mode)
    optimizer = make_optimizer(sae, default_lr(n_latents))
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device) if since_fired is None else since_fired
    if device.type == "cpu":
        return lambda x: float(train_step(sae, optimizer, x, since_fired, dead_tokens).fvu), sae
    if n_dead is None:  # the host count `gsae train` reads every few steps
        n_dead = 0 if dead_tokens == NEVER_DEAD else n_latents
    return (lambda x: train_step(sae, optimizer, x, since_fired, dead_tokens, n_dead_hint=n_dead,
                                 check_finite=False, bf16=bf16).fvu), sae


def sparsify_step(d_in: int, n_latents: int, k: int, first_mean: torch.Tensor, dead_tokens: int,
                  since_fired: torch.Tensor | None = None, init_seed: int = 0) -> tuple[Step, torch.nn.Module]:
    """sparsify Trainer.fit's step for one SAE (loss_fn "fvu", grad_acc_steps = micro_acc_steps = 1,
    no multi-TopK); b_dec starts at the first batch's mean, as the Trainer sets it on its first step.
    AuxK (auxk_alpha 1/32, dead_feature_threshold = dead_tokens) is on unless dead_tokens is NEVER_DEAD.
    ``since_fired``, when given, is the Trainer's num_tokens_since_fired counter."""
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(init_seed)
    device = first_mean.device
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k), device, dtype=torch.float32)
    sae.b_dec.data = first_mean.clone()
    optimizer = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10**6)  # lr_warmup_steps=0, a long run
    auxk_alpha = AUXK_ALPHA if dead_tokens != NEVER_DEAD else 0.0  # sparsify's default auxk_alpha is 0
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device) if since_fired is None else since_fired
    did_fire = torch.zeros(n_latents, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> float:
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_tokens if auxk_alpha > 0 else None
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        fvu = out.fvu.detach() if device.type == "cuda" else float(out.fvu.detach())
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu

    return step, sae


@contextlib.contextmanager
def matmul_precision(tool: str, device: torch.device) -> Iterator[None]:
    """The float32 matmul precision each tool trains at: sparsify's fit() sets "high"; gsae train sets TF32
    ("high") on CUDA and leaves the CPU's default."""
    previous = torch.get_float32_matmul_precision()
    gsae = tool in ("gsae", OTHER)
    torch.set_float32_matmul_precision("highest" if gsae and device.type == "cpu" else "high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, batches: list[torch.Tensor], warmup: int, tool: str) -> tuple[float, float]:
    """Seconds per step over the batches after the first ``warmup``, and the last step's FVU."""
    device = batches[0].device
    with matmul_precision(tool, device):
        for x in batches[:warmup]:
            step(x)
        _sync(device)
        start = time.perf_counter()
        for x in batches[warmup:]:
            fvu = step(x)
        _sync(device)
        return (time.perf_counter() - start) / (len(batches) - warmup), float(fvu)


def same_weights_check(x: torch.Tensor, n_latents: int, k: int) -> str:
    """Load one gsae SAE's weights into sparsify's SparseCoder; compare their TopK codes and FVU on x
    (on x's device: sparsify's Triton decoder runs only on CUDA tensors)."""
    _, sae = gsae_step(x.shape[1], n_latents, k, x.mean(0), NEVER_DEAD)
    _, coder = sparsify_step(x.shape[1], n_latents, k, x.mean(0), NEVER_DEAD)
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc.T)
        coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
        ours, theirs = sae.loss(x), coder(x)

    def active(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], n_latents, dtype=torch.bool, device=x.device).scatter_(1, indices, values > 0)

    same = (active(ours.codes.indices, ours.codes.values) == active(theirs.latent_indices, theirs.latent_acts)).all(1)
    return (f"same weights, k={k}: active latents/token gsae {ours.codes.l0():.2f}, sparsify "
            f"{float((theirs.latent_acts > 0).sum(1).float().mean()):.2f}; identical active sets on "
            f"{100 * float(same.float().mean()):.1f}% of tokens; FVU {float(ours.fvu):.5f} / {float(theirs.fvu):.5f}")


def main(args: argparse.Namespace) -> None:
    try:
        import sparsify
    except ImportError:
        sys.exit("sparsify is not importable: run this with the venv that has eai-sparsify 1.3.3: see docs/benchmarks.md")
    batches, what = load_batches(args)
    d_in = batches[0].shape[1]
    n_latents = int(d_in * args.expansion)
    mean = torch.cat(batches).mean(0)
    print(f"data: {what}")
    print(f"SAE {d_in}→{n_latents}, batch {args.batch_size}, Adam lr {default_lr(n_latents):.3g}, {args.warmup} warm-up + "
          f"{len(batches) - args.warmup} timed steps, best of {args.repeats} alternating runs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sparsify {sparsify.__version__}, decoder {sparsify.utils.decoder_impl.__name__}; "
          f"device {_describe_device(args.device)}, gsae {args.precision}")
    print(f"{'k':>12}  {'gsae tok/s':>10}  {'sparsify tok/s':>14}  {'ratio':>6}  target  FVU after {len(batches)} steps "
          f"gsae / sparsify  (runs, ms/step: gsae | sparsify)")
    variants = ([(k, NEVER_DEAD, 0.0) for k in args.k] + ([(k, ALL_DEAD, 1.0) for k in args.k] if args.auxk else [])
                + [(k, DEAD_AFTER, fraction) for fraction in args.dead_fraction for k in args.k])
    for k, dead_tokens, fraction in variants:
        runs: dict[str, list[float]] = {"gsae": [], "sparsify": []}
        if args.other_auxk and dead_tokens != NEVER_DEAD:
            runs[OTHER] = []
        fvus: dict[str, float] = {}
        for _ in range(args.repeats):
            for tool in runs:
                step = make_step(tool, d_in, n_latents, k, mean, batches[0].mean(0), dead_tokens, fraction, args)
                seconds, fvus[tool] = timed(step, batches, args.warmup, tool)
                runs[tool].append(seconds)
        other = runs.pop(OTHER, None)
        speed = {tool: args.batch_size / min(times) for tool, times in runs.items()}
        label = f"{k}{' +AuxK' if dead_tokens == ALL_DEAD else ''}{f' {100 * fraction:g}% dead' if dead_tokens == DEAD_AFTER else ''}"
        target = f"≥ {TARGETS[k]}" if k in TARGETS and dead_tokens == NEVER_DEAD else "  –"
        print(f"{label:>12}  {speed['gsae']:10,.0f}  {speed['sparsify']:14,.0f}  {speed['gsae'] / speed['sparsify']:6.3f}  "
              f"{target:<6}  {fvus['gsae']:.4f} / {fvus['sparsify']:.4f}   "
              + " | ".join(", ".join(_ms(t) for t in runs[tool]) for tool in runs)
              + f"   (median ratio {statistics.median(runs['sparsify']) / statistics.median(runs['gsae']):.3f})")
        if other:
            sae = SparseAutoencoder(d_in, n_latents, k=k).to(args.device)
            picked = "dense" if sae_module.dense_auxk_decode(batches[0][:1] @ sae.W_enc, sae.k_aux) else "gather"
            print(f"{label:>12}  gsae with AuxK decoded by the {'gather' if picked == 'dense' else 'dense matmul'} "
                  f"(gsae picks the {picked} here): {args.batch_size / min(other):,.0f} tok/s, ÷ gsae = "
                  f"{min(runs['gsae']) / min(other):.3f}   ({', '.join(_ms(t) for t in other)} ms)")
        if args.compile:
            compiled_step = gsae_step(d_in, n_latents, k, mean, dead_tokens, bf16=args.precision == "bfloat16",
                                      compile_mode=args.compile)[0]
            started = time.perf_counter()
            with matmul_precision("gsae", args.device):
                compiled_step(batches[0])  # the compilation
            _sync(args.device)
            compile_seconds = time.perf_counter() - started
            seconds, fvu = timed(compiled_step, batches, args.warmup, "gsae")
            print(f"{label:>12}  gsae under torch.compile(mode={args.compile!r}): {args.batch_size / seconds:,.0f} tok/s, "
                  f"÷ gsae eager = {min(runs['gsae']) / seconds:.3f}, ÷ sparsify = {min(runs['sparsify']) / seconds:.3f} "
                  f"(compiling took {compile_seconds:.1f} s; FVU {fvu:.4f})")
    if args.auxk:
        print("+AuxK: every latent counted dead (gsae dead_tokens = sparsify dead_feature_threshold = -1, "
              "auxk_alpha 1/32): AuxK's full cost on both sides")
    if args.dead_fraction:
        print("N% dead: that share of the latents (the same ones for both tools) kept dead, as a long run has them "
              "(2-18% of 8,192 after 400k tokens of a Pythia-70M-shaped cache): their encoder bias at -1000 so they never fire, "
              "their since-fired counters past the threshold; auxk_alpha 1/32")
    for k in args.k:
        print(same_weights_check(batches[0], n_latents, k))


def make_step(tool: str, d_in: int, n_latents: int, k: int, mean: torch.Tensor, first_mean: torch.Tensor,
              dead_tokens: int, fraction: float, args: argparse.Namespace) -> Step:
    """A fresh SAE's step of ``tool``; with ``dead_tokens`` DEAD_AFTER, ``fraction`` of its latents (a seeded
    choice, the same for both tools) are dead from the start and stay dead."""
    since_fired, dead = None, None
    if dead_tokens == DEAD_AFTER:
        dead = torch.randperm(n_latents, generator=torch.Generator().manual_seed(0))[:round(fraction * n_latents)]
        since_fired = torch.zeros(n_latents, dtype=torch.long)
        since_fired[dead] = 2 * DEAD_AFTER
        since_fired, dead = since_fired.to(args.device), dead.to(args.device)
    if tool in ("gsae", OTHER):
        step, sae = gsae_step(d_in, n_latents, k, mean, dead_tokens, since_fired, bf16=args.precision == "bfloat16",
                              n_dead=None if dead is None else len(dead))
        bias = sae.b_enc
        if tool == OTHER:
            sae._auxk = types.MethodType(other_auxk, sae)
    else:
        step, sae = sparsify_step(d_in, n_latents, k, first_mean, dead_tokens, since_fired)
        bias = sae.encoder.bias
    if dead is not None:
        with torch.no_grad():
            bias[dead] = -1000.0
    return step


OTHER = "gsae, the other AuxK decode"


def _ms(seconds: float) -> str:
    """Milliseconds with three significant figures below 100 ms (GPU steps), whole ones above (CPU steps)."""
    return f"{1000 * seconds:.3g}" if seconds < 0.1 else f"{1000 * seconds:.0f}"


def other_auxk(self: SparseAutoencoder, *args) -> torch.Tensor:
    """``SparseAutoencoder._auxk`` with the AuxK decode that ``dense_auxk_decode`` does not pick (the
    gather where it picks the dense matmul, and the other way round): ``--other-auxk``, to check the rule
    again on another device or shape.  Both give the same loss and gradients (tests/test_sae.py)."""
    chosen = sae_module.dense_auxk_decode
    sae_module.dense_auxk_decode = lambda pre, k_aux: not chosen(pre, k_aux)
    try:
        return SparseAutoencoder._auxk(self, *args)
    finally:
        sae_module.dense_auxk_decode = chosen


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (TF32 on for both)"
    return "cpu"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576, help="input width (ignored with --cache: the cache's)")
    parser.add_argument("--expansion", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating")
    parser.add_argument("--cache", help="a gsae activation cache; random Gaussian data without it")
    parser.add_argument("--layer", type=int, help="the cache's layer (default: the middle one)")
    parser.add_argument("--auxk", action="store_true", help="also time each k with AuxK on every latent")
    parser.add_argument("--other-auxk", action="store_true",
                        help="where AuxK runs, also time gsae with the AuxK decode it does not pick on this device and "
                             "shape (the gather or the dense matmul: pipeline.sae.dense_auxk_decode)")
    parser.add_argument("--dead-fraction", type=float, nargs="*", default=[], metavar="F",
                        help="also time each k with this share of the latents dead (AuxK on), e.g. 0.02 0.18")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                        help="gsae's forward: float32 (gsae train's default) or bfloat16 autocast")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="also time gsae's step with its forward under torch.compile(mode=...); "
                             "reduce-overhead replays it as CUDA graphs")
    parsed = parser.parse_args()
    parsed.device = torch.device(parsed.device)
    main(parsed)
