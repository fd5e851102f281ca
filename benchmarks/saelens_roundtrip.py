"""Check that SAELens (or sparsify) loads gsae's export and reconstructs what gsae reconstructs.

Two steps, because sae-lens is an optional extra (`pip install -e '.[saelens]'`, or sae-lens in an
environment of its own; the second step needs only sae-lens):

    python benchmarks/saelens_roundtrip.py dump --run RUN --cache CACHE --out probe.safetensors
    gsae export --run RUN --out EXPORT
    /path/to/saelens-venv/bin/python benchmarks/saelens_roundtrip.py check --export EXPORT --probe probe.safetensors

``dump`` writes raw activations of every layer of the run and gsae's reconstruction of them
(x̂ = SAE(s·x)/s); ``check`` loads each exported folder with ``sae_lens.SAE.load_from_disk`` and
prints the largest difference between SAELens's and gsae's reconstructions.  For sparsify (TopK runs;
eai-sparsify in an environment of its own, with the CPU torch pinned):

    gsae export --run RUN --format sparsify --out EXPORT
    /path/to/sparsify-venv/bin/python benchmarks/saelens_roundtrip.py check-sparsify --export EXPORT --probe probe.safetensors

(with ``SPARSIFY_DISABLE_TRITON=1`` where that environment's torch is a CUDA build on a machine without a GPU:
sparsify's Triton decoder then fails with "0 active drivers")
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def dump(run: str, cache: str, out: str, rows: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    from safetensors.torch import save_file

    from pipeline.sae import load_sae
    from stores import ActivationStore, to_float32

    store = ActivationStore.open(cache)
    tensors = {}
    for name in sorted(f for f in os.listdir(run) if f.startswith("sae_") and f.endswith(".json")):
        sae, config = load_sae(os.path.join(run, name.replace(".json", ".safetensors")), os.path.join(run, name))
        for layer in config["layers"]:
            start = store.chunk_rows(store.n_chunks - 1)[0]  # held-out end of the corpus
            x = torch.from_numpy(to_float32(store.read_rows(layer, start, start + rows), store.dtype))
            scale = config["scales"][str(layer)]
            with torch.no_grad():
                codes = sae.encode(x * scale)
                tensors[f"x.{layer}"] = x.contiguous()
                tensors[f"xhat.{layer}"] = (sae.decode(codes) / scale).contiguous()
                tensors[f"active.{layer}"] = _active_mask(codes, sae.n_latents)
    save_file(tensors, out)
    print(f"wrote {len(tensors) // 3} layers × {rows} rows to {out}")


def _active_mask(codes, n_latents: int):
    """(rows, latents) uint8: which latents gsae keeps on each row."""
    import torch

    if codes.dense is not None:
        return (codes.dense > 0).to(torch.uint8)
    mask = torch.zeros(codes.values.shape[0], n_latents, dtype=torch.uint8)
    return mask.scatter_(1, codes.indices, (codes.values > 0).to(torch.uint8))


def _compare(name: str, xhat, latents, tensors: dict, layer: str) -> tuple[float, int]:
    """Print and return (largest |peer − gsae| / max|x̂| over the rows where the peer keeps the latents gsae
    keeps, the number of rows where it keeps others).  A JumpReLU or BatchTopK latent whose pre-activation
    lies within float rounding of its threshold can land on either side: the peer computes
    (x − b_dec/s)(s·W_enc), gsae (s·x − b_dec) W_enc (one such row in 512 was seen, 5e-9 from the threshold);
    that row's x̂ then differs by the latent's contribution, and is counted, not taken for a format error."""
    expected = tensors[f"xhat.{layer}"]
    active = tensors.get(f"active.{layer}")
    same = ((latents > 0).to(active.dtype) == active).all(dim=1) if active is not None else None
    rows = same if same is not None else slice(None)
    diff = float((xhat[rows] - expected[rows]).abs().max() / expected.abs().max()) if bool(same is None or same.any()) else 0.0
    flipped = 0 if same is None else int((~same).sum())
    print(f"{name}: max |peer − gsae| / max|x̂| = {diff:.2e}"
          + (f"; {flipped} of {len(expected)} rows keep other latents (at a threshold)" if flipped else ""))
    return diff, flipped


def _verdict(worst: float, flipped: int, rows: int, missing: list[str] = ()) -> None:
    """ok: the same reconstruction wherever the same latents are kept, and other latents on at most 1% of rows."""
    ok = worst < 1e-4 and flipped <= 0.01 * rows and not missing
    print(f"worst relative difference {worst:.2e}; rows with other latents: {flipped} of {rows} "
          f"({'ok' if ok else 'MISMATCH'})" + (f"; no coder for layers {', '.join(missing)}" if missing else ""))


def check(export: str, probe: str) -> None:
    import torch
    from safetensors.torch import load_file
    from sae_lens import SAE

    tensors = load_file(probe)
    worst, flipped, rows = 0.0, 0, 0
    for key in sorted(k for k in tensors if k.startswith("x.")):
        layer = key.split(".")[1]
        folder = os.path.join(export, f"blocks.{layer}.hook_resid_post")
        sae = SAE.load_from_disk(folder, device="cpu")
        with torch.no_grad():
            latents = sae.encode(tensors[key])
            xhat = sae.decode(latents)
        name = (f"layer {layer}: {json.load(open(os.path.join(folder, 'cfg.json')))['architecture']}, "
                f"hook {sae.cfg.metadata.hook_name}")
        diff, flips = _compare(name, xhat, latents, tensors, layer)
        worst, flipped, rows = max(worst, diff), flipped + flips, rows + len(xhat)
    _verdict(worst, flipped, rows)


def check_sparsify(export: str, probe: str) -> None:
    """The same for `gsae export --format sparsify`, with ``sparsify.SparseCoder.load_many`` (eai-sparsify)."""
    import torch
    from safetensors.torch import load_file
    from sparsify import SparseCoder

    tensors = load_file(probe)
    coders = SparseCoder.load_many(export, local=True)
    worst, flipped, rows = 0.0, 0, 0
    for name, coder in coders.items():
        layer = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            out = coder(tensors[f"x.{layer}"])
        latents = torch.zeros(len(out.sae_out), coder.num_latents).scatter_(1, out.latent_indices, out.latent_acts)
        diff, flips = _compare(name, out.sae_out, latents, tensors, layer)
        worst, flipped, rows = max(worst, diff), flipped + flips, rows + len(out.sae_out)
    missing = sorted({k.split(".")[1] for k in tensors if k.startswith("x.")}
                     - {name.rsplit(".", 1)[-1] for name in coders})
    _verdict(worst, flipped, rows, missing)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--run", required=True)
    d.add_argument("--cache", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--rows", type=int, default=512)
    for command in ("check", "check-sparsify"):
        c = sub.add_parser(command)
        c.add_argument("--export", required=True)
        c.add_argument("--probe", required=True)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.run, args.cache, args.out, args.rows)
    else:
        (check if args.command == "check" else check_sparsify)(args.export, args.probe)
