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

Every file is written to a temporary name and renamed into place, so a run killed at any moment (kill -9
included) holds either the old or the new version of each file, never half of one.  The state is read
from which files exist: ``planned`` (config only), ``training`` (a checkpoint), ``trained`` (every SAE
file and the summary), ``evaluated`` (eval.json as well).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import GsaeError
from pipeline.sae import SparseAutoencoder, load_sae, save_sae
from stores import ActivationStore

RUN_FORMAT = 1
STATES = ("planned", "training", "trained", "evaluated")
CONFIG, METRICS, SUMMARY, EVAL, CHECKPOINTS = "config.json", "metrics.jsonl", "summary.json", "eval.json", "checkpoints"


@dataclass
class RunConfig:
    """Everything a run needs to train, resume, evaluate and be reported, typed."""

    label: str  # "baseline", "amad-g7", ...
    cache: str
    cache_fingerprint: dict[str, Any]
    source: dict[str, Any]  # model_id, context_length, prepend_bos, corpus of the cache
    groups: list[list[int]]
    scales: dict[int, float]  # input scale of each layer (1 / its mean norm)
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
        missing = names - set(data) - {"arguments", "gsae_version", "format"}
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
    """What identifies the cache a run trains on: a resume or an evaluation must find the same one."""
    a = store.attrs
    return {"model_id": a.get("model_id"), "model_fingerprint": a.get("model_fingerprint"),
            "corpus_fingerprint": a.get("corpus", {}).get("fingerprint"), "tokens": store.n_tokens,
            "n_layers": store.n_layers, "d_model": store.d_model, "dtype": store.dtype}


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that a kill leaves either the old one or the new one, never half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)


