"""Several writers of one store: `gsae cache` under torchrun (2 CPU ranks over gloo), per-chunk commit
markers, per-writer resume after kill -9, old stores with only the attribute counter, and S3."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from stores import ActivationStore, read_seconds_writing

CONTEXT = 32


def _args(model: Path, cache: str | Path, tokens: int, chunk_tokens: int = 50) -> list[str]:
    return ["cache", "--model", str(model), "--cache", str(cache), "--tokens", str(tokens), "--context-length",
            str(CONTEXT), "--batch-size", "4", "--chunk-tokens", str(chunk_tokens), "--write-threads", "1"]


def _torchrun(args: list[str], ranks: int = 2) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node N cli.py ARGS`` (a free rendezvous port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "cli.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return out, err


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a cache but timing.json (wall-clock time differs between runs by nature)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


def _markers(cache: Path) -> int:
    return len(list((cache / "commits").glob("*.json"))) if (cache / "commits").is_dir() else 0


def test_torchrun_two_ranks_give_the_bytes_of_one_process(tiny_neox, tmp_path, capsys):
    # 1500 rows, chunks of 50 rows, batches of 4 windows of 31 rows: batches straddle chunks and the
    # ranks' boundary (chunk 15, row 750 is inside batch 6), and the last chunk is whole
    assert run_cli(_args(tiny_neox, tmp_path / "one", 1500), capsys)[0] == 0
    out, err = _finish(_torchrun(_args(tiny_neox, tmp_path / "two", 1500)))
    assert _tree_bytes(tmp_path / "two") == _tree_bytes(tmp_path / "one")
    assert not (tmp_path / "two" / "commits").exists() and not (tmp_path / "two" / "timing").exists()
    assert "1,500" in out  # rank 0's summary counts every rank's rows
    store = ActivationStore.open(str(tmp_path / "two"))
    assert store.complete and store.n_tokens == 1500 and read_seconds_writing(store) > 0


def test_torchrun_when_the_corpus_runs_out(tiny_neox, tmp_path, capsys):
    """The corpus ends inside rank 0's chunks: rank 1 has nothing to write, rank 0 writes a short chunk."""
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    args = [*_args(tiny_neox, tmp_path / "one", 100000, chunk_tokens=96), "--dataset", str(text)]
    assert run_cli(args, capsys)[0] == 0
    args[args.index(str(tmp_path / "one"))] = str(tmp_path / "two")
    _, err = _finish(_torchrun(args))
    assert _tree_bytes(tmp_path / "two") == _tree_bytes(tmp_path / "one")
    assert 0 < ActivationStore.open(str(tmp_path / "two")).n_tokens < 100000


def test_killed_rank_resumes_to_identical_bytes(tiny_neox, tmp_path, capsys):
    args = _args(tiny_neox, tmp_path / "whole", 12000)
    assert run_cli(args, capsys)[0] == 0
    killed = tmp_path / "killed"
    args[args.index(str(tmp_path / "whole"))] = str(killed)
    process = _torchrun(args)
    deadline = time.time() + 180
    while _markers(killed) < 30 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; raise --tokens"
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no torchrun workers found"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank; torchrun then stops the other
    process.communicate(timeout=60)
    assert process.returncode != 0

    partial = ActivationStore.open(str(killed), allow_partial=True)
    committed = partial.committed_chunks()
    # on a loaded machine the ranks may have committed every chunk before the kill (seen once in the newest-stack
    # suite): killed before the store was finalized, that is a partial store to resume too
    assert not partial.complete and 0 < len(committed) <= partial.n_chunks_planned
    assert partial.attrs["chunks_written"] == 0  # several writers never touch the attribute counter
    # partial readers see the committed prefix only
    assert partial.n_tokens == partial.tokens_written <= sum(committed.values())
    with pytest.raises(Exception, match="incomplete"):
        ActivationStore.open(str(killed))
    before = {name: (killed / name).stat().st_mtime_ns for name in
              [f"layers/0/c/{chunk}/0" for chunk in committed]}

    _finish(_torchrun(args))
    assert _tree_bytes(killed) == _tree_bytes(tmp_path / "whole")
    # a committed chunk is not written again: each rank redoes only its own uncommitted chunks
    assert before == {name: (killed / name).stat().st_mtime_ns for name in before}


