"""The downstream passes that run only the blocks after the replaced one (pipeline.block_replay), against the whole
model with a hook (the definition), on each tiny architecture and on models whose blocks do not pass on their
outputs alone."""

from __future__ import annotations

import pytest
import torch

from pipeline.block_replay import BlockReplay, run_with_block_output
from pipeline.models import load_model, resolve_model_spec


def _flip(h: torch.Tensor) -> torch.Tensor:  # a replacement that changes every later logit
    return torch.cat([h[:, :1], h[:, 1:].flip(-1)], dim=1)


def _zero(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


def _ids(lm, windows: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (windows, length), generator=torch.Generator().manual_seed(seed))


def _counting(lm) -> list[int]:
    """Calls of each (original) block's forward, counted by hooks that stay for the test."""
    calls = [0] * lm.n_layers
    for i, block in enumerate(lm.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("kind", ["neox", "llama", "gpt2"])
def test_replayed_passes_equal_the_whole_model_and_skip_the_blocks_before(kind, tiny_models):
    lm = load_model(resolve_model_spec(str(tiny_models[kind])), torch.device("cpu"))
    calls = _counting(lm)
    for batch, ids in enumerate((_ids(lm), _ids(lm, windows=2, length=9, seed=1))):
        replay = BlockReplay(lm, range(lm.n_layers))
        clean = replay.clean(ids)
        assert torch.equal(clean, run_with_block_output(lm, ids, 0, None))
        assert replay.replayable == set(range(lm.n_layers))
        for layer in range(lm.n_layers):
            for replace in (_flip, _zero):
                expected = run_with_block_output(lm, ids, layer, replace)
                before = list(calls)
                got = replay.run(layer, replace)
                ran = [after - was for after, was in zip(calls, before)]
                assert ran == [0] * (layer + 1) + [1] * (lm.n_layers - layer - 1), (layer, ran)
                assert torch.equal(got, expected), (kind, layer, float((got - expected).abs().max()))
                assert not torch.equal(got, clean)  # the replacement reached the logits
        assert all(b is not None and type(b).__name__ != "_StandIn" for b in lm.blocks)  # put back


def _sharing_a_state(lm) -> None:
    """Block 2 takes something block 0 leaves, as blocks that share keys and values do (Gemma 3n, Gemma 4)."""
    shared: list[torch.Tensor] = []
    lm.blocks[0].register_forward_hook(lambda m, a, o: shared.append(o[0] if isinstance(o, tuple) else o))

    def take(module, args):
        left = shared.pop() if shared else torch.zeros_like(args[0])
        return (args[0] + 0.5 * left, *args[1:])

    lm.blocks[2].register_forward_pre_hook(take)


def test_blocks_that_share_a_state_run_the_whole_model_where_a_replay_would_miss_it(tiny_llama):
    """Replaying from layer 0 or 1 skips block 0 but runs block 2, which misses what block 0 left: the check finds
    other logits there, and those layers' passes run the whole model; from layer 2 on nothing is missed."""
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    _sharing_a_state(lm)
    ids = _ids(lm)
    replay = BlockReplay(lm, range(lm.n_layers))
    clean = replay.clean(ids)
    assert replay.replayable == {2, 3} and set(replay._kept) == {2, 3}
    assert torch.equal(clean, run_with_block_output(lm, ids, 0, None))
    for layer in range(lm.n_layers):
        assert torch.equal(replay.run(layer, _flip), run_with_block_output(lm, ids, layer, _flip))
    replay.clean(_ids(lm, seed=2))  # not checked again
    assert replay.replayable == {2, 3} and set(replay._kept) == {2, 3}


def test_layers_a_later_shorter_batch_keeps_were_checked_too(tiny_llama):
    """The budget keeps only layer 3 of the first batch; a shorter batch then keeps more, which were checked with
    the first (found by a sweep of Gemma 3n: an unchecked layer's replay raised)."""
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    _sharing_a_state(lm)
    first, shorter = _ids(lm, windows=3), _ids(lm, windows=1, seed=3)
    replay = BlockReplay(lm, range(lm.n_layers), kept_bytes=first.numel() * lm.d_model * 4)
    replay.clean(first)
    assert set(replay._kept) == {3}
    replay.clean(shorter)
    assert set(replay._kept) == {2, 3}  # room for three (3, 2, 1): 1 failed the check
    for layer in range(lm.n_layers):
        assert torch.equal(replay.run(layer, _zero), run_with_block_output(lm, shorter, layer, _zero))


def test_a_model_that_fails_without_its_earlier_blocks_falls_back(tiny_llama):
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    ran = []
    lm.blocks[0].register_forward_hook(lambda m, a, o: ran.append(0))

    def need(module, args):
        if not ran:
            raise RuntimeError("block 0 did not run")
        ran.clear()

    lm.blocks[3].register_forward_pre_hook(need)
    ids = _ids(lm)
    replay = BlockReplay(lm, [1, 2, 3])
    replay.clean(ids)
    assert replay.replayable == {3}  # block 3 is a stand-in there
    assert torch.equal(replay.run(2, _zero), run_with_block_output(lm, ids, 2, _zero))


def _in_place_zero(h: torch.Tensor) -> torch.Tensor:
    h[:, 1:] = 0
    return h


def test_a_later_block_that_changes_its_input_in_place_leaves_the_kept_output_clean(tiny_llama):
    """... and so does a replacement that writes into the hidden state it is given."""
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))

    def in_place(module, args):
        args[0].mul_(0.5)

    lm.blocks[2].register_forward_pre_hook(in_place)
    ids = _ids(lm)
    replay = BlockReplay(lm, range(lm.n_layers))
    replay.clean(ids)
    assert replay.replayable == set(range(lm.n_layers))
    for _ in range(2):  # the same layer twice: the first pass must not have changed what the second starts from
        for replace in (_flip, _in_place_zero, None):
            expected = run_with_block_output(lm, ids, 1, replace)
            assert torch.equal(replay.run(1, replace or (lambda h: h.clone())), expected)


