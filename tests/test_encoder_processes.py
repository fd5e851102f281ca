"""The cache writer's encoder processes (`gsae cache --writer processes`, stores/chunk_files.py): zarr's bytes
from shared memory, the same cache as the writer threads, kill -9 and Ctrl-C, errors, and when auto uses them."""

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
import pytest

from conftest import ROOT, run_cli
from stores import ActivationStore, compute_chunk_stats
from stores.chunk_files import EncoderProcesses, SharedBuffers
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
    """Chunks written by the encoder processes, the activations read where they lie in shared memory, the
    tokens and statistics sent along, make zarr's store file for file; a short chunk (through zarr, on the
    threads) and an all-zero one (no file) included."""
    import stores.activation_store as module

    def make(path: Path, processes: bool) -> dict[str, bytes]:
        store = ActivationStore.create(str(path), n_layers=2, d_model=8, n_tokens=450, chunk_tokens=100, dtype=dtype)
        shared = SharedBuffers()
        encoder = EncoderProcesses(2, shared) if processes else None
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
    real_submit = EncoderProcesses.submit

    def counted(self, path, codec, values):
        sent.append(Path(path).relative_to(tmp_path / "processes").parts[0:2])
        return real_submit(self, path, codec, values)

    mp = pytest.MonkeyPatch()
    mp.setattr(EncoderProcesses, "submit", counted)
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
    # whole chunks only: 4 of each layer (the all-zero one too: its file removed there), 4 of the tokens,
    # 5 of each statistic; the short chunk 4 of the layers and tokens through zarr
    assert collections.Counter(sent) == {("layers", "0"): 4, ("layers", "1"): 4, ("tokens", "c"): 4,
                                         ("stats", "chunk_sum"): 5, ("stats", "chunk_norm_sum"): 5,
                                         ("stats", "chunk_overflow"): 5}
    assert not any(name.endswith(".partial") for name in ours)


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
    encoder = EncoderProcesses(1, shared)
    try:
        values = np.ones((4, 4), np.float16)
        error = encoder.submit(str(blocker / "c" / "0"), codec, values).exception(timeout=60)
        assert isinstance(error, OSError) and error.errno == errno.ENOTDIR
        encoder.submit(str(tmp_path / "ok" / "0"), codec, values).result(timeout=60)
        assert (tmp_path / "ok" / "0").stat().st_size > 4
        encoder._workers[0].process.kill()
        failed = encoder.submit(str(tmp_path / "ok" / "1"), codec, values).exception(timeout=60)
        assert isinstance(failed, OSError) and "encoder process" in str(failed)  # one line from the store
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


def test_ctrl_c_to_the_process_group_stops_the_cache_and_its_processes_in_one_line(tiny_neox, tmp_path):
    """Ctrl-C in a terminal reaches every process of the group: the encoder processes ignore it, the cache
    stops with its one line, and no process is left."""
    cache = tmp_path / "c"
    command = [sys.executable, "-c", "import sys; sys.argv[0] = 'gsae'; import cli; cli.main()",
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
    os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _gone(workers)


def test_writer_choice(tiny_neox, tmp_path, capsys, monkeypatch):
    """auto: threads where the model runs on the CPU, processes on a GPU where they can work; an explicit
    --writer processes that cannot work is a one-line error."""
    import torch

    import pipeline.cache as cache_module

    store = ActivationStore.create(str(tmp_path / "s"), n_layers=2, d_model=8, n_tokens=400, chunk_tokens=100)
    lossy = ActivationStore.create(str(tmp_path / "l"), n_layers=2, d_model=8, n_tokens=400, chunk_tokens=100,
                                   compression="lossy")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(cache_module, "usable_cores", lambda: 16)
    monkeypatch.setattr(cache_module, "_can_pin_shared_memory", lambda: True)
    assert cache_module._writer_kind("auto", store, cpu, 1 << 20) == "threads"
    assert cache_module._writer_kind("auto", store, cuda, 1 << 20) == "processes"
    assert cache_module._writer_kind("auto", lossy, cuda, 1 << 20) == "threads"
    assert cache_module._writer_kind("processes", store, cpu, 1 << 20) == "processes"
    monkeypatch.setattr(cache_module, "_can_pin_shared_memory", lambda: False)  # CUDA cannot pin it here
    assert cache_module._writer_kind("auto", store, cuda, 1 << 20) == "threads"
    monkeypatch.setattr(cache_module, "shared_memory_room", lambda: 64 << 20)  # a container's /dev/shm
    assert cache_module._writer_kind("auto", store, cpu, 600 << 20) == "threads"
    with pytest.raises(Exception, match="needs 600 MiB of shared memory"):
        cache_module._writer_kind("processes", store, cpu, 600 << 20)
    monkeypatch.undo()

    code, _, err = run_cli([*_cache_args(tiny_neox, 3000), "--cache", tmp_path / "lossy", "--compression", "lossy",
                            "--writer", "processes"], capsys)
    assert code == 1 and "--writer processes needs a lossless cache on a local disk" in err
    assert len(err.strip().splitlines()) == 1
