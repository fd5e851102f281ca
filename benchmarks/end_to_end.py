"""End to end, one process: gsae (cache once, train from the cache) against sparsify 1.3.3 training live.

    python benchmarks/end_to_end.py                       # GPU size: Pythia-70M shape, 1M tokens per SAE
    python benchmarks/end_to_end.py --layers 3 --hidden 64 --tokens 20000 --batch-size 1024 \\
        --context-length 64 --expansion 8 --k 8           # a CPU-sized check
    python benchmarks/end_to_end.py --only-build-model DIR [--corpus-out FILE]   # just the model (and corpus)

Run it with a Python that imports gsae's dependencies and eai-sparsify 1.3.3 (docs/benchmarks.md).

Three wall times for the same model, the same layers (0 .. L-2: what `gsae train --baseline` trains),
the same SAE shape, k, batch (tokens per step) and tokens per SAE:

1. `gsae cache` + `gsae train --baseline` (one SAE per layer, trained from the cache);
2. the same `gsae cache` + `gsae group` + `gsae train` (the grouping's G*, or `--groups N`);
3. sparsify's `Trainer` (one SAE per layer, `hookpoints` on the same blocks' outputs) fed live by the
   model: one forward per batch feeds every SAE. Adam (`optimizer="adam"`) with `lr_warmup_steps=0`,
   the same learning rate as gsae (both tools' default, 2e-4 / sqrt(M / 2^14)), loss "fvu"; its `fit()`
   turns TF32 on (`torch.set_float32_matmul_precision("high")`), and its SparseCoder's forward runs
   under bfloat16 autocast on a CUDA device with bfloat16 (its own code; gsae trains in float32 + TF32
   unless `--precision bfloat16`). AuxK: by default matched to gsae (auxk_alpha 1/32, a latent is dead
   after gsae's `--dead-tokens` default); `--sparsify-auxk default` keeps sparsify's auxk_alpha = 0.

gsae runs through its real CLI in this process (`cli.main()`, as tests/conftest.py's run_cli does), so
neither side pays a process start; each command's own output goes to a log in the work folder. Every
timed step is preceded and followed by `torch.cuda.synchronize()` on CUDA. Before the timed runs both
tools run once at a tiny size with the same SAE shape and batch (imports, CUDA context, cuBLAS and
Triton kernels), unless `--no-warmup` (then the first-call cost is in the first timed step of each).

The model is a GPT-NeoX with random weights (Pythia-70M's shape by default: 6 layers, d 512, 8 heads,
intermediate 2048, rotary_pct 0.25) and a byte-level BPE tokenizer (vocab 512) trained on the pydoc
corpus as tests/conftest.py builds them, saved with save_pretrained and passed to gsae as `--model DIR`.
The corpus is `pydoc_data.topics` (≈220k tokens with that tokenizer), written as a .jsonl and repeated
as often as needed, so that by default the cache holds as many tokens as each SAE trains on (one pass,
like sparsify's); `--cache-tokens` smaller than `--tokens` makes gsae train several epochs over its cache.
sparsify's dataset is a `datasets.Dataset` with an `input_ids` column of the same windows gsae's cache
is cut into (BOS first, in corpus order, shuffled with seed 42 as sparsify's CLI does), as many rows as
give the same number of steps; its Trainer makes one pass over it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gsae command sets it (before torch starts)
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

AUXK_ALPHA = 1 / 32  # gsae's AuxK weight (pipeline/sae.py AUXK_ALPHA)


def say(*parts: object) -> None:
    print(*parts, flush=True)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ model and corpus
def pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build_model(folder: str | Path, layers: int = 6, hidden: int = 512, heads: int = 8,
                intermediate: int | None = None, context_length: int = 256) -> Path:
    """Save a GPT-NeoX with random weights (Pythia-70M's shape by default) and a small byte-level BPE
    tokenizer trained on the pydoc corpus (as tests/conftest.py does) to ``folder``; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(pydoc_texts()[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    shape = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max(2048, context_length),
                 use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    try:  # transformers 5 names it rope_parameters["partial_rotary_factor"]; rotary_pct is its legacy name
        config = GPTNeoXConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.25})
    except TypeError:
        config = GPTNeoXConfig(**shape, rotary_pct=0.25)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return folder


def corpus_tokens(tokenizer) -> int:
    """Tokens of one pass over the pydoc corpus (documents joined by one separator each)."""
    texts = pydoc_texts()
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) + len(texts)


