"""Run checkpoints without pickle: tensors in safetensors, everything else in JSON.

``<run>/checkpoints/step-<n>/`` holds one ``sae_<i>.safetensors`` per SAE (parameters, Adam moments and
the dead-latent counters) and ``state.json``; ``<run>/checkpoints/latest`` names the newest complete one
and is replaced atomically, so a run killed while writing keeps the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _pack(sae: torch.nn.Module, optimizer: torch.optim.Optimizer, since_fired: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {f"param.{name}": p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
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
    for name, p in sae.named_parameters():
        state = {key.rsplit(".", 1)[1]: value.to(p.device) for key, value in tensors.items()
                 if key.startswith(f"adam.{name}.")}
        if state:
            optimizer.state[p] = state
    since_fired.copy_(tensors["since_fired"])


def save_checkpoint(run: Path, step: int, saes: list, optimizers: list, since_fired: list,
                    state: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; older ones beyond ``keep`` are removed."""
    root = run / "checkpoints"
    target = root / f"step-{step:09d}"
    partial = root / f".step-{step:09d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i, (sae, optimizer, fired) in enumerate(zip(saes, optimizers, since_fired)):
        save_file(_pack(sae, optimizer, fired), str(partial / f"sae_{i}.safetensors"))
    (partial / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    pointer = root / "latest.tmp"
    pointer.write_text(target.name)
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    target = run / "checkpoints" / pointer.read_text().strip()
    return target if (target / "state.json").is_file() else None


def load_checkpoint(path: Path, saes: list, optimizers: list, since_fired: list) -> dict[str, Any]:
    """Restore the SAEs, optimizers and counters in place; return the JSON state."""
    for i, (sae, optimizer, fired) in enumerate(zip(saes, optimizers, since_fired)):
        _unpack(load_file(str(path / f"sae_{i}.safetensors")), sae, optimizer, fired)
    return json.loads((path / "state.json").read_text())
