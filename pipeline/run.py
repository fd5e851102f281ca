"""A training run directory: the stage-two twin of :class:`stores.ActivationStore`.

One module owns the layout (docs/run-format.md); train, evaluate, export, report and `gsae run` read and
write runs only through :class:`Run`:

    <run>/config.json             RunConfig: what was asked, what was planned (format RUN_FORMAT)
    <run>/metrics.jsonl           training log, one JSON record per SAE per log step
    <run>/checkpoints/<name>/     sae_<i>.safetensors (weights, buffers, Adam moments, dead counters)
                                  + state.json (step, stream positions, timings)
    <run>/checkpoints/latest      the name of the newest complete checkpoint
    <run>/sae_<i>.safetensors     the trained SAE i (W_enc [d, M], W_dec [M, d], b_enc, b_dec, ...)
    <run>/sae_<i>.json            its config: architecture, shape, k, layers, scales, hook names
    <run>/summary.json            held-out FVU per layer, L0, dead %, training seconds
    <run>/eval.json               `gsae eval`'s records
    <run>/.lock                   held (flock) by the process training a local run: no second one at once

A run lives in a folder or at an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).  Every file is
written whole: on a local disk to a temporary name and renamed into place, on object storage as one PUT
(atomic there), so a run killed at any moment (kill -9 included) holds either the old or the new version
of each file, never half of one.  The state is read
from which files exist: ``planned`` (config only), ``training`` (a checkpoint), ``trained`` (every SAE
file and the summary), ``evaluated`` (eval.json as well).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, TextIO

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import save

from pipeline.errors import GsaeError, write_errors
from pipeline.requests import L1_COEFFICIENT
from pipeline.sae import SparseAutoencoder, read_tensors, sae_files, sae_from_files
from stores import ActivationStore
from stores.messages import first_few, first_line
from stores.locks import exclusive
from stores.remote import is_temporary, join, write_whole

RUN_FORMAT = 1
STATES = ("planned", "training", "trained", "evaluated")
CONFIG, METRICS, SUMMARY, EVAL, CHECKPOINTS = "config.json", "metrics.jsonl", "summary.json", "eval.json", "checkpoints"
LOCK = ".lock"  # see Run.training_lock


@dataclass
class RunConfig:
    """Everything a run needs to train, resume, evaluate and be reported, typed."""

    label: str  # "baseline", "amad-g7", ...
    cache: str
    cache_fingerprint: dict[str, Any]
    source: dict[str, Any]  # model_id, context_length, prepend_bos, corpus, blocks_path, model_source, model_revision of the cache
    groups: list[list[int]]
    scales: dict[int, float]  # input scale of each layer (1 / its mean norm over the training rows)
    metric: str | None  # the grouping's metric; None for the per-layer baseline
    grouping: dict[str, Any] | None  # snapshot at planning: file, n_groups, amad, seconds, arguments
    d_in: int
    n_latents: int
    k: int
    architecture: str
    lr: float
    steps: int
    batch_size: int
    dead_tokens: int
    seed: int
    window_chunks: int
    checkpoint_every: int
    log_every: int
    device: str
    tf32: bool
    precision: str
    train_chunks: list[int]
    eval_chunks: list[int]
    eval_rows: list[int]  # [first held-out row, rows in the cache]
    arguments: dict[str, Any] = field(default_factory=dict)  # the command's arguments, to know "the same command"
    l1_coefficient: float = L1_COEFFICIENT  # ReLU's L1 / JumpReLU's L0 weight (runs before it: the default)
    gsae_version: str = ""
    format: int = RUN_FORMAT

    @property
    def tokens_per_sae(self) -> int:
        return self.steps * self.batch_size

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scales"] = {str(layer): scale for layer, scale in self.scales.items()}  # JSON keys are strings
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "RunConfig":
        """Today's format, or the layout gsae wrote before run formats (a nested ``request``)."""
        if "format" not in data and "request" in data:
            data = _from_unversioned(data)
        if data.get("format") != RUN_FORMAT:
            raise GsaeError(f"{where} was written by another gsae (run format {data.get('format')}, this one reads "
                            f"{RUN_FORMAT}); use that version or train it again")
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"arguments", "l1_coefficient", "gsae_version", "format"}
        if missing:
            raise GsaeError(f"{where} is not a complete gsae run config (missing {', '.join(sorted(missing))})")
        values = {key: value for key, value in data.items() if key in names}
        values["scales"] = {int(layer): float(scale) for layer, scale in values["scales"].items()}
        return cls(**values)