def write_corpus(path: str | Path, tokenizer, tokens_needed: int) -> tuple[Path, int, int]:
    """The pydoc topics as .jsonl records, repeated so that they hold at least ``tokens_needed`` tokens
    (plus one spare pass). Returns (path, repetitions, tokens of one pass)."""
    per_pass = corpus_tokens(tokenizer)
    repeats = max(1, math.ceil(tokens_needed / per_pass) + 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}) for t in pydoc_texts()]
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(repeats):
            handle.write("\n".join(lines) + "\n")
    return path, repeats, per_pass


def make_windows(corpus: Path, tokenizer, context_length: int, n_rows: int) -> list[list[int]]:
    """``n_rows`` token windows cut from ``corpus`` exactly as `gsae cache` cuts them (gsae's own
    window plan and iterator: BOS first, documents joined by EOS), repeated cyclically if too few."""
    import itertools

    from pipeline.corpus import iter_windows, open_corpus, window_plan

    plan = window_plan(tokenizer, context_length, None)
    windows = list(itertools.islice(iter_windows(open_corpus(str(corpus)), tokenizer, plan), n_rows))
    if not windows:
        raise RuntimeError("the corpus gave no window")
    while len(windows) < n_rows:
        windows.extend(windows[: n_rows - len(windows)])
    return windows


# ------------------------------------------------------------------------------------ stand-ins
def standins() -> list[str]:
    """Minimal stand-ins for modules sparsify imports when they are missing (the GPU machine may lack
    einops and an importable `datasets`); each use is printed. Nothing is replaced when the real
    module imports."""
    notes = []
    try:
        import einops  # noqa: F401
    except ImportError:
        module = types.ModuleType("einops")

        def einsum(*args):  # einops.einsum(t1, t2, "a b, a b -> a"): the same torch.einsum call
            *tensors, pattern = args
            inputs, output = pattern.split("->")
            names: dict[str, str] = {}

            def letters(spec: str) -> str:
                return "".join(names.setdefault(n, chr(ord("a") + len(names))) for n in spec.split())

            equation = ",".join(letters(s) for s in inputs.split(",")) + "->" + letters(output)
            return torch.einsum(equation, *tensors)

        module.einsum = einsum
        sys.modules["einops"] = module
        notes.append("einops is not installed: a stand-in einops.einsum (torch.einsum) is used by sparsify")
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # ImportError, or a version clash inside it
        for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
            del sys.modules[name]
        module = types.ModuleType("datasets")

        class Dataset:  # only named in sparsify's annotations
            pass

        class DatasetDict(dict):
            pass

        def load_dataset(*_, **__):
            raise ImportError("datasets is a stand-in here")

        module.Dataset, module.DatasetDict, module.load_dataset = Dataset, DatasetDict, load_dataset
        sys.modules["datasets"] = module
        notes.append(f"datasets does not import ({one_line(exc)}): sparsify gets a torch Dataset of the same "
                     "rows (same input_ids, same seed-42 shuffle) instead of a datasets.Dataset")
    return notes


