"""`gsae eval`: reconstruction, sparsity and downstream (spliced cross-entropy) metrics per layer.

Definitions follow SAELens's evaluator / SAEBench's core metrics:
- explained variance = 1 − FVU, FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the evaluation tokens (pooled);
- per-token explained variance = mean over tokens of 1 − ‖x − x̂‖² / ‖x − μ‖² (SAELens's
  ``explained_variance_legacy``, the paper's EV), with μ the layer's exact mean from the store (SAELens
  centres on its evaluation batch's mean);
- MSE = mean over tokens and dimensions of (x − x̂)², in the raw activation space;
- cosine similarity = mean over tokens of cos(x, x̂); L2 ratio = mean over tokens of ‖x̂‖ / ‖x‖;
- L0 = mean active latents per token; dead fraction = latents never active over the evaluation tokens;
- CE: next-token cross-entropy on held-out windows, clean, with the block output replaced by the SAE's
  reconstruction (spliced), and replaced by zeros (zero-ablated); ΔCE % = (spliced − clean) / clean · 100;
  CE recovered = (zero − spliced) / (zero − clean); KL = mean over positions of KL(clean ‖ spliced).
The BOS position is left as it is when splicing (the SAEs were not trained on it).
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

from pipeline.block_replay import BlockReplay
from pipeline.errors import GsaeError
from pipeline.grouping import layer_span
from pipeline.models import (LoadedModel, ModelSpec, load_model, matmul_precision, pick_device,
                             resolve_model_spec)
from pipeline.progress import CountColumn, LoggedProgress, RemainingColumn
from pipeline.ranks import Ranks
from pipeline.requests import EVAL_TOKENS, EVAL_WINDOWS
from pipeline.run import EVAL, Run, cache_fingerprint, fingerprint_changes
from pipeline.sae import SparseAutoencoder
from stores import ActivationStore, probe
from stores.stream import as_tensor

_EVAL_BATCH = 4096  # rows, rounded to whole chunks (each whole local chunk then skips zarr: ActivationStore.read_into)
_READ_AHEAD_BYTES = 256 << 20  # held-out rows decoded ahead at most, besides the batch evaluated
# Fewest held-out rows per layer worth an FVU: its denominator is a sample variance, whose relative standard
# error is about sqrt(2 / (n - 1)) when one direction dominates (as in residual streams): 14% at 100 rows,
# and at 1 row it is 0 (FVU ~1e27). Sparsity (dead %) over fewer tokens says nothing either.
MIN_TOKENS = 100
PROGRESS_EVERY = 15.0  # seconds between the progress's plain lines where the console is not a terminal
_LOGITS_BYTES = 256 * 2**20  # float32 logits per forward pass of the downstream metrics (a batch of windows)


class EvalProgress(LoggedProgress):
    """The evaluation's bar: its steps done of all (a layer's reconstruction metrics, and each forward pass of
    the downstream ones), elapsed and ETA, the current layer and stage in its description. A step takes
    seconds, so no rate (it would read ``0 steps/s``); the ETA averages over every step done (rich's default,
    over the last 30 s, has none while one step takes longer). Where the console is not a terminal, a plain
    line every ``every`` seconds."""

    def __init__(self, console: Any, every: float | None = None):
        super().__init__(TextColumn("[progress.description]{task.description}"), BarColumn(), CountColumn(),
                         TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA"), RemainingColumn(),
                         console=console, transient=False, unit="steps", rate=False,
                         every=PROGRESS_EVERY if every is None else every,
                         speed_estimate_period=7 * 86400.0)


class ReconstructionTotals:
    """Running sums for the reconstruction metrics, so they can be computed a batch at a time."""

    def __init__(self) -> None:
        self.rows, self.error, self.sum, self.sum_sq = 0, 0.0, None, 0.0
        self.cosine, self.l2_ratio, self.per_token_ev = 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        """Add a batch; ``mean`` centres the per-token EV (default: this batch's mean)."""
        x64, r64 = x.double(), reconstruction.double()
        self.rows += x.shape[0]
        token_error = (x64 - r64).pow(2).sum(dim=1)
        centre = x64.mean(dim=0) if mean is None else mean.double()
        token_variance = (x64 - centre).pow(2).sum(dim=1).clamp_min(1e-30)
        self.per_token_ev += float((1 - token_error / token_variance).sum())
        self.error += float(token_error.sum())
        self.sum = x64.sum(dim=0) if self.sum is None else self.sum + x64.sum(dim=0)
        self.sum_sq += float(x64.pow(2).sum())
        self.cosine += float(F.cosine_similarity(x64, r64, dim=1).sum())
        self.l2_ratio += float((r64.norm(dim=1) / x64.norm(dim=1).clamp_min(1e-30)).sum())

    def metrics(self, d_model: int) -> dict[str, float]:
        variance = max(self.sum_sq - float(self.sum.pow(2).sum()) / self.rows, 1e-30)
        fvu = self.error / variance
        return {"fvu": fvu, "explained_variance": 1.0 - fvu, "explained_variance_per_token": self.per_token_ev / self.rows,
                "mse": self.error / (self.rows * d_model),
                "cosine_similarity": self.cosine / self.rows, "l2_ratio": self.l2_ratio / self.rows}


def reconstruction_metrics(x: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """FVU, explained variance, MSE, cosine similarity and L2 ratio of a reconstruction."""
    totals = ReconstructionTotals()
    totals.add(x, reconstruction)
    return totals.metrics(x.shape[1])


@torch.no_grad()
def layer_reconstruction(sae: SparseAutoencoder, store: ActivationStore, layer: int, scale: float, start: int,
                         stop: int, device: torch.device, pool: Executor | None = None, ahead: int = 0
                         ) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on rows [start, stop) of ``layer`` (raw activations;
    the SAE sees them times ``scale``), a batch at a time so memory stays flat in the number of rows.
    With ``pool``, up to ``ahead`` next batches are decoded on its threads while one is evaluated."""
    totals, l0_sum = ReconstructionTotals(), 0.0
    active = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    mean = torch.from_numpy(store.mean[layer]).to(device)
    batch_rows = store.chunk_tokens * max(1, round(_EVAL_BATCH / store.chunk_tokens))
    batch_bytes = batch_rows * store.d_model * np.dtype(store.layer_array(layer).dtype).itemsize
    ahead = min(ahead, max(1, _READ_AHEAD_BYTES // batch_bytes))  # bounded memory whatever the width
    for values in store.iter_rows(layer, start, stop, batch_rows, pool, ahead):
        # stored precision to the device, converted there (numpy's float16 conversion is ~3x slower here)
        x = as_tensor(values, store.dtype).to(device).float()
        codes = sae.encode(x * scale)
        totals.add(x, sae.decode(codes) / scale, mean)
        l0_sum += codes.l0() * x.shape[0]
        active |= codes.active(sae.n_latents)
    return {"tokens": totals.rows, **totals.metrics(store.d_model), "l0": l0_sum / totals.rows,
            "dead_fraction": float(1 - active.float().mean()), "alive_latents": int(active.sum())}


def token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every position, float32: what CE and KL are taken from."""
    return F.log_softmax(logits.float(), dim=-1)


#: eval.json's ``arguments`` record where CE and KL were averaged: over the positions the splice replaces, as
#: SAELens's evaluator does (it skips BOS); an eval.json without it (before 2026-11-29) also averaged the BOS
#: position in, whose logits no splice changes
DOWNSTREAM_POSITIONS = "spliced"


class DownstreamTotals:
    """Sums of the clean, spliced and zero-ablated CE and of KL(clean ‖ spliced) over the positions the splice
    replaces (``first`` on: BOS is never spliced), added a batch of windows at a time, so that memory holds
    one batch's logits (32 windows of 1,024 tokens of a 50k vocabulary are 6.4 GB of float32 logits per pass).
    CE is the NLL of the next token at those positions but the last (which has none); KL is taken at all of
    them, the last included, as SAELens does.  The clean pass's log-probabilities come in made
    (:func:`token_log_probs`, once per batch for every layer, and so may KL's weights); each logits tensor is
    log-softmaxed once, its CE the NLL of those (what ``F.cross_entropy`` computes)."""

    def __init__(self, first: int = 0) -> None:
        self.first = first
        self.ce_tokens, self.kl_tokens, self.clean, self.spliced, self.zero, self.kl = 0, 0, 0.0, 0.0, 0.0, 0.0

    def add(self, clean_log_probs: torch.Tensor, spliced_logits: torch.Tensor, zero_logits: torch.Tensor,
            input_ids: torch.Tensor, clean_probs: torch.Tensor | None = None) -> None:
        """``clean_probs``: ``clean_log_probs[:, first:].exp()``, KL's weights, if made already (once per batch)."""
        first = self.first
        targets = input_ids[:, first + 1:].unsqueeze(-1)

        def ce_sum(log_probs: torch.Tensor) -> float:
            # the NLL of the next tokens, gathered: nll_loss wanted the slice flattened, a copy of the batch's
            # log-probabilities (0.04 s per call, three per layer, for two 256-token windows of SmolLM2 here)
            return -float(log_probs[:, first:-1].gather(-1, targets).sum(dtype=torch.float64))

        log_spliced = token_log_probs(spliced_logits)
        self.clean += ce_sum(clean_log_probs)
        self.spliced += ce_sum(log_spliced)
        self.zero += ce_sum(token_log_probs(zero_logits))
        clean, spliced = clean_log_probs[:, first:], log_spliced[:, first:]
        weights = clean.exp() if clean_probs is None else clean_probs
        self.kl += float((weights * (clean - spliced)).sum())
        self.ce_tokens += targets.numel()
        self.kl_tokens += clean.shape[0] * clean.shape[1]

    def metrics(self) -> dict[str, float]:
        """Clean, spliced and zero-ablated CE, ΔCE %, CE recovered and KL(clean ‖ spliced): means per token."""
        clean, spliced, zero = (total / self.ce_tokens for total in (self.clean, self.spliced, self.zero))
        recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
        return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablated": zero,
                "delta_ce_percent": 100.0 * (spliced - clean) / clean, "ce_recovered": recovered,
                "kl_divergence": self.kl / self.kl_tokens}


def downstream_metrics(clean_logits: torch.Tensor, spliced_logits: torch.Tensor, zero_logits: torch.Tensor,
                       input_ids: torch.Tensor, first: int = 0) -> dict[str, float]:
    """Clean, spliced and zero-ablated CE, ΔCE %, CE recovered and KL(clean ‖ spliced) of whole logits, over the
    positions from ``first`` on (see :class:`DownstreamTotals`)."""
    totals = DownstreamTotals(first)
    totals.add(token_log_probs(clean_logits), spliced_logits, zero_logits, input_ids)
    return totals.metrics()


def windows_per_pass(lm: LoadedModel, context: int) -> int:
    """Windows per forward pass of the downstream metrics: about _LOGITS_BYTES of float32 logits."""
    vocab = getattr(lm.model.config, "vocab_size", None) or 50_000
    return max(1, _LOGITS_BYTES // (4 * context * int(vocab)))


def spec_from_store(store: ActivationStore, model: str | None = None) -> ModelSpec:
    """The model the cache was made with, to load as `gsae cache` did.  A hub model at the commit it resolved
    to then (its fingerprint names the revision asked for, ``main`` by default, not that commit, so it is not
    compared: the commit is the model); a folder, a .gguf file or the embedded model only while its files are
    those the cache recorded (their fingerprint).  ``model``: where such a folder or file is now, if it moved
    (`gsae eval --model`; checked by the same fingerprint)."""
    source, model_id = store.attrs.get("model_source"), store.attrs.get("model_id")
    if source == "hub":
        if model is not None:
            raise GsaeError(f"--model finds a model folder or file that moved; the cache {store.path} was made with "
                            f"the hub model {model_id}, which is found by its id (offline: from the hub's local cache, "
                            "HF_HUB_OFFLINE=1)")
        return resolve_model_spec(model_id, store.attrs.get("model_revision"))
    if model is None and source != "embedded" and not Path(model_id).exists():
        raise GsaeError(f"the model {model_id} the cache {store.path} was made with is no longer there; if it moved, "
                        "pass --model with its new place")
    spec = resolve_model_spec(model if model is not None else None if source == "embedded" else model_id)
    if spec.fingerprint != store.attrs.get("model_fingerprint"):
        raise GsaeError(f"the model {spec.model_id!r} found {'at --model' if model is not None else 'now'} "
                        f"(fingerprint {spec.fingerprint}) is not the one the cache {store.path} was made with "
                        f"({store.attrs.get('model_fingerprint')}); " +
                        ("pass --model with that model" if model is not None else "put that model back"))
    return spec


def held_out_window_count(store: ActivationStore, start_row: int) -> int:
    """How many whole windows the held-out rows from ``start_row`` on hold."""
    return whole_windows(store.n_tokens, start_row, int(store.attrs["rows_per_window"]))


def whole_windows(n_tokens: int, start_row: int, rows_per_window: int) -> int:
    """How many whole windows (the cache's, every ``rows_per_window`` rows from row 0) rows ``start_row`` to
    ``n_tokens`` hold."""
    return n_tokens // rows_per_window - -(-start_row // rows_per_window)


def check_held_out(store: ActivationStore, start_row: int, windows: int) -> None:
    """Refuse a held-out slice too short for an FVU, or without a whole window when the downstream
    metrics are asked for (``windows`` > 0), in one line."""
    held_out = store.n_tokens - start_row
    if held_out < MIN_TOKENS:
        raise GsaeError(f"the held-out slice of {store.path} holds {held_out} rows, fewer than the {MIN_TOKENS} "
                        "an FVU needs; cache more tokens")
    if windows > 0 and held_out_window_count(store, start_row) < 1:
        raise GsaeError(f"the held-out slice of {store.path} ({held_out} rows) holds no whole window of "
                        f"{int(store.attrs['rows_per_window'])} rows for the downstream metrics; cache more tokens, "
                        "or pass --windows 0")


def held_out_windows(store: ActivationStore, start_row: int, n_windows: int, context_length: int | None) -> torch.Tensor:
    """Whole windows from the held-out rows, rebuilt from the stored tokens (BOS put back in front)."""
    a = store.attrs
    rows_per_window = int(a["rows_per_window"])
    first = -(-start_row // rows_per_window)
    available = held_out_window_count(store, start_row)
    windows = []
    for w in range(first, first + min(n_windows, available)):
        tokens = store.tokens(w * rows_per_window, (w + 1) * rows_per_window).tolist()
        if a.get("prepend_bos") and not a.get("bos_stored"):
            tokens = [int(a["bos_token_id"])] + tokens
        windows.append(tokens[: context_length or len(tokens)])
    return torch.tensor(windows, dtype=torch.long)


def _splicer(sae: SparseAutoencoder, scale: float, first: int, device: torch.device, tf32: bool):
    """A block output's replacement: its positions from ``first`` on through the SAE (scaled in, unscaled out)."""
    def splice(hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        body = hidden[:, first:]
        flat = body.reshape(-1, body.shape[-1])
        with matmul_precision(device, tf32):
            out[:, first:] = (sae(flat * scale) / scale).reshape(body.shape)
        return out

    return splice


def _zero_from(first: int, hidden: torch.Tensor) -> torch.Tensor:
    """A block output's replacement: zero from position ``first`` on."""
    out = hidden.clone()
    out[:, first:] = 0
    return out


def eval_arguments(tokens: int = EVAL_TOKENS, windows: int = EVAL_WINDOWS,
                   context_length: int | None = None) -> dict[str, Any]:
    """What decides what an evaluation measures, as eval.json records it (``arguments``): the options, and
    where CE and KL were averaged (:data:`DOWNSTREAM_POSITIONS`)."""
    return {"tokens": tokens, "windows": windows, "context_length": context_length,
            "downstream_positions": DOWNSTREAM_POSITIONS}


def eval_argument_changes(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two :func:`eval_arguments`, as ``--windows 0 → 16`` (``none``: not given)."""
    def show(value: Any) -> str:
        return "none" if value is None else str(value)

    changes = [f"--{key.replace('_', '-')} {show(recorded.get(key))} → {show(value)}"
               for key, value in wanted.items() if key != "downstream_positions" and recorded.get(key, "?") != value]
    positions = [evaluation.get("downstream_positions") for evaluation in (recorded, wanted)]
    if positions[0] != positions[1] and recorded.get("windows") and wanted.get("windows"):  # both measured CE
        changes.append(f"CE and KL averaged {_POSITIONS_SHOWN.get(positions[0], positions[0])} → "
                       f"{_POSITIONS_SHOWN.get(positions[1], positions[1])}")
    return changes


_POSITIONS_SHOWN = {None: "as gsae did before 2026-11-29", DOWNSTREAM_POSITIONS: "over the spliced positions"}


def read_eval(run: Run) -> dict[str, Any] | None:
    """``<run>/eval.json`` as written (None where there is none); a damaged one is one line naming it."""
    again = f"run `gsae eval --run {run.path}` again"
    try:
        data = run.read_json(EVAL)
    except GsaeError as exc:
        raise GsaeError(f"{exc}; {again}") from None
    if data is not None and not (isinstance(data.get("records"), list) and all(
            isinstance(r, dict) and isinstance(r.get("layer"), int) for r in data["records"])):
        raise GsaeError(f"{run.url(EVAL)} is damaged (no list of per-layer records); {again}")
    return data


def check_eval_arguments(tokens: int, windows: int, context_length: int | None) -> None:
    """Refuse, before any work, arguments that cannot give meaningful metrics."""
    if tokens < MIN_TOKENS:
        raise GsaeError(f"--tokens must be at least {MIN_TOKENS} (got {tokens}): the FVU's variance over fewer "
                        "held-out rows is noise")
    if windows < 0:
        raise GsaeError(f"--windows must be 0 (skip the downstream metrics) or more (got {windows})")
    if context_length is not None and context_length < 2:
        raise GsaeError(f"--context-length must be at least 2 tokens, a token and the next one it predicts "
                        f"(got {context_length}; leave it out for whole windows)")


def evaluate_run(run: str, tokens: int = EVAL_TOKENS, windows: int = EVAL_WINDOWS, context_length: int | None = None,
                 device: str = "auto", console: Any = None, cache: str | None = None,
                 models: dict[tuple[ModelSpec, torch.device], LoadedModel] | None = None,
                 model: str | None = None) -> list[dict[str, Any]]:
    """Evaluate every layer of a run; writes ``<run>/eval.json`` and returns its records.  On CUDA the SAEs'
    float32 matmuls run in TF32 where the run trained so (``tf32`` in its config), as its held-out FVU was
    measured; the language model runs in full float32, as it ran to make the cache (:func:`matmul_precision`,
    for this call only).  ``cache``: where the run's cache is now, if it moved (checked by its fingerprint).
    ``models``: language models loaded by earlier calls, taken from it and added to it (`gsae run` evaluates
    several runs of one cache; loading the embedded GGUF model took 34 s of each evaluation's 160).  ``model``:
    where the cache's model folder or .gguf file is now, if it moved (checked by its fingerprint)."""
    with contextlib.ExitStack() as scope:
        return _evaluate_run(run, tokens, windows, context_length, device, console, scope, cache, models, model)


def _evaluate_run(run: str, tokens: int, windows: int, context_length: int | None, device: str, console: Any,
                  scope: contextlib.ExitStack, cache: str | None = None,
                  models: dict[tuple[ModelSpec, torch.device], LoadedModel] | None = None,
                  model: str | None = None) -> list[dict[str, Any]]:
    check_eval_arguments(tokens, windows, context_length)
    trained = Run.open(run, need="trained")
    config = trained.config
    if cache is None and probe(config.cache) == "absent":
        raise GsaeError(f"the cache {run} was trained on is no longer at {config.cache}; if it moved, pass "
                        "--cache with its new place")
    store = ActivationStore.open(cache or config.cache)
    differ = fingerprint_changes(config.cache_fingerprint, cache_fingerprint(store))
    if differ:
        raise GsaeError(f"the cache {cache or config.cache} is not the one {run} was trained on (there vs here: "
                        f"{'; '.join(differ)}); evaluate with that cache")
    start_row = int(config.eval_rows[0])
    held_out = store.n_tokens - start_row
    check_held_out(store, start_row, windows)
    first = 1 if store.attrs.get("prepend_bos") else 0
    if windows > 0 and context_length is not None and context_length < first + 2:
        raise GsaeError(f"--context-length must be at least {first + 2} here: the BOS in front is not spliced, "
                        f"so a window needs a spliced token and the next one it predicts (got {context_length})")
    torch_device = pick_device(device)
    scope.enter_context(matmul_precision(torch_device, tf32=False))  # the model; the SAEs' calls below: config.tf32
    saes = trained.load_saes(torch_device)
    lm = None
    if windows > 0:
        try:
            spec = spec_from_store(store, model)
        except GsaeError as exc:  # the model folder moved or changed, or the hub is out of reach
            raise GsaeError(f"{exc}, or pass --windows 0 to skip the downstream metrics") from None
        lm = (models or {}).get((spec, torch_device))
        status = console.status("loading the model for the downstream metrics ...") if console and lm is None else None
        if status:
            status.start()
        try:
            if lm is None:
                lm = load_model(spec, torch_device)
        except GsaeError as exc:
            raise GsaeError(f"{exc}; or pass --windows 0 to skip the downstream metrics") from None
        finally:
            if status:
                status.stop()
        if models is not None:
            models[(spec, torch_device)] = lm
        input_ids = held_out_windows(store, start_row, windows, context_length).to(torch_device)
    layers = [(sae, sae_config, layer) for sae, sae_config in saes for layer in sae_config["layers"]]
    batches = []
    if lm is not None:
        batches = list(input_ids.split(windows_per_pass(lm, input_ids.shape[1])))
    # one bar over the steps: each layer's reconstruction, then per batch of windows the clean forward pass and
    # two per layer (spliced, zero-ablated), minutes in all on a large model. Where there are forward passes,
    # the bar counts those alone: a reconstruction took 0.25 s beside a pass's 4-5 s (SmolLM2 on this CPU), and
    # counted alike, the quick ones done first made the ETA 30 s for a 5-minute evaluation
    passes = len(batches) * (1 + 2 * len(layers)) if lm is not None else 0
    progress = EvalProgress(console) if console is not None else None
    task = None
    if progress is not None:
        scope.enter_context(progress)
        task = progress.add_task("eval", total=passes or len(layers))

    done = [0]  # steps finished whose count the bar does not show yet

    def stage(text: str) -> None:
        """Name the step that starts now and count those finished before it, in one update: a plain line
        printed between the two would show a finished step's count beside its description."""
        if progress is not None:
            progress.update(task, advance=done[0], description=f"eval {text}" if text else "eval")
        done[0] = 0

    def step_done(counted: bool = True) -> None:
        done[0] += counted

    records, notes = [], []
    # fewer there than to evaluate: said, not left to be read from eval.json's counts. Neither "asked for"
    # (the defaults apply when nothing is asked) nor option names (under `gsae run`, --tokens means training tokens)
    if tokens > held_out:
        notes.append(f"the held-out slice holds {held_out:,} rows (fewer than the {tokens:,} to evaluate): the "
                     "reconstruction metrics use those")
    if min(tokens, held_out) < config.dead_tokens:  # training's dead % (summary.json) counts over dead_tokens
        notes.append(f"dead % here counts the latents silent over the {min(tokens, held_out):,} rows evaluated per "
                     f"layer; training calls a latent dead after {config.dead_tokens:,} tokens without firing (over all "
                     "the layers of its SAE), so this dead % can read higher than training's")
    if lm is not None and windows > len(input_ids):
        notes.append(f"the held-out slice holds {len(input_ids)} whole window{'s' if len(input_ids) > 1 else ''} "
                     f"(fewer than the {windows} to evaluate): the downstream metrics use {len(input_ids)}")
    if lm is not None and context_length is not None and context_length > input_ids.shape[1]:
        notes.append(f"the cached windows hold {input_ids.shape[1]} tokens: a context length of {context_length} "
                     "truncates nothing")
    threads = Ranks().decode_threads(store.path)  # as gsae train decodes (`gsae eval` is one process)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gsae-eval") as reader:
        for sae, sae_config in saes:
            for layer in sae_config["layers"]:
                scale = sae_config["scales"][str(layer)]
                stage(f"layer {layer} (reconstruction)")
                with matmul_precision(torch_device, config.tf32):
                    reconstruction = layer_reconstruction(sae, store, layer, scale, start_row, start_row + tokens,
                                                          torch_device, reader, threads)
                records.append({"layer": layer, "sae_layers": sae_config["layers"], **reconstruction})
                step_done(counted=not passes)
            note = threshold_note(sae, sae_config["layers"],
                                  float(np.mean([r["l0"] for r in records[-len(sae_config["layers"]):]])))
            notes += [note] if note else []
    if lm is not None:
        # batches of windows outside, layers inside: one batch's clean log-probabilities are held at a time
        # (all of them were 6.4 GB for 32 windows of 1,024 tokens of a 50k vocabulary); each layer's sums run
        # over the batches in the same order as one layer at a time would take them
        totals = [DownstreamTotals(first) for _ in layers]
        # the spliced and zero-ablated passes run from the clean pass's output of their block on, where the model
        # allows it (checked per layer before the first batch): the same logits, the blocks before not run again
        passes_from = BlockReplay(lm, [layer for _, _, layer in layers])
        shown = 0
        for ids in batches:
            span = f"windows {shown + 1}–{shown + len(ids)}" if len(ids) > 1 else f"window {shown + 1}"
            where = f", {span} of {len(input_ids)}" if len(batches) > 1 else ""
            shown += len(ids)
            stage(f"(clean forward pass{where})")
            clean = token_log_probs(passes_from.clean(ids))
            clean_probs = clean[:, first:].exp()  # KL's weights, the same for every layer
            step_done()
            for (sae, sae_config, layer), total in zip(layers, totals):
                stage(f"layer {layer} (spliced forward pass{where})")
                spliced_logits = passes_from.run(
                    layer, _splicer(sae, sae_config["scales"][str(layer)], first, torch_device, config.tf32))
                step_done()
                stage(f"layer {layer} (zero-ablated forward pass{where})")
                zero_logits = passes_from.run(layer, functools.partial(_zero_from, first))
                step_done()
                total.add(clean, spliced_logits, zero_logits, ids, clean_probs)
                del spliced_logits, zero_logits
            del clean, clean_probs
        for record, total in zip(records, totals):
            record.update(total.metrics())
            record["eval_windows"] = int(input_ids.shape[0])
        note = ce_recovered_note(records)
        notes += [note] if note else []
    if progress is not None:
        stage("")  # done: "eval", the count and the time it took
        progress.stop()  # before the notes below, which a bar drawn after them would push up
    tf32 = torch_device.type == "cuda" and config.tf32  # what matmul_precision gives: TF32 exists only on CUDA
    trained.write_eval(records, eval_arguments(tokens, windows, context_length),
                       {"device": torch_device.type, "sae_matmuls": "tf32" if tf32 else "float32",
                        "model_matmuls": "float32"})
    for note in notes if console else []:
        console.print(f"[yellow]{note}[/]")
    return records


#: zero-ablating a layer raises CE by less than this share of the clean CE: CE recovered divides by that rise
CE_RECOVERED_LEAST_RISE = 0.01


def ce_recovered_note(records: list[dict[str, Any]]) -> str | None:
    """A note naming the layers whose CE recovered means little: zeroing them raised CE by under 1% (a random or
    tiny model), so its denominator is about 0 (11.3 and −4.5 on such models, helper-73).  ΔCE % and KL hold."""
    least = CE_RECOVERED_LEAST_RISE
    weak = sorted(r["layer"] for r in records  # (not ≥: a NaN CE counts as weak too)
                  if "ce_zero_ablated" in r and not r["ce_zero_ablated"] - r["ce_clean"] >= least * r["ce_clean"])
    if not weak:
        return None
    return (f"note: CE rec. means little at layer{'s' if len(weak) > 1 else ''} {layer_span(weak, '–')}: zero-ablating "
            f"{'them' if len(weak) > 1 else 'it'} raised CE by under {CE_RECOVERED_LEAST_RISE:.0%} (as on a random or "
            "tiny model), and CE rec. divides by that rise; ΔCE % and KL do not")


def threshold_note(sae: SparseAutoencoder, layers: list[int], l0: float) -> str | None:
    """A BatchTopK SAE is evaluated (as exported) with its inference threshold; when the held-out ``l0``
    that threshold gives is far from the k it trained with, its FVU is not comparable with training's: say so."""
    if sae.architecture != "batchtopk" or sae.k / 2 <= l0 <= 2 * sae.k:
        return None
    return (f"note: the BatchTopK SAE of layers {layer_span(layers, '–')} is evaluated, as exported, "
            f"with its inference threshold ({float(sae.threshold):.4g}), which keeps {l0:.1f} latents per token "
            f"against k = {sae.k} in training: the threshold has not settled (train longer), so its held-out metrics "
            f"are those of L0 {l0:.1f}, not k")