def _from_unversioned(old: dict[str, Any]) -> dict[str, Any]:
    """Map the config.json of gsae before run formats (plan fields plus a nested request) onto format 1."""
    request = old["request"]
    grouping = None
    if old.get("grouping"):
        grouping = {"file": old["grouping"], "n_groups": len(old["groups"]), "amad": None, "seconds": None,
                    "arguments": None}
    return {
        **{key: old[key] for key in ("label", "cache", "cache_fingerprint", "source", "groups", "scales", "d_in",
                                     "n_latents", "k", "lr", "steps", "dead_tokens", "train_chunks", "eval_chunks",
                                     "eval_rows") if key in old},
        "metric": request.get("metric") if old.get("grouping") else None, "grouping": grouping,
        "architecture": request["architecture"], "batch_size": request["batch_size"], "seed": request["seed"],
        "window_chunks": request.get("window_chunks", 8), "checkpoint_every": request["checkpoint_every"],
        "log_every": request.get("log_every", 10), "device": request.get("device", "auto"),
        "tf32": request.get("tf32", True), "precision": request.get("precision", "float32"),
        "arguments": {k: v for k, v in request.items() if k != "resume"},
        "gsae_version": old.get("gsae_version", ""), "format": RUN_FORMAT,
    }


def cache_fingerprint(store: ActivationStore) -> dict[str, Any]:
    """What identifies the cache a run trains on: a resume or an evaluation must find the same one.  Besides
    the model, the text and the shape, every setting that changes the rows (windows, BOS, lossy bits) or
    which of them are held out (the chunking)."""
    a = store.attrs
    codec = a.get("codec") or {}
    return {"model_id": a.get("model_id"), "model_fingerprint": a.get("model_fingerprint"),
            "corpus_fingerprint": a.get("corpus", {}).get("fingerprint"), "tokens": store.n_tokens,
            "n_layers": store.n_layers, "d_model": store.d_model, "dtype": store.dtype,
            "context_length": a.get("context_length"), "prepend_bos": a.get("prepend_bos"),
            "bos_stored": a.get("bos_stored"), "chunk_tokens": store.chunk_tokens,
            "compression": codec.get("compression"), "keep_bits": codec.get("keep_bits")}