class WindowRows(torch.utils.data.Dataset):
    """What sparsify's Trainer needs of its dataset without `datasets`: len, rows {"input_ids"}, select."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}

    def select(self, indices):
        return WindowRows(self.ids[torch.as_tensor(list(indices))])


def sparsify_dataset(windows: list[list[int]]):
    """sparsify's input: a datasets.Dataset with an input_ids column, shuffled with seed 42 and in torch
    format, as sparsify's CLI prepares it (sparsify/__main__.py load_artifacts)."""
    import datasets

    if hasattr(datasets.Dataset, "from_dict"):
        return datasets.Dataset.from_dict({"input_ids": windows}).shuffle(seed=42).with_format("torch"), "datasets.Dataset"
    ids = torch.tensor(windows, dtype=torch.long)
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(42))
    return WindowRows(ids[order]), "torch Dataset (stand-in)"


# ------------------------------------------------------------------------------------ the two tools
class Gsae:
    """Runs `gsae ARGS` in this process through cli.main(); output to a log in ``logs``."""

    def __init__(self, logs: Path, verbose: bool):
        self.logs, self.verbose = logs, verbose
        logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, *args: object) -> tuple[float, str]:
        import cli

        torch.set_float32_matmul_precision("highest")  # each command starts from torch's default
        out = io.StringIO()
        old = sys.argv
        sys.argv = ["gsae", *[str(a) for a in args]]
        code = 0
        redirect = contextlib.ExitStack()
        if not self.verbose:
            redirect.enter_context(contextlib.redirect_stdout(out))
            redirect.enter_context(contextlib.redirect_stderr(out))
        sync()
        start = time.perf_counter()
        try:
            with redirect:
                cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sync()
            seconds = time.perf_counter() - start
            sys.argv = old
        release()
        text = out.getvalue()
        (self.logs / f"{name}.log").write_text(f"$ gsae {' '.join(map(str, args))}\n{text}")
        if code:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
            raise RuntimeError(f"gsae {args[0]} exited {code}: {last[:300]}")
        return seconds, text


def run_sparsify(model_dir: Path, dataset, layers: list[int], seqs: int, n_latents: int, k: int,
                 auxk_alpha: float, dead_tokens: int, dtype: torch.dtype, device: torch.device,
                 save_dir: Path, log: Path, verbose: bool) -> dict[str, float]:
    """sparsify's Trainer, in this process, on the model loaded as its CLI loads it; seconds of each part."""
    out = io.StringIO()
    times: dict[str, float] = {}
    torch.set_float32_matmul_precision("highest")  # fit() sets "high" itself, as it always does
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: log.write_text(out.getvalue()))  # also when it fails
        if not verbose:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
        from sparsify import SparseCoderConfig, TrainConfig, Trainer  # its import prints the decoder it picked
        from transformers import AutoModel

        sync()
        start = time.perf_counter()
        # sparsify/__main__.py load_artifacts: AutoModel (no LM head) for loss "fvu", bfloat16 on a CUDA
        # device with bfloat16, else "auto" (the checkpoint's float32); device_map {"": "cuda:0"} there.
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype).to(device)
        sync()
        times["load"] = time.perf_counter() - start
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=n_latents, k=k),
            batch_size=seqs, loss_fn="fvu", optimizer="adam", lr_warmup_steps=0,
            auxk_alpha=auxk_alpha, dead_feature_threshold=dead_tokens,
            hookpoints=[f"layers.{layer}" for layer in layers],
            log_to_wandb=False, save_dir=str(save_dir), run_name="sparsify",
        )
        trainer = Trainer(cfg, dataset, model)
        sync()
        times["init"] = time.perf_counter() - start - times["load"]
        trainer.fit()
        sync()
        times["total"] = time.perf_counter() - start
        times["fit"] = times["total"] - times["load"] - times["init"]
        times["steps"] = float(trainer.global_step)
        times["hookpoints"] = float(len(trainer.saes))
        times["adam8bit"] = float("8-bit Adam from bitsandbytes" in out.getvalue())  # its Trainer picks it when importable
    torch.set_float32_matmul_precision("highest")
    del trainer, model
    release()
    return times


