"""The CUDA paths: run only where CUDA exists (the GPU machine); skipped on CPU-only machines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stores import ActivationStore, compute_chunk_stats
from stores.held_out import split_chunks
from stores.stream import TrainingStream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    path = tmp_path_factory.mktemp("cuda") / "c"
    n_layers, d, chunk = 3, 16, 200
    store = ActivationStore.create(str(path), n_layers=n_layers, d_model=d, n_tokens=10 * chunk, chunk_tokens=chunk)
    rng = np.random.default_rng(0)
    for c in range(10):
        layers = [rng.standard_normal((chunk, d)).astype(np.float16) for _ in range(n_layers)]
        store.write_chunk(c, layers, np.zeros(chunk, np.int32), compute_chunk_stats(layers, "float16"))
    store.finalize()
    return ActivationStore.open(str(path))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_cuda_stream_gives_the_cpu_batches_from_float16_windows_copied_to_the_device(store, processes):
    """Also with the decode in chunk processes (`gsae train --reader`, auto on a GPU): the host windows in
    their shared memory, pinned by cudaHostRegister."""
    from stores.chunk_files import ChunkProcesses, SharedBuffers

    train_chunks, _ = split_chunks(store, 0.1)
    args = (store, [0, 1, 2], [0.5, 1.0, 2.0], train_chunks, 128)
    workers = ChunkProcesses(2, SharedBuffers()) if processes else None
    on_cpu = TrainingStream(*args, seed=3, window_chunks=2)
    on_gpu = TrainingStream(*args, seed=3, window_chunks=2, device="cuda", processes=workers)
    copies = set()
    for _ in range(40):  # several windows: both device copies in turn
        expected, got = on_cpu.next_batch(), on_gpu.next_batch()
        assert got.x.is_cuda and got.x.dtype == torch.float32
        np.testing.assert_array_equal(expected.layers, got.layers)
        np.testing.assert_array_equal(expected.rows, got.rows)
        assert torch.equal(got.x.cpu(), expected.x)  # the same float32 conversion and product
        window = on_gpu._current.on_device
        assert window.values.is_cuda and window.values.dtype == torch.float16
        copies.add(window.values.untyped_storage().data_ptr())
    assert len(copies) == 2  # reused, not a new device window each time
    assert all(buffer.is_pinned() for buffer in on_gpu._buffers if buffer is not None)  # the host windows
    # both ways pinned by cudaHostRegister at their exact size (torch's allocator rounds up to a power of two)
    assert all(entry is not None and entry[1] is not None for entry in on_gpu._host)
    on_cpu.close()
    on_gpu.close()
    assert on_gpu._host == [None, None]  # unpinned at close
    if workers is not None:
        assert not workers.shared._blocks  # given back at close
        workers.close()
        workers.shared.close()


def test_cuda_resume_hands_out_the_same_batches(store):
    train_chunks, _ = split_chunks(store, 0.1)
    args = (store, [0, 2], [1.0, 1.0], train_chunks, 100)
    whole = TrainingStream(*args, seed=1, device="cuda")
    first = [whole.next_batch().rows for _ in range(7)]
    state = whole.state_dict()
    rest = [whole.next_batch().rows for _ in range(10)]
    resumed = TrainingStream(*args, seed=1, device="cuda")
    resumed.load_state_dict(state)
    for expected in rest:
        np.testing.assert_array_equal(resumed.next_batch().rows, expected)
    assert len(first) == 7
    whole.close()
    resumed.close()


def test_cuda_rewinding_a_stream_that_handed_out_batches_gives_the_same_batches(store):
    """A rewind reuses device windows that batches already handed out may still be read from."""
    train_chunks, _ = split_chunks(store, 0.1)
    stream = TrainingStream(store, [0, 1], [1.0, 2.0], train_chunks, 100, seed=2, window_chunks=2, device="cuda")
    handed_out = []
    for i in range(30):  # several windows
        if i == 5:
            state = stream.state_dict()
        handed_out.append(stream.next_batch().x)
    stream.load_state_dict(state)
    for expected in handed_out[5:]:
        assert torch.equal(stream.next_batch().x, expected)
    stream.close()


def test_cuda_training_step_needs_no_host_sync():
    from pipeline.sae import SparseAutoencoder
    from pipeline.train import make_optimizer, train_step

    sae = SparseAutoencoder(64, 512, k=8).cuda()
    optimizer = make_optimizer(sae, 1e-3)  # gsae train's: fused, its step count on the GPU
    assert optimizer.defaults["fused"]
    fired = torch.zeros(512, dtype=torch.long, device="cuda")
    x = torch.randn(256, 64, device="cuda")
    train_step(sae, optimizer, x, fired, 100, n_dead_hint=5, check_finite=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for _ in range(3):
            train_step(sae, optimizer, x, fired, 100, n_dead_hint=5, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_more_ranks_than_gpus_share_them():
    from pipeline.ranks import Ranks

    n = torch.cuda.device_count()
    extra = Ranks(rank=n, world=n + 1, local_rank=n, local_world=n + 1)
    assert extra.device(torch.device("cuda")) == torch.device("cuda", 0)


def test_cuda_training_killed_between_checkpoints_finishes_each_step_once(tiny_models, tmp_path):
    """On CUDA a resumed run is the uninterrupted one up to the order of float additions (the CPU
    tests compare weights bit for bit): the same steps logged once each, the same L0 and FVU to 5%."""
    from conftest import make_cache, run_cli
    from pipeline.run import Run
    from test_runs import _KILL_POINTS, _run_killed

    cache = make_cache(tiny_models["llama"], tmp_path / "c", tokens=8000, context_length=64, batch_size=8,
                       chunk_tokens=500)
    assert run_cli(["group", "--cache", cache])[0] == 0
    args = ["train", "--cache", cache, "--groups", 2, "--tokens", 3072, "--batch-size", 256, "--checkpoint-every", 4,
            "--device", "cuda"]
    assert run_cli([*args, "--out", tmp_path / "whole"])[0] == 0
    _run_killed([*args, "--out", tmp_path / "r"], _KILL_POINTS["between checkpoints"])
    code, _, err = run_cli([*args, "--out", tmp_path / "r"])
    assert code == 0, err
    whole, resumed = Run.open(tmp_path / "whole").metrics(), Run.open(tmp_path / "r").metrics()
    assert [(r["sae"], r["step"]) for r in resumed] == [(r["sae"], r["step"]) for r in whole]
    for a, b in zip(whole, resumed):
        assert b["fvu"] == pytest.approx(a["fvu"], rel=0.05) and b["l0"] == pytest.approx(a["l0"], abs=0.05)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_cuda_cache_rows_go_from_the_device_into_reused_pinned_chunk_buffers(tmp_path, processes):
    """Also with the writer's encoder processes: the buffers in shared memory, pinned by cudaHostRegister."""
    from test_cache import assemble_and_write

    n_layers, d, chunk, n, batch = 3, 16, 64, 1000, 96
    store = ActivationStore.create(str(tmp_path / "c"), n_layers=n_layers, d_model=d, n_tokens=n, chunk_tokens=chunk)
    values = torch.randn(n_layers, n, d, device="cuda").half()
    assembler, _ = assemble_and_write(store, values, np.arange(n, dtype=np.int32), batch, pinned=True,
                                      processes=processes)
    store = ActivationStore.open(str(tmp_path / "c"))
    for layer in range(n_layers):
        np.testing.assert_array_equal(store.read_rows(layer, 0, n), values[layer].cpu().numpy())
    assert all(torch.from_numpy(buffer).is_pinned() for buffer in assembler.buffers.free)
    assert len(assembler.buffers.free) < store.n_chunks
    # both ways pinned by cudaHostRegister at their exact size (torch's allocator rounds up to a power of two)
    assert len(assembler.buffers.registered) == len(assembler.buffers.free)
    assembler.close()
    assert not assembler.buffers.registered