def fingerprint_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How two caches' fingerprints differ ("context length 128 vs 64"), over the settings both record: a
    run of an older gsae recorded fewer, and those it did not record are not held against it."""
    return [f"{key.replace('_', ' ')} {before[key]} vs {after[key]}" for key in before
            if key in after and before[key] != after[key]]


def write_atomic(url: str | Path, data: bytes | str) -> None:
    """:func:`stores.remote.write_whole` (never half a file), with a failure as one line."""
    with write_errors(str(url)):
        write_whole(str(url), data)


class Run:
    """One run directory (a folder or an fsspec URL), opened or created; see the module docstring."""

    def __init__(self, path: str | Path, config: RunConfig):
        self.path, self.config = str(path), config
        self.fs, self._root = fsspec.core.url_to_fs(self.path)
        self._local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ files
    def url(self, *parts: str) -> str:
        return join(self.path, *parts)

    def _read(self, *parts: str) -> bytes | None:
        try:
            return self.fs.cat_file(join(self._root, *parts))
        except FileNotFoundError:
            return None

    def _exists(self, *parts: str) -> bool:
        return self.fs.exists(join(self._root, *parts))

    def _write(self, data: bytes | str, *parts: str) -> None:
        with write_errors(self.url(*parts)):
            self.fs.makedirs(join(self._root, *parts[:-1]), exist_ok=True)
        write_atomic(self.url(*parts), data)

    def read_json(self, name: str) -> dict[str, Any] | None:
        """``<run>/<name>`` parsed (None where it is absent); one that is not a JSON object is a
        :class:`GsaeError` naming it."""
        try:
            raw = self._read(name)
        except NotADirectoryError:  # the run "folder" is a file
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError included
            raise GsaeError(f"{self.url(name)} is damaged ({first_line(exc, 80)})") from None
        return data

    # ------------------------------------------------------------------ opening
    @staticmethod
    def read_config(path: str | Path) -> RunConfig | None:
        """The run's config, or None where there is none (it is written whole: never half)."""
        fs, root = fsspec.core.url_to_fs(str(path))
        try:
            raw = fs.cat_file(join(root, CONFIG))
        except (FileNotFoundError, NotADirectoryError):
            return None
        where = join(str(path), CONFIG)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return RunConfig.from_json(data, where)
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
            raise GsaeError(f"{where} is not a gsae run config ({type(exc).__name__}: {exc})") from None

    @classmethod
    def create(cls, path: str | Path, config: RunConfig) -> "Run":
        run = cls(path, config)
        with write_errors(str(path)):
            run.fs.makedirs(run._root, exist_ok=True)
        run.write_config()
        return run

    @classmethod
    def open(cls, path: str | Path, need: str = "planned") -> "Run":
        """An existing run in at least state ``need``; otherwise one line saying what is missing."""
        config = cls.read_config(path)
        if config is None and is_cache(path):
            raise GsaeError(f"{path} is a gsae cache, not a run; pass the folder `gsae train --out` wrote")
        if config is None and "://" not in str(path) and not Path(path).exists():
            raise GsaeError(f"{path} does not exist: give a run's folder (the --out of `gsae train`)")
        if config is None:
            raise GsaeError(f"{path} is not a gsae run (no {CONFIG}); `gsae train --out {path}` makes one")
        run = cls(path, config)
        if STATES.index(run.state) < STATES.index(need):
            hint = {"trained": f"finish it first with `gsae train --out {path} --resume`",
                    "evaluated": f"run `gsae eval --run {path}` first"}.get(need, "")
            raise GsaeError(f"{path} is {run.state}, not {need}: {hint}".rstrip(": "))
        return run

    def write_config(self) -> None:
        self._write(json.dumps(self.config.to_json(), indent=1), CONFIG)

    @contextlib.contextmanager
    def training_lock(self) -> Iterator[None]:
        """Hold the run's lock while training it: a second `gsae train` on the same local run stops in one
        line instead of writing beside the first (it died on a checkpoint file the first had replaced).
        Runs on object storage take no lock."""
        if not isinstance(self.fs, LocalFileSystem):
            yield
            return
        with exclusive(os.path.join(self._root, LOCK), GsaeError(f"another gsae process is training {self.path} now; "
                                                                  "wait for it, or pass --out for a new run")):
            yield

    @property
    def state(self) -> str:
        if self.summary is not None:  # written after every SAE (one lost later is named where it is loaded); damaged: one line
            return "evaluated" if self._exists(EVAL) else "trained"
        return "training" if self.latest_checkpoint() is not None else "planned"

    # ------------------------------------------------------------------ metrics
    def open_metrics(self, after_step: int) -> TextIO:
        """The metrics log opened for appending, holding only records up to ``after_step`` (0: empty).
        A record torn by a kill mid-line is dropped with the records after the checkpoint.  On object
        storage (no appends) the log is rewritten whole at every ``flush()``: before each checkpoint."""
        kept = [record for record in self.metrics() if record["step"] <= after_step] if after_step else []
        text = "".join(json.dumps(record) + "\n" for record in kept)
        self._write(text, METRICS)
        if self._local:
            return open(join(self._root, METRICS), "a")
        return _RewrittenLog(self.url(METRICS), text)

    def metrics(self) -> list[dict[str, Any]]:
        records = []
        raw = self._read(METRICS)
        for line in (raw or b"").decode().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill; nothing after it was written whole
        return records

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, packed: dict[int, dict[str, torch.Tensor]], state: dict[str, Any]) -> str:
        """Write checkpoint ``step`` (``packed``: each SAE's :func:`pack_training_state`) under a fresh
        name, point ``latest`` at it, then remove the others.

        The checkpoint ``latest`` names is never touched before ``latest`` names the new one, so a kill at
        any moment leaves one complete checkpoint (re-saving the same step gets a new name).  Locally
        the new one is written into a hidden folder and renamed; on object storage its files are PUT
        under the new name, which nothing names until ``latest`` is written last."""
        with write_errors(self.url(CHECKPOINTS)):
            return self._save_checkpoint(step, packed, state)

    def _save_checkpoint(self, step: int, packed: dict[int, dict[str, torch.Tensor]], state: dict[str, Any]) -> str:
        root = join(self._root, CHECKPOINTS)
        self.fs.makedirs(root, exist_ok=True)
        existing = set(self._listdir(CHECKPOINTS))
        name, n = f"step-{step:09d}", 1
        while name in existing:
            name, n = f"step-{step:09d}.{n}", n + 1
        folder = join(root, f".{name}.partial" if self._local else name)
        if self._local and self.fs.exists(folder):  # left by a kill while it was written
            self.fs.rm(folder, recursive=True)
        self.fs.makedirs(folder, exist_ok=True)
        for i, tensors in sorted(packed.items()):
            self.fs.pipe_file(join(folder, f"sae_{i}.safetensors"), save(tensors))
        self.fs.pipe_file(join(folder, "state.json"), json.dumps({**state, "step": step}, indent=1).encode())
        if self._local:
            os.rename(folder, join(root, name))
        self._write(name, CHECKPOINTS, "latest")
        for old in set(self._listdir(CHECKPOINTS)) - {name, "latest"}:
            self.fs.rm(join(root, old), recursive=True)
        return self.url(CHECKPOINTS, name)

    def remove_checkpoints(self) -> None:
        """Remove the checkpoints of a finished run: its SAE files hold the weights, and a checkpoint (the
        Adam moments too, mid-run) would double the run's size.  ``latest`` goes first, so a kill midway
        leaves no pointer to a removed checkpoint."""
        with write_errors(self.url(CHECKPOINTS)):
            root = join(self._root, CHECKPOINTS)
            if self._exists(CHECKPOINTS, "latest"):
                self.fs.rm(join(root, "latest"))
            if self.fs.exists(root):
                self.fs.rm(root, recursive=True)

    def _listdir(self, *parts: str) -> list[str]:
        try:
            return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(join(self._root, *parts), detail=False)]
        except FileNotFoundError:
            return []

    def has_checkpoints(self) -> bool:
        """Whether ``checkpoints/`` holds anything (a finished run's are removed; a kill may leave them)."""
        return bool(self._listdir(CHECKPOINTS))

    def latest_checkpoint(self) -> str | None:
        pointer = self._read(CHECKPOINTS, "latest")
        if pointer is None:
            return None
        name = pointer.decode(errors="replace").strip()
        if not (name and "/" not in name and self._exists(CHECKPOINTS, name, "state.json")):
            # the pointer is written after its checkpoint and before the older one goes: this is damage
            raise GsaeError(f"{join(self.path, CHECKPOINTS, 'latest')} names no complete checkpoint ({name[:40]!r}); "
                            "the run cannot resume: train again into another --out")
        return self.url(CHECKPOINTS, name)

    @staticmethod
    def load_checkpoint(url: str, targets: dict[int, tuple[Any, Any, torch.Tensor]]) -> dict[str, Any]:
        """Restore SAE i, its optimizer and its counters in place for each ``i: (sae, optimizer,
        since_fired)`` of ``targets`` (a rank loads only its own); return the JSON state."""
        fs, root = fsspec.core.url_to_fs(url)
        advice = "the run cannot resume from it: train again into another --out"
        try:
            for i, (sae, optimizer, fired) in targets.items():
                name = join(url, f"sae_{i}.safetensors")
                tensors = read_tensors(fs.cat_file(join(root, f"sae_{i}.safetensors")), f"checkpoint file {name}")
                try:
                    unpack_training_state(tensors, sae, optimizer, fired)
                except (KeyError, RuntimeError) as exc:  # a tensor missing, or of another shape
                    raise GsaeError(f"checkpoint file {name} does not fit this run ({type(exc).__name__}: "
                                    f"{first_line(exc)})") from None
            try:
                state = json.loads(fs.cat_file(join(root, "state.json")))
                missing = [key for key in ("step", "elapsed", "streams") if key not in state]
                if missing:
                    raise ValueError(f"no {missing[0]!r}")
                return state
            except (ValueError, TypeError) as exc:  # not JSON, not an object, or a field missing
                raise GsaeError(f"checkpoint file {join(url, 'state.json')} is damaged ({exc})") from None
        except GsaeError as exc:
            raise GsaeError(f"{exc}; {advice}") from None

    # ------------------------------------------------------------------ SAE files
    def save_sae(self, i: int, sae: SparseAutoencoder, extra: dict[str, Any]) -> None:
        """Save SAE ``i``: the weights first, its JSON (which marks it present) last, each written whole."""
        weights, config = sae_files(sae, extra)
        self._write(weights, f"sae_{i}.safetensors")
        self._write(config, f"sae_{i}.json")

    def _lost_sae(self, i: int, name: str) -> GsaeError:
        # a run is trained once its summary is written, after every SAE's files: one missing was removed after
        return GsaeError(f"{join(self.path, name)} is missing: this run lost SAE {i}; train it again into a new --out")

    def check_sae_files(self) -> None:
        """Refuse, in one line, a trained run that lost an SAE's file."""
        for i in range(len(self.config.groups)):
            for name in (f"sae_{i}.safetensors", f"sae_{i}.json"):
                if not self._exists(name):
                    raise self._lost_sae(i, name)

    def load_saes(self, device: torch.device | str = "cpu") -> list[tuple[SparseAutoencoder, dict[str, Any]]]:
        """Every trained SAE with its config, in evaluation mode."""
        loaded = []
        for i in range(len(self.config.groups)):
            names = (f"sae_{i}.safetensors", f"sae_{i}.json")
            files = [self._read(name) for name in names]
            for name, data in zip(names, files):
                if data is None:
                    raise self._lost_sae(i, name)
            sae, sae_config = sae_from_files(*files, *(join(self.path, name) for name in names))
            loaded.append((sae.to(device).eval(), sae_config))
        return loaded

    # ------------------------------------------------------------------ summary and evaluation
    @property
    def summary(self) -> dict[str, Any] | None:
        return self.read_json(SUMMARY)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write(json.dumps(summary, indent=1), SUMMARY)

    def write_eval(self, records: list[dict[str, Any]], arguments: dict[str, Any],
                   measured_on: dict[str, Any] | None = None) -> None:
        """eval.json: the per-layer records, the arguments that measured them (`gsae run` compares them) and
        where and at which matmul precision they were measured."""
        data = {"run": self.path, "arguments": arguments, "measured_on": measured_on, "records": records}
        self._write(json.dumps(data, indent=1), EVAL)


