"""The gsae command line. Argument parsing lives here and nowhere else."""

from __future__ import annotations

import contextlib
import decimal
import functools
import math
import os
import re
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

# transformers' GGUF loader draws a raw tqdm bar; gsae shows its own progress instead
os.environ.setdefault("TQDM_DISABLE", "1")
# Stage one compresses on a background thread while torch's OpenMP threads run the model. With
# spinning OpenMP workers the writer stalls every parallel region: cache/forward throughput was 0.65
# with the default policy and 0.85 with PASSIVE (benchmarks/cache_throughput.py, SmolLM2, 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM while the imports below run (torch, transformers: seconds): one line, nothing was made
    yet.  A KeyboardInterrupt there printed a 30-line traceback out of torch's import, and SIGTERM ended the
    process without a word; main() and entry() set the command's own handlers before any command runs."""
    sys.stderr.write(f"{'terminated (SIGTERM)' if signum == signal.SIGTERM else 'interrupted'} while starting: "
                     "nothing was done\n")
    os._exit(128 + signum)


def _under_torchrun() -> bool:
    """A rank of a torchrun job, whose agent stops the ranks with SIGTERM: they keep its default (see entry)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


if (os.path.basename(sys.argv[0]) == "gsae" or __name__ == "__main__") and \
        threading.current_thread() is threading.main_thread():
    # the command (also `python cli.py`, `python -m cli`), not an import elsewhere
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not _under_torchrun():
        signal.signal(signal.SIGTERM, _interrupted_while_starting)

import typer  # noqa: E402
from rich.console import Console, ConsoleDimensions  # noqa: E402
from rich.table import Table  # noqa: E402

# Defaults and choices come from the stages' requests (pipeline.requests), never restated here; that module and
# stores.codecs import neither torch nor zarr, so `--help` and a bad option's message come at once.
from pipeline.requests import (ARCHITECTURES, CACHE_ROOT, DEVICES, EVAL_TOKENS, EVAL_WINDOWS, FORMATS,  # noqa: E402
                               METRICS, PRECISIONS, WORKER_KINDS, CacheRequest, GroupRequest, PaperRequest,
                               TrainRequest)
from stores.codecs import COMPRESSIONS, DEFAULT_KEEP_BITS, STORAGE_DTYPES  # noqa: E402

app = typer.Typer(
    name="gsae",
    help="Group-SAE: cache residual streams once, group similar layers, train one SAE per group.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
#: The width of a console writing to a file or a pipe. rich would take 80 columns there (or the width of
#: whichever standard stream is a terminal) and cut every table to it, eval's to "0.…" in every cell;
#: tables are not expanded, so they keep their natural width within this.
NON_TERMINAL_WIDTH = 1000


class _Console(Console):
    """A rich Console that, when its stream is not a terminal and no width was given (by COLUMNS or in
    code), is NON_TERMINAL_WIDTH columns wide, so a table in a log or a pipe is never cut. On a terminal
    it is rich's own Console."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(max(size.width, NON_TERMINAL_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console(stderr=True, soft_wrap=True)
report = _Console(soft_wrap=True)


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum of the given values, as typer wants for a fixed set of choices."""
    return Enum(name, {value: value for value in values}, type=str)


Compression = _choices("Compression", COMPRESSIONS)
StorageDtype = _choices("StorageDtype", STORAGE_DTYPES)
Device = _choices("Device", DEVICES)
Metric = _choices("Metric", METRICS)
Architecture = _choices("Architecture", ARCHITECTURES)
Precision = _choices("Precision", PRECISIONS)
Workers = _choices("Workers", WORKER_KINDS)
ExportFormat = _choices("ExportFormat", FORMATS)
_DEBUG = False  # --debug or GSAE_DEBUG=1: show tracebacks


def _command(name: str | None = None, uses_torch: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``app.command``, with torch's threads capped (:func:`_cap_torch_threads`) and the command's signal handlers
    set (:func:`_command_signals`) when the command runs: not before, so that `--help` and a bad option's message
    need no torch.  ``uses_torch=False``: a command that reads a store and runs no model or SAE (`info`, `verify`),
    which then starts without torch's import (under a second rather than three)."""

    def register(function: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(function)  # typer reads the options from the wrapped function's signature
        def run(*args: Any, **kwargs: Any) -> None:
            if uses_torch:
                _cap_torch_threads()  # imports torch, most of a command's start, while Ctrl-C still says "starting"
            _command_signals()
            return function(*args, **kwargs)

        return app.command(name)(run)

    return register


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (for bug reports); "
                                        "GSAE_DEBUG=1 does the same.")) -> None:
    global _DEBUG
    _DEBUG = debug or _DEBUG


_STORAGE_OPTION_HELP = ("key=value for the file system of an fsspec URL (s3://...), e.g. endpoint_url=http://host:9000; "
                        "repeatable; used by this process only, never written anywhere.")


_STORAGE_KEYS: set[str] = set()  # the --storage-option keys given: an fsspec file system may refuse one late


