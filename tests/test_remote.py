"""Caches and runs on object storage (moto's S3 server on loopback) and grouping on a Dask cluster:
each gives what the local path gives, byte for byte, matrix for matrix, weight for weight."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from conftest import run_cli

CACHE_ARGS = ["--tokens", 3000, "--context-length", 64, "--batch-size", 8, "--chunk-tokens", 500]
# on the CPU: weights are compared bit for bit (a CUDA step is reproducible only up to the order of its sums)
TRAIN_ARGS = ["--groups", 2, "--tokens", 1024, "--batch-size", 256, "--device", "cpu"]


def _s3():
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return fs


def _local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _remote_files(url: str) -> dict[str, bytes]:
    fs = _s3()
    root = url.removeprefix("s3://")
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)}


def test_cache_to_eval_on_s3_gives_what_a_local_path_gives(tiny_llama, bucket, tmp_path, capsys):
    local, remote = tmp_path / "c", f"{bucket}/caches/c"
    for cache in (local, remote):
        code, _, err = run_cli(["cache", "--model", tiny_llama, "--cache", cache, *CACHE_ARGS], capsys)
        assert code == 0, err
    ours, theirs = _local_files(local), _remote_files(remote)
    ours.pop("timing.json"), theirs.pop("timing.json")  # wall-clock seconds, outside the store's bytes
    assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours)

    code, out, err = run_cli(["info", "--cache", remote], capsys)
    assert code == 0 and "complete" in out, err
    code, out, err = run_cli(["verify", "--cache", remote], capsys)
    assert code == 0 and "ok" in out, err

    for cache in (local, remote):
        assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    grouping = {name: json.loads(files["groups/amad.json"]) for name, files in
                (("local", _local_files(local)), ("remote", _remote_files(remote)))}
    np.testing.assert_array_equal(np.array(grouping["local"]["distance"]), np.array(grouping["remote"]["distance"]))
    assert grouping["local"]["curve"] == grouping["remote"]["curve"]

    runs = {"local": tmp_path / "r", "remote": f"{bucket}/runs/r"}
    for name, cache in (("local", local), ("remote", remote)):
        code, _, err = run_cli(["train", "--cache", cache, "--out", runs[name], *TRAIN_ARGS], capsys)
        assert code == 0, err
        code, _, err = run_cli(["eval", "--run", runs[name], "--windows", 2], capsys)
        assert code == 0, err
    remote_run = _remote_files(runs["remote"])
    assert not any(key.startswith("checkpoints/") for key in remote_run)  # removed once trained, there too
    for i in range(2):
        ours_w = load_file(str(runs["local"] / f"sae_{i}.safetensors"))
        theirs_w = load_bytes(remote_run[f"sae_{i}.safetensors"])
        assert all(torch.equal(ours_w[k], theirs_w[k]) for k in ours_w)
    records = {"local": json.loads((runs["local"] / "eval.json").read_text())["records"],
               "remote": json.loads(remote_run["eval.json"])["records"]}
    for a, b in zip(records["local"], records["remote"]):
        assert a["fvu"] == b["fvu"] and a["ce_spliced"] == b["ce_spliced"]
    assert run_cli(["export", "--run", runs["remote"]], capsys)[0] == 0
    # again, with a trailing slash: the same run's export, rewritten in place; another run's: refused
    assert run_cli(["export", "--run", runs["remote"] + "/"], capsys)[0] == 0
    code, _, err = run_cli(["export", "--run", runs["local"], "--out", f"{runs['remote']}/export-saelens"], capsys)
    assert code == 1 and "not an export of this run" in err
    assert run_cli(["report", "--runs", runs["remote"], "--out", f"{bucket}/report"], capsys)[0] == 0
    assert "| amad-g2 |" in _remote_files(f"{bucket}/report")["report.md"].decode()


def test_credentials_are_never_written(tiny_llama, bucket, capsys):
    remote = f"{bucket}/c"
    code, _, err = run_cli(["cache", "--model", tiny_llama, "--cache", remote, *CACHE_ARGS,
                            "--storage-option", "anon=false"], capsys)
    assert code == 0, err
    for name, data in _remote_files(remote).items():
        assert b"gsae-test" not in data, name  # the dummy key and secret


def test_a_missing_protocol_and_a_bad_storage_option_are_one_line(capsys):
    code, _, err = run_cli(["info", "--cache", "nosuchfs://bucket/c"], capsys)
    assert code == 1 and "nosuchfs://" in err and "Traceback" not in err
    code, _, err = run_cli(["info", "--cache", "s3://bucket/c", "--storage-option", "novalue"], capsys)
    assert code == 1 and "key=value" in err


def test_access_denied_by_object_storage_is_named_as_such(capsys, monkeypatch):
    """s3fs turns a 403 into Python's PermissionError (botocore's error its cause): a wrong key or a denied
    bucket read "PermissionError: Forbidden (an input gsae does not check, or a bug ...)"."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    import stores.activation_store as activation_store
    from stores.remote import describe_storage_error

    denied = translate_boto_error(ClientError({"Error": {"Code": "AccessDenied", "Message": "Forbidden"}},
                                              "ListObjectsV2"))
    assert isinstance(denied, PermissionError)

    def refused(path):
        raise denied

    monkeypatch.setattr(activation_store, "probe", refused)
    code, _, err = run_cli(["info", "--cache", "s3://denied/c"], capsys)
    assert code == 1 and "object storage: PermissionError" in err and "AWS_ACCESS_KEY_ID" in err, err
    assert "a bug" not in err and len(err.strip().splitlines()) == 1, err
    # S3's other refusals, which s3fs raises as a plain OSError (a wrong region: helper-75)
    region = translate_boto_error(ClientError({"Error": {"Code": "AuthorizationHeaderMalformed",
                                                         "Message": "the region 'us-east-1' is wrong"}}, "ListObjectsV2"))
    assert type(region) is OSError and describe_storage_error(region).startswith("object storage: OSError: ")
    # a refusal of the local disk, and a missing key, keep their own messages
    assert describe_storage_error(PermissionError(13, "Permission denied")) is None
    assert describe_storage_error(translate_boto_error(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))) \
        is None


