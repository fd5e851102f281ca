"""Which of a cache's chunks train and which are held out for evaluation: the last ~5% of them.

Apart from the stream (torch) so that `gsae`'s options, whose defaults name this share, load without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stores.activation_store import ActivationStore

#: the share of a cache's chunks (its last ones) held out from training, for evaluation
HELD_OUT_FRACTION = 0.05


def split_chunks(store: ActivationStore, eval_fraction: float = HELD_OUT_FRACTION) -> tuple[list[int], list[int]]:
    """(training chunks, held-out chunks): the held-out slice is the last chunks of the corpus."""
    n = store.n_chunks
    if n < 2:
        raise ValueError(f"the cache has {n} chunk; training needs at least 2 (one is held out): cache more "
                         "tokens, or fewer per chunk (`gsae cache --chunk-tokens`)")
    held_out = held_out_chunks(n, eval_fraction)
    return list(range(n - held_out)), list(range(n - held_out, n))


def held_out_chunks(n_chunks: int, eval_fraction: float = HELD_OUT_FRACTION) -> int:
    """How many of a cache's last chunks training holds out: ~``eval_fraction`` of them, at least one."""
    return max(1, round(n_chunks * eval_fraction))
