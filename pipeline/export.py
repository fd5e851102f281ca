"""Export a run's SAEs in SAELens's or sparsify's on-disk layout: one folder per layer, input scale folded in.

A gsae SAE sees s·x (s scales the layer to mean norm 1). For raw activations x:
pre = (s·x − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc and x̂ = z (W_dec/s) + b_dec/s, so each
member layer of a group SAE gets W_enc·s, W_dec/s, b_dec/s, and the same b_enc (and threshold).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import fsspec
import torch
from safetensors.torch import save

from pipeline.errors import GsaeError, write_errors
from pipeline.requests import FORMATS
from pipeline.run import Run, cache_fingerprint, fingerprint_changes, join, write_atomic
from stores import ActivationStore
from stores.messages import first_few


# gsae architecture -> SAELens inference architecture. BatchTopK is exported as SAELens exports it: a
# JumpReLU whose threshold is the running threshold kept in training, the same rule gsae evaluates with.
_SAELENS_ARCHITECTURE = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}


def folded_weights(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """SAELens tensors for raw activations of a layer with input scale ``scale``."""
    folded = {
        "W_enc": (weights["W_enc"] * scale).contiguous(),
        "W_dec": (weights["W_dec"] / scale).contiguous(),
        "b_enc": weights["b_enc"].clone(),
        "b_dec": (weights["b_dec"] / scale).contiguous(),
    }
    if "log_threshold" in weights:
        folded["threshold"] = weights["log_threshold"].exp()
    elif "threshold" in weights:  # BatchTopK: one threshold for every latent
        folded["threshold"] = weights["threshold"].expand_as(weights["b_enc"]).contiguous()
    return folded


def saelens_config(config: dict, layer: int, run_config: dict, run: dict | None = None) -> dict:
    architecture = _SAELENS_ARCHITECTURE[config["architecture"]]
    cfg = {
        "architecture": architecture,
        "d_in": config["d_in"],
        "d_sae": config["n_latents"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": config.get("model_id"),
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": run_config.get("prepend_bos", True),
            "context_size": run_config.get("context_length"),
            "dataset_path": run_config.get("corpus"),
            "sae_lens_version": "6.0.0",  # the v6 config layout; older layouts go through a legacy converter
            # not trained by SAELens (absent, SAELens fills in its own version), as its converters of others' SAEs say
            "sae_lens_training_version": None,
            # the residual stream of the model as transformers runs it: TransformerLens's default processing
            # centres the writing weights, which moves a LayerNorm model's stream (GPT-NeoX: 7% relative); with
            # this SAELens warns to load with from_pretrained_no_processing, and its evals pass it on, as for the
            # SAEs SAELens trains itself
            "model_from_pretrained_kwargs": {"center_writing_weights": False, **_revision_kwargs(run_config)},
        },
    }
    if run_config.get("model_revision"):
        cfg["metadata"]["model_revision"] = run_config["model_revision"]
    if architecture == "topk":
        cfg["k"] = config["k"]
        cfg["rescale_acts_by_decoder_norm"] = False  # folded decoder rows are not unit norm
    cfg["gsae"] = {"group_layers": config["layers"], "scale": config["scales"][str(layer)],
                   "architecture": config["architecture"], "tokens": config.get("tokens"), **(run or {})}
    # SAELens keeps only its own fields of cfg.json, but every key of its metadata (and writes them back with
    # save_model): the provenance travels with a loaded SAE there
    cfg["metadata"]["gsae"] = cfg["gsae"]
    return cfg


def _revision_kwargs(run_config: dict) -> dict:
    """``revision``, the commit of a hub model the cache ran, for ``model_from_pretrained_kwargs``:
    TransformerLens passes it on to transformers, so SAELens's evals load the weights the SAEs were trained on
    (a Pythia ``step1000`` checkpoint, or main as it was), not the hub's main branch of the day."""
    if run_config.get("model_source") == "hub" and run_config.get("model_revision"):
        return {"revision": run_config["model_revision"]}
    return {}


def _run_identity(trained: Run) -> dict[str, str]:
    """Where the run was when exported (``run``, for people) and what identifies it wherever it moves
    (``run_config_sha256``: its config.json, which a move, a copy or a symlink leaves as it is)."""
    path = str(trained.path).rstrip("/")
    config = json.dumps(trained.config.to_json(), sort_keys=True).encode()
    return {"run": path if "://" in path else os.path.abspath(path),
            "run_config_sha256": hashlib.sha256(config).hexdigest()[:16]}


