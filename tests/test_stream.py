"""The training stream's window buffers: decoded in place for every storage dtype, reused, and safe to
reuse across a resume while decodes are still running."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from stores import ActivationStore, compute_chunk_stats, to_float32
from stores.activation_store import StoreError
from stores.held_out import split_chunks
from stores.stream import TrainingStream


def _store(path, dtype: str, compression: str = "lossless") -> ActivationStore:
    n_layers, d, chunk, n_tokens = 3, 8, 100, 1450  # a short last chunk
    store = ActivationStore.create(str(path), n_layers=n_layers, d_model=d, n_tokens=n_tokens, chunk_tokens=chunk,
                                   dtype=dtype, compression=compression)
    rng = np.random.default_rng(0)
    for c in range(-(-n_tokens // chunk)):
        rows = min(chunk, n_tokens - c * chunk)
        values = [rng.standard_normal((rows, d), dtype=np.float32) for _ in range(n_layers)]
        if dtype == "bfloat16":
            layers = [(torch.from_numpy(v).bfloat16().view(torch.int16).numpy().view(np.uint16)) for v in values]
        else:
            layers = [v.astype(dtype) for v in values]
        store.write_chunk(c, layers, np.zeros(rows, dtype=np.int32), compute_chunk_stats(layers, dtype))
    store.finalize()
    return ActivationStore.open(str(path))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return _store(tmp_path_factory.mktemp("stream") / "c", "float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_batches_are_the_stored_rows_scaled_for_every_dtype(tmp_path, dtype):
    store = _store(tmp_path / "c", dtype)
    train_chunks, _ = split_chunks(store, 0.1)
    layers, scales = [0, 2], [0.5, 3.0]
    stream = TrainingStream(store, layers, scales, train_chunks, batch_size=128, seed=2, window_chunks=4)
    for _ in range(30):  # more than an epoch: windows of both buffers, a short last window, carried rows
        batch = stream.next_batch()
        for layer, scale in zip(layers, scales):
            mask = batch.layers == layer
            stored = store.layer_array(layer).get_orthogonal_selection((batch.rows[mask], slice(None)))
            np.testing.assert_array_equal(batch.x[torch.from_numpy(mask)].numpy(),
                                          to_float32(stored, store.dtype) * np.float32(scale))
    stream.close()


@pytest.mark.parametrize("dtype, batch_size", [("float16", 96), ("bfloat16", 96), ("float32", 96), ("float16", 250)])
def test_batches_gathered_from_a_window_copy_equal_the_host_batches(tmp_path, dtype, batch_size):
    """The CUDA path's steps (each window copied whole with its shuffle and row scales, batches gathered,
    converted and scaled from the copy; two copies reused), run in memory: the host path's batches bit for
    bit, across windows, epochs and carried rows, and after a resume.  Batch 250: the last window of an
    epoch holds fewer rows than a batch, so it is only carried, never copied."""
    store = _store(tmp_path / "c", dtype)
    train_chunks, _ = split_chunks(store, 0.1)
    copies = same_batches((store, [0, 2], [0.5, 3.0], train_chunks, batch_size), {"device_windows": True},
                          lambda stream: stream._current.on_device.values)
    assert len(copies) == 2


def same_batches(args: tuple, options: dict, buffer_of) -> set[int]:
    """40 batches of a plain TrainingStream(*args) and of one made with ``options`` are equal bit for bit,
    across windows, epochs and carried rows, and so are a resumed stream's after batch 17; returns the
    addresses of the buffers ``buffer_of(stream)`` gave the second stream's batches (closed at the end)."""
    plain = TrainingStream(*args, seed=5, window_chunks=3)
    other = TrainingStream(*args, seed=5, window_chunks=3, **options)
    expected, state, buffers = [], None, set()
    for i in range(40):
        want, got = plain.next_batch(), other.next_batch()
        np.testing.assert_array_equal(got.layers, want.layers)
        np.testing.assert_array_equal(got.rows, want.rows)
        assert torch.equal(got.x, want.x)
        buffers.add(buffer_of(other).untyped_storage().data_ptr())
        expected.append(want)
        if i == 16:
            state = other.state_dict()
    resumed = TrainingStream(*args, seed=5, window_chunks=3, **options)
    resumed.load_state_dict(state)
    for want in expected[17:]:
        assert torch.equal(resumed.next_batch().x, want.x)
    for stream in (plain, other, resumed):
        stream.close()
    return buffers


def test_window_buffers_are_reused(store):
    train_chunks, _ = split_chunks(store, 0.1)
    stream = TrainingStream(store, [0, 1], [1.0, 1.0], train_chunks, batch_size=100, seed=0, window_chunks=3)
    pointers = set()
    for _ in range(40):  # about six windows
        stream.next_batch()
        pointers.add(stream._current.values.untyped_storage().data_ptr())
    assert len(pointers) == 2
    stream.close()