def test_a_storage_error_on_a_dask_worker_says_where_its_credentials_come_from(monkeypatch):
    """A worker without credentials raised NoCredentialsError, whose line told to pass --storage-option, which
    never reaches a worker (helper-74)."""
    import contextlib

    import distributed
    from botocore.exceptions import NoCredentialsError

    import pipeline.grouping as grouping
    from pipeline.errors import GsaeError

    def no_credentials(*args, **kwargs):
        raise NoCredentialsError()

    monkeypatch.setattr(distributed, "Client", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(grouping, "distance_matrix", no_credentials)
    monkeypatch.setattr(grouping, "sample_chunks", lambda *args: [0])

    class Store:
        def readable_rows(self, chunk):
            return 0, 10

    with pytest.raises(GsaeError, match="^on a Dask worker: object storage: NoCredentialsError: .*from its own "
                                        "environment, not from --storage-option"):
        grouping.compute_distances(Store(), [0, 1], 10, 0, scheduler="tcp://nowhere:8786")


def test_a_cache_in_a_bucket_that_is_not_there_says_so(bucket, capsys):
    """`gsae info` said "no gsae cache ...; create one with `gsae cache`", which then failed on the bucket."""
    code, _, err = run_cli(["info", "--cache", f"{bucket}-none/c"], capsys)
    assert code == 1 and f"its bucket {bucket.removeprefix('s3://')}-none was not found" in " ".join(err.split()), err
    code, _, err = run_cli(["info", "--cache", f"{bucket}/c"], capsys)
    assert code == 1 and "create one with `gsae cache`" in err and "bucket" not in err.replace(bucket, ""), err


def test_a_storage_option_of_the_wrong_type_is_named():
    """s3fs took anon=maybe (a string) as true: the run went anonymous without a word."""
    from stores.remote import RemoteError, check_option_types

    with pytest.raises(RemoteError, match="--storage-option anon: 'maybe' is not true or false"):
        check_option_types("s3", {"anon": "maybe"})
    with pytest.raises(RemoteError, match="--storage-option max_concurrency: 'lots' is not a number"):
        check_option_types("s3", {"max_concurrency": "lots"})
    with pytest.raises(RemoteError, match="--storage-option use_ssl: 1 is not true or false"):
        check_option_types("s3", {"use_ssl": 1})
    # right types, null, options without a default to go by, and those s3fs passes on to its session: left to s3fs
    check_option_types("s3", {"anon": True, "max_concurrency": 4, "endpoint_url": "http://127.0.0.1:9000",
                              "client_kwargs": {"region_name": "x"}, "profile": "p", "use_ssl": None})
    # other file systems' defaults do not tell their types: gcsfs's requester_pays=False takes a project name
    check_option_types("memory", {"global_store": "maybe"})


def test_storage_options_the_file_system_cannot_take_are_named(tiny_llama, bucket, capsys, monkeypatch):
    """An option s3fs passes on to its session failed there, as a TypeError "an input gsae does not check,
    or a bug"; a dict given as broken JSON reached s3fs as a string ('str' object has no attribute 'copy')."""
    import copy

    import fsspec

    monkeypatch.setattr(fsspec.config, "conf", copy.deepcopy(fsspec.config.conf))  # this test's options stay here
    code, _, err = run_cli(["info", "--cache", f"{bucket}/c", "--storage-option", "bogus_opt=1"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--storage-option bogus_opt: the file system does not take it" in err
    code, _, err = run_cli(["info", "--cache", f"{bucket}/c", "--storage-option", "client_kwargs={bad"], capsys)
    assert code == 1 and "--storage-option client_kwargs: '{bad' is not valid JSON" in err, err


def test_group_on_a_two_process_dask_cluster_gives_the_local_matrix(tiny_llama, bucket, tmp_path, capsys,
                                                                     monkeypatch):
    """Workers open the store by URL themselves (credentials from their environment): the same D as the
    local threaded scheduler, for a local cache and for one on S3.  A local cache named relatively is found by
    workers started in another folder (they looked for it under their own: "no gsae cache at c")."""
    distributed = pytest.importorskip("distributed")
    caches = [tmp_path / "c", f"{bucket}/c"]
    for cache in caches:
        assert run_cli(["cache", "--model", tiny_llama, "--cache", cache, *CACHE_ARGS], capsys)[0] == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.chdir(tmp_path)  # the workers stay where they started
        caches[0] = Path("c")
        for cache in caches:
            args = ["group", "--cache", cache, "--metric", "amad"]
            assert run_cli(args, capsys)[0] == 0
            read = (lambda: json.loads((Path(cache) / "groups" / "amad.json").read_text())) if isinstance(cache, Path) \
                else (lambda: json.loads(_remote_files(cache)["groups/amad.json"]))
            local = read()
            code, _, err = run_cli([*args, "--force", "--scheduler", cluster.scheduler_address], capsys)
            assert code == 0, err
            np.testing.assert_array_equal(np.array(read()["distance"]), np.array(local["distance"]))
        if not torch.cuda.is_available():  # a worker's own error comes back as one line saying where it arose
            code, _, err = run_cli(["group", "--cache", caches[0], "--force", "--device", "cuda",
                                    "--scheduler", cluster.scheduler_address], capsys)
            assert code == 1 and err.startswith("error: on a Dask worker: --device cuda") and "Traceback" not in err, err


def test_torchrun_train_spreads_the_saes_and_gives_the_single_process_weights(tiny_llama, tmp_path, capsys):
    """Two ranks (gloo, CPU): each trains its SAEs, rank 0 writes the run; the files hold what one
    process writes, weight for weight."""
    import subprocess
    import sys

    from conftest import ROOT

    cache = tmp_path / "c"
    assert run_cli(["cache", "--model", tiny_llama, "--cache", cache, *CACHE_ARGS], capsys)[0] == 0
    assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    # compared bit for bit; 101 steps: at step 100 rank 0 decides whether a checkpoint is due by time, a
    # collective every rank must reach
    args = ["train", "--cache", cache, "--groups", 3, "--tokens", 101 * 256, "--batch-size", 256,
            "--checkpoint-every", 40, "--device", "cpu"]
    code, out, _ = run_cli([*args, "--out", tmp_path / "one"], capsys)
    assert code == 0 and "the SAEs take turns, so their training took about the sum" in " ".join(out.split()), out
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "cli.py", *map(str, args), "--out", str(tmp_path / "two")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(3):
        ours = load_file(str(tmp_path / "one" / f"sae_{i}.safetensors"))
        theirs = load_file(str(tmp_path / "two" / f"sae_{i}.safetensors"))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), i
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert [r["held_out_fvu"] for r in one["saes"]] == [r["held_out_fvu"] for r in two["saes"]]
    # side by side: not "the SAEs take turns, so their training took about the sum" (helper-74)
    said = re.search(r"2 ranks trained side by side, each its SAEs in turn, so their training took about the longest "
                     r"rank's sum, ([\d.,]+) s", " ".join(result.stdout.split()))
    assert said and float(said[1]) < sum(r["seconds"] for r in two["saes"]), result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["sae"]) for r in metrics}) == [(r["step"], r["sae"]) for r in metrics]
    assert {r["sae"] for r in metrics} == {0, 1, 2}
    # the same torchrun command again: every rank learns from rank 0 that the run is trained already
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "cli.py", *map(str, args), "--out", str(tmp_path / "two")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert said.count("trained already") == 1 and "Traceback" not in said, said  # rank 0 says it, once
    assert json.loads((tmp_path / "two" / "summary.json").read_text()) == two


