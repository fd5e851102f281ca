"""Stage two (a): distances, AMAD, partitions and `gsae group`."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from conftest import make_cache, run_cli
from pipeline.errors import GsaeError
from pipeline.grouping import (amad, build_grouping, contiguous_agglomeration, contiguous_partition, parse_layers,
                               uniform_partition)
from stores import ActivationStore, to_float32


@pytest.fixture(scope="module")
def llama_cache(tiny_models, tmp_path_factory):
    return make_cache(tiny_models["llama"], tmp_path_factory.mktemp("group") / "c", tokens=2000,
                      context_length=32, batch_size=4, chunk_tokens=128)


def numpy_distance(store: ActivationStore, layers: list[int], row_ranges: list[list[int]]) -> np.ndarray:
    """The definition, in float64 NumPy, independently of gsae's Dask/torch code."""
    rows = np.concatenate([np.arange(a, b) for a, b in row_ranges])
    centred = []
    for layer in layers:
        x = to_float32(store.layer_array(layer).get_orthogonal_selection((rows, slice(None))), store.dtype)
        x = x.astype(np.float64)
        x -= store.mean[layer].astype(np.float64)
        centred.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    n = len(layers)
    distance = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                cosine = np.clip(np.sum(centred[i] * centred[j], axis=1), -1, 1)
                distance[i, j] = np.mean(np.arccos(cosine) / np.pi)
    return distance


def test_distance_matches_float64_numpy(llama_cache, capsys):
    code, out, err = run_cli(["group", "--cache", llama_cache, "--tokens", 700, "--layers", "0-3", "--seed", 3], capsys)
    assert code == 0, err
    saved = json.loads((llama_cache / "groups" / "amad.json").read_text())
    store = ActivationStore.open(str(llama_cache))
    assert saved["sample"]["tokens"] >= 700 and saved["sample"]["seed"] == 3
    distance = np.asarray(saved["distance"])
    expected = numpy_distance(store, saved["layers"], saved["sample"]["row_ranges"])
    np.testing.assert_allclose(distance, expected, atol=1e-4)
    assert np.allclose(distance, distance.T) and np.all(np.diag(distance) == 0)
    assert distance.min() >= 0 and distance.max() <= 1
    assert (llama_cache / "groups" / "amad-distance.png").stat().st_size > 1000
    assert (llama_cache / "groups" / "amad-amad.png").stat().st_size > 1000
    assert "G*" in out


def test_a_group_is_shown_as_a_range_only_where_its_layers_are_consecutive():
    from pipeline.grouping import layer_span

    assert [layer_span(g) for g in ([3], [0, 1, 2], [0, 2], [4, 6, 8])] == ["3", "0-2", "0,2", "4,6,8"]
    assert layer_span([5, 6, 7, 8], "–") == "5–8"
    assert layer_span([0, 1, 2, 5, 7, 8], "–", ", ") == "0–2, 5, 7–8"


def test_amad_of_a_hand_made_matrix():
    d = np.array([[0, .1, .4, .5],
                  [.1, 0, .3, .45],
                  [.4, .3, 0, .05],
                  [.5, .45, .05, 0]])
    assert amad(d, [[0, 1], [2, 3]]) == pytest.approx((0.1 + 0.05) / 2)
    assert amad(d, [[0, 1, 2, 3]]) == pytest.approx(0.5)
    assert amad(d, [[0], [1, 2], [3]]) == pytest.approx(0.3 / 3)
    assert amad(d, [[0], [1], [2], [3]]) == 0
    assert contiguous_partition(d, 2) == [[0, 1], [2, 3]]
    grouping = build_grouping("amad", [0, 1, 2, 3], d, 0.2, {})
    assert grouping.groups_for(3) == [[0], [1], [2, 3]]  # merges: (2,3) at .05, then (0,1) at .1
    assert [p["amad"] for p in grouping.curve] == pytest.approx([0.5, 0.075, 0.05 / 3, 0.0])
    assert grouping.chosen == 2  # smallest G with AMAD < 0.2
    assert build_grouping("amad", [0, 1, 2, 3], d, 0.05, {}).chosen == 3
    assert build_grouping("amad", [0, 1, 2, 3], d, 0.01, {}).chosen == 4