def test_resume_with_decodes_in_flight_gives_the_same_batches(store, monkeypatch):
    """A rewind waits for the decodes already running: they write into the buffers it reuses."""
    train_chunks, _ = split_chunks(store, 0.1)
    args = (store, [0, 1, 2], [1.0, 2.0, 0.5], train_chunks, 96)
    reference = TrainingStream(*args, seed=4, window_chunks=2)
    expected = [reference.next_batch() for _ in range(60)]
    reference.close()
    stream = TrainingStream(*args, seed=4, window_chunks=2, workers=8)
    for _ in range(23):
        stream.next_batch()
    state = stream.state_dict()
    gate, read_into = threading.Event(), TrainingStream._read_into

    def held_read_into(self, *args):
        gate.wait()
        read_into(self, *args)

    monkeypatch.setattr(TrainingStream, "_read_into", held_read_into)
    stream._schedule(state["window"] + 2)  # into the buffer of the window it rewinds to, held mid-way
    running = [future for _, futures in stream._pending.values() for future in futures]
    threading.Timer(0.2, gate.set).start()
    stream.load_state_dict(state)
    assert all(future.done() for future in running)
    monkeypatch.undo()
    for want in expected[23:]:
        got = stream.next_batch()
        np.testing.assert_array_equal(got.layers, want.layers)
        np.testing.assert_array_equal(got.rows, want.rows)
        assert torch.equal(got.x, want.x)
    stream.close()


def test_a_failed_window_decode_stops_its_siblings_and_a_retry_serves_the_window_its_state_names(store, monkeypatch):
    """One chunk of a window failing to decode: the window's other decodes are stopped or waited for before
    the error reaches the caller (none writes into the buffer afterwards), and the stream's position is
    the new window's start, whose batches a retry serves (its carried rows re-read by id)."""
    train_chunks, _ = split_chunks(store, 0.1)
    args = (store, [0, 1], [1.0, 2.0], train_chunks, 64)
    reference = TrainingStream(*args, seed=5, window_chunks=2)
    expected = [reference.next_batch() for _ in range(30)]
    reference.close()
    stream = TrainingStream(*args, seed=5, window_chunks=2, workers=4)
    bad = stream._window_chunk_ids(2)[1]
    read_into, started, finished = TrainingStream._read_into, [], []
    sibling_running = threading.Event()

    def failing_read_into(self, out, layer, start, stop):
        if start != store.chunk_rows(bad)[0]:
            return read_into(self, out, layer, start, stop)
        if layer == 0:
            sibling_running.wait(timeout=10)  # 4 workers, 4 decodes a window: the sibling runs
            raise StoreError("damaged (simulated)")
        started.append(layer)
        sibling_running.set()
        time.sleep(0.5)  # a sibling still decoding when the failure is seen
        read_into(self, out, layer, start, stop)
        finished.append(layer)

    monkeypatch.setattr(TrainingStream, "_read_into", failing_read_into)
    served = 0
    with pytest.raises(StoreError):
        while True:
            stream.next_batch()
            served += 1
    assert started and finished == started  # waited for, or never started: nothing writes into the buffer now
    assert stream.state_dict()["window"] == 2 and stream.state_dict()["batch"] == 0
    monkeypatch.undo()
    for want in expected[served:]:
        got = stream.next_batch()
        np.testing.assert_array_equal(got.layers, want.layers)
        np.testing.assert_array_equal(got.rows, want.rows)
        assert torch.equal(got.x, want.x)
    stream.close()
    assert stream._buffers == [None, None] and stream._current is None  # the windows are let go


@pytest.mark.parametrize("dtype, compression", [("float16", "lossless"), ("bfloat16", "lossless"),
                                                ("float32", "lossless"), ("float16", "lossy")])