def test_ranks_get_balanced_whole_saes():
    from itertools import product

    from pipeline.ranks import assign

    assert assign([5.0] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]  # equal tokens per SAE: counts differ by one at most
    rng = np.random.default_rng(0)
    for _ in range(30):  # longest-first greedy against the best split found by brute force: within 4/3
        costs = rng.integers(1, 20, size=int(rng.integers(1, 8))).tolist()
        owner = assign(costs, 3)
        load = max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(3))
        best = min(max(sum(c for c, o in zip(costs, split) if o == r) for r in range(3))
                   for split in product(range(3), repeat=len(costs)))
        assert load <= 4 / 3 * best + 1e-9


def test_write_whole_uses_a_temporary_of_its_own_and_removes_stale_ones(tmp_path):
    """Two `gsae eval` of one run shared `.eval.json.partial`: the second's rename took the first's file
    away, which then failed ("No such file or directory"). Each writer now has its own temporary; those a
    killed writer left (older than an hour; gsae's older, unnamed one too) go at the next write of the file."""
    import threading
    import time

    from stores.remote import STALE_SECONDS, write_whole

    target = tmp_path / "eval.json"
    old, recent = f".eval.json.{'a' * 32}.partial", f".eval.json.{'b' * 32}.partial"
    pid_named = ".eval.json.12345-6789.partial"  # as 7866963 named them
    for name in (old, ".eval.json.partial", pid_named, recent, ".eval.json.x.partial", ".eval.json2.partial"):
        (tmp_path / name).write_text("left")
    for name in (old, ".eval.json.partial", pid_named, ".eval.json.x.partial", ".eval.json2.partial"):
        stamp = time.time() - STALE_SECONDS - 60
        os.utime(tmp_path / name, (stamp, stamp))
    errors = []

    def write(text: str) -> None:
        try:
            for _ in range(200):
                write_whole(str(target), text * 1000)
        except OSError as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(text,)) for text in "ab"]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    assert not errors and target.read_text() in ("a" * 1000, "b" * 1000)
    # the stale temporaries of eval.json are gone; a recent one (a writer at work) and other files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval.json", recent, ".eval.json.x.partial",
                                                                 ".eval.json2.partial"])