def test_old_store_with_only_the_attribute_counter_opens_and_resumes(tiny_neox, tmp_path, capsys):
    """A store written by one process (attribute counter, no markers), killed half way, resumed by a
    single process and by two ranks."""
    args = _args(tiny_neox, tmp_path / "whole", 3000)
    assert run_cli(args, capsys)[0] == 0
    whole = _tree_bytes(tmp_path / "whole")
    for name, resume in [("single", run_cli), ("torchrun", None)]:
        old = tmp_path / name
        assert run_cli(_args(tiny_neox, old, 3000), capsys)[0] == 0
        _rewind_to(old, chunks=23)  # as a killed single writer leaves it
        partial = ActivationStore.open(str(old), allow_partial=True)
        assert not partial.markers and partial.tokens_written == 23 * 50 and partial.n_chunks == 23
        assert np.array_equal(partial.tokens(), ActivationStore.open(str(tmp_path / "whole")).tokens(0, 1150))
        if resume is not None:
            assert resume(_args(tiny_neox, old, 3000), capsys)[0] == 0
        else:
            _finish(_torchrun(_args(tiny_neox, old, 3000)))
        assert _tree_bytes(old) == whole, name


def _rewind_to(cache: Path, chunks: int) -> None:
    """Turn a complete single-writer store back into one killed after ``chunks`` commits: the attribute
    counter, no statistics, chunk files beyond the counter left in place (as a killed run leaves them)."""
    meta = json.loads((cache / "zarr.json").read_text())
    attributes = meta["attributes"]
    attributes.update(chunks_written=chunks, tokens_written=chunks * attributes["chunk_tokens"], complete=False)
    for key in ("overflow_values",):
        attributes.pop(key, None)
    (cache / "zarr.json").write_text(json.dumps(meta, indent=2))
    import shutil

    for name in ("mean", "norm"):
        shutil.rmtree(cache / "stats" / name)


def test_markers_commit_chunks_out_of_order(tmp_path):
    """Chunks committed by markers need not be a prefix; readers see the prefix; finalize needs all."""
    from stores import StoreError, compute_chunk_stats

    sizes = [40, 40, 40, 17]
    store = ActivationStore.create(str(tmp_path / "c"), n_layers=2, d_model=8, n_tokens=sum(sizes), chunk_tokens=40)
    store.use_markers()
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((sum(sizes), 8)).astype(np.float16) for _ in range(2)]
    tokens = rng.integers(0, 100, sum(sizes), dtype=np.int32)

    def write(chunk: int, target: ActivationStore) -> None:
        rows = slice(chunk * 40, chunk * 40 + sizes[chunk])
        values = [layer[rows] for layer in layers]
        target.write_chunk(chunk, values, tokens[rows], compute_chunk_stats(values, "float16"))

    other = ActivationStore.open(str(tmp_path / "c"), mode="r+", allow_partial=True)
    other.use_markers()
    write(1, store)
    write(3, store)
    write(2, other)  # a second writer of the same store
    reader = ActivationStore.open(str(tmp_path / "c"), allow_partial=True)
    assert sorted(reader.committed_chunks()) == [1, 2, 3] and reader.n_tokens == 0
    assert reader.markers  # a store holding markers is committed by markers, whoever opens it
    assert reader.attrs["chunks_written"] == 0  # several writers leave the attributes to finalize
    # info and the other commands count every committed chunk ("0 of 137 tokens" under torchrun), and info says
    # what --allow-partial reads
    code, out, err = run_cli(["info", "--cache", tmp_path / "c"])
    shown = " ".join(out.replace("│", " ").split())  # the table's cell, wrapped over its lines
    assert code == 0 and "incomplete: 97 of 137 tokens (3 of 4 chunks); --allow-partial reads the first 0" in shown, \
        out + err
    code, _, err = run_cli(["train", "--cache", tmp_path / "c"])
    assert code == 1 and "is incomplete (97 of 137 tokens)" in err, err
    with pytest.raises(StoreError, match="chunk 0 was not written"):
        store.finalize()
    write(0, other)
    reader = ActivationStore.open(str(tmp_path / "c"), allow_partial=True)
    assert reader.n_tokens == 137 and reader.chunks_written == 4
    store.finalize()
    done = ActivationStore.open(str(tmp_path / "c"))
    assert done.attrs["chunks_written"] == 4 and done.attrs["tokens_written"] == 137
    assert not (tmp_path / "c" / "commits").exists()
    np.testing.assert_array_equal(done.read_rows(1, 0, 137), layers[1])


