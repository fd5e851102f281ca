"""Export a run's SAEs in SAELens's on-disk layout: one folder per layer, input scale folded in.

A gsae SAE sees s·x (s scales the layer to mean norm 1). For raw activations x:
pre = (s·x − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc and x̂ = z (W_dec/s) + b_dec/s, so each
member layer of a group SAE gets W_enc·s, W_dec/s, b_dec/s, and the same b_enc (and threshold).
"""

from __future__ import annotations

import json

import fsspec
import torch
from safetensors.torch import save

from pipeline.run import Run, join, write_atomic

FORMATS = ("saelens",)

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


def saelens_config(config: dict, layer: int, run_config: dict) -> dict:
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
        },
    }
    if architecture == "topk":
        cfg["k"] = config["k"]
        cfg["rescale_acts_by_decoder_norm"] = False  # folded decoder rows are not unit norm
    cfg["gsae"] = {"group_layers": config["layers"], "scale": config["scales"][str(layer)],
                   "architecture": config["architecture"], "tokens": config.get("tokens")}
    return cfg


def export_saelens(run: str, out: str | None = None) -> list[str]:
    """Write ``<out>/blocks.<l>.hook_resid_post/{cfg.json, sae_weights.safetensors}`` for every layer."""
    trained = Run.open(run, need="trained")
    target = out or trained.url("export-saelens")
    source = trained.config.source
    store_info = {"context_length": source.get("context_length"), "corpus": source.get("corpus"),
                  "prepend_bos": source.get("prepend_bos", True)}
    folders = []
    for sae, config in trained.load_saes():
        weights = {name: t.detach() for name, t in sae.state_dict().items()}
        for layer in config["layers"]:
            folder = join(target, f"blocks.{layer}.hook_resid_post")
            fs, root = fsspec.core.url_to_fs(folder)
            fs.makedirs(root, exist_ok=True)
            write_atomic(join(folder, "sae_weights.safetensors"), save(folded_weights(weights, config["scales"][str(layer)])))
            write_atomic(join(folder, "cfg.json"), json.dumps(saelens_config(config, layer, store_info), indent=1))
            folders.append(folder)
    return folders