def test_partitions_are_contiguous_and_cover_every_layer_once():
    rng = np.random.default_rng(0)
    points = np.cumsum(rng.random(12))
    d = np.abs(points[:, None] - points[None, :]) / points.max()
    layers = list(range(3, 15))
    for metric in ("amad", "uniform"):
        grouping = build_grouping(metric, layers, d, 0.2, {})
        for point in grouping.curve:
            flat = [layer for group in point["groups"] for layer in group]
            assert flat == layers and len(point["groups"]) == point["n_groups"]
            for group in point["groups"]:
                assert group == list(range(group[0], group[-1] + 1))
        assert grouping.curve[-1]["amad"] == 0
    assert uniform_partition(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def _brute_force_merge(distance: np.ndarray, groups: list[list[int]]) -> list[list[int]]:
    """The next merge by the definition, with plain loops: every adjacent pair's largest member distance."""
    best, best_link = None, None
    for position in range(len(groups) - 1):
        link = max(float(distance[i][j]) for i in groups[position] for j in groups[position + 1])
        if best_link is None or link < best_link:  # strict: a tie keeps the lower index
            best, best_link = position, link
    return groups[:best] + [groups[best] + groups[best + 1]] + groups[best + 2:]


@pytest.mark.parametrize("seed", range(60))
def test_every_merge_matches_a_brute_force_over_adjacent_pairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 14))
    values = rng.random((n, n))
    if seed % 3 == 0:
        values = np.round(values * 4) / 4  # many exact ties
    distance = np.triu(values, 1) + np.triu(values, 1).T
    partitions = contiguous_agglomeration(distance)
    assert sorted(partitions) == list(range(1, n + 1))
    groups = [[i] for i in range(n)]
    for n_groups in range(n - 1, 0, -1):
        groups = _brute_force_merge(distance, groups)
        assert partitions[n_groups] == groups


def test_a_drifting_chain_is_split_in_its_middle():
    # Neighbours all ~0.01 apart, distance growing along the chain; the step after layer 0 is the
    # largest adjacent one, so "cut at the largest adjacent distance" (scikit-learn with a chain
    # connectivity, issue #23550) would split {0} | {1..15}. Complete linkage splits in the middle.
    steps = np.array([0.0110] + [0.0100] * 14)
    position = np.concatenate([[0.0], np.cumsum(steps)])
    distance = np.abs(position[:, None] - position[None, :])
    halves = contiguous_partition(distance, 2)
    assert all(7 <= len(g) <= 9 for g in halves), halves
    quarters = contiguous_partition(distance, 4)
    assert all(3 <= len(g) <= 5 for g in quarters), quarters


def test_a_block_structured_matrix_gives_its_blocks():
    sizes = [3, 5, 2, 4]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(1)
    noise = rng.random((14, 14)) * 0.05
    distance = np.where(labels[:, None] == labels[None, :], 0.05, 0.6) + noise + noise.T
    np.fill_diagonal(distance, 0)
    bounds = np.cumsum([0, *sizes])
    expected = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    assert contiguous_partition(distance, 4) == expected
    grouping = build_grouping("amad", list(range(14)), distance, 0.2, {})
    assert grouping.chosen == 4 and grouping.groups_for(4) == expected


def test_one_agglomeration_gives_nested_partitions():
    rng = np.random.default_rng(5)
    values = rng.random((10, 10))
    distance = np.triu(values, 1) + np.triu(values, 1).T
    partitions = contiguous_agglomeration(distance)
    for n_groups in range(1, 10):
        coarse = partitions[n_groups]
        for group in partitions[n_groups + 1]:  # every finer group lies inside one coarser group
            assert any(set(group) <= set(c) for c in coarse)


def test_parse_layers():
    assert parse_layers(None, 30) == list(range(29))
    assert parse_layers("0-3,7,5", 30) == [0, 1, 2, 3, 5, 7]
    assert parse_layers("0-1", 2) == [0, 1]
    # a 2-block model: the default leaves one layer, and the message says how to group both
    with pytest.raises(GsaeError, match=r"leaves out the last of this model's 2 blocks .*pass --layers 0-1 \(to gsae group or gsae run\)"):
        parse_layers(None, 2)
    with pytest.raises(GsaeError, match=r"at least two layers \(got 0: the cache has 1 block\)"):
        parse_layers(None, 1)