def test_whole_chunks_read_from_their_files_equal_zarrs_read(tmp_path, monkeypatch, dtype, compression):
    """read_into decodes a whole local chunk from its file (not through zarr): byte for byte zarr's read,
    for every layer and chunk; a short last chunk, and codecs other than bytes → blosc → crc32c, go
    through zarr."""
    from stores.chunk_io import whole_chunk_file

    store = _store(tmp_path / "c", dtype, compression)
    fast = 0
    for layer in range(store.n_layers):
        array = store.layer_array(layer)
        for chunk in range(store.n_chunks):
            start, stop = store.readable_rows(chunk)
            out = np.full((stop - start, store.d_model), 7, dtype=array.dtype)
            store.read_into(layer, start, stop, out)
            np.testing.assert_array_equal(out.view(np.uint8), array[start:stop].view(np.uint8))
            fast += whole_chunk_file(array, slice(start, stop), out.shape, out.dtype) is not None
    whole_chunks = store.n_layers * (store.n_chunks - 1)
    assert fast == (whole_chunks if compression == "lossless" else 0)
    # read_rows takes the same path for each whole chunk of a range, and zarr's for the rest (past the end too)
    import stores.chunk_io as module

    direct = []
    real = module._decode_chunk_file
    monkeypatch.setattr(module, "_decode_chunk_file", lambda path, out: direct.append(path) or real(path, out))
    store.read_rows(0, 250, store.n_tokens)  # half a chunk, then whole ones, then the short last one
    assert len(direct) == ((1400 - 300) // 100 if compression == "lossless" else 0)  # chunks 3-13 of 100 rows
    for start, stop in [(300, 400), (250, 420), (0, 1450), (1400, 2000), (1449, 1450), (500, 500), (501, 501),
                        (1450, 1460), (2000, 2100)]:
        for layer in range(store.n_layers):
            array = store.layer_array(layer)
            got = store.read_rows(layer, start, stop)
            assert got.dtype == array.dtype
            np.testing.assert_array_equal(got.view(np.uint8), array[start:stop].view(np.uint8))


def test_iter_rows_gives_read_rows_batches_in_order_with_and_without_read_ahead(store):
    """Batches that straddle chunks, a short last batch and a range past the end, decoded ahead on a pool
    or one at a time: the same rows as one read_rows; a consumer that stops early leaves nothing queued."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        for start, stop, batch in [(0, store.n_tokens, 70), (130, 1000, 256), (store.n_tokens - 5, store.n_tokens + 50, 4)]:
            whole = store.read_rows(2, start, stop)
            for reader, ahead in [(None, 0), (pool, 1), (pool, 3)]:
                parts = list(store.iter_rows(2, start, stop, batch, reader, ahead))
                assert all(len(p) == batch for p in parts[:-1]) and 0 < len(parts[-1]) <= batch
                np.testing.assert_array_equal(np.concatenate(parts), whole)
        early = store.iter_rows(1, 0, store.n_tokens, 10, pool, 3)
        np.testing.assert_array_equal(next(early), store.read_rows(1, 0, 10))
        early.close()  # the generator's finally cancels what is still queued
    assert list(store.iter_rows(0, 10, 10, 4)) == []


def test_a_damaged_chunk_file_is_one_store_error(store, tmp_path):
    import shutil

    from stores.activation_store import StoreError

    copy = tmp_path / "c"
    shutil.copytree(store.path, copy)
    damaged = ActivationStore.open(str(copy))
    chunk_file = copy / "layers" / "1" / "c" / "3" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    out = np.empty((damaged.chunk_tokens, damaged.d_model), np.float16)
    with pytest.raises(StoreError, match="layer 1 rows 300–399 cannot be read \\(checksum mismatch\\)"):
        damaged.read_into(1, 300, 400, out)
    chunk_file.write_bytes(bytes(data[:3]))  # cut short
    with pytest.raises(StoreError, match="layer 1 rows 300–399 cannot be read"):
        damaged.read_into(1, 300, 400, out)
    # a valid chunk of a narrower store (its own checksum right): an error, not stale rows left in out
    other = ActivationStore.create(str(tmp_path / "wide"), n_layers=1, d_model=4, n_tokens=100, chunk_tokens=100)
    values = np.ones((100, 4), np.float16)
    other.write_chunk(0, [values], np.zeros(100, np.int32), compute_chunk_stats([values], "float16"))
    chunk_file.write_bytes((tmp_path / "wide" / "layers" / "0" / "c" / "0" / "0").read_bytes())
    out[:] = 7
    with pytest.raises(StoreError, match="layer 1 rows 300–399 cannot be read \\(cannot decode"):
        damaged.read_into(1, 300, 400, out)


def test_a_prefetched_stream_gives_the_same_batches(store):
    """prefetch() only starts the first window's decode early: the batches, across windows, are those of a
    stream that was not prefetched; a rewind after a prefetch drops it and starts where it says."""
    def batches(stream, n):
        out = [stream.next_batch() for _ in range(n)]
        stream.close()
        return out

    kwargs = dict(layers=[0, 2], scales=[1.0, 0.5], chunks=list(range(store.n_chunks - 1)), batch_size=64, seed=3,
                  window_chunks=2)
    plain = batches(TrainingStream(store, **kwargs), 12)
    early = TrainingStream(store, **kwargs)
    early.prefetch()
    for want, got in zip(plain, batches(early, 12)):
        assert torch.equal(want.x, got.x) and np.array_equal(want.rows, got.rows)
    rewound = TrainingStream(store, **kwargs)
    rewound.prefetch()
    position = TrainingStream(store, **kwargs)
    [position.next_batch() for _ in range(5)]
    rewound.load_state_dict(position.state_dict())
    position.close()
    for want, got in zip(plain[5:], batches(rewound, 7)):
        assert torch.equal(want.x, got.x) and np.array_equal(want.layers, got.layers)