def _same_export(old: Any, new: dict) -> bool:
    """Whether an existing folder's cfg.json is an earlier export of the SAE ``new`` describes: the same run
    (exports of gsae before it recorded the run: the same model, layers, architecture, tokens and scale)."""
    if not isinstance(old, dict) or not isinstance(old.get("gsae"), dict):
        return False
    before, now = old["gsae"], new["gsae"]
    if before.get("run_config_sha256") is not None:
        return before["run_config_sha256"] == now["run_config_sha256"]
    keys = ("group_layers", "scale", "architecture", "tokens")
    return (all(before.get(key) == now[key] for key in keys)
            and (old.get("metadata") or {}).get("model_name") == (new.get("metadata") or {}).get("model_name"))


def _check_target(target: str, planned: dict[str, dict], identity_file: str = "cfg.json") -> None:
    """Refuse a target that holds anything but an earlier export of these SAEs (``planned``: folder name →
    the JSON with their ``gsae`` section, a folder's ``identity_file``: SAELens's cfg.json, written last;
    sparsify's gsae.json, written first): writing into it would leave another run's SAEs beside these, as if
    one run's."""
    fs, root = fsspec.core.url_to_fs(target)
    fs.invalidate_cache(root)  # s3fs caches listings
    if not fs.isdir(root):
        return
    foreign = []
    for entry in sorted(fs.ls(root, detail=False)):
        entry = entry.rstrip("/")
        if entry == root.rstrip("/"):  # an object store's marker of the folder itself
            continue
        name = entry.rsplit("/", 1)[-1]
        if name not in planned:
            foreign.append(name)
            continue
        try:
            same = _same_export(json.loads(fs.cat_file(f"{entry}/{identity_file}")), planned[name])
        except FileNotFoundError:  # an export killed before its last file (the identity) was written; a folder
            # holding a whole SAE without it (sparsify's own cfg.json beside its weights) is not one of ours
            same = identity_file == "cfg.json" or not fs.exists(f"{entry}/cfg.json")
        except (OSError, ValueError):  # not one of ours
            same = False
        if not same:
            foreign.append(name)
    if foreign:
        if all(_this_runs_other_export(fs, root, name, planned) for name in foreign):
            raise GsaeError(f"{target} already holds this run's export in the other format ({first_few(foreign)}); "
                            "export each format into a folder of its own (--out)")
        raise GsaeError(f"{target} already holds {first_few(foreign)}, not an export of this run; export into an empty or new "
                        "folder (--out)")


def _this_runs_other_export(fs: Any, root: str, name: str, planned: dict[str, dict]) -> bool:
    """Whether the folder ``name`` under ``root`` is this run's export in the other format (SAELens's cfg.json,
    or sparsify's gsae.json, names the run): it read "not an export of this run" (helper-76)."""
    ours = next(iter(planned.values()))["gsae"].get("run_config_sha256")
    for identity_file in ("cfg.json", "gsae.json"):
        try:
            recorded = json.loads(fs.cat_file(f"{root.rstrip('/')}/{name}/{identity_file}"))
        except (OSError, ValueError):
            continue
        if ours is not None and isinstance(recorded, dict) and isinstance(recorded.get("gsae"), dict) and \
                recorded["gsae"].get("run_config_sha256") == ours:
            return True
    return False


def export_run(run: str, out: str | None = None, format: str = "saelens") -> list[str]:
    """Export every layer's SAE of ``run`` in ``format`` (:data:`FORMATS`); the folders written."""
    if format not in FORMATS:
        raise GsaeError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    return export_sparsify(run, out) if format == "sparsify" else export_saelens(run, out)


_FROM_THE_CACHE = ("blocks_path", "model_source", "model_revision")  # keys runs began to record later


def _source(trained: Run) -> dict[str, Any]:
    """The run's record of its cache (``source``); for a run from before it recorded some keys, those of the
    cache, where it is still at its place and still this run's (read once, best effort: the export does not
    need it otherwise, and a cache out of reach leaves those keys None)."""
    source = dict(trained.config.source)
    missing = [key for key in _FROM_THE_CACHE if key not in source]
    if missing:
        try:
            store = ActivationStore.open(trained.config.cache, allow_partial=True)
            same = not fingerprint_changes(trained.config.cache_fingerprint, cache_fingerprint(store))
            attrs = store.attrs if same else {}
        except Exception:  # gone, damaged, a file system not installed, no credentials: not needed to export
            attrs = {}
        source.update({key: attrs.get(key) for key in missing})
    return source


def _hookpoint_prefix(trained: Run) -> str:
    """The blocks' module path below the LM's base model (``layers``, ``h``, ``decoder.layers``): where
    sparsify names a hookpoint, as its trainer does (`--hookpoints layers.5`)."""
    blocks = _source(trained)["blocks_path"]
    if not blocks:
        raise GsaeError(f"the run does not say where its model's blocks are, and its cache is not at "
                        f"{trained.config.cache} to tell (sparsify names SAEs by them); export --format saelens")
    return blocks.split(".", 1)[1] if "." in blocks else blocks