def _s3_objects(url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    root = url.removeprefix("s3://")
    return {path[len(root):]: fs.cat_file(path) for path in sorted(fs.find(root))
            if not path.endswith("/timing.json")}


def test_remote_cache_killed_with_kill_9_resumes_to_identical_bytes(tiny_neox, bucket, tmp_path, capsys):
    args = _args(tiny_neox, f"{bucket}/whole", 3000)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    killed = f"{bucket}/killed"
    args[args.index(f"{bucket}/whole")] = killed
    command = [sys.executable, "-c", "import cli; cli.main()", *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    zarr_json = f"{killed.removeprefix('s3://')}/zarr.json"
    deadline = time.time() + 180

    def chunks_written() -> int:
        try:
            return json.loads(fs.cat_file(zarr_json))["attributes"]["chunks_written"]
        except (OSError, ValueError, KeyError):
            return 0

    while chunks_written() < 15 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed; raise --tokens"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = ActivationStore.open(killed, allow_partial=True)
    assert not partial.complete and 0 < partial.tokens_written < 3000

    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert _s3_objects(killed) == _s3_objects(f"{bucket}/whole")


def test_remote_torchrun_gives_the_bytes_of_one_process(tiny_neox, bucket, capsys):
    args = _args(tiny_neox, f"{bucket}/one", 1500)
    assert run_cli(args, capsys)[0] == 0
    args[args.index(f"{bucket}/one")] = f"{bucket}/two"
    _finish(_torchrun(args))
    assert _s3_objects(f"{bucket}/two") == _s3_objects(f"{bucket}/one")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("pooled", [False, True], ids=["write_chunk", "start_chunk"])
def test_chunk_files_written_directly_are_zarrs_bytes(tmp_path, monkeypatch, dtype, pooled):
    """A whole local chunk is encoded and written without zarr's write path (_encode_chunk_file); the
    store it makes is zarr's, file for file and byte for byte, for the activations (blosc) and for the
    tokens and statistics (zstd); short chunks and all-zero chunks (not stored) still go through zarr."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import stores.chunk_io as module
    from stores import compute_chunk_stats

    direct = []
    real = module._encode_chunk_file

    def counted(*args):
        written = real(*args)
        direct.extend([args[0].path] if written else [])
        return written

    def make(path: Path, writer) -> dict[str, bytes]:
        monkeypatch.setattr(module, "_encode_chunk_file", writer)
        store = ActivationStore.create(str(path), n_layers=2, d_model=8, n_tokens=450, chunk_tokens=100, dtype=dtype)
        rng = np.random.default_rng(0)
        with ThreadPoolExecutor(2) as pool:
            for chunk in range(5):
                rows = min(100, 450 - chunk * 100)
                values = [rng.standard_normal((rows, 8), dtype=np.float32) for _ in range(2)]
                layers = ([torch.from_numpy(v).bfloat16().view(torch.int16).numpy().view(np.uint16) for v in values]
                          if dtype == "bfloat16" else [v.astype(dtype) for v in values])
                if chunk == 2:
                    layers[1][:] = 0  # equal to the fill value: zarr does not store it
                stats, tokens = compute_chunk_stats(layers, dtype), np.arange(rows, dtype=np.int32)
                if pooled:
                    store.finish_chunk(store.start_chunk(chunk, layers, tokens, stats, pool))
                else:
                    store.write_chunk(chunk, layers, tokens, stats)
        store.finalize()
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file() and p.name != "timing.json"}

    ours = make(tmp_path / "direct", counted)
    monkeypatch.setattr(module, "_remove_empty_chunk_file", lambda *args: False)  # zarr's own, for the empty chunks
    zarrs = make(tmp_path / "zarr", lambda *args: False)
    assert ours.keys() == zarrs.keys() and all(ours[name] == zarrs[name] for name in ours)
    # whole chunks only: chunks 0-3 of layer 0, 0, 1 and 3 of layer 1 (its chunk 2 is all zero: not stored),
    # the tokens' chunks 0-3 (chunk 4 is short), every chunk's sums (never all zero); no overflow counts (all 0)
    assert collections.Counter(direct) == {"layers/0": 4, "layers/1": 3, "tokens": 4, "stats/chunk_sum": 5,
                                           "stats/chunk_norm_sum": 5}
    assert not any(name.endswith(".partial") for name in ours)


@pytest.mark.parametrize("array_name,key", [("layers/0", slice(0, 100)), ("stats/chunk_overflow", 1), ("tokens", slice(100, 200))])
def test_an_all_zero_chunk_removes_its_file_as_zarr_does(tmp_path, monkeypatch, array_name, key):
    """A whole chunk rewritten with zeros (the fill value) leaves no file, whether gsae removes it or zarr."""
    import stores.chunk_io as module

    trees, removed = {}, []
    real = module._remove_empty_chunk_file

    def counted(*args):
        removed.append(real(*args))
        return removed[-1]

    for name, remove in [("direct", counted), ("zarr", lambda *args: False)]:
        monkeypatch.setattr(module, "_remove_empty_chunk_file", remove)
        store = ActivationStore.create(str(tmp_path / name), n_layers=1, d_model=4, n_tokens=300, chunk_tokens=100)
        array = store.group[array_name]
        unchecked = array.with_config({"write_empty_chunks": True})
        shape = array.shape[1:] if isinstance(key, int) else (100, *array.shape[1:])
        module.put(array, unchecked, key, np.ones(shape, dtype=array.dtype))
        before = sorted(p.name for p in (tmp_path / name / array_name / "c").rglob("*") if p.is_file())
        module.put(array, unchecked, key, np.zeros(shape, dtype=array.dtype))
        trees[name] = before, sorted(p.name for p in (tmp_path / name / array_name / "c").rglob("*") if p.is_file())
    assert trees["direct"] == trees["zarr"] and trees["zarr"][0] and not trees["zarr"][1]
    assert removed == [True]  # gsae removed the file itself (the first, non-zero write is not its job)


def test_resumed_cache_bar_never_goes_back(tiny_neox, tmp_path, capsys, monkeypatch):
    """A resumed cache re-reads its committed batches first; the bar stays at the rows already written
    (it went back to 0 and up again, and rich's rate then showed millions of tok/s)."""
    import pipeline.cache as cache_module

    args = _args(tiny_neox, tmp_path / "c", 3000)
    assert run_cli(args, capsys)[0] == 0
    _rewind_to(tmp_path / "c", chunks=40)  # 2,000 of 3,000 rows written
    seen = []
    real = cache_module.make_progress

    def recording(console, unit="tok"):
        progress = real(console, unit)
        update = progress.update

        def record(task, **fields):
            seen.append(fields.get("completed"))
            return update(task, **fields)

        progress.update = record
        return progress

    monkeypatch.setattr(cache_module, "make_progress", recording)
    assert run_cli(args, capsys)[0] == 0
    assert seen and min(seen) == 2000 and seen == sorted(seen) and seen[-1] == 3000


def test_an_incomplete_cache_asked_with_other_settings_is_refused_before_the_model_loads(tiny_neox, tmp_path,
                                                                                        monkeypatch):
    """A killed cache re-run with another --batch-size: refused from its stored recipe, with the line the long
    way (the model loaded) gives; the same command as before still resumes it."""
    import pipeline.cache as cache_module

    args = _args(tiny_neox, tmp_path / "c", 3000)
    assert run_cli(args)[0] == 0
    _rewind_to(tmp_path / "c", chunks=40)
    other = ["8" if previous == "--batch-size" else value for previous, value in zip([None, *args], args)]
    assert other != args
    load = cache_module.load_model

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cache_module, "load_model", no_model)
    code, out, err = run_cli(other)
    early = (out + err).strip().splitlines()[-1]
    assert code == 1 and "--batch-size: 4 there, 8 now" in early and "model was loaded" not in early, out + err
    monkeypatch.setattr(cache_module, "load_model", load)
    monkeypatch.setattr(cache_module, "_complete_as_asked", lambda *a: None)
    code, out, err = run_cli(other)
    assert code == 1 and (out + err).strip().splitlines()[-1] == early
    monkeypatch.undo()
    assert run_cli(args)[0] == 0 and ActivationStore.open(str(tmp_path / "c")).complete


@pytest.mark.parametrize("releases_gil", [False, True])
def test_chunk_checksum_is_zarrs_crc32c_whether_or_not_it_releases_the_gil(monkeypatch, releases_gil):
    """The direct write and decode paths checksum with the crc32c package (GIL released on more than 2
    cores); zarr's crc32c codec uses google_crc32c: the same value for every length, odd ones included."""
    import google_crc32c

    from stores import chunk_files as codecs

    monkeypatch.setattr(codecs, "CHECKSUM_RELEASES_GIL", releases_gil)
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 4096, 1 << 20, (1 << 20) + 3):
        payload = rng.integers(0, 256, size, dtype=np.uint8)
        assert codecs.chunk_checksum(payload) == google_crc32c.value(payload.tobytes())


def test_finalize_totals_kept_while_writing_are_the_chunk_by_chunk_sums_of_what_was_stored(tmp_path, monkeypatch):
    """One writer from chunk 0 keeps the statistics' totals as it commits, so finalize reads none back:
    stats/mean, stats/norm and the overflow count are bit for bit the totals added chunk by chunk in order
    (float64, the definition), and those of a store resumed halfway, whose finalize reads them back."""
    from stores import ChunkStats

    sizes, d, n_layers = [64] * 9 + [23], 8, 3
    rng = np.random.default_rng(5)
    # awkward magnitudes, so that another order of additions would round differently
    stats = [ChunkStats(rng.standard_normal((n_layers, d)) * 10.0 ** rng.integers(-8, 9, (n_layers, d)),
                        rng.random(n_layers) * 1e6, rng.integers(0, 3, n_layers)) for _ in sizes]
    layers = [rng.standard_normal((sum(sizes), d)).astype(np.float16) for _ in range(n_layers)]
    tokens = rng.integers(0, 100, sum(sizes), dtype=np.int32)

    def write(target: ActivationStore, chunks: range) -> None:
        for chunk in chunks:
            rows = slice(chunk * 64, chunk * 64 + sizes[chunk])
            target.write_chunk(chunk, [layer[rows] for layer in layers], tokens[rows], stats[chunk])

    whole = ActivationStore.create(str(tmp_path / "whole"), n_layers=n_layers, d_model=d, n_tokens=sum(sizes),
                                   chunk_tokens=64)
    read_back = []  # the statistics finalize reads back from disk
    summed = ActivationStore._sum_chunk_stats
    monkeypatch.setattr(ActivationStore, "_sum_chunk_stats",
                        lambda self, name, n: read_back.append(name) or summed(self, name, n))
    write(whole, range(len(sizes)))
    assert whole._totals is not None and whole._totals[0] == len(sizes)  # finalize takes them
    whole.finalize()
    assert read_back == []
    half = ActivationStore.create(str(tmp_path / "half"), n_layers=n_layers, d_model=d, n_tokens=sum(sizes),
                                  chunk_tokens=64)
    write(half, range(4))
    resumed = ActivationStore.open(str(tmp_path / "half"), mode="r+", allow_partial=True)
    write(resumed, range(4, len(sizes)))
    assert resumed._totals is None  # it did not see chunks 0-3 committed: finalize reads them all back
    resumed.finalize()
    assert read_back == ["chunk_sum", "chunk_norm_sum", "chunk_overflow"]

    sums, norm_sums, overflow = np.zeros((n_layers, d)), np.zeros(n_layers), np.zeros(n_layers, dtype=np.int64)
    for chunk in stats:
        sums += chunk.sums
        norm_sums += chunk.norm_sums
        overflow += chunk.overflow
    for path in (tmp_path / "whole", tmp_path / "half"):
        done = ActivationStore.open(str(path))
        assert done.mean.tobytes() == (sums / sum(sizes)).astype(np.float32).tobytes()
        assert done.norm.tobytes() == (norm_sums / sum(sizes)).astype(np.float32).tobytes()
        assert done.attrs["overflow_values"] == overflow.tolist()
    assert _tree_bytes(tmp_path / "whole") == _tree_bytes(tmp_path / "half")