def checkpoint_step(url: str) -> int:
    """The step of a checkpoint :meth:`Run.latest_checkpoint` names (``.../step-000000040`` or ``.../step-000000040.1``)."""
    return int(url.rstrip("/").rsplit("/", 1)[-1].split("-", 1)[1].split(".")[0])


def is_cache(path: str | Path) -> bool:
    """Whether ``path`` holds a gsae cache (a run must not be written into one, nor one read as a run)."""
    from stores import probe
    from stores.activation_store import DamagedCache

    try:
        return probe(str(path)) == "store"
    except DamagedCache:  # a cache still, for this question
        return True
    except Exception:  # a file, something else, or out of reach
        return False


def cache_around(path: str | Path) -> str | None:
    """The gsae cache that ``path`` is or lies inside (a local path's folders up to the root), or None:
    a run written into a cache's ``layers/`` mixed its files with the store's."""
    if is_cache(path):
        return str(path)
    if "://" in str(path):  # on object storage only the path itself is checked
        return None
    for parent in Path(path).absolute().parents:
        if (parent / "zarr.json").is_file() and is_cache(parent):  # a store's root has zarr.json
            return str(parent)
    return None


def check_new_run_folder(path: str | Path) -> None:
    """Refuse a new run's ``--out`` that already holds other files (no run's config.json): a run's files
    would be written among them, where `gsae export` and `gsae cache` refuse such a folder."""
    fs, root = fsspec.core.url_to_fs(str(path))
    try:
        if not fs.isdir(root):
            return  # absent (a file there is refused when the run is made)
        names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False))
    except OSError:
        return  # unreadable: making the run says so
    foreign = [name for name in names if name != LOCK and not is_temporary(name)]  # (a run killed making its config)
    if foreign:
        raise GsaeError(f"--out {path} already holds {first_few(foreign)}, not a gsae run; pass an empty or new folder")