def test_rerun_reuses_and_train_can_read_groups(llama_cache, capsys):
    args = ["group", "--cache", llama_cache, "--tokens", 500, "--metric", "uniform"]
    assert run_cli(args, capsys)[0] == 0
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "reusing" in err
    from pipeline.group import load_grouping

    grouping = load_grouping(ActivationStore.open(str(llama_cache)), "uniform")
    assert grouping.groups_for(2) == [[0, 1], [2]]  # layers 0..L-2 of the 4-layer model


def test_pictures_drawn_for_a_grouping_whose_record_a_kill_stopped_are_redrawn(llama_cache, tmp_path, capsys):
    """The pictures are drawn before the record is written: a kill in between left another grouping's
    pictures beside the record, and the same command reused the record and never drew them again."""
    import hashlib
    import shutil

    import pipeline.group as group_module

    cache = tmp_path / "c"
    shutil.copytree(llama_cache, cache)
    shutil.rmtree(cache / "groups", ignore_errors=True)
    args = ["group", "--cache", cache, "--tokens", 500, "--threshold", 0.2]
    assert run_cli(args, capsys)[0] == 0
    record = json.loads((cache / "groups" / "amad.json").read_text())

    def pictures() -> dict[str, str]:
        return {name: hashlib.sha256((cache / name).read_bytes()).hexdigest() for name in record["pictures"]}

    assert record["picture_sha256"] == pictures()
    real = group_module.write_side_file

    def killed(store, relative, data):
        if relative == "groups/amad.json":
            raise KeyboardInterrupt
        return real(store, relative, data)

    group_module.write_side_file = killed
    try:
        assert run_cli([*args[:-1], 0.05], capsys)[0] == 130
    finally:
        group_module.write_side_file = real
    assert json.loads((cache / "groups" / "amad.json").read_text()) == record  # the record of threshold 0.2 ...
    assert pictures() != record["picture_sha256"]  # ... beside the pictures of 0.05
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "reusing" in err, err
    assert pictures() == json.loads((cache / "groups" / "amad.json").read_text())["picture_sha256"] \
        == record["picture_sha256"]


@pytest.mark.parametrize("args,message", [
    (["--threshold", 0], "--threshold must be between 0 and 1"),
    (["--threshold", 1.5], "--threshold must be between 0 and 1"),
    (["--layers", "0-9"], "the cache has layers 0-3"),
    (["--layers", "2"], "at least two layers"),
    (["--layers", "x"], "--layers"),
])
def test_bad_group_arguments(args, message, llama_cache, capsys):
    code, _, err = run_cli(["group", "--cache", llama_cache, *args], capsys)
    assert code == 1 and message in err and "Traceback" not in err


def test_a_grouping_from_an_older_format_is_recomputed(llama_cache, capsys):
    from pipeline.group import load_grouping

    args = ["group", "--cache", llama_cache, "--tokens", 400, "--metric", "amad"]
    assert run_cli(args, capsys)[0] == 0
    path = llama_cache / "groups" / "amad.json"
    record = json.loads(path.read_text())
    record.pop("format")  # as the scikit-learn-based code wrote it
    record["used_by"] = ["runs/old"]
    path.write_text(json.dumps(record))
    assert load_grouping(ActivationStore.open(str(llama_cache)), "amad") is None
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "older gsae" in err and "reusing" not in err
    assert json.loads(path.read_text())["format"] == 2


def test_group_more_tokens_than_cache_uses_all(llama_cache, capsys):
    code, _, err = run_cli(["group", "--cache", llama_cache, "--tokens", 10**9, "--metric", "uniform", "--force"], capsys)
    # all but the held-out chunk (the last of 16): runs are evaluated on its rows, and D is not measured on them
    assert code == 0 and "holds 1,920 tokens to sample" in err and "its last chunk is held out" in err, err
    assert "using all 1,920" in err
    sample = json.loads((llama_cache / "groups" / "uniform.json").read_text())["sample"]
    assert sample["chunks"] == list(range(15)) and sample["tokens"] == 1920


