"""The downstream metrics' forward passes: logits with one block's output replaced, and a faster way to the same
logits that runs only the blocks after that one.

`gsae eval` runs, per batch of windows, one clean pass and two per layer (spliced, zero-ablated).  The blocks up
to the replaced one compute in those exactly what they computed in the clean pass, so :class:`BlockReplay` keeps
each evaluated block's clean output from that pass and, for a replaced layer, stands in for the blocks up to it
with modules that hand that output on (replaced): the model runs its embeddings, its own masks and positions,
then only the later blocks and its head.  On SmolLM2 (30 blocks; its head is worth about 6 of them) that is
about 40% less forward work per layer on average.

This works through the model's own forward, whatever its architecture, as long as its blocks pass on nothing
but their outputs.  Whether they do is checked, not assumed: before the first batch, every evaluated layer is
replayed unchanged on the first window's first tokens and must give their clean logits; a layer that does not
(or fails) has every pass run through the whole model with a hook, as it always could.  (Gemma 3n and Gemma 4
with shared keys and values fail it for the layers before the last that stores them: the later layers read
those from a dict the earlier ones fill as they run.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.models import LoadedModel, block_output

Replace = Callable[[torch.Tensor], torch.Tensor]

#: kept clean block outputs per batch of windows at most (deepest layers first: they save the most blocks)
KEPT_BYTES = 1 << 30
#: a replayed pass agrees with the whole model's when its logits differ by at most this share of their largest
#: magnitude: the same kernels on the same inputs give the same bits, and a block that depends on something
#: other than its input (a state the blocks share, a step between blocks) moves logits by whole units
AGREE = 1e-5
#: tokens of the first window the check runs on
CHECK_TOKENS = 32


def with_output(output: Any, hidden: torch.Tensor) -> Any:
    """A block's output (a tensor, or a tuple or list that starts with one) with its hidden state replaced."""
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def run_with_block_output(lm: LoadedModel, input_ids: torch.Tensor, layer: int, replace: Replace | None) -> torch.Tensor:
    """Logits of the whole model with block ``layer``'s output passed through ``replace`` (None: untouched)."""
    handle = None
    if replace is not None:
        def hook(module: Any, inputs: Any, output: Any):
            return with_output(output, replace(block_output(output)))
        handle = lm.blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.model(input_ids=input_ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()


class _StandIn(nn.Module):
    """Takes a block's place for one pass: returns the kept output, whatever it is called with.  Attributes the
    model's loop reads from its blocks (``attention_type``, ``layer_idx``, ...) come from the block it replaces,
    which is not registered as a submodule (its parameters stay where they are)."""

    def __init__(self, block: nn.Module, output: Callable[[], Any]):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_output", output)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class BlockReplay:
    """The clean pass of a batch of windows, and passes with one evaluated block's output replaced, which run from
    the clean output of that block on where the model allows it (see the module's docstring)."""

    def __init__(self, lm: LoadedModel, layers: Iterable[int], kept_bytes: int | None = None):
        self.lm = lm
        self.layers = sorted(set(layers), reverse=True)  # deepest first: each saves the most blocks
        self.kept_bytes = KEPT_BYTES if kept_bytes is None else kept_bytes
        self.replayable: set[int] | None = None  # the layers that passed the check; None until checked
        self._kept: dict[int, tuple[Any, torch.Tensor]] = {}  # layer: (its clean output, that hidden state cloned)
        self.input_ids: torch.Tensor | None = None

    def clean(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The clean logits of ``input_ids``; keeps the evaluated blocks' outputs for :meth:`run` (the first time,
        after checking that replaying them gives the clean logits)."""
        keep = self._layers_to_keep(input_ids)
        if self.replayable is None and keep:
            # every layer (a later, shorter batch may keep more), on the first window's first CHECK_TOKENS: the
            # check's passes then cost little beside the batch's (on the whole first batch they added half the
            # evaluation of a single-batch run)
            self.replayable = self._check(input_ids[:1, :CHECK_TOKENS])
        logits, self._kept = self._recorded(input_ids, [layer for layer in keep if layer in (self.replayable or ())])
        return logits

    def run(self, layer: int, replace: Replace) -> torch.Tensor:
        """Logits of the current batch with block ``layer``'s output passed through ``replace``."""
        assert self.input_ids is not None, "clean() first"
        if layer not in self._kept:
            return run_with_block_output(self.lm, self.input_ids, layer, replace)
        return self._replayed(layer, replace)

    def _layers_to_keep(self, input_ids: torch.Tensor) -> list[int]:
        dtype = next(self.lm.model.parameters()).dtype
        each = input_ids.numel() * self.lm.d_model * dtype.itemsize
        return self.layers[: max(0, self.kept_bytes // max(1, each))]

    def _replayed(self, layer: int, replace: Replace | None) -> torch.Tensor:
        output, hidden = self._kept[layer]

        def replaced() -> Any:  # each pass gets a hidden state of its own: the kept one stays clean
            return with_output(output, replace(hidden.clone()) if replace is not None else hidden.clone())

        with self._standing_in(layer, replaced, lambda: output):
            return run_with_block_output(self.lm, self.input_ids, layer, None)

    @contextlib.contextmanager
    def _standing_in(self, layer: int, replaced: Callable[[], Any], ignored: Callable[[], Any]) -> Iterator[None]:
        """Blocks 0..``layer`` replaced by stand-ins: ``layer``'s hands on ``replaced()``, the ones before it
        ``ignored()`` (what they return goes only to the next stand-in, which ignores it)."""
        blocks = self.lm.blocks
        originals = [blocks[i] for i in range(layer + 1)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = _StandIn(block, replaced if i == layer else ignored)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def _recorded(self, input_ids: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, dict[int, tuple[Any, torch.Tensor]]]:
        """The clean logits of ``input_ids``, and the outputs of blocks ``keep`` (the batch :meth:`run` replaces in)."""
        kept: dict[int, tuple[Any, torch.Tensor]] = {}

        def keeper(layer: int):
            def hook(module: Any, inputs: Any, output: Any) -> None:
                kept[layer] = (output, block_output(output).clone())  # a copy: a later block may change it in place
            return hook

        self.input_ids, self._kept = input_ids, {}
        handles = [self.lm.blocks[layer].register_forward_hook(keeper(layer)) for layer in keep]
        try:
            return run_with_block_output(self.lm, input_ids, 0, None), kept
        finally:
            for handle in handles:
                handle.remove()

    def _check(self, input_ids: torch.Tensor) -> set[int]:
        """The evaluated layers that, replayed unchanged on ``input_ids``, give the clean logits."""
        clean, self._kept = self._recorded(input_ids, self.layers)
        scale = max(1.0, float(clean.abs().max()))
        agree = set()
        try:
            for layer in self.layers:
                try:
                    replayed = self._replayed(layer, None)
                except Exception:  # a model whose loop needs more from its blocks than their outputs
                    continue
                if replayed.shape == clean.shape and float((replayed - clean).abs().max()) <= AGREE * scale:
                    agree.add(layer)
            return agree
        finally:
            self._kept = {}