def _storage(options: list[str], *locations: Optional[str]) -> None:
    """Check the protocols of the given locations and hand --storage-option values to fsspec."""
    import json

    from pipeline.errors import GsaeError
    from stores.remote import use_storage_options

    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GsaeError(f"--storage-option {item!r}: give key=value, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            parsed[key] = json.loads(value)  # true, 3, {"a": 1} as JSON; anything else as a string
        except json.JSONDecodeError as exc:
            if value.lstrip()[:1] in ("{", "["):  # meant as JSON: as a string it fails later, far from here
                raise GsaeError(f"--storage-option {key}: {value!r} is not valid JSON ({exc.msg}), e.g. "
                                f"{key}='{{\"region_name\": \"us-east-1\"}}' (a string that starts so: give it "
                                "as a JSON string, in double quotes)") from None
            parsed[key] = value
    _STORAGE_KEYS.update(parsed)
    use_storage_options(parsed, [str(location) for location in locations if location])


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


#: the largest token count an option takes: every count up to it is exact in a float64 (rates, ETAs, JSON)
MAX_COUNT = 2**53


def _count(value: str | int) -> int:
    """A count of tokens as researchers write it: ``100000``, ``100_000``, ``1e5``, ``100k``, ``2M``, ``1.5B``."""
    if isinstance(value, int):
        return value
    text = value.strip().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(text[-1:].lower(), 1) if text[-1:].isalpha() else 1
    number = text[:-1] if scale != 1 else text
    # 1e30 overflowed a C size in the cache, and lost its last digits to floats in train
    too_large = typer.BadParameter(f"{value!r} is more than gsae counts (at most 2^53 = {MAX_COUNT:,})")
    try:
        exact = decimal.Decimal(number) * scale
    except decimal.Overflow:  # past the context's exponent (1e9999999)
        raise too_large from None
    except decimal.InvalidOperation:
        exact = None
    if exact is not None and exact.is_finite() and abs(exact) > MAX_COUNT:
        raise too_large
    if exact is None or not exact.is_finite() or exact != exact.to_integral_value():
        raise typer.BadParameter(f"{value!r} is not a whole number (e.g. 100000, 1e5, 100k, 2M)")
    return int(exact)


def _check_folder(option: str, location: Optional[str]) -> None:
    """A local folder option (--out, --run) must not be, or lie under, a file (a URL is left to its file system)."""
    from pipeline.errors import GsaeError

    if not location:
        return
    path = location[len("file://"):] if location.startswith("file://") else location
    if "://" in path:
        return
    wanted = Path(path)
    for candidate in (wanted, *wanted.parents):
        try:
            if not candidate.exists():
                continue
            if candidate.is_dir():
                return
        except OSError:  # unreadable: the write says what is wrong
            return
        what = f"{option} {location} is a file" if candidate == wanted else f"{option} {location}: {candidate} is a file"
        raise GsaeError(f"{what}, not a folder; choose another {option}")


def _resolve_cache(cache: Optional[str]) -> str:
    """--cache, or the only cache under gsae-cache/ when there is exactly one."""
    from pipeline.errors import GsaeError

    if cache:
        return cache
    root = Path(CACHE_ROOT)
    found = sorted(p for p in root.iterdir() if (p / "zarr.json").is_file()) if root.is_dir() else []
    if len(found) == 1:
        return str(found[0])
    if not found:
        raise GsaeError(f"no cache under ./{CACHE_ROOT}; run `gsae cache` first or pass --cache")
    raise GsaeError(f"several caches under ./{CACHE_ROOT} ({', '.join(p.name for p in found)}); pass --cache")


@_command()
def cache(
    model: Optional[str] = typer.Option(None, help="Hub id, alias (pythia-70m, ...), folder saved with save_pretrained, or .gguf file. Default: the embedded SmolLM2-135M."),
    dataset: Optional[str] = typer.Option(None, help="pydoc (embedded default), a .txt/.jsonl/.parquet file or folder, or a hub dataset id."),
    tokens: int = typer.Option(CacheRequest.tokens, parser=_count, metavar="N", help="Tokens (stored rows) to cache (100000, 1e5, 100k)."),
    context_length: int = typer.Option(CacheRequest.context_length, help="Tokens per window, BOS included."),
    batch_size: int = typer.Option(CacheRequest.batch_size, help="Windows per forward pass."),
    cache: Optional[str] = typer.Option(None, help="Where to write the cache. Default: gsae-cache/<model>."),
    compression: Compression = typer.Option(CacheRequest.compression, help="lossless (shuffle+zstd) or lossy (mantissa bit rounding first)."),
    keep_bits: Optional[int] = typer.Option(None, help=f"Mantissa bits kept by --compression lossy (default {DEFAULT_KEEP_BITS})."),
    dtype: StorageDtype = typer.Option(CacheRequest.dtype, help="Storage dtype of activations."),
    device: Device = typer.Option(CacheRequest.device, help="Where the model runs."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) of --model (default: the Hub's main)."),
    dataset_config: Optional[str] = typer.Option(None, help="Configuration name of a hub dataset."),
    split: str = typer.Option(CacheRequest.split, help="Split of a hub dataset."),
    text_field: str = typer.Option(CacheRequest.text_field, help="Text field of .jsonl / .parquet / hub records."),
    prepend_bos: Optional[bool] = typer.Option(None, "--prepend-bos/--no-prepend-bos", help="Start every window with BOS (default: when the tokenizer has one)."),
    keep_bos: bool = typer.Option(CacheRequest.keep_bos, help="Also store the BOS position's activations (outliers; dropped by default)."),
    chunk_tokens: Optional[int] = typer.Option(None, parser=_count, metavar="N", help="Rows per chunk (default: about 4 MiB per chunk)."),
    write_threads: Optional[int] = typer.Option(None, help="Threads (or processes, see --writer) compressing and writing chunks (default: one per core)."),
    writer: Workers = typer.Option(CacheRequest.writer, help="Who compresses and writes the chunks: threads, or processes (their own GIL, so the model's thread does not wait for it; lossless local caches). auto: threads (on an H200 the processes made the cache slower)."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Run the model once and cache every block's residual stream to a compressed, resumable Zarr store."""
    from pipeline.cache import build_cache

    _storage(storage_option, cache)
    request = CacheRequest(
        model=model, revision=revision, dataset=dataset, dataset_config=dataset_config, split=split,
        text_field=text_field, tokens=tokens, context_length=context_length, batch_size=batch_size,
        cache=cache, compression=compression.value, keep_bits=keep_bits, dtype=dtype.value,
        device=device.value, prepend_bos=prepend_bos, keep_bos=keep_bos, chunk_tokens=chunk_tokens,
        write_threads=write_threads, writer=writer.value,
    )
    result = build_cache(request, console)
    if result.rank:  # under torchrun rank 0 reports for every rank
        return
    if result.already_complete:
        console.print(f"[green]cache {result.path} is already complete[/]; nothing to do")
    if result.corpus_exhausted:
        console.print(f"[yellow]the corpus ran out after {result.tokens_written:,} of {result.tokens_planned:,} tokens; the cache holds what there was"
                      + (f": {result.chunking_note}" if result.chunking_note else "") + "[/]")
    overflow = [(layer, n) for layer, n in enumerate(result.overflow_values) if n]
    if overflow:
        listed = ", ".join(f"layer {layer}: {n:,}" for layer, n in overflow[:8])
        console.print(f"[yellow]values beyond the float16 range were clipped to ±65504 ({listed}); use --dtype bfloat16 or float32 to keep them[/]")
    table = Table(title="gsae cache", show_header=False)
    rate = result.tokens_this_run / result.elapsed if result.elapsed else 0.0
    for name, value in [
        ("cache", result.path),
        ("tokens", f"{result.tokens_written:,}" + (f" (resumed at {result.resumed_from:,})" if result.resumed_from and not result.already_complete else "")),
        ("layers × d_model", f"{result.n_layers} × {result.d_model}"),
        ("bytes on disk", _human_bytes(result.bytes_on_disk)),
        ("bytes per value", f"{result.bytes_per_value:.3f} (activations only)"),
        ("compression ratio", f"{result.raw_bytes / max(1, result.activation_bytes):.2f}×"),
        ("time", f"{result.elapsed:,.1f} s" + (f" ({rate:,.0f} tok/s)" if rate else "")
         + (f", after {result.load_seconds:,.1f} s loading the model" if result.load_seconds >= 0.05 else ""))
        if not result.already_complete
        else ("time", "nothing ran" + (f"; made in {result.seconds_made:,.1f} s "
                                       f"({result.tokens_written / result.seconds_made:,.0f} tok/s)"
                                       if result.seconds_made else "")),
    ] + ([("of which", f"model {result.phases['forward']:,.1f} s · waiting for the writer "
                       f"{result.phases['writer_wait']:,.1f} s · reading text {result.phases['windows']:,.1f} s"
                       + (f" · chunk buffers {result.phases['buffers']:,.1f} s" if result.phases.get("buffers", 0) >= 0.05 else ""))]
         if result.phases and result.elapsed >= 1 else []) + ([("written by", result.writer)] if result.writer else []):
        table.add_row(name, value)
    report.print(table)


@_command(uses_torch=False)
def info(cache: Optional[str] = typer.Option(None, help="The cache (default: the only one under gsae-cache/)."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Show what a cache holds."""
    from rich.markup import escape

    from stores import ActivationStore

    _storage(storage_option, cache)
    store = ActivationStore.open(_resolve_cache(cache), allow_partial=True)
    a = store.attrs
    on_disk, activations = store.disk_bytes()  # bytes per value: the activations alone (not groups/, stats/)
    values = store.n_tokens * store.n_layers * store.d_model
    status = "complete" if store.complete else (
        f"incomplete: {store.tokens_committed:,} of {store.tokens_planned:,} tokens "
        f"({len(store.committed_chunks()):,} of {store.n_chunks_planned:,} chunks)"
        # several writers (torchrun) commit out of order; readers take the chunks in order from the first
        + (f"; --allow-partial reads the first {store.tokens_written:,}, in the chunks written in order"
           if store.tokens_committed > store.tokens_written else ""))
    start, stop = store.readable_rows(store.n_chunks - 1) if store.n_chunks else (0, 0)
    short_last = f" (the last {stop - start:,})" if store.n_chunks > 1 and stop - start != store.chunk_tokens else ""
    table = Table(title=f"gsae info · {store.path}", show_header=False)
    corpus = a.get("corpus", {})
    for name, value in [
        ("status", status),
        ("model", f"{a.get('model_id')} ({a.get('architecture')}, {a.get('model_source')})"),
        ("revision", str(a.get("model_revision") or "–")),
        ("layers × d_model", f"{store.n_layers} × {store.d_model} ({a.get('hook_point')}, {a.get('blocks_path')})"),
        ("tokens", f"{store.n_tokens:,} in {store.n_chunks} chunk{'' if store.n_chunks == 1 else 's'} "
                   f"of {store.chunk_tokens:,}{short_last}"),
        ("windows", f"{a.get('context_length')} tokens, "
                    + (f"BOS prepended, {'stored' if a.get('bos_stored') else 'not stored'}" if a.get("prepend_bos")
                       else "no BOS")),
        ("corpus", escape(f"{corpus.get('description')} [{corpus.get('fingerprint')}]")),
        ("dtype", store.dtype),
        ("codec", " → ".join(a["codec"]["chain"]) + (f" (relative error ≤ {a['codec']['relative_error_bound']:g})" if a["codec"]["compression"] == "lossy" else "")),
        ("bytes on disk", f"{_human_bytes(on_disk)} (activations {_human_bytes(activations)})"),
        ("bytes per value", f"{activations / values:.3f} (activations only)" if values else "–"),
        ("compression ratio", f"{store.raw_activation_bytes() / activations:.2f}×" if values and activations else "–"),
        ("gsae version", str(a.get("gsae_version"))),
    ]:
        table.add_row(name, value)
    if not store.complete:
        from pipeline.cache import cache_command  # (torch: the device `auto` would pick here)

        if (command := cache_command(store.path, a)) is not None:
            table.add_row("to finish it", escape(command))  # to be copied: a [tag] in a path stays
    if any(a.get("overflow_values", [])):
        table.add_row("clipped to float16", ", ".join(f"L{l}: {n}" for l, n in enumerate(a["overflow_values"]) if n))
    report.print(table)


@_command(uses_torch=False)
def verify(cache: Optional[str] = typer.Option(None, help="The cache (default: the only one under gsae-cache/)."),
           allow_partial: bool = typer.Option(False, help="Verify the committed chunks of an incomplete cache."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Read every chunk, check its checksum and shape, and name any corrupt chunk."""
    from pipeline.progress import make_progress
    from stores import ActivationStore, StoreError

    _storage(storage_option, cache)
    store = ActivationStore.open(_resolve_cache(cache), allow_partial=allow_partial)
    problems, damaged_stats = [], None
    with make_progress(console, unit="chunk") as progress:
        task = progress.add_task("verifying", total=store.n_chunks * (store.n_layers + 1))
        try:
            for name, layer, start, stop, problem in store.iter_chunk_checks():
                if problem:
                    problems.append((layer if layer >= 0 else store.n_layers, start, stop, problem))
                progress.advance(task)
        except StoreError as exc:  # the statistics, checked last: the chunks' list first, then this line
            damaged_stats = exc
    for layer, start, stop, problem in sorted(problems):  # by layer, the tokens last, then by row
        where = f"layer {layer}" if layer < store.n_layers else "tokens"
        report.print(f"[red]corrupt[/] {where} rows {start:,}–{stop - 1:,}: {problem}")
    if damaged_stats is not None:
        raise damaged_stats
    if problems:
        report.print(f"[red]{len(problems):,} of {store.n_chunks * (store.n_layers + 1):,} chunks are damaged[/]; "
                     "restore the cache from a copy or re-create it with `gsae cache`")
        raise typer.Exit(1)
    report.print(f"[green]ok[/]: {store.n_chunks * (store.n_layers + 1):,} chunks of {store.path} decode and match their checksums")


@_command()
def group(
    cache: Optional[str] = typer.Option(None, help="The cache (default: the only one under gsae-cache/)."),
    metric: Metric = typer.Option(GroupRequest.metric, help="amad: contiguous complete-linkage groups; uniform: equal splits."),
    tokens: int = typer.Option(GroupRequest.tokens, parser=_count, metavar="N", help="Tokens to sample (whole chunks, at random)."),
    threshold: float = typer.Option(GroupRequest.threshold, help="G* is the smallest G with AMAD below this."),
    layers: Optional[str] = typer.Option(None, help="Layers to group, e.g. 0-27 or 0,2,4 (default: all but the last)."),
    seed: int = typer.Option(GroupRequest.seed, help="Seed of the chunk sample."),
    scheduler: Optional[str] = typer.Option(None, help="Address of a dask.distributed scheduler (default: local threads)."),
    allow_partial: bool = typer.Option(False, help="Use the committed part of an incomplete cache."),
    force: bool = typer.Option(False, help="Recompute and replace a saved grouping made with other arguments."),
    device: Device = typer.Option(GroupRequest.device, help="Where the distances are computed (auto: the GPU where there is one)."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Compute layer distances (Dask, sampled chunks), the AMAD curve and the layer groups."""
    from pipeline.group import run_group
    from pipeline.grouping import layer_span, partition_text

    _storage(storage_option, cache)
    result = run_group(GroupRequest(
        cache=_resolve_cache(cache), metric=metric.value, tokens=tokens, threshold=threshold, layers=layers,
        seed=seed, scheduler=scheduler, allow_partial=allow_partial, force=force, device=device.value), console)
    for note in result.notes:
        console.print(f"[yellow]{note}[/]")
    grouping = result.grouping
    if result.reused:
        console.print(f"reusing {result.json_path} (same arguments)")
    table = Table(title=f"gsae group · {grouping.metric} · {grouping.sample['tokens']:,} tokens · threshold {grouping.threshold:g}")
    table.add_column("G", justify="right")
    table.add_column("AMAD", justify="right")
    table.add_column("groups")
    for point in grouping.curve:
        mark = " ← G*" if point["n_groups"] == grouping.chosen else ""
        spans = " ".join(layer_span(g) for g in point["groups"])
        style = "bold green" if mark else None
        table.add_row(f"{point['n_groups']}{mark}", f"{point['amad']:.3f}", spans, style=style)
    report.print(table)
    chosen = grouping.groups_for(grouping.chosen)
    report.print(f"G* = {grouping.chosen}: {partition_text(chosen)}")
    if not result.reused:  # a reused result was said so above; nothing was written
        report.print(f"saved {result.json_path}" + (f" and {len(result.pictures)} pictures" if result.pictures else "")
                     + f" in {result.seconds:.1f} s")


@_command()
def train(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(None, help="The cache (default: the only one under gsae-cache/)."),
    groups: Optional[int] = typer.Option(None, help="Train the N-group partition (default: G* of the grouping)."),
    baseline: bool = typer.Option(False, help="Train one SAE per layer instead (the paper's baseline)."),
    metric: Metric = typer.Option(TrainRequest.metric, help="Which grouping to take the partition from."),
    tokens: int = typer.Option(TrainRequest.tokens, parser=_count, metavar="N", help="Training tokens per SAE (1e6, 1M)."),
    expansion: float = typer.Option(TrainRequest.expansion, help="d_sae / d_model."),
    k: Optional[int] = typer.Option(None, help="Active latents per token (default ≈ d_model/6: the paper's 128 at d=768)."),
    architecture: Architecture = typer.Option(TrainRequest.architecture, help="SAE architecture."),
    l1_coefficient: float = typer.Option(TrainRequest.l1_coefficient, help="relu: the L1 penalty's weight; jumprelu: the L0 penalty's (unused by topk and batchtopk)."),
    batch_size: int = typer.Option(TrainRequest.batch_size, help="Tokens per training step."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 2^14))."),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/<cache>-<label>)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    device: Device = typer.Option(TrainRequest.device, help="Where to train."),
    seed: int = typer.Option(TrainRequest.seed, help="Seed of initialisation and stream order."),
    dead_tokens: Optional[int] = typer.Option(None, parser=_count, metavar="N", help="A latent silent this many tokens is dead (AuxK); default min(10M, tokens/10), at least one batch."),
    checkpoint_every: int = typer.Option(TrainRequest.checkpoint_every, help="Steps between checkpoints."),
    tf32: bool = typer.Option(TrainRequest.tf32, "--tf32/--no-tf32", help="TF32 float32 matmuls on CUDA (as sparsify)."),
    precision: Precision = typer.Option(TrainRequest.precision, help="float32, or bfloat16 autocast for the forward."),
    reader: Workers = typer.Option(TrainRequest.reader, help="Who decodes the chunks: threads, or processes (their own GIL, so the training loop does not wait for it; lossless local caches). auto: processes where training runs on a GPU and the machine has more than 2 cores."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Train group SAEs (or the per-layer baseline) from the cache, streaming chunks with prefetch."""
    from pipeline.grouping import layer_span
    from pipeline.train import train as run_train

    _storage(storage_option, cache, out)
    _check_folder("--out", out)
    request = TrainRequest(
        cache=cache if resume and cache is None else _resolve_cache(cache), groups=groups, baseline=baseline, metric=metric.value, tokens=tokens,
        expansion=expansion, k=k, architecture=architecture.value, batch_size=batch_size, lr=lr, out=out,
        resume=resume, device=device.value, seed=seed, dead_tokens=dead_tokens, checkpoint_every=checkpoint_every,
        tf32=tf32, precision=precision.value, l1_coefficient=l1_coefficient, given=_typed(ctx), reader=reader.value)
    result = run_train(request, console)
    if result.rank:  # under torchrun rank 0 reports for every rank
        return
    if result.trained_already:
        console.print(f"{result.run} holds this run, trained already (the same arguments): nothing to train",
                      markup=False, highlight=False)
        if not result.rows:  # a summary.json of an older gsae, without every figure of the table
            return
    table = Table(title=f"gsae train · {result.run}")
    # held-out FVU beside the L0 it was measured at (BatchTopK: its inference threshold's, not k)
    # an SAE's own steps: the run's SAEs take turns, so the bars' rates (wall time) are lower where there are several
    for column in ("SAE", "layers", "FVU train / held-out", "L0 train / held-out", "dead %", "tok/s, own steps",
                   "time, own steps"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(str(row["sae"]), layer_span(row["layers"]), f"{row['train_fvu']:.3f} / {row['held_out_fvu']:.3f}",
                      f"{row['l0']:.1f} / {row['held_out_l0']:.1f}",
                      f"{100 * row['dead_fraction']:.1f}", f"{row['tokens_per_s']:,.0f}", f"{row['seconds']:.1f} s")
    report.print(table)
    seconds = {row["sae"]: row["seconds"] for row in result.rows}
    turns = [saes for saes in result.turns if saes] or [list(seconds)]
    if len(result.rows) > 1 and len(turns) == 1:
        report.print("tok/s and time count each SAE's own steps; the SAEs take turns, so their training took about "
                     f"the sum, {sum(seconds.values()):,.1f} s (summary.json's wall_seconds splits "
                     "the last gsae train process's time)", style="dim", highlight=False)
    elif len(turns) > 1:  # torchrun: the ranks train side by side, each its SAEs in turn
        longest = max(sum(seconds.get(sae, 0.0) for sae in saes) for saes in turns)
        report.print(f"tok/s and time count each SAE's own steps; {len(turns)} ranks trained side by side, each its "
                     f"SAEs in turn, so their training took about the longest rank's sum, {longest:,.1f} s",
                     style="dim", highlight=False)
    for row in result.rows:
        if row.get("note"):
            report.print(row["note"], style="yellow", highlight=False, markup=False)
    if not result.trained_already:
        saved = "1 SAE and its" if len(result.rows) == 1 else f"{len(result.rows)} SAEs and their"
        report.print(f"saved {saved} metrics in {result.run}")


def _typed(ctx: typer.Context) -> tuple[str, ...]:
    """The options of this command that were typed on the command line (not left at their defaults).
    By the source's name: typer may carry its own copy of click, whose enum is not click's."""
    return tuple(name for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE")


@_command("eval")
def evaluate(
    run: str = typer.Option(..., help="The run directory written by gsae train."),
    tokens: int = typer.Option(EVAL_TOKENS, parser=_count, metavar="N", help="Held-out tokens per layer for reconstruction and sparsity metrics."),
    windows: int = typer.Option(EVAL_WINDOWS, help="Held-out text windows for the downstream metrics (0: skip them)."),
    context_length: Optional[int] = typer.Option(None, help="Truncate the evaluation windows to this many tokens."),
    device: Device = typer.Option(TrainRequest.device, help="Where to run."),
    cache: Optional[str] = typer.Option(None, help="Where the run's cache is now, if it moved (default: where the run recorded it)."),
    model: Optional[str] = typer.Option(None, help="Where the cache's model folder or .gguf file is now, if it moved (checked by its fingerprint; default: where the cache recorded it)."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Evaluate every layer of a run: reconstruction, sparsity, spliced CE / KL. Writes <run>/eval.json."""
    from pipeline.evaluate import evaluate_run

    _storage(storage_option, run, cache)
    _check_folder("--run", run)
    records = evaluate_run(run, tokens=tokens, windows=windows, context_length=context_length,
                           device=device.value, console=console, cache=cache, model=model)
    # two tables of at most 8 columns: 13 in one were cut to "0.…" in every cell on an 80-column terminal
    reconstruction = [("layer", "layer", "{}"), ("EV", "explained_variance", "{:.3f}"),
                      ("EV/token", "explained_variance_per_token", "{:.3f}"), ("FVU", "fvu", "{:.3f}"),
                      ("cos", "cosine_similarity", "{:.3f}"), ("L2 ratio", "l2_ratio", "{:.3f}"), ("L0", "l0", "{:.1f}"),
                      ("dead %", "dead_fraction", "{:.1%}")]
    downstream = [("layer", "layer", "{}"), ("CE clean", "ce_clean", "{:.3f}"), ("CE spliced", "ce_spliced", "{:.3f}"),
                  ("ΔCE %", "delta_ce_percent", "{:.2f}"), ("CE rec.", "ce_recovered", "{:.3f}"),
                  ("KL", "kl_divergence", "{:.4f}")]
    for title, columns in ((f"gsae eval · {run} · reconstruction and sparsity", reconstruction),
                           (f"gsae eval · {run} · downstream (the SAE spliced into the model)", downstream)):
        if not any(key in record for record in records for _, key, _ in columns[1:]):
            continue  # no metric of the table measured (--windows 0: the downstream ones)
        table = Table(title=title)
        for name, _, _ in columns:
            table.add_column(name, justify="right", no_wrap=True)
        for record in records:
            table.add_row(*[fmt.format(record[key]) if key in record else "-" for _, key, fmt in columns])
        report.print(table)
    report.print(f"wrote {run}/eval.json")


@_command("report")
def report_command(
    runs: list[str] = typer.Option(..., "--runs", help="Run directories (baseline and group runs), evaluated with gsae eval."),
    out: str = typer.Option("report", help="Folder for report.md and the plots."),
    cache_seconds: Optional[float] = typer.Option(None, help="Seconds the cache took to produce (the A of the total "
                                                  "cost), for a cache that recorded none; given, it replaces any recorded."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Put a baseline and group runs side by side: Markdown tables in the paper's shape and PNG plots."""
    from pipeline.errors import GsaeError
    from pipeline.report import build_report

    _storage(storage_option, out, *runs)
    if cache_seconds is not None and not (math.isfinite(cache_seconds) and cache_seconds > 0):
        raise GsaeError(f"--cache-seconds must be positive (got {cache_seconds})")
    _check_folder("--out", out)
    for run in runs:
        _check_folder("--runs", run)
    result = build_report(runs, out, cache_seconds)
    report.print(result.tables)
    report.print(f"wrote report.md and plots in {result.folder}")


@_command("run")
def run_all(
    cache: Optional[str] = typer.Option(None, help="The cache (default: the only one under gsae-cache/)."),
    groups: Optional[str] = typer.Option(None, help="Comma-separated G values for AMAD runs (default: G* and its neighbours)."),
    tokens: int = typer.Option(PaperRequest.tokens, parser=_count, metavar="N", help="Training tokens per SAE (1e6, 1M)."),
    expansion: float = typer.Option(PaperRequest.expansion, help="d_sae / d_model."),
    batch_size: int = typer.Option(PaperRequest.batch_size, help="Tokens per training step."),
    windows: int = typer.Option(PaperRequest.windows, help=f"Held-out windows for the downstream metrics (fewer than gsae eval's {EVAL_WINDOWS}: it evaluates many runs)."),
    layers: Optional[str] = typer.Option(None, help="Layers to group and train, e.g. 0-27 or 0,2,4 (default: all but the last)."),
    out: str = typer.Option(PaperRequest.out, help="Where the runs and the report go."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """The whole paper on one cache: group, train baseline and group runs, evaluate, report."""
    from pipeline.errors import GsaeError
    from pipeline.paper import run_paper

    _storage(storage_option, cache, out)
    try:
        counts = [int(g) for g in groups.split(",")] if groups is not None else []
    except ValueError:
        raise GsaeError(f"--groups {groups!r}: give comma-separated integers such as 3,4,5") from None
    _check_folder("--out", out)
    result = run_paper(PaperRequest(cache=_resolve_cache(cache), groups=counts, tokens=tokens, expansion=expansion,
                                    batch_size=batch_size, windows=windows, out=out, layers=layers), console)
    report.print(result.tables)
    report.print(f"wrote report.md and plots in {result.folder}")


@_command()
def export(
    run: str = typer.Option(..., help="The run directory written by gsae train."),
    format: ExportFormat = typer.Option(FORMATS[0], help="Export format."),
    out: Optional[str] = typer.Option(None, help="Where to write (default <run>/export-<format>)."),
    storage_option: list[str] = typer.Option([], help=_STORAGE_OPTION_HELP, metavar="KEY=VALUE"),
) -> None:
    """Export every layer's SAE in SAELens's or sparsify's layout (scale folded into the weights)."""
    from pipeline.export import export_run

    _storage(storage_option, run, out)
    _check_folder("--run", run)
    _check_folder("--out", out)
    folders = export_run(run, out, format.value)
    parent = folders[0].rsplit("/", 1)[0]
    names = [f.rsplit("/", 1)[-1] for f in folders]
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
    report.print(f"wrote {len(folders)} {'SAELens' if format.value == 'saelens' else 'sparsify'} folders under "
                 f"{parent}: {shown}")


def _cap_torch_threads() -> None:
    """torch's intra-op threads at most the cores this process may use, where no *_NUM_THREADS says
    otherwise: OpenMP counts the cores it may run on, not a CPU quota (`docker --cpus 4` on a 64-core host
    gave torch 64 threads sharing 4 cores' time)."""
    import torch

    from stores.chunk_files import usable_cores

    if not any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        cores = usable_cores()
        if torch.get_num_threads() > cores:
            torch.set_num_threads(cores)


def _message(exc: BaseException) -> str:
    """The one line an error prints: an incomplete cache's names the command that finishes it."""
    from stores import IncompleteCache

    if isinstance(exc, IncompleteCache):
        from pipeline.cache import incomplete_cache_message

        return incomplete_cache_message(exc)
    return str(exc)


_TERMINATED = False  # set by SIGTERM's handler in the `gsae` program (entry)
_SIGTERM_STOPS_COMMANDS = False  # set by entry: a command's SIGTERM is handled as Ctrl-C (_terminate)


def _command_signals() -> None:
    """A command's own handlers, once it has started (its imports done): Ctrl-C is a KeyboardInterrupt, which
    main() turns into one line after the command's clean-up, and so is SIGTERM in the `gsae` program (entry);
    elsewhere SIGTERM is left as it was, or set back to its default from the starting one."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _SIGTERM_STOPS_COMMANDS:
        signal.signal(signal.SIGTERM, _terminate)
    elif signal.getsignal(signal.SIGTERM) is _interrupted_while_starting:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (kill, SLURM's time limit, docker stop) stops a command as Ctrl-C does: the same clean-up (the
    writer's and the stream's processes, shared memory), and one line; before, it ended the process silently
    and the processes' shared memory was left to multiprocessing's warnings.  Once: a second SIGTERM (SLURM's and
    a wrapper's) does not cut that clean-up short; SIGKILL still ends it."""
    global _TERMINATED
    _TERMINATED = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_now(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM once the command is over: leave at once, with the signal's exit code.  Python's
    KeyboardInterrupt there landed in torch's atexit clean-up and printed a traceback after the run had been
    saved; ignoring the signals instead left a hung exit (a stuck thread) to kill -9."""
    os._exit(128 + signum)


def _interrupts_from_finalizers(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that raises again, in the main thread, a Ctrl-C (or SIGTERM) that landed in a
    finalizer: Python reports one raised in a ``__del__`` as "Exception ignored" and goes on, so the command ran
    to its end (seen once in about 45 signalled `gsae train` runs, helper-73).  Raised from a thread a moment
    later: raised in the hook, it would land in the hook and be ignored in turn."""
    import _thread

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            threading.Timer(0.01, _thread.interrupt_main).start()
            return
        previous(unraisable)

    return hook


def entry() -> None:
    """The `gsae` program: :func:`main`, with the process's signals its own.  SIGTERM stops a command as Ctrl-C
    does (not under torchrun, whose agent stops the ranks with it: one blocked in a collective would only run
    a Python handler once the collective returned); once the command is over, either ends the process at once."""
    global _SIGTERM_STOPS_COMMANDS
    main_thread = threading.current_thread() is threading.main_thread()
    _SIGTERM_STOPS_COMMANDS = main_thread and not _under_torchrun()  # from the command's start (_command_signals)
    if main_thread:
        sys.unraisablehook = _interrupts_from_finalizers(sys.unraisablehook)
    try:
        main()
    finally:
        if main_thread:
            for stream in (sys.stdout, sys.stderr):  # what the command printed is out before any exit
                with contextlib.suppress(Exception):
                    stream.flush()
            signal.signal(signal.SIGINT, _exit_now)
            signal.signal(signal.SIGTERM, _exit_now)


def _known_errors() -> tuple[type[BaseException], ...]:
    """gsae's own errors, whose message is the one line printed.  Imported only once one is raised: the store's
    and the file systems' modules (zarr, fsspec) would slow `--help` down."""
    from pipeline.errors import GsaeError
    from stores import StoreError
    from stores.remote import RemoteError

    return GsaeError, StoreError, RemoteError


def main() -> None:
    """Runs the app and turns known errors into one line and a non-zero exit."""
    from rich.markup import escape

    global _DEBUG
    _DEBUG = os.environ.get("GSAE_DEBUG", "") not in ("", "0")
    try:
        code = app(standalone_mode=False, prog_name="gsae")  # returns the code of a typer.Exit instead of raising it
        if code == 130:  # typer turns Ctrl-C into Exit(130) before it reaches the handler below
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        what = "terminated (SIGTERM)" if _TERMINATED else "interrupted"
        console.print(f"[yellow]{what}[/]: what was committed is kept (a cache's chunks, a run's last "
                      "checkpoint); re-run the same command to resume")
        sys.exit(128 + signal.SIGTERM if _TERMINATED else 130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors (a bad option value exits 2 with the usage line), then gsae's
        if isinstance(exc, _click_exceptions()):
            exc.show()
            sys.exit(exc.exit_code)
        if _DEBUG:
            raise
        if isinstance(exc, _known_errors()):  # after click's: a usage error imports no store (and no torch)
            console.print(f"[red]error:[/] {escape(_message(exc))}", highlight=False, soft_wrap=True)
            sys.exit(1)
        from stores.remote import describe_storage_error

        storage = describe_storage_error(exc)
        console.print(f"[red]error:[/] {escape(storage if storage is not None else _unexpected(exc))}",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


def _unexpected(exc: BaseException) -> str:
    """One line for an exception gsae has no message of its own for: what happened, and how to see more."""
    if any(kind.__name__ == "OutOfMemoryError" for kind in type(exc).__mro__):  # torch's, on a GPU
        return "the GPU ran out of memory (run with --debug for the traceback)"
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # the latter: torch's CPU allocator
        return "ran out of memory (run with --debug for the traceback)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = re.search(r"unexpected keyword argument '(\w+)'", lines[0] if lines else "")
    if isinstance(exc, TypeError) and refused and refused[1] in _STORAGE_KEYS:  # s3fs passes its extras on
        return (f"--storage-option {refused[1]}: the file system does not take it ({lines[0]}); see its "
                "documentation (s3fs: S3FileSystem's arguments) for the options it does")
    what = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    return f"{what} (an input gsae does not check, or a bug; run with --debug for the traceback)"


def _click_exceptions() -> tuple[type, ...]:
    """click's exception base, and typer's vendored copy of it (typer ≥ 0.17 raises its own)."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


if __name__ == "__main__":
    entry()