def test_cuda_cache_writes_with_processes_the_bytes_of_threads(tiny_neox, tmp_path):
    """`gsae cache` on CUDA: auto keeps the writer threads (processes were slower on the H200), and
    `--writer processes` makes the cache they make."""
    from conftest import run_cli
    from stores.chunk_files import usable_cores

    args = ["cache", "--model", tiny_neox, "--tokens", 6000, "--context-length", 32, "--batch-size", 8,
            "--chunk-tokens", 500, "--device", "cuda"]
    code, out, err = run_cli([*args, "--cache", tmp_path / "processes", "--writer", "processes"])
    assert code == 0, err
    assert f"{usable_cores()} processes" in out
    code, out, err = run_cli([*args, "--cache", tmp_path / "threads"])
    assert code == 0, err
    assert "threads" in out and "processes" not in out
    trees = [{str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
              if p.is_file() and p.name != "timing.json"} for root in (tmp_path / "processes", tmp_path / "threads")]
    assert trees[0] == trees[1]
    # each batch's chunks went to the writer while the next batch ran: every chunk's rows and the statistics
    # recorded for it on the device (read back without waiting for the next batch) agree
    for name in ("processes", "threads"):
        store = ActivationStore.open(str(tmp_path / name))
        for chunk in range(store.n_chunks):
            start, stop = store.readable_rows(chunk)
            layers = [store.read_rows(layer, start, stop) for layer in range(store.n_layers)]
            assert all(values.any(axis=1).all() for values in layers)  # no row left unwritten
            expected = compute_chunk_stats(layers, "float16")
            np.testing.assert_allclose(store._read_stats("chunk_sum", chunk), expected.sums, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(store._read_stats("chunk_norm_sum", chunk), expected.norm_sums, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_dead", [5, 60, 400])
def test_cuda_auxk_picks_the_same_dead_latents_as_on_the_cpu(dtype, n_dead):
    """The column subset (a stable sort of a uint8 mask, a column gather) on CUDA, every stored dtype, and
    the whole-row path (400 of 512 dead): the same latents per row as on the CPU."""
    from pipeline.sae import _top_dead

    generator = torch.Generator().manual_seed(n_dead)
    pre = torch.randn(64, 512, generator=generator).to(dtype)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[torch.randperm(512, generator=generator)[:n_dead]] = True
    k = min(16, n_dead)
    on_cpu = _top_dead(pre.float(), dead, n_dead, k)
    on_gpu = _top_dead(pre.cuda(), dead.cuda(), n_dead, k).cpu()
    assert bool(dead[on_gpu].all())
    # the values chosen, not the indices: low-precision values tie, and either of two tied latents is right
    chosen = [pre.float().gather(1, picked).sort(dim=1).values for picked in (on_cpu, on_gpu)]
    assert torch.equal(*chosen)


def test_cuda_auxk_dead_count_gives_the_cpu_counts():
    from pipeline.train import DeadCount

    counts = [3, 8, 20, 21, 50, 49, 70]
    on_cpu, on_gpu = DeadCount(torch.device("cpu")), DeadCount(torch.device("cuda"))
    expected = [on_cpu.step(torch.tensor(c)) for c in counts]
    assert [on_gpu.step(torch.tensor(c, device="cuda")) for c in counts] == expected
    assert on_gpu.state() == on_cpu.state()


@pytest.mark.parametrize("n_latents,k_aux,dense", [(8192, 256, True), (16384, 256, False)])
def test_cuda_auxk_decodes_densely_up_to_32_k_aux_with_the_loss_and_gradients_of_the_gather(n_latents, k_aux, dense):
    """On CUDA AuxK decodes by a dense matmul up to M = 32 k_aux, and by the gather past it; both give the
    dense-autograd reference's loss and gradients (float64: no TF32 rounding)."""
    import pipeline.sae as sae_module
    from test_sae import dense_reference_loss, gradients

    d_in = 2 * k_aux
    assert sae_module.dense_auxk_decode(torch.zeros(1, n_latents, device="cuda"), k_aux) == dense
    big = torch.zeros(1, device="cuda").expand(1 << 20, n_latents)  # B × M past 1 GiB, without the memory
    assert not sae_module.dense_auxk_decode(big, k_aux)
    torch.manual_seed(0)
    sae = sae_module.SparseAutoencoder(d_in=d_in, n_latents=n_latents, k=8, seed=1).double().cuda()
    x = torch.randn(256, d_in, dtype=torch.float64, device="cuda")
    dead = torch.rand(n_latents, device="cuda") < 0.2
    fast = sae.loss(x, dead)
    reference = dense_reference_loss(sae, x, dead)
    assert fast.loss.item() == pytest.approx(reference.item(), rel=1e-9)
    fast_grads, reference_grads = gradients(sae, fast.loss), gradients(sae, reference)
    for name, expected in reference_grads.items():
        assert float((fast_grads[name] - expected).abs().max()) <= 1e-9 * float(expected.abs().max()), name


def test_pinned_memory_is_pinned_asynchronous_and_a_refusal_leaves_no_cuda_error():
    """stores.pinned on the device: pinned_empty's memory is pinned for torch and a non_blocking copy into it
    returns before it is done; a refused cudaHostRegister (the same memory twice) is a PinError and leaves no
    CUDA error for the next kernel (the stream's and the cache's fallback depend on it); unpin, a buffer
    dropped without unpin, and the cache's make-ahead thread let every registration go."""
    import gc
    import time

    from pipeline.capture import ChunkBuffers
    from stores.pinned import PinError, pin, pinned_empty, unpin

    # 256 MiB: its copy takes 5-10 ms, so a worker descheduled for a millisecond on a busy machine does not
    # make a queued copy look like one that waited
    buffer, address = pinned_empty((256, 1 << 20), np.dtype(np.uint8))
    host = torch.from_numpy(buffer)
    assert host.is_pinned()
    device = torch.full(host.shape, 7, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    host.copy_(device, non_blocking=True)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    assert queued < (time.perf_counter() - start) / 2, "a copy into pinned memory waited for the GPU"
    assert buffer[0, 0] == 7 and buffer[-1, -1] == 7
    with pytest.raises(PinError):
        pin(buffer)
    x = torch.randn(256, 256, device="cuda")
    assert torch.isfinite((x @ x).sum()).item()  # no error left for this launch to raise
    unpin(address)
    assert not torch.from_numpy(buffer).is_pinned()
    dropped, _ = pinned_empty((8, 1 << 20), np.dtype(np.uint8))
    del dropped
    gc.collect()
    assert (torch.ones(8, device="cuda") * 2).sum().item() == 16
    buffers = ChunkBuffers((2, 4096, 512), np.dtype(np.float16), pinned=True)
    buffers.make_ahead(3)
    buffers._ahead.join()
    assert len(buffers.free) == len(buffers.registered) == 3
    assert all(torch.from_numpy(b).is_pinned() for b in buffers.free)
    buffers.close()
    assert not buffers.registered and not buffers.free
    torch.cuda.synchronize()


def test_cuda_replayed_passes_equal_the_whole_model_there(tiny_llama):
    """`gsae eval`'s passes from the replaced block on (pipeline.block_replay) on CUDA: every layer passes the
    check and gives the whole model's logits (the kept outputs live on the GPU, budgeted by its free memory)."""
    from pipeline.block_replay import BlockReplay, run_with_block_output
    from pipeline.models import load_model, resolve_model_spec

    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cuda"))
    ids = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(0)).cuda()
    replay = BlockReplay(lm, range(lm.n_layers))
    clean = replay.clean(ids)
    assert replay.replayable == set(range(lm.n_layers)) and set(replay._kept) == set(range(lm.n_layers))
    assert all(hidden.is_cuda for _, hidden in replay._kept.values())
    scale = float(clean.abs().max())
    for layer in range(lm.n_layers):
        for replace in (lambda h: h.flip(-1), lambda h: torch.zeros_like(h)):
            expected = run_with_block_output(lm, ids, layer, replace)
            assert float((replay.run(layer, replace) - expected).abs().max()) <= 1e-5 * scale, layer