def test_outputs_kept_within_the_budget_deepest_first(tiny_llama):
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    ids = _ids(lm)
    each = ids.numel() * lm.d_model * 4
    replay = BlockReplay(lm, [0, 1, 3], kept_bytes=2 * each + 1)
    replay.clean(ids)
    assert sorted(replay._kept) == [1, 3] and replay.replayable == {0, 1, 3}
    for layer in (0, 1, 3):
        assert torch.equal(replay.run(layer, _flip), run_with_block_output(lm, ids, layer, _flip))
    nothing = BlockReplay(lm, [0, 1, 3], kept_bytes=0)
    nothing.clean(ids)
    assert nothing.replayable is None and not nothing._kept  # nothing kept, nothing checked
    assert torch.equal(nothing.run(1, _zero), run_with_block_output(lm, ids, 1, _zero))


def test_a_model_that_never_calls_the_stand_ins_runs_the_whole_model(tiny_llama):
    """Where the forward runs blocks held elsewhere (here lm.blocks is a copy of the model's list), a replay is
    a clean pass whatever the replacement: an unchanged replay would pass a check against the clean logits, so the
    check replays a replacement and compares with the whole model's (found in review)."""
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    lm.blocks = torch.nn.ModuleList(list(lm.blocks))
    ids = _ids(lm)
    replay = BlockReplay(lm, range(lm.n_layers))
    replay.clean(ids)
    assert replay.replayable == set()
    for layer in range(lm.n_layers):
        assert torch.equal(replay.run(layer, _flip), run_with_block_output(lm, ids, layer, _flip))


def test_kept_outputs_hold_one_copy_each(tiny_llama):
    """The kept output's hidden state is the copy (the block's own is let go with its pass), and the budget counts
    what a kept layer takes per token."""
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    ids = _ids(lm)
    replay = BlockReplay(lm, range(lm.n_layers))
    replay.clean(ids)
    for output, hidden in replay._kept.values():
        assert (output[0] if isinstance(output, tuple) else output) is hidden
    assert replay._token_bytes == {layer: lm.d_model * 4 for layer in range(lm.n_layers)}


def test_the_gpu_budget_counts_torchs_cached_memory_and_none_of_the_last_batchs(tiny_llama, monkeypatch):
    """On a GPU the kept outputs may take a quarter of the free memory, where free includes what torch's allocator
    holds unused (the driver counts it as taken), measured after the last batch's kept outputs are let go (found in
    review: both made fewer layers fit than do)."""
    import dataclasses

    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    on_gpu = BlockReplay(dataclasses.replace(lm, device=torch.device("cuda")), [1], kept_bytes=100 * gib)
    assert on_gpu._budget() == (4 + 6 - 2) * gib // 4
    assert BlockReplay(dataclasses.replace(lm, device=torch.device("cuda")), [1])._budget() == 2**30  # KEPT_BYTES

    replay = BlockReplay(lm, range(lm.n_layers))
    held_when_measured = []
    measure = replay._budget
    monkeypatch.setattr(replay, "_budget", lambda: held_when_measured.append(len(replay._kept)) or measure())
    replay.clean(_ids(lm))
    replay.clean(_ids(lm, seed=1))
    assert len(replay._kept) == lm.n_layers and held_when_measured == [0, 0]