def test_group_refuses_missing_or_incomplete_cache(llama_cache, tmp_path, capsys):
    code, _, err = run_cli(["group", "--cache", tmp_path / "none"], capsys)
    assert code == 1 and "no gsae cache" in err
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(llama_cache, partial)
    meta = json.loads((partial / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (partial / "zarr.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["group", "--cache", partial], capsys)
    assert code == 1 and "incomplete" in err and "--allow-partial" in err
    code, _, err = run_cli(["group", "--cache", partial, "--allow-partial", "--tokens", 300], capsys)
    assert code == 0, err


def test_runs_marking_a_grouping_at_once_are_all_kept(llama_cache, capsys):
    """Each run writes its own mark: 16 threads marking at once lose none (a shared list would)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.group import mark_used, runs_using

    args = ["group", "--cache", llama_cache, "--tokens", 400, "--metric", "uniform", "--force"]
    assert run_cli(args, capsys)[0] == 0
    store = ActivationStore.open(str(llama_cache))
    runs = [f"runs/r{i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda run: mark_used(store, "uniform", run), runs))
    assert runs_using(store, "uniform") == sorted(runs)
    code, _, err = run_cli(["group", "--cache", llama_cache, "--tokens", 300, "--metric", "uniform"], capsys)
    assert code == 1 and "training runs use it" in err and "runs/r0" in err
    assert "and 13 more" in " ".join(err.split()), err  # all 16 counted, before the user chooses --force
    assert run_cli([*args[:-1], "--tokens", 300, "--force"], capsys)[0] == 0
    assert runs_using(store, "uniform") == []  # a replaced grouping is used by nothing yet


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_chunk_distance_sums_match_float64_on_every_stored_dtype(dtype, device, monkeypatch):
    """The per-chunk kernel against the definition in float64, on a chunk that is not a whole number of
    its 256-row steps, with a layer that is a copy (distance 0) and one that is negated (distance 1).  On
    CUDA the kernel runs in float64, TF32 switched on or not."""
    import torch

    import pipeline.grouping as grouping
    from pipeline.grouping import _chunk_distance_sums

    monkeypatch.setattr(grouping, "_GPU_STEP_BYTES", 8 * 5 * (24 + 5) * 256)  # 256-row steps on a GPU too

    rng = np.random.default_rng(0)
    rows, d = 1100, 24
    base = rng.normal(size=(rows, d)).astype(np.float32)
    layers = [base, base.copy(), -base, base + rng.normal(scale=0.5, size=(rows, d)).astype(np.float32),
              rng.normal(size=(rows, d)).astype(np.float32) * 50 + 7]
    mean = np.zeros((len(layers), d), dtype=np.float32)  # centred on 0: -base is then exactly opposite
    if dtype == "bfloat16":
        stored = [torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for x in layers]
    else:
        stored = [x.astype(dtype) for x in layers]
    values = [to_float32(s, dtype).astype(np.float64) for s in stored]
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in values]
    expected = np.array([[0.0 if i == j else np.arccos(np.clip((unit[i] * unit[j]).sum(1), -1, 1)).sum() / np.pi
                          for j in range(len(layers))] for i in range(len(layers))])
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training run in the same process may have left
    try:
        sums = _chunk_distance_sums(mean, dtype, *stored, device=device)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    np.testing.assert_allclose(sums / rows, expected / rows, atol=1e-4 if device == "cpu" else 1e-7)
    assert sums[0, 1] / rows < 1e-3 and sums[0, 2] / rows > 1 - 1e-3


def test_group_allow_partial_on_a_cache_whose_writer_stopped_midway(tmp_path, capsys):
    """A cache whose writer stopped after 3 of its 5 chunks (no kill needed: chunks written and committed
    through the store, never finalized) has no stats/mean; --allow-partial forms μ from the committed
    chunks' statistics, as finalize will."""
    from stores import compute_chunk_stats

    path = tmp_path / "c"
    n_layers, d, rows = 4, 16, 64
    store = ActivationStore.create(str(path), n_layers=n_layers, d_model=d, n_tokens=5 * rows, chunk_tokens=rows,
                                   attributes={"model_id": "made-by-hand"})
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3 * rows, d))
    written = [(base * (1 + layer) + rng.normal(size=base.shape) + layer).astype(np.float16) for layer in range(n_layers)]
    for chunk in range(3):
        layers = [values[chunk * rows : (chunk + 1) * rows] for values in written]
        store.write_chunk(chunk, layers, np.arange(rows, dtype=np.int32), compute_chunk_stats(layers, "float16"))
    assert not (path / "stats" / "mean").exists()

    code, _, err = run_cli(["group", "--cache", path], capsys)
    assert code == 1 and "Traceback" not in err and "incomplete" in err and "--allow-partial" in err
    code, out, err = run_cli(["group", "--cache", path, "--allow-partial", "--layers", "0-3", "--tokens", 10**6], capsys)
    assert code == 0, err
    assert "using all 128" in err and "G*" in out  # the last committed chunk held out
    partial = ActivationStore.open(str(path), allow_partial=True)
    expected = np.stack([values.astype(np.float64).mean(axis=0) for values in written])
    np.testing.assert_allclose(partial.mean, expected, rtol=1e-6, atol=1e-6)
    saved = json.loads((path / "groups" / "amad.json").read_text())
    assert saved["sample"]["row_ranges"] == [[0, 64], [64, 128]]
    np.testing.assert_allclose(np.asarray(saved["distance"]),
                               numpy_distance(partial, saved["layers"], saved["sample"]["row_ranges"]), atol=1e-4)


def test_a_layer_given_twice_is_one_line(llama_cache, capsys):
    for spec, layer in (("0,0,1", 0), ("0-2,1", 1)):
        code, out, err = run_cli(["group", "--cache", llama_cache, "--layers", spec], capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "Traceback" not in err
        assert f"layer {layer} is given twice" in lines[0] and lines[0].startswith("error:")


def test_tokens_below_a_chunk_say_that_whole_chunks_are_sampled(llama_cache, capsys):
    code, _, err = run_cli(["group", "--cache", llama_cache, "--tokens", 10, "--metric", "uniform", "--force"], capsys)
    assert code == 0 and "Traceback" not in err
    assert "--tokens 10: whole chunks are sampled, so D is over 128 tokens (1 chunk)" in err
    saved = json.loads((llama_cache / "groups" / "uniform.json").read_text())
    assert saved["sample"]["tokens"] == 128


def test_a_deleted_run_no_longer_holds_its_grouping(llama_cache, tmp_path, capsys):
    """A run's mark is its absolute folder; once the folder is gone the grouping may be recomputed without
    --force (a stale mark refused it forever)."""
    import shutil

    from pipeline.group import runs_using

    args = ["group", "--cache", llama_cache, "--tokens", 400, "--metric", "uniform", "--force"]
    assert run_cli(args, capsys)[0] == 0
    run = tmp_path / "r"
    assert run_cli(["train", "--cache", llama_cache, "--metric", "uniform", "--groups", 1, "--tokens", 512,
                    "--batch-size", 256, "--out", run], capsys)[0] == 0
    store = ActivationStore.open(str(llama_cache))
    assert runs_using(store, "uniform") == [str(run)]
    code, _, err = run_cli([*args[:-1], "--tokens", 300], capsys)
    assert code == 1 and "training runs use it" in err
    shutil.rmtree(run)
    assert runs_using(store, "uniform") == []
    assert run_cli([*args[:-1], "--tokens", 300], capsys)[0] == 0
    # a train whose --out is a file fails after marking: that mark is of no run and holds nothing back
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["train", "--cache", llama_cache, "--metric", "uniform", "--groups", 1, "--tokens", 512,
                            "--batch-size", 256, "--out", tmp_path / "afile"], capsys)
    assert code == 1 and "afile" in err
    assert runs_using(store, "uniform") == []
    assert run_cli([*args[:-1], "--tokens", 400], capsys)[0] == 0
    # a run stopped before its first checkpoint, replaced by one on another metric, holds that one only
    from rich.console import Console

    from pipeline.train import TrainRequest, _open_run

    with contextlib.ExitStack() as scope:  # planned (and marked), then stopped
        _open_run(TrainRequest(cache=str(llama_cache), out=str(tmp_path / "p"), metric="uniform", groups=1,
                               tokens=512, batch_size=256), Console(file=io.StringIO()), scope)
    assert runs_using(store, "uniform") == [str(tmp_path / "p")]
    assert run_cli(["group", "--cache", llama_cache, "--tokens", 400, "--force"], capsys)[0] == 0  # amad
    code, out, err = run_cli(["train", "--cache", llama_cache, "--metric", "amad", "--groups", 1, "--tokens", 512,
                              "--batch-size", 256, "--out", tmp_path / "p"], capsys)
    assert code == 0 and "replacing the unfinished run" in out + err, err
    assert runs_using(store, "uniform") == [] and runs_using(store, "amad") == [str(tmp_path / "p")]
