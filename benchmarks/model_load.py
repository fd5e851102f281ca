"""Loading a GGUF model with its file parsed once ÷ as transformers loads it (parsing it three times), in one run:

    python benchmarks/model_load.py                 # the embedded SmolLM2-135M
    python benchmarks/model_load.py --model F.gguf  # any GGUF file (or any --model gsae takes)

Each load runs in a fresh process, as each gsae command does (imports included); the two ways alternate and
the best of each is kept.  Each load prints a hash of the model's weights, its config and a tokenized text,
which must be the same both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LOAD = r"""
import contextlib, hashlib, json, sys, time
t0 = time.perf_counter()
import torch
from pipeline import models
if sys.argv[2] == "plain":
    models.gguf_parsed_once = contextlib.nullcontext
lm = models.load_model(models.resolve_model_spec(sys.argv[1] or None), torch.device("cpu"))
seconds = time.perf_counter() - t0
digest = hashlib.sha256()
for name, tensor in sorted(lm.model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.contiguous().numpy().tobytes())
digest.update(lm.model.config.to_json_string().encode())
digest.update(str(lm.tokenizer("def f(x):\n    return x  # The quick brown fox")["input_ids"]).encode())
print(json.dumps({"seconds": seconds, "digest": digest.hexdigest()[:16]}))
"""


def _load(model: str, way: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", _LOAD, model, way], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="what gsae's --model takes (default: the embedded model)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"once": [], "plain": []}
    for _ in range(args.repeats):
        for way in runs:
            runs[way].append(_load(args.model, way))
    for way, label in (("plain", "as transformers loads it"), ("once", "the file parsed once")):
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs[way])
        print(f"{label:26s}: {min(r['seconds'] for r in runs[way]):7.2f} s  (runs {times}; weights, config and "
              f"tokens {runs[way][0]['digest']})")
    same = len({r["digest"] for way in runs for r in runs[way]}) == 1
    ratio = min(r["seconds"] for r in runs["once"]) / min(r["seconds"] for r in runs["plain"])
    print(f"ratio parsed once ÷ as transformers loads it = {ratio:.3f}; the same model both ways: {same}")


if __name__ == "__main__":
    main()