def release() -> None:
    """Free what a finished run left on the device (outside the timed part)."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model folder saved with save_pretrained (default: build the Pythia-70M-shaped one)")
    p.add_argument("--only-build-model", metavar="DIR", help="build the model into DIR and exit")
    p.add_argument("--corpus-out", metavar="FILE", help="with --only-build-model: also write the repeated pydoc "
                   "corpus (.jsonl) holding --cache-tokens tokens")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, help="default 4 × hidden")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE (both tools)")
    p.add_argument("--cache-tokens", type=int, help="tokens gsae caches (default: --tokens, one pass)")
    p.add_argument("--batch-size", type=int, default=8192, help="tokens per SAE step (both tools)")
    p.add_argument("--context-length", type=int, default=256, help="tokens per window, BOS included")
    p.add_argument("--expansion", type=float, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--groups", type=int, help="measurement 2 trains this many groups (default: G* of gsae group)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32", help="gsae train --precision")
    p.add_argument("--sparsify-auxk", choices=["matched", "default"], default="matched",
                   help="matched: auxk_alpha 1/32 and gsae's dead threshold; default: sparsify's auxk_alpha 0")
    p.add_argument("--sparsify-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="model dtype for sparsify (auto: as its CLI, bfloat16 on CUDA with bf16, else float32)")
    p.add_argument("--sparsify-runs", type=int, default=1, help="time sparsify live this many times, keep the fastest")
    p.add_argument("--no-warmup", action="store_true", help="no untimed tiny run of each tool first")
    p.add_argument("--workdir", help="where caches, runs and logs go (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--verbose", action="store_true", help="show gsae's and sparsify's own output")
    args = p.parse_args()

    cache_tokens = args.cache_tokens or args.tokens
    if args.only_build_model:
        start = time.perf_counter()
        folder = build_model(args.only_build_model, args.layers, args.hidden, args.heads, args.intermediate,
                             args.context_length)
        say(f"model: GPT-NeoX {args.layers} layers × {args.hidden}, random weights, saved in {folder} "
            f"({time.perf_counter() - start:.1f} s)")
        if args.corpus_out:
            from transformers import AutoTokenizer

            path, repeats, per_pass = write_corpus(args.corpus_out, AutoTokenizer.from_pretrained(folder), cache_tokens)
            say(f"corpus: pydoc topics × {repeats} ({per_pass:,} tokens a pass) in {path}")
        return

    made_workdir = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gsae-e2e-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work, cache_tokens)
    finally:
        if made_workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")


def run(args: argparse.Namespace, work: Path, cache_tokens: int) -> None:
    from transformers import AutoTokenizer

    from pipeline.sae import default_lr

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    say("end_to_end: gsae (cache once, train from it) vs sparsify (live), in one process")
    say(f"device {device.type} ({name}), torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for note in standins():
        say(f"note: {note}")

    # --- the model
    start = time.perf_counter()
    if args.model:
        model_dir = Path(args.model).resolve()
        how = f"given: {model_dir}"
    else:
        model_dir = build_model(work / "model", args.layers, args.hidden, args.heads, args.intermediate,
                                args.context_length)
        how = f"built in {time.perf_counter() - start:.1f} s"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    n_layers, d = int(config.num_hidden_layers), int(config.hidden_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    say(f"model: {config.model_type} {n_layers} layers × d {d}, {config.num_attention_heads} heads, intermediate "
        f"{config.intermediate_size}, random weights, vocab {config.vocab_size} (BPE on pydoc); {how}")

    # --- the shared plan
    C, B = args.context_length, args.batch_size
    layers = list(range(n_layers - 1))  # gsae train --baseline: all but the last block
    n_latents = max(1, int(round(d * args.expansion)))
    steps = math.ceil(args.tokens / B)  # gsae: ceil(tokens / batch) steps per SAE
    seqs = max(1, round(B / C))  # sparsify batches whole windows
    rows = steps * seqs
    dead_tokens = min(10_000_000, max(B, args.tokens // 10))  # gsae's --dead-tokens default
    auxk_alpha, threshold = (AUXK_ALPHA, dead_tokens) if args.sparsify_auxk == "matched" else (0.0, 10_000_000)
    sparsify_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.sparsify_dtype) or (
        torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    chunk = min(max(1, 4 * 2**20 // (2 * d)), max(64, cache_tokens // 40))  # gsae's ≈4 MiB, ≥ 40 chunks
    say(f"SAEs: layers {layers[0]}–{layers[-1]} ({len(layers)} per-layer SAEs), {d} → {n_latents}, k {args.k}, "
        f"batch {B:,} tokens, {steps} steps = {steps * B:,} tokens per SAE, Adam lr {default_lr(n_latents):.3g} "
        f"(both), no LR warm-up")
    say(f"gsae: model float32 (as gsae loads it); SAEs float32 ({'bfloat16 autocast' if args.precision == 'bfloat16' else 'TF32 on CUDA'}), "
        f"AuxK 1/32, dead after {dead_tokens:,} tokens; cache batches {seqs} windows × {C}, chunks of {chunk:,} rows")
    say(f"sparsify: batch {seqs} windows × {C} = {seqs * C:,} tokens (BOS position included; gsae drops it)"
        + ("" if seqs * C == B else f" — differs from gsae's {B:,}: --batch-size is not a multiple of --context-length")
        + f", {rows:,} windows = {rows * C:,} tokens per SAE, one pass; model {str(sparsify_dtype).replace('torch.', '')}"
        f" as its CLI loads it; auxk_alpha {auxk_alpha:g}"
        + (f", dead after {threshold:,} tokens (matched to gsae)" if auxk_alpha else " (its default)")
        + ("; SparseCoder forward under bfloat16 autocast (sparsify's code)" if device.type == "cuda"
           and torch.cuda.is_bf16_supported() else ""))

    # --- the corpus (shared) and sparsify's windows
    start = time.perf_counter()
    corpus, repeats, per_pass = write_corpus(work / "corpus.jsonl", tokenizer, max(cache_tokens, rows * (C - 1)))
    windows = make_windows(corpus, tokenizer, C, rows)
    say(f"corpus: pydoc topics × {repeats} ({per_pass:,} tokens a pass) as {corpus.name}; gsae caches "
        f"{cache_tokens:,} tokens, so its per-layer SAEs make {steps * B / (0.95 * cache_tokens):.2f} passes over "
        f"their layer's training rows (95%; 5% held out); sparsify gets the first {rows:,} windows of the same "
        f"corpus cut the same way ({time.perf_counter() - start:.1f} s to tokenize them, not timed; gsae's cache "
        f"time includes its tokenizing)")

    gsae = Gsae(work / "logs", args.verbose)
    cache = work / "cache"
    common = ["--expansion", args.expansion, "--k", args.k, "--batch-size", B, "--precision", args.precision]

    # --- warm-up: both tools once, tiny, same SAE shape and batch
    if not args.no_warmup:
        start = time.perf_counter()
        try:
            wcache, wtokens = work / "warmup-cache", max(4 * B, 8 * seqs * (C - 1))
            gsae("warmup-cache", "cache", "--model", model_dir, "--dataset", corpus, "--cache", wcache, "--tokens",
                 wtokens, "--context-length", C, "--batch-size", seqs, "--chunk-tokens", max(16, wtokens // 16))
            gsae("warmup-group", "group", "--cache", wcache)
            gsae("warmup-train", "train", "--cache", wcache, "--baseline", "--tokens", 2 * B, "--out",
                 work / "warmup-run", *common)
            shutil.rmtree(wcache, ignore_errors=True)
            dataset, _ = sparsify_dataset(windows[: 2 * seqs])
            run_sparsify(model_dir, dataset, layers, seqs, n_latents, args.k, auxk_alpha, threshold, sparsify_dtype,
                         device, work / "warmup-sparsify", work / "logs" / "warmup-sparsify.log", args.verbose)
            say(f"warm-up: both tools, 2 steps each at the same shapes, {time.perf_counter() - start:.1f} s (not timed)")
        except Exception as exc:
            say(f"warm-up failed (first-call costs fall into the timed runs): {one_line(exc)}")
    else:
        say("no warm-up: each tool's first-call cost (CUDA context, kernels) is in its first timed step")

    # --- 1. gsae cache + baseline
    results: dict[str, float] = {}
    try:
        seconds, _ = gsae("cache", "cache", "--model", model_dir, "--dataset", corpus, "--cache", cache, "--tokens",
                          cache_tokens, "--context-length", C, "--batch-size", seqs, "--chunk-tokens", chunk)
        results["cache"] = seconds
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        say(f"[gsae cache] {seconds:.2f} s: {cache_tokens:,} tokens × {n_layers} layers at {cache_tokens / seconds:,.0f} "
            f"tok/s (model load included), {size / 2**30:.2f} GiB on disk")
    except Exception as exc:
        say(f"[gsae cache] failed: {one_line(exc)}")
    if "cache" in results:
        try:
            seconds, _ = gsae("baseline", "train", "--cache", cache, "--baseline", "--tokens", args.tokens,
                              "--out", work / "run-baseline", *common)
            results["baseline"] = seconds
            say(f"[gsae train --baseline] {seconds:.2f} s: {len(layers)} SAEs × {steps * B:,} tokens, "
                f"{steps * B / seconds:,.0f} tok/s per SAE ({len(layers) * steps * B / seconds:,.0f} SAE·tok/s)"
                + steps_note(work / "run-baseline"))
        except Exception as exc:
            say(f"[gsae train --baseline] failed: {one_line(exc)}")

        # --- 2. the same cache + group + G*
        try:
            seconds, _ = gsae("group", "group", "--cache", cache)
            results["group"] = seconds
            record = json.loads((cache / "groups" / "amad.json").read_text())
            g_star = int(record["chosen"])
            groups = next(pt["groups"] for pt in record["curve"] if pt["n_groups"] == g_star)
            spans = ", ".join(f"[{g[0]}–{g[-1]}]" if len(g) > 1 else f"[{g[0]}]" for g in groups)
            results["g_star"] = g_star
            say(f"[gsae group] {seconds:.2f} s: G* = {g_star} of {len(layers)} layers: {spans} "
                f"(AMAD {next(pt['amad'] for pt in record['curve'] if pt['n_groups'] == g_star):.3f}); "
                f"{record['seconds']:.2f} s computing the distances over {record['sample']['tokens']:,} sampled tokens")
            n_groups = args.groups or g_star
            results["n_groups"] = n_groups
            seconds, _ = gsae("groups", "train", "--cache", cache, "--tokens", args.tokens, "--out",
                              work / "run-groups", *common, *(["--groups", n_groups] if args.groups else []))
            results["groups"] = seconds
            say(f"[gsae train --groups {n_groups}{' (G*)' if n_groups == g_star else ' (given)'}] {seconds:.2f} s: "
                f"{n_groups} SAEs × {steps * B:,} tokens, "
                f"{steps * B / seconds:,.0f} tok/s per SAE" + steps_note(work / "run-groups"))
        except Exception as exc:
            say(f"[gsae group / train G*] failed: {one_line(exc)}")
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)  # disk: the GPU-sized cache is several GB

    # --- 3. sparsify live
    try:
        dataset, kind = sparsify_dataset(windows)
        runs = []
        for run in range(args.sparsify_runs):  # the fastest is kept: fair to the peer
            shutil.rmtree(work / "sparsify", ignore_errors=True)
            runs.append(run_sparsify(model_dir, dataset, layers, seqs, n_latents, args.k, auxk_alpha, threshold,
                                     sparsify_dtype, device, work / "sparsify", work / "logs" / f"sparsify-{run}.log",
                                     args.verbose))
        times = min(runs, key=lambda t: t["total"])
        if len(runs) > 1:
            seconds = ", ".join(f"{t['total']:.2f}" for t in runs)
            say(f"[sparsify live] {len(runs)} runs: {seconds} s; the fastest is kept")
        results["sparsify"] = times["total"]
        total = int(times["steps"]) * seqs * C
        say(f"[sparsify live] {times['total']:.2f} s: {int(times['hookpoints'])} SAEs × {total:,} tokens "
            f"({int(times['steps'])} steps), {total / times['total']:,.0f} tok/s per SAE; model load {times['load']:.2f} s, "
            f"Trainer init {times['init']:.2f} s, fit {times['fit']:.2f} s; dataset: {kind}; "
            f"{'bitsandbytes Adam8bit' if times['adam8bit'] else 'torch.optim.Adam'}; sparsify "
            f"{sys.modules['sparsify'].__version__}, decoder {sys.modules['sparsify.utils'].decoder_impl.__name__}")
    except Exception as exc:
        release()
        say(f"[sparsify live] failed: {one_line(exc)}")
        if args.verbose:
            traceback.print_exc()

    # --- summary
    tokens = steps * B
    say("")
    say(f"wall times, {tokens:,} tokens per SAE ({len(layers)} layers):")
    rows_out = []
    if "cache" in results and "baseline" in results:
        rows_out.append(("1 gsae cache + train --baseline", results["cache"] + results["baseline"]))
    if "cache" in results and "groups" in results:
        rows_out.append((f"2 gsae cache + group + train G={int(results['n_groups'])}",
                         results["cache"] + results["group"] + results["groups"]))
    if "sparsify" in results:
        rows_out.append(("3 sparsify live", results["sparsify"]))
    for label, seconds in rows_out:
        say(f"  {label:<36} {seconds:9.2f} s  {tokens / seconds:12,.0f} tok/s per SAE")
    live = results.get("sparsify")
    if live:
        say("ratios against sparsify live:")
        if "cache" in results and "groups" in results:
            total = results["cache"] + results["group"] + results["groups"]
            say(f"  (cache + group + train G) ÷ sparsify live   = {total / live:.3f}   (target < 1)")
        if "baseline" in results:
            say(f"  baseline from the cache ÷ sparsify live     = {results['baseline'] / live:.3f}   (target ≤ 1.2; "
                "cache time excluded: reusing a cache)")
        if "groups" in results:
            say(f"  group + train G from the cache ÷ live       = {(results['group'] + results['groups']) / live:.3f}"
                f"   (target ≤ 0.5; cache time excluded; train G alone {results['groups'] / live:.3f})")
    else:
        say("no ratio: sparsify live did not finish")
    missing = [name for name in ("cache", "baseline", "groups", "sparsify") if name not in results]
    if missing:  # the figures that exist are printed above; a session's step table shows the rest failed
        raise SystemExit(f"end_to_end: {', '.join(missing)} did not finish (see the lines above)")


def steps_note(run: Path) -> str:
    """'; x s in training steps (wall: start …, steps …, …)' from the run's summary.json, when it has one."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except Exception:
        return ""
    wall = ", ".join(f"{name.replace('_', ' ')} {seconds:.2f}" for name, seconds in summary.get("wall_seconds", {}).items())
    # AuxK's cost grows with the dead latents: the step alone (sparsify_speed.py) has none
    dead = ", ".join(f"{100 * sae['dead_fraction']:.1f}" for sae in summary.get("saes", [])
                     if isinstance(sae.get("dead_fraction"), (int, float)))
    return (f"; {summary['train_seconds']:.2f} s in training steps" + (f" (wall s: {wall})" if wall else "")
            + (f"; dead latents at the end, % per SAE: {dead}" if dead else ""))


if __name__ == "__main__":
    main()