class _RewrittenLog(io.StringIO):
    """A log on object storage: appended to in memory, written whole (one PUT) at every flush."""

    def __init__(self, url: str, text: str):
        super().__init__()
        self.url = url
        self.write(text)

    def flush(self) -> None:
        super().flush()
        write_atomic(self.url, self.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
        super().close()


def pack_training_state(sae: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        since_fired: torch.Tensor, moments: bool = True) -> dict[str, torch.Tensor]:
    """One SAE's weights, buffers, Adam moments and dead counters as CPU tensors (a checkpoint file).

    ``moments=False`` leaves Adam's state out: the checkpoint after the last step, from which a resume
    only writes the SAE files (the moments are twice the weights' bytes)."""
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    tensors.update({f"buffer.{name}": b.detach().cpu().contiguous() for name, b in sae.named_buffers()})
    names = {id(p): name for name, p in sae.named_parameters()}
    for group in optimizer.param_groups if moments else []:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"adam.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu().contiguous()
    return tensors


def unpack_training_state(tensors: dict[str, torch.Tensor], sae: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          since_fired: torch.Tensor) -> None:
    """Restore what :func:`pack_training_state` packed, in place."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(tensors[f"param.{name}"])
        for name, b in sae.named_buffers():
            if f"buffer.{name}" in tensors:  # checkpoints of gsae before buffers keep the initial value
                b.copy_(tensors[f"buffer.{name}"])
    # torch's Adam keeps its step count on the CPU (a CUDA one would cost a host sync per step), its fused
    # Adam on the parameters' device, as float32 (checkpoints of either load into either)
    fused = bool(optimizer.defaults.get("fused"))
    for name, p in sae.named_parameters():
        state = {key.rsplit(".", 1)[1]: (value.to(p.device, torch.float32) if fused else value.float())
                 if key.endswith(".step") else value.to(p.device)
                 for key, value in tensors.items() if key.startswith(f"adam.{name}.")}
        if state:
            optimizer.state[p] = state
    since_fired.copy_(tensors["since_fired"])
