"""The chunk processes (stores/chunk_files.py): the cache writer's (`gsae cache --writer processes`: zarr's bytes
from shared memory, the same cache as the writer threads, kill -9 and Ctrl-C, errors) and the training
stream's (`gsae train --reader processes`: the threads' batches and weights), and when auto uses them."""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import pytest

from conftest import ROOT, run_cli
from stores import ActivationStore, compute_chunk_stats
from stores.chunk_files import ChunkProcesses, SharedBuffers
from stores.codecs import activation_codecs

CONTEXT = 32


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a cache but timing.json (wall-clock time differs between runs by nature)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


def _encoder_processes(parent: int | None = None) -> list[int]:
    """Pids of the encoder processes still running (their command line names serve()), of ``parent`` only
    when given (a process killed -9 leaves them to init)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"stores.chunk_files import serve" in command and parent in (None, ppid):
                found.append(int(entry.name))
    return found


def _chunks_written(cache: Path) -> int:
    try:
        return json.loads((cache / "zarr.json").read_text())["attributes"]["chunks_written"]
    except (OSError, ValueError, KeyError):
        return 0


def _gone(pids: list[int], seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not set(pids) & set(_encoder_processes()):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_processes_write_zarrs_bytes_from_shared_memory(tmp_path, dtype):
    """Chunks written by the encoder processes, the activations read where they lie in shared memory (the
    tokens and statistics on the threads), make zarr's store file for file; a short chunk (through zarr, on
    the threads) and an all-zero one (no file) included."""
    import stores.chunk_io as module

    def make(path: Path, processes: bool) -> dict[str, bytes]:
        store = ActivationStore.create(str(path), n_layers=2, d_model=8, n_tokens=450, chunk_tokens=100, dtype=dtype)
        shared = SharedBuffers()
        encoder = ChunkProcesses(2, shared) if processes else None
        rng = np.random.default_rng(0)
        try:
            with ThreadPoolExecutor(2) as pool:
                for chunk in range(5):
                    rows = min(100, 450 - chunk * 100)
                    values = rng.standard_normal((2, rows, 8), dtype=np.float32)
                    layers = shared.empty((2, rows, 8), np.dtype(np.uint16 if dtype == "bfloat16" else dtype))
                    layers[...] = ((values.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16"
                                   else values.astype(dtype))
                    if chunk == 2:
                        layers[1] = 0  # equal to the fill value: zarr does not store it
                    stats, tokens = compute_chunk_stats(list(layers), dtype), np.arange(rows, dtype=np.int32)
                    if processes:
                        assert shared.locate(layers[1]) is not None
                    store.finish_chunk(store.start_chunk(chunk, list(layers), tokens, stats, pool, encoder))
        finally:
            if encoder is not None:
                encoder.close()
            shared.close()
        store.finalize()
        return _tree_bytes(path)

    sent = []
    real_write = ChunkProcesses.write

    def counted(self, path, codec, values):
        sent.append(Path(path).relative_to(tmp_path / "processes").parts[0:2])
        return real_write(self, path, codec, values)

    mp = pytest.MonkeyPatch()
    mp.setattr(ChunkProcesses, "write", counted)
    try:
        ours = make(tmp_path / "processes", True)
    finally:
        mp.undo()
    mp.setattr(module, "_encode_chunk_file", lambda *args: False)  # zarr's own write path
    mp.setattr(module, "_remove_empty_chunk_file", lambda *args: False)
    try:
        zarrs = make(tmp_path / "zarr", False)
    finally:
        mp.undo()
    assert ours.keys() == zarrs.keys() and all(ours[name] == zarrs[name] for name in ours)
    # the layers' whole chunks only: 4 of each layer (the all-zero one too: its file removed there); the short
    # chunk 4 through zarr, the tokens and statistics (not in shared memory) on the threads
    assert collections.Counter(sent) == {("layers", "0"): 4, ("layers", "1"): 4}
    assert not any(name.endswith(".partial") for name in ours)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_chunks_of_many_blosc_blocks_are_zarrs_bytes_every_time(tmp_path, dtype):
    """A chunk over one 256 KiB blosc block: the processes must not let blosc use threads of its own, whose
    block order varies from run to run (numcodecs turns them on in a process's main thread)."""
    from zarr.codecs import BloscCodec

    codec = activation_codecs("lossless", dtype).compressors[0]
    assert isinstance(codec, BloscCodec)
    rng = np.random.default_rng(1)
    shared = SharedBuffers()
    encoder = ChunkProcesses(2, shared)
    try:
        values = shared.empty((4, 1024, 512), np.dtype(dtype))  # 1-2 MiB a chunk: 4-8 blocks
        values[...] = rng.standard_normal(values.shape, dtype=np.float32) * 4
        for repeat in range(2):
            for i in range(4):
                encoder.write(str(tmp_path / f"p{repeat}" / str(i)), codec._blosc_codec, values[i]).result(timeout=60)
    finally:
        encoder.close()
        shared.close()
    import zarr

    array = zarr.create_array(str(tmp_path / "z"), shape=(4 * 1024, 512), chunks=(1024, 512), dtype=dtype,
                              compressors=[codec, activation_codecs("lossless", dtype).compressors[1]])
    array[:] = values.reshape(-1, 512)
    for i in range(4):
        zarrs = (tmp_path / "z" / "c" / str(i) / "0").read_bytes()
        assert (tmp_path / "p0" / str(i)).read_bytes() == zarrs == (tmp_path / "p1" / str(i)).read_bytes()


def test_shared_buffers_are_found_and_removed():
    shared = SharedBuffers()
    array = shared.empty((3, 5, 4), np.float16)
    name, offset = shared.locate(array[1])
    assert offset == 5 * 4 * 2 and Path("/dev/shm", name).exists()
    assert shared.locate(np.zeros(4, np.float16)) is None  # not in shared memory
    assert shared.locate(array[:, 1]) is None  # not contiguous: a process could not read it in place
    shared.close()
    assert not Path("/dev/shm", name).exists()
    array[...] = 1  # still mapped here: its memory goes with the last mapping
    assert array.sum() == 60


def test_a_failed_write_raises_its_oserror_and_a_dead_process_fails_its_jobs(tmp_path):
    codec = activation_codecs("lossless", "float16").compressors[0]._blosc_codec
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    shared = SharedBuffers()
    encoder = ChunkProcesses(1, shared)
    try:
        values = shared.empty((4, 4), np.float16)
        values[...] = 1
        with pytest.raises(ValueError, match="shared memory only"):
            encoder.write(str(tmp_path / "x"), codec, np.ones((4, 4), np.float16))
        error = encoder.write(str(blocker / "c" / "0"), codec, values).exception(timeout=60)
        assert isinstance(error, OSError) and error.errno == errno.ENOTDIR
        encoder.write(str(tmp_path / "ok" / "0"), codec, values).result(timeout=60)
        assert (tmp_path / "ok" / "0").stat().st_size > 4
        encoder._workers[0].process.kill()
        failed = encoder.write(str(tmp_path / "ok" / "1"), codec, values).exception(timeout=60)
        assert isinstance(failed, OSError) and "chunk process" in str(failed)  # one line from the store
    finally:
        encoder.close()
        shared.close()


def _cache_args(model: str, tokens: int) -> list:
    return ["cache", "--model", model, "--tokens", tokens, "--context-length", CONTEXT, "--batch-size", 4,
            "--chunk-tokens", 50, "--write-threads", 2]


def test_cache_with_writer_processes_gives_the_threads_bytes_and_resumes_after_kill_9(tiny_neox, tmp_path, capsys):
    args = _cache_args(tiny_neox, 30000)
    code, out, err = run_cli([*args, "--cache", tmp_path / "threads", "--writer", "threads"], capsys)
    assert code == 0, err
    code, out, err = run_cli([*args, "--cache", tmp_path / "processes", "--writer", "processes"], capsys)
    assert code == 0, err
    assert _tree_bytes(tmp_path / "processes") == _tree_bytes(tmp_path / "threads")
    assert "2 processes" in out

    killed = tmp_path / "killed"
    command = [sys.executable, "-c", "import cli; cli.main()", *map(str, args), "--cache", str(killed),
               "--writer", "processes"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _chunks_written(killed) < 20 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; raise --tokens"
    workers = _encoder_processes(process.pid)
    assert workers
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _gone(workers), "encoder processes outlived their killed parent"
    assert not ActivationStore.open(str(killed), allow_partial=True).complete
    code, _, err = run_cli([*args, "--cache", killed, "--writer", "threads"], capsys)  # resumed the other way
    assert code == 0, err
    assert _tree_bytes(killed) == _tree_bytes(tmp_path / "threads")


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_to_the_process_group_stops_the_cache_and_its_processes_in_one_line(
        tiny_neox, tmp_path, signum, code, said):
    """Ctrl-C in a terminal reaches every process of the group, and so does SIGTERM in a SLURM job (or a kill of
    the group): the encoder processes ignore both, the cache stops with its one line, and no process is left
    (SIGTERM ended it silently, and multiprocessing warned of leaked shared memory)."""
    cache = tmp_path / "c"
    command = [sys.executable, "-c", "import sys; sys.argv[0] = 'gsae'; import cli; cli.entry()",
               *map(str, _cache_args(tiny_neox, 200000)), "--cache", str(cache), "--writer", "processes"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if _chunks_written(cache):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be interrupted; raise --tokens"
    workers = _encoder_processes(process.pid)
    assert workers
    os.killpg(process.pid, signum)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "leaked" not in err, err
    assert f"{said}: what was committed is kept" in out + err
    assert _gone(workers)


def test_writer_choice(tiny_neox, tmp_path, capsys, monkeypatch):
    """auto: for the reader, threads where the model runs on the CPU, processes on a GPU where they can work;
    for the writer, threads; an explicit --writer processes that cannot work is a one-line error."""
    import torch

    import pipeline.processes as module

    store = ActivationStore.create(str(tmp_path / "s"), n_layers=2, d_model=8, n_tokens=400, chunk_tokens=100)
    lossy = ActivationStore.create(str(tmp_path / "l"), n_layers=2, d_model=8, n_tokens=400, chunk_tokens=100,
                                   compression="lossy")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(module, "usable_cores", lambda: 16)
    monkeypatch.setattr(module, "can_pin_shared_memory", lambda: True)

    def use(requested, target, device, size=1 << 20, option="reader"):
        return module.use_processes(requested, option, target, device, size)

    assert not use("auto", store, cpu) and use("auto", store, cuda) and not use("auto", lossy, cuda)
    # the writer's auto keeps threads: its processes were slower on the H200 (AUTO_PROCESSES)
    assert not use("auto", store, cuda, option="writer") and use("processes", store, cuda, option="writer")
    assert use("processes", store, cpu) and not use("threads", store, cuda)
    monkeypatch.setattr(module, "usable_cores", lambda: 2)
    assert not use("auto", store, cuda)
    monkeypatch.setattr(module, "usable_cores", lambda: 16)
    monkeypatch.setattr(module, "can_pin_shared_memory", lambda: False)  # CUDA cannot pin it here
    assert not use("auto", store, cuda)
    monkeypatch.setattr(module, "shared_memory_room", lambda: 64 << 20)  # a container's /dev/shm
    assert not use("auto", store, cpu, 600 << 20)
    with pytest.raises(Exception, match="--reader processes needs 600 MiB of shared memory"):
        use("processes", store, cpu, 600 << 20, option="reader")
    monkeypatch.undo()

    code, _, err = run_cli([*_cache_args(tiny_neox, 3000), "--cache", tmp_path / "lossy", "--compression", "lossy",
                            "--writer", "processes"], capsys)
    assert code == 1 and "--writer processes needs a lossless cache on a local disk" in err
    assert len(err.strip().splitlines()) == 1 and "caching" not in err  # refused before the model loads
    assert not (tmp_path / "lossy").exists()
    # the reader's, before the run folder is made (it was made, and the next command "replaced" it)
    assert run_cli([*_cache_args(tiny_neox, 600), "--cache", tmp_path / "lossy", "--compression", "lossy"], capsys)[0] == 0
    code, _, err = run_cli(["train", "--cache", tmp_path / "lossy", "--out", tmp_path / "run", "--baseline",
                            "--tokens", 256, "--batch-size", 64, "--reader", "processes"], capsys)
    assert code == 1 and "--reader processes needs a lossless cache on a local disk" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_stream_decoding_in_processes_gives_the_threads_batches(tmp_path, dtype):
    """Windows decoded by the processes into shared memory: the batches of the threads bit for bit, across
    windows, epochs (a short last chunk goes through zarr on the threads), carried rows and a resume; the
    window buffers are reused, and released at close."""
    from stores.held_out import split_chunks
    from test_stream import _store, same_batches

    store = _store(tmp_path / "c", dtype)
    train_chunks, _ = split_chunks(store, 0.1)
    args = (store, [0, 2], [0.5, 3.0], train_chunks, 96)
    shared = SharedBuffers()
    processes = ChunkProcesses(2, shared)
    reads = []
    real_read = ChunkProcesses.read

    def counted(self, path, out):
        reads.append(path)
        return real_read(self, path, out)

    mp = pytest.MonkeyPatch()
    mp.setattr(ChunkProcesses, "read", counted)
    in_shared = []

    def window(stream):  # the buffer a batch came from, which lies in the processes' shared memory
        in_shared.append(shared.locate(stream._current.values.view(torch.uint8).numpy()) is not None)
        return stream._current.values

    try:
        buffers = same_batches(args, {"processes": processes}, window)
        assert len(buffers) == 2 and reads and all(in_shared)
        assert not shared._blocks  # every window buffer given back at close
    finally:
        mp.undo()
        processes.close()
        shared.close()


def test_a_window_cuda_cannot_pin_is_one_line_and_gives_its_shared_memory_back(tmp_path, monkeypatch):
    import stores.stream as stream_module
    from stores.pinned import PinError
    from stores.held_out import split_chunks
    from stores.stream import TrainingStream
    from test_stream import _store

    def refuse(block):
        raise PinError("cudaHostRegister of 4,096 bytes failed (CUDA error 1)")

    monkeypatch.setattr(stream_module, "pin", refuse)
    store = _store(tmp_path / "c", "float16")
    shared = SharedBuffers()
    processes = ChunkProcesses(1, shared)
    try:
        stream = TrainingStream(store, [1], [1.0], split_chunks(store, 0.1)[0], 64, seed=0, processes=processes)
        stream._cuda = True  # (its CUDA branch up to the pinning of a window buffer)
        with pytest.raises(Exception, match=r"cannot pin a .* MiB window .*; pass --reader threads") as caught:
            stream._new_buffer(0, 1000)
        assert len(str(caught.value).splitlines()) == 1 and not shared._blocks
    finally:
        processes.close()
        shared.close()


def test_a_damaged_chunk_decoded_in_a_process_is_one_line_naming_it(tmp_path):
    from stores.held_out import split_chunks
    from stores.stream import TrainingStream
    from test_stream import _store

    store = _store(tmp_path / "c", "float16")
    victim = tmp_path / "c" / "layers" / "1" / "c" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[40] ^= 0xFF
    victim.write_bytes(bytes(data))
    shared = SharedBuffers()
    processes = ChunkProcesses(1, shared)
    try:
        stream = TrainingStream(store, [1], [1.0], split_chunks(store, 0.1)[0], 64, seed=0, window_chunks=20,
                                processes=processes)
        with pytest.raises(Exception, match=r"layer 1 rows 0–99 cannot be read \(.*checksum") as caught:
            stream.next_batch()
        assert len(str(caught.value).splitlines()) == 1
        stream.close()
    finally:
        processes.close()
        shared.close()


def test_train_with_reader_processes_gives_the_threads_weights(tiny_neox, tmp_path, capsys):
    from conftest import make_cache
    from safetensors.numpy import load_file

    cache = make_cache(tiny_neox, tmp_path / "cache", tokens=6000, context_length=32, batch_size=8, chunk_tokens=200)
    assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    # on the CPU: bit for bit there (on CUDA two identical runs differ in the last bits: cuSPARSE's backward;
    # test_cuda.py compares the processes' batches on CUDA)
    args = ["train", "--cache", cache, "--groups", 2, "--tokens", 2048, "--batch-size", 128, "--expansion", 2,
            "--device", "cpu"]
    weights = {}
    for reader in ("threads", "processes"):
        code, out, err = run_cli([*args, "--out", tmp_path / reader, "--reader", reader], capsys)
        assert code == 0, err
        weights[reader] = {path.name: load_file(path) for path in sorted((tmp_path / reader).rglob("*.safetensors"))
                           if "checkpoint" not in str(path)}
    assert weights["threads"] and weights["threads"].keys() == weights["processes"].keys()
    for name, tensors in weights["threads"].items():
        assert all(np.array_equal(tensors[key], weights["processes"][name][key]) for key in tensors)
    # not recorded with the run's arguments (--resume compares those): it changes no result
    assert "\"reader\"" not in (tmp_path / "processes" / "config.json").read_text()


def test_cpu_quota_of_the_cgroup_caps_the_cores(tmp_path, monkeypatch):
    """A container given 1.5 CPUs of a larger host (cgroup v2 `cpu.max`, set on an ancestor; or v1's cfs quota)
    counts 2 cores, not the host's; no quota (v2 "max", v1 -1) or no cgroup files count the affinity."""
    import stores.chunk_files as module

    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "kubepods" / "cpu.max").write_text("150000 100000\n")
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1\n")
    assert module.cgroup_cpu_quota(str(v2), str(membership)) == 1.5
    membership.write_text("0::/\n")  # a cgroup namespace: its own cgroup shows as the root
    (v2 / "cpu.max").write_text("max 100000\n")
    assert module.cgroup_cpu_quota(str(v2), str(membership)) is None

    v1 = tmp_path / "v1" / "cpu,cpuacct" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    membership.write_text("12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert module.cgroup_cpu_quota(str(tmp_path / "v1"), str(membership)) == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert module.cgroup_cpu_quota(str(tmp_path / "v1"), str(membership)) is None
    assert module.cgroup_cpu_quota(str(tmp_path / "none"), str(tmp_path / "missing")) is None

    monkeypatch.setattr(module, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert module.usable_cores() == 2
    monkeypatch.setattr(module, "cgroup_cpu_quota", lambda: None)
    assert module.usable_cores() == 64

    from pipeline.ranks import Ranks

    assert Ranks().threads() == 64

    # the command caps torch's own threads too, unless *_NUM_THREADS chose them
    import cli

    before = torch.get_num_threads()
    monkeypatch.setattr(module, "usable_cores", lambda: 1)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    try:
        torch.set_num_threads(2)
        cli._cap_torch_threads()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        cli._cap_torch_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_process_lets_go_of_a_block_the_parent_released(tmp_path):
    """A window buffer that grows, or a closed stream, releases its block: the processes unmap it when they
    next map one, so its /dev/shm pages do not outlive it until they end."""
    from test_stream import _store

    store = _store(tmp_path / "c", "float16")
    path = str(tmp_path / "c" / "layers" / "0" / "c" / "0" / "0")
    shared = SharedBuffers()
    processes = ChunkProcesses(1, shared)
    try:
        pid = processes._workers[0].process.pid
        first = shared.empty((100, 8), np.float16)
        assert processes.read(path, first).result(timeout=60)
        name = shared.locate(first)[0]
        assert name in Path(f"/proc/{pid}/maps").read_text()
        shared.release(first)
        second = shared.empty((100, 8), np.float16)
        assert processes.read(path, second).result(timeout=60)
        np.testing.assert_array_equal(second, store.read_rows(0, 0, 100))
        assert name not in Path(f"/proc/{pid}/maps").read_text()
    finally:
        processes.close()
        shared.close()


def test_no_room_in_dev_shm_or_a_stopped_process_is_one_line_that_is_not_about_the_cache(tmp_path, monkeypatch):
    from stores.activation_store import StoreError
    from stores.held_out import split_chunks
    from stores.stream import TrainingStream
    from test_stream import _store

    store = _store(tmp_path / "c", "float16")
    chunks = split_chunks(store, 0.1)[0]
    shared = SharedBuffers()
    processes = ChunkProcesses(1, shared)
    try:
        real_empty = SharedBuffers.empty

        def full(self, shape, dtype):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SharedBuffers, "empty", full)
        stream = TrainingStream(store, [0], [1.0], chunks, 64, seed=0, window_chunks=2, processes=processes)
        with pytest.raises(StoreError, match=r"no room in /dev/shm .*No space left.*pass --reader threads") as caught:
            stream.next_batch()
        assert len(str(caught.value).splitlines()) == 1
        stream.close()
        monkeypatch.setattr(SharedBuffers, "empty", real_empty)

        processes._workers[0].process.kill()
        processes._workers[0].process.wait()
        stream = TrainingStream(store, [1], [1.0], chunks, 64, seed=0, window_chunks=2, processes=processes)
        with pytest.raises(StoreError, match=r"were not decoded: .*chunk process.*pass --reader threads") as caught:
            stream.next_batch()
        assert "verify" not in str(caught.value) and len(str(caught.value).splitlines()) == 1
        stream.close()
    finally:
        processes.close()
        shared.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_workers_beside_a_gpu_lower_their_priority_and_only_theirs(tmp_path):
    """The pools that compress or decode chunks beside a GPU's thread run at a lower CPU priority: each
    thread of the pool and each chunk process, not the thread that made them (pipeline.processes)."""
    import threading

    from pipeline.processes import WORKER_NICE, worker_nice, worker_threads

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert worker_nice(cuda, "writer") == worker_nice(cuda, "reader") == WORKER_NICE > 0
    # on a CPU the training thread gathers each batch itself, beside the decode; the forward and the
    # writer wait for each other
    assert worker_nice(cpu, "reader") == WORKER_NICE and worker_nice(cpu, "writer") == 0
    base = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, base + 5)
    with worker_threads(2, "gsae-test", 5) as pool:
        seen = set(pool.map(lambda _: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), range(8)))
    assert seen == {expected}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's stays
    processes = ChunkProcesses(2, SharedBuffers(), nice=5)
    try:
        processes.wait_ready()
        assert {os.getpriority(os.PRIO_PROCESS, w.process.pid) for w in processes._workers} == {expected}
    finally:
        processes.close()
        processes.shared.close()
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
