"""The ordering the training stream's CUDA branch relies on, checked on the CPU with a fake ``torch.cuda``.

The CPU suite otherwise never runs the stream's events and waits (``device_windows`` runs the same steps
in memory, with no streams), and tests/test_cuda.py, which does, runs only where CUDA exists; there a
missing wait shows as a rare wrong batch, not as a failure.  Here each fake stream is a list of ops, each
op remembering how far into the other streams it is ordered after (through ``wait_event``), and the host
remembers what it waited for (``synchronize``).  The rules checked:

 (a) an upload into a device window is ordered after every gather from it issued before;
 (b) a gather from a device window is ordered after the upload into it;
 (c) a host window buffer is written (decode, carried rows), unpinned or freed only once the host waited
     for every copy out of it;
and the batches equal the CPU stream's (across windows, epochs, a rewind and a resume), and every pinned
window is unpinned once, by close.  The mutation tests drop one wait each, to show the check can fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

import stores.pinned as pinned
from stores import ActivationStore
from stores.held_out import split_chunks
from stores.stream import Batch, TrainingStream


def address(buffer: torch.Tensor | np.ndarray) -> int:
    return buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.untyped_storage().data_ptr()


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str):
        self.cuda, self.name = cuda, name
        self.ops: list[dict[str, int]] = []  # per op: how far into each other stream it is ordered after
        self.after: dict[str, int] = {}  # the same for the next op

    def op(self) -> int:
        self.ops.append(dict(self.after))
        return len(self.ops) - 1

    def wait_event(self, event: FakeEvent) -> None:
        if event.stream is not None:  # waiting for an event never recorded waits for nothing, as on CUDA
            self.after[event.stream.name] = max(self.after.get(event.stream.name, -1), event.index)

    def synchronize(self) -> None:
        self.cuda.host_waited(self.name, len(self.ops) - 1)


class FakeEvent:
    def __init__(self, cuda: FakeCuda):
        self.cuda, self.stream, self.index = cuda, None, -1

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream or self.cuda.current[-1]
        self.index = len(self.stream.ops) - 1

    def synchronize(self) -> None:
        if self.stream is not None:
            self.cuda.host_waited(self.stream.name, self.index)


class FakeCuda:
    """The fake torch.cuda of one test, and the record of its ops and the rules they broke."""

    def __init__(self) -> None:
        self.training = FakeStream(self, "training")
        self.current = [self.training]  # torch.cuda.stream(...) contexts, innermost last
        self.names = itertools.count(1)
        self.host_after: dict[str, int] = {}  # how far into each stream the host has waited
        self.host_reads: dict[int, list[tuple[str, int]]] = {}  # host buffer -> the uploads out of it
        self.gathers: dict[int, list[int]] = {}  # device window -> training ops gathering from it since its upload
        self.uploads: dict[int, tuple[str, int]] = {}  # device window -> its last upload
        self.alive: list[torch.Tensor] = []  # buffers that have records: their addresses are not reused meanwhile
        self.pinned: set[int] = set()
        self.pin_count = 0
        self.unpin_at_drop: dict[int, Any] = {}
        self.violations: list[str] = []

    def host_waited(self, stream: str, index: int) -> None:
        self.host_after[stream] = max(self.host_after.get(stream, -1), index)

    def host_write(self, key: int, what: str) -> None:
        for stream, index in list(self.host_reads.get(key, ())):  # decodes run on the pool's threads
            if self.host_after.get(stream, -1) < index:
                self.violations.append(f"(c) {what} of host buffer {key:#x} while copy {stream}[{index}] may run")

    def upload(self, target: torch.Tensor, source: torch.Tensor) -> None:
        stream, device, host = self.current[-1], address(target), address(source)
        index = stream.op()
        for gather in self.gathers.pop(device, []):
            if stream.ops[index].get("training", -1) < gather:
                self.violations.append(f"(a) upload {stream.name}[{index}] into {device:#x} before gather "
                                       f"training[{gather}] from it")
        self.uploads[device] = (stream.name, index)
        self.host_reads.setdefault(host, []).append((stream.name, index))
        self.alive += [target, source]

    def gather(self, window: torch.Tensor) -> None:
        device, index = address(window), self.training.op()
        stream, upload = self.uploads[device]
        if self.training.ops[index].get(stream, -1) < upload:
            self.violations.append(f"(b) gather training[{index}] from {device:#x} before upload {stream}[{upload}]")
        self.gathers.setdefault(device, []).append(index)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        @contextlib.contextmanager
        def on_stream(stream: FakeStream) -> Iterator[None]:
            self.current.append(stream)
            try:
                yield
            finally:
                self.current.pop()

        copy, setitem = torch.Tensor.copy_, torch.Tensor.__setitem__

        def copy_(target: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
            if non_blocking and self.current[-1] is not self.training:  # _upload's copy of a window
                self.upload(target, source)
            return copy(target, source, non_blocking=non_blocking)

        def carried_rows(tensor: torch.Tensor, index: Any, value: Any) -> None:  # _open_window's carried rows
            self.host_write(address(tensor), "carried rows")
            setitem(tensor, index, value)

        for name, value in [("Stream", lambda device=None: FakeStream(self, f"copy{next(self.names)}")),
                            ("Event", lambda **options: FakeEvent(self)),
                            ("current_stream", lambda device=None: self.current[-1]), ("stream", on_stream)]:
            monkeypatch.setattr(torch.cuda, name, value)
        for name, value in [("copy_", copy_), ("__setitem__", carried_rows), ("record_stream", lambda *args: None),
                            ("pin_memory", lambda tensor, *args, **kwargs: tensor.clone())]:
            monkeypatch.setattr(torch.Tensor, name, value)
        self._install_pinning(monkeypatch)
        self._install_stream_hooks(monkeypatch)

    def _install_pinning(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def pin(buffer: np.ndarray) -> int:
            self.pinned.add(buffer.ctypes.data)
            self.pin_count += 1
            return buffer.ctypes.data

        def unregister(key: int) -> None:
            if key not in self.pinned:
                self.violations.append(f"(pin) unpin of {key:#x}, not pinned (or unpinned twice)")
            self.pinned.discard(key)
            self.host_write(key, "unpin")

        dropped = pinned._dropped

        def dropped_unpinned(key: int, *where: Any) -> None:  # pinned_empty's safety net: close should have unpinned it
            self.violations.append(f"(pin) buffer {key:#x} dropped still pinned")
            dropped(key, *where)

        # a fresh registry, so that a buffer left pinned by a failing test is detached at teardown rather than
        # unpinned later by the real cudaHostUnregister
        for name, value in [("_UNPIN_AT_DROP", self.unpin_at_drop), ("pin", pin), ("_unregister", unregister),
                            ("_dropped", dropped_unpinned)]:
            monkeypatch.setattr(pinned, name, value)

    def _install_stream_hooks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        next_batch, read_into, free_host = (TrainingStream.next_batch, TrainingStream._read_into,
                                            TrainingStream._free_host)

        def gathered(stream: TrainingStream) -> Batch:
            batch = next_batch(stream)
            if stream._current.on_device is not None:  # the wait for `ready` was issued inside next_batch
                self.gather(stream._current.on_device.values)
            return batch

        def decode(stream: TrainingStream, out: torch.Tensor, layer: int, start: int, stop: int) -> None:
            self.host_write(address(out), "decode")
            read_into(stream, out, layer, start, stop)

        def free(stream: TrainingStream, slot: int) -> None:
            if stream._host[slot] is not None:
                self.host_write(address(stream._host[slot][0]), "free")
            free_host(stream, slot)

        for name, value in [("next_batch", gathered), ("_read_into", decode), ("_free_host", free)]:
            monkeypatch.setattr(TrainingStream, name, value)


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCuda]:
    fake = FakeCuda()
    fake.install(monkeypatch)
    yield fake
    for finalizer in list(fake.unpin_at_drop.values()):
        finalizer.detach()


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    from test_stream import _store

    return _store(tmp_path / "c", "float16")  # 3 layers x d 8, chunks of 100 rows, a short last chunk


def cuda_like(*args: Any, **options: Any) -> TrainingStream:
    """A stream on the CPU that takes the CUDA branch (pinned windows, copy stream, events)."""
    stream = TrainingStream(*args, **options)
    stream._cuda = stream._device_windows = True
    stream._copy_stream = torch.cuda.Stream(stream.device)
    return stream


def same(cpu: TrainingStream, gpu: TrainingStream, n: int) -> None:
    for i in range(n):
        want, got = cpu.next_batch(), gpu.next_batch()
        assert np.array_equal(got.layers, want.layers) and np.array_equal(got.rows, want.rows), f"batch {i}"
        assert torch.equal(got.x, want.x), f"batch {i}"


def run(store: ActivationStore, cuda: FakeCuda, batch_size: int, window_chunks: int) -> None:
    """Batches of both device windows in turn over two epochs, a rewind of the same stream (batches handed
    out before may still read both its device windows) and a fresh stream resumed; then close."""
    train, _ = split_chunks(store, 0.1)
    args = (store, [0, 2], [0.5, 3.0], train, batch_size)
    cpu = TrainingStream(*args, seed=2, window_chunks=window_chunks)
    gpu = cuda_like(*args, seed=2, window_chunks=window_chunks)
    same(cpu, gpu, 20)
    state = gpu.state_dict()
    same(cpu, gpu, 40)
    for stream in (cpu, gpu):
        stream.load_state_dict(state)
    same(cpu, gpu, 30)
    resumed = cuda_like(*args, seed=2, window_chunks=window_chunks)
    for stream in (cpu, resumed):
        stream.load_state_dict(state)
    same(cpu, resumed, 30)
    for stream in (cpu, gpu, resumed):
        stream.close()
    assert not cuda.pinned, "a pinned window left pinned by close"
    assert not cuda.unpin_at_drop


def test_the_cuda_branch_orders_its_copies_and_gathers_and_unpins_at_close(store, cuda):
    # 96: several windows an epoch; 250: an epoch's last window only carried, never uploaded; 37: a chunk a window
    for batch_size, window_chunks in [(96, 4), (250, 2), (37, 1)]:
        run(store, cuda, batch_size, window_chunks)
    assert cuda.violations == []
    assert cuda.training.ops and cuda.host_reads and cuda.pin_count  # the branch ran: gathers, uploads, pins


def drop_release_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    upload = TrainingStream._upload

    def without(stream: TrainingStream, data: Any, slot: int) -> Any:
        stream._released[slot] = None  # the copy no longer waits for the last gather from its window
        return upload(stream, data, slot)

    monkeypatch.setattr(TrainingStream, "_upload", without)


def drop_ready_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    upload = TrainingStream._upload
    # next_batch then gathers without waiting for the copy (the host still waits for it before a decode)
    monkeypatch.setattr(TrainingStream, "_upload", lambda stream, data, slot: dataclasses.replace(
        upload(stream, data, slot), ready=None))


def drop_host_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = TrainingStream._schedule

    def without(stream: TrainingStream, window: int) -> None:
        stream._uploaded[window % 2] = None  # a decode into the buffer no longer waits for the copy out of it
        schedule(stream, window)

    monkeypatch.setattr(TrainingStream, "_schedule", without)


@pytest.mark.parametrize("mutate, kind", [(drop_release_wait, "(a)"), (drop_ready_wait, "(b)"),
                                          (drop_host_wait, "(c)")], ids=["nowait", "noready", "nohostsync"])
def test_the_check_catches_a_missing_wait(store, cuda, monkeypatch, mutate: Callable, kind: str):
    mutate(monkeypatch)
    run(store, cuda, 96, 4)  # the fake only records: the batches are still equal
    assert {violation.split()[0] for violation in cuda.violations} == {kind}, cuda.violations[:5]
