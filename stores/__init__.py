"""The activation store: format, codecs, writing and chunk-wise reading. Knows nothing of SAEs."""

from stores.activation_store import (
    FLOAT16_MAX,
    ActivationStore,
    ChunkStats,
    PendingChunk,
    StatsAccumulator,
    StoreError,
    compute_chunk_stats,
    default_chunk_tokens,
    is_local,
    list_side_files,
    probe,
    read_seconds_writing,
    read_side_file,
    remove_side_files,
    to_float32,
    write_seconds_writing,
    write_side_file,
)
from stores.codecs import STORAGE_DTYPES, activation_codecs

__all__ = [
    "FLOAT16_MAX", "STORAGE_DTYPES", "ActivationStore", "ChunkStats", "PendingChunk", "StatsAccumulator", "StoreError", "activation_codecs",
    "compute_chunk_stats", "default_chunk_tokens", "is_local", "list_side_files", "probe", "read_seconds_writing",
    "read_side_file", "remove_side_files", "to_float32",
    "write_seconds_writing", "write_side_file",
]