class Run:
    """One run directory, opened or created; see the module docstring for its files."""

    def __init__(self, path: Path, config: RunConfig):
        self.path, self.config = Path(path), config

    # ------------------------------------------------------------------ opening
    @staticmethod
    def read_config(path: str | Path) -> RunConfig | None:
        """The run's config, or None where there is no config.json (it is written atomically: never half)."""
        config_path = Path(path) / CONFIG
        try:
            raw = config_path.read_text()
        except FileNotFoundError:
            return None
        try:
            return RunConfig.from_json(json.loads(raw), str(config_path))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise GsaeError(f"{config_path} is not a gsae run config ({type(exc).__name__}: {exc})") from None

    @classmethod
    def create(cls, path: str | Path, config: RunConfig) -> "Run":
        run = cls(Path(path), config)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config()
        return run

    @classmethod
    def open(cls, path: str | Path, need: str = "planned") -> "Run":
        """An existing run in at least state ``need``; otherwise one line saying what is missing."""
        config = cls.read_config(path)
        if config is None:
            raise GsaeError(f"{path} is not a gsae run (no {CONFIG}); `gsae train --out {path}` makes one")
        run = cls(Path(path), config)
        if STATES.index(run.state) < STATES.index(need):
            hint = {"trained": f"finish `gsae train --out {path}` first",
                    "evaluated": f"run `gsae eval --run {path}` first"}.get(need, "")
            raise GsaeError(f"{path} is {run.state}, not {need}: {hint}".rstrip(": "))
        return run

    def write_config(self) -> None:
        write_atomic(self.path / CONFIG, json.dumps(self.config.to_json(), indent=1))

    @property
    def state(self) -> str:
        if self.summary is not None and all(self.sae_paths(i)[1].is_file() for i in range(len(self.config.groups))):
            return "evaluated" if (self.path / EVAL).is_file() else "trained"
        return "training" if self.latest_checkpoint() is not None else "planned"

    # ------------------------------------------------------------------ metrics
    def open_metrics(self, after_step: int) -> TextIO:
        """The metrics log opened for appending, holding only records up to ``after_step`` (0: empty).
        A record torn by a kill mid-line is dropped with the records after the checkpoint."""
        path = self.path / METRICS
        kept = [record for record in self.metrics() if record["step"] <= after_step] if after_step else []
        write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
        return path.open("a")

    def metrics(self) -> list[dict[str, Any]]:
        records = []
        try:
            lines = (self.path / METRICS).read_text().splitlines()
        except FileNotFoundError:
            return records
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill; nothing after it was written whole
        return records

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, saes: list, optimizers: list, since_fired: list,
                        state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` under a fresh name, point ``latest`` at it, then remove the others.

        The directory ``latest`` names is never touched before ``latest`` names the new one, so a kill at
        any moment leaves one complete checkpoint (re-saving the same step gets a new name)."""
        root = self.path / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        name, n = f"step-{step:09d}", 1
        while (root / name).exists():
            name, n = f"step-{step:09d}.{n}", n + 1
        partial = root / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for i, (sae, optimizer, fired) in enumerate(zip(saes, optimizers, since_fired)):
            save_file(_pack(sae, optimizer, fired), str(partial / f"sae_{i}.safetensors"))
        (partial / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        partial.rename(root / name)
        write_atomic(root / "latest", name)
        for old in root.iterdir():
            if old.name in (name, "latest"):
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        return root / name

    def latest_checkpoint(self) -> Path | None:
        pointer = self.path / CHECKPOINTS / "latest"
        if not pointer.is_file():
            return None
        target = self.path / CHECKPOINTS / pointer.read_text().strip()
        return target if (target / "state.json").is_file() else None

    @staticmethod
    def load_checkpoint(path: Path, saes: list, optimizers: list, since_fired: list) -> dict[str, Any]:
        """Restore the SAEs, optimizers and counters in place; return the JSON state."""
        for i, (sae, optimizer, fired) in enumerate(zip(saes, optimizers, since_fired)):
            _unpack(load_file(str(path / f"sae_{i}.safetensors")), sae, optimizer, fired)
        return json.loads((path / "state.json").read_text())

    # ------------------------------------------------------------------ SAE files
    def sae_paths(self, i: int) -> tuple[Path, Path]:
        """(weights, config) of SAE ``i``."""
        return self.path / f"sae_{i}.safetensors", self.path / f"sae_{i}.json"

    def save_sae(self, i: int, sae: SparseAutoencoder, extra: dict[str, Any]) -> None:
        """Save SAE ``i``: the weights first, its JSON (which marks it present) last, each atomically."""
        weights, config = self.sae_paths(i)
        partial_weights, partial_config = (p.with_name(f".{p.name}.partial") for p in (weights, config))
        save_sae(sae, str(partial_weights), str(partial_config), extra)
        os.replace(partial_weights, weights)
        os.replace(partial_config, config)

    def load_saes(self, device: torch.device | str = "cpu") -> list[tuple[SparseAutoencoder, dict[str, Any]]]:
        """Every trained SAE with its config, in evaluation mode."""
        loaded = []
        for i in range(len(self.config.groups)):
            weights, config = self.sae_paths(i)
            sae, sae_config = load_sae(str(weights), str(config))
            loaded.append((sae.to(device).eval(), sae_config))
        return loaded

    # ------------------------------------------------------------------ summary and evaluation
    @property
    def summary(self) -> dict[str, Any] | None:
        return _read_json(self.path / SUMMARY)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / SUMMARY, json.dumps(summary, indent=1))

    @property
    def eval_records(self) -> list[dict[str, Any]] | None:
        data = _read_json(self.path / EVAL)
        return data["records"] if data is not None else None

    def write_eval(self, records: list[dict[str, Any]]) -> None:
        write_atomic(self.path / EVAL, json.dumps({"run": str(self.path), "records": records}, indent=1))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _pack(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, since_fired: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    tensors.update({f"buffer.{name}": b.detach().cpu().contiguous() for name, b in sae.named_buffers()})
    names = {id(p): name for name, p in sae.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"adam.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu().contiguous()
    return tensors


def _unpack(tensors: dict[str, torch.Tensor], sae: torch.nn.Module, optimizer: torch.optim.Optimizer,
            since_fired: torch.Tensor) -> None:
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(tensors[f"param.{name}"])
        for name, b in sae.named_buffers():
            b.copy_(tensors[f"buffer.{name}"])
    for name, p in sae.named_parameters():
        state = {key.rsplit(".", 1)[1]: value.to(p.device) for key, value in tensors.items()
                 if key.startswith(f"adam.{name}.")}
        if state:
            optimizer.state[p] = state
    since_fired.copy_(tensors["since_fired"])
