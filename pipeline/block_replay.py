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
replayed with a replacement on the first window's first tokens and must give the whole model's logits with that
replacement; a layer that does not (or fails) has its passes run through the whole model with a hook, as they
always could.  (Gemma 3n and Gemma 4 with shared keys and values fail it from the first layer that stores them
up to the one before the last: a later layer reads them from a dict that the skipped blocks would have filled.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.models import LoadedModel, block_output

Replace = Callable[[torch.Tensor], torch.Tensor]
Kept = tuple[Any, torch.Tensor]  # a block's clean output (its hidden state the copy), and that copy

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


def run_with_block_output(lm: LoadedModel, input_ids: torch.Tensor, layer: int,
                          replace: Replace | None) -> torch.Tensor:
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
        self.train(block.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)


def _probe(hidden: torch.Tensor) -> torch.Tensor:
    """The check's replacement: one that moves every later logit."""
    return hidden.flip(-1)


class BlockReplay:
    """The clean pass of a batch of windows, and passes with one evaluated block's output replaced, which run from
    the clean output of that block on where the model allows it (see the module's docstring)."""

    def __init__(self, lm: LoadedModel, layers: Iterable[int], kept_bytes: int | None = None):
        self.lm = lm
        self.layers = sorted(set(layers), reverse=True)  # deepest first: each saves the most blocks
        self.kept_bytes = KEPT_BYTES if kept_bytes is None else kept_bytes
        self.replayable: set[int] | None = None  # the layers that passed the check; None until checked
        self._token_bytes: dict[int, float] = {}  # a kept output's bytes per token, per layer (from the check)
        self._kept: dict[int, Kept] = {}
        self.input_ids: torch.Tensor | None = None

    def clean(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The clean logits of ``input_ids``; keeps the evaluated blocks' outputs for :meth:`run` (the first time,
        after checking which layers replay exactly)."""
        self._kept = {}  # the last batch's: let go before the free memory is measured
        budget = self._budget()
        if self.replayable is None and budget > 0:
            # every layer, on the first window's first CHECK_TOKENS: the check's passes then cost little beside
            # the batch's (on the whole first batch they added half the evaluation of a single-batch run)
            self.replayable = self._check(input_ids[:1, :CHECK_TOKENS])
        keep, held = [], 0.0
        for layer in self.layers:  # only checked layers have a size, and none fits a budget of 0
            size = self._token_bytes.get(layer, 0.0) * input_ids.numel()
            if layer in (self.replayable or ()) and held + size <= budget:
                keep.append(layer)
                held += size
        logits, self._kept = self._recorded(input_ids, keep)
        return logits

    def run(self, layer: int, replace: Replace) -> torch.Tensor:
        """Logits of the current batch with block ``layer``'s output passed through ``replace``."""
        assert self.input_ids is not None, "clean() first"
        if layer not in self._kept:
            return run_with_block_output(self.lm, self.input_ids, layer, replace)
        return self._replayed(layer, replace)

    def _budget(self) -> int:
        """Bytes the kept outputs may take: KEPT_BYTES, and on a GPU at most a quarter of its free memory (the
        logits of a pass and their log-probabilities need room beside them), counting what torch's allocator holds
        unused as free: the driver's figure leaves it out."""
        device = self.lm.device
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return min(self.kept_bytes, free // 4)
        return self.kept_bytes

    def _replayed(self, layer: int, replace: Replace | None) -> torch.Tensor:
        output, hidden = self._kept[layer]
        # what the stand-ins before ``layer`` return goes only to the next stand-in, which ignores it: an empty
        # tensor, so that nothing the model does between blocks can write into the kept one
        ignored = with_output(output, torch.empty_like(hidden))

        def replaced() -> Any:  # each pass gets a hidden state of its own: the kept one stays clean
            return with_output(output, replace(hidden.clone()) if replace is not None else hidden.clone())

        with self._standing_in(layer, replaced, lambda: ignored):
            return run_with_block_output(self.lm, self.input_ids, layer, None)

    @contextlib.contextmanager
    def _standing_in(self, layer: int, replaced: Callable[[], Any], ignored: Callable[[], Any]) -> Iterator[None]:
        """Blocks 0..``layer`` replaced by stand-ins: ``layer``'s hands on ``replaced()``, the ones before it
        ``ignored()``."""
        blocks = self.lm.blocks
        originals = [blocks[i] for i in range(layer + 1)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = _StandIn(block, replaced if i == layer else ignored)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def _recorded(self, input_ids: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, dict[int, Kept]]:
        """The clean logits of ``input_ids``, and the outputs of blocks ``keep`` (the batch :meth:`run` replaces in)."""
        kept: dict[int, Kept] = {}

        def keeper(layer: int):
            def hook(module: Any, inputs: Any, output: Any) -> None:
                # a copy, as the output's only hidden state (the block's own goes with the pass): a later block
                # may change its input in place
                hidden = block_output(output).clone()
                kept[layer] = (with_output(output, hidden), hidden)
            return hook

        self.input_ids, self._kept = input_ids, {}
        handles = [self.lm.blocks[layer].register_forward_hook(keeper(layer)) for layer in keep]
        try:
            return run_with_block_output(self.lm, input_ids, 0, None), kept
        finally:
            for handle in handles:
                handle.remove()

    def _check(self, input_ids: torch.Tensor) -> set[int]:
        """The evaluated layers whose replay of a replacement (:func:`_probe`) on ``input_ids`` gives the whole
        model's logits with that replacement.  A replacement that changes the logits, not none: where the model's
        loop never calls the stand-ins (blocks it holds elsewhere too), an unchanged replay would equal the clean
        pass while every spliced one did too."""
        _, self._kept = self._recorded(input_ids, self.layers)
        agree = set()
        try:
            for layer in self.layers:
                if layer not in self._kept:  # the model's forward never ran this block
                    continue
                hidden = self._kept[layer][1]
                self._token_bytes[layer] = hidden.numel() * hidden.element_size() / input_ids.numel()
                expected = run_with_block_output(self.lm, input_ids, layer, _probe)
                try:
                    replayed = self._replayed(layer, _probe)
                except Exception:  # a model whose loop needs more from its blocks than their outputs
                    continue
                scale = max(1.0, float(expected.abs().max()))
                if replayed.shape == expected.shape and float((replayed - expected).abs().max()) <= AGREE * scale:
                    agree.add(layer)
            return agree
        finally:
            self._kept = {}
