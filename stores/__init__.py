"""The activation store: format, codecs, writing and chunk-wise reading. Knows nothing of SAEs.

The names below are loaded on first use (PEP 562): the chunk processes of `gsae cache` and `gsae train` import
``stores.chunk_files`` alone, and importing the whole store (torch, zarr) took them 1.8 s of start-up
instead of 0.2 s on the development machine."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "stores.activation_store": (
        "ActivationStore", "IncompleteCache", "PendingChunk", "StoreError", "default_chunk_tokens", "is_local",
        "list_side_files", "probe",
        "read_seconds_writing", "read_side_file", "remove_side_files", "to_float32", "write_seconds_writing",
        "write_side_file",
    ),
    "stores.chunk_stats": ("FLOAT16_MAX", "ChunkStats", "StatsAccumulator", "compute_chunk_stats"),
    "stores.codecs": ("STORAGE_DTYPES", "activation_codecs"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'stores' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value