def sparsify_config(config: dict) -> dict:
    """sparsify's SparseCoder cfg.json: its SparseCoderConfig and ``d_in``, nothing else (sparsify prints a line
    for every field it does not know, on every load)."""
    return {"activation": "topk", "expansion_factor": max(1, config["n_latents"] // config["d_in"]),
            "normalize_decoder": True,  # as gsae keeps them (see sparsify_weights)
            "num_latents": config["n_latents"], "k": config["k"], "multi_topk": False, "skip_connection": False,
            "transcode": False, "d_in": config["d_in"]}


def sparsify_weights(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """sparsify's tensors for raw activations of a layer with input scale ``scale``.  gsae's pre-activations of
    s·x are s times those of (x − b_dec/s) W_enc + b_enc/s, and a TopK keeps the same latents of either: so the
    latents are divided by s (raw units, as a SparseCoder trained on x has them) and the decoder rows stay
    unit norm, as sparsify's own are (SAELens's export multiplies W_enc by s instead)."""
    return {"encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": (weights["b_enc"] / scale).contiguous(),
            "W_dec": weights["W_dec"].contiguous(), "b_dec": (weights["b_dec"] / scale).contiguous()}


def _sparsify_identity(config: dict, layer: int, run: dict) -> dict:
    """A sparsify folder's ``gsae.json``: which run, group, layer and scale it came from."""
    return {"gsae": {"layer": layer, "group_layers": config["layers"], "scale": config["scales"][str(layer)],
                     "architecture": config["architecture"], "tokens": config.get("tokens"),
                     "model_name": config.get("model_id"), **run}}


def _write_layers(target: str, saes: list, name_of: Callable[[int], str],
                  files_of: Callable[[dict, dict, int, str], list[tuple[str, bytes | str]]]) -> list[str]:
    """For each SAE's member layers, the folder ``target/name_of(layer)`` with the files ``files_of(weights,
    config, layer, name)`` gives, written in that order; the folders."""
    folders = []
    for sae, config in saes:
        weights = {name: t.detach() for name, t in sae.state_dict().items()}
        for layer in config["layers"]:
            name = name_of(layer)
            folder = join(target, name)
            fs, root = fsspec.core.url_to_fs(folder)
            with write_errors(folder):  # (write_atomic says its own failures in one line)
                fs.makedirs(root, exist_ok=True)
            for file, data in files_of(weights, config, layer, name):
                write_atomic(join(folder, file), data)
            folders.append(folder)
    return folders


def export_sparsify(run: str, out: str | None = None) -> list[str]:
    """Write ``<out>/<hookpoint>/{sae.safetensors, cfg.json, gsae.json}`` for every layer, as sparsify's trainer
    saves a SparseCoder (``SparseCoder.load_from_disk`` / ``load_many(out, local=True)`` load them). TopK SAEs
    only: sparsify's coders are TopK (the top k of relu(pre), which keeps what gsae's relu of the top k keeps)."""
    trained = Run.open(run, need="trained")
    saes = trained.load_saes()
    other = sorted({config["architecture"] for _, config in saes} - {"topk"})
    if other:
        raise GsaeError(f"sparsify's SparseCoder is TopK only, and this run's SAEs are {', '.join(other)}; "
                        "export --format saelens")
    target = out or trained.url("export-sparsify")
    prefix = _hookpoint_prefix(trained)
    identity = _run_identity(trained)
    name_of = f"{prefix}.{{}}".format
    planned = {name_of(layer): _sparsify_identity(config, layer, identity)
               for _, config in saes for layer in config["layers"]}
    _check_target(target, planned, "gsae.json")
    # gsae.json first: a folder killed before it has its cfg.json is still known as this export's (a cfg.json
    # without a gsae.json is sparsify's own, and is not overwritten); cfg.json last, as sparsify loads a folder
    return _write_layers(target, saes, name_of, lambda weights, config, layer, name: [
        ("gsae.json", json.dumps(planned[name], indent=1)),
        ("sae.safetensors", save(sparsify_weights(weights, config["scales"][str(layer)]))),
        ("cfg.json", json.dumps(sparsify_config(config), indent=1))])


def export_saelens(run: str, out: str | None = None) -> list[str]:
    """Write ``<out>/blocks.<l>.hook_resid_post/{sae_weights.safetensors, cfg.json}`` for every layer."""
    trained = Run.open(run, need="trained")
    target = out or trained.url("export-saelens")
    source = _source(trained)
    saes = trained.load_saes()
    identity = _run_identity(trained)
    name_of = "blocks.{}.hook_resid_post".format
    planned = {name_of(layer): saelens_config(config, layer, source, identity)
               for _, config in saes for layer in config["layers"]}
    _check_target(target, planned)
    return _write_layers(target, saes, name_of,
                         lambda weights, config, layer, name: [
                             ("sae_weights.safetensors", save(folded_weights(weights, config["scales"][str(layer)]))),
                             ("cfg.json", json.dumps(planned[name], indent=1))])  # last: the export is whole
