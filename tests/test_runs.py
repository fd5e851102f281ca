"""Runs as first-class objects: kill -9 at any point then the same command finishes with the weights of
an uninterrupted run; old run directories; reuse only with the same arguments; the run's own record of
its grouping; the model check of `gsae eval`; BatchTopK evaluated as exported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from conftest import ROOT, make_cache, run_cli
from pipeline.run import Run, pack_training_state
from pipeline.sae import load_sae
from stores import ActivationStore, to_float32

# 12 steps, on the CPU: these tests compare weights bit for bit, and a CUDA step is reproducible only
# up to the order of its float additions (tests/test_cuda.py checks what holds there)
STEPS_ARGS = ["--groups", 2, "--tokens", 3072, "--batch-size", 256, "--checkpoint-every", 4, "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tiny_models, tmp_path_factory):
    path = make_cache(tiny_models["llama"], tmp_path_factory.mktemp("runs") / "c", tokens=8000,
                      context_length=64, batch_size=8, chunk_tokens=500)
    assert run_cli(["group", "--cache", path])[0] == 0
    return path


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory):
    """The uninterrupted run every killed run must end equal to."""
    out = tmp_path_factory.mktemp("whole") / "r"
    code, _, err = run_cli(_train(cache, out))
    assert code == 0, err
    return out


def _train(cache, out, *extra):
    return ["train", "--cache", cache, "--out", out, *STEPS_ARGS, *extra]


# Each kill point patches one function in a child process so that it SIGKILLs itself there: a real
# kill -9 (no finally blocks, no flushes) at a place a timer could not hit reliably.
_KILL_POINTS = {
    # the first batch is asked for: config.json is written, nothing trained
    "before the first step": """
import stores.stream as m
def hit(self, _real=m.TrainingStream.next_batch):
    kill()
m.TrainingStream.next_batch = hit
""",
    # step 6 of 12 (2 SAEs, one batch each per step): after the checkpoint at step 4
    "between checkpoints": """
import stores.stream as m
calls = [0]
def hit(self, _real=m.TrainingStream.next_batch):
    calls[0] += 1
    if calls[0] == 13:
        kill()
    return _real(self)
m.TrainingStream.next_batch = hit
""",
    # the second checkpoint (step 8), after its first SAE file: a partial checkpoint directory
    "while writing a checkpoint": """
import pipeline.run as m
calls = [0]
def hit(tensors, _real=m.save):
    calls[0] += 1
    if calls[0] == 4:
        kill()
    return _real(tensors)
m.save = hit
""",
    # the run is trained (summary.json written), its checkpoints not yet removed
    "after the summary": """
import pipeline.run as m
def hit(self, _real=m.Run.remove_checkpoints):
    kill()
m.Run.remove_checkpoints = hit
""",
    # the final SAE files: SAE 0 saved, SAE 1's weights written but not its JSON
    "during the final write": """
import pipeline.run as m
def hit(self, data, *parts, _real=m.Run._write):
    if parts == ("sae_1.json",):
        kill()
    _real(self, data, *parts)
m.Run._write = hit
""",
}


def _run_killed(args: list, patch: str) -> None:
    program = ("import os, signal, sys\n"
               "def kill():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
               + patch + "\nimport cli\nsys.argv = ['gsae', *sys.argv[1:]]\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", program, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _assert_same_saes(a: Path, b: Path) -> None:
    for i in range(2):
        x, y = load_file(str(a / f"sae_{i}.safetensors")), load_file(str(b / f"sae_{i}.safetensors"))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (i, key)
    summary_a, summary_b = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for row_a, row_b in zip(summary_a["saes"], summary_b["saes"]):
        for key in ("layers", "train_fvu", "l0", "dead_fraction", "held_out_fvu"):
            assert row_a[key] == row_b[key], key


def test_a_killed_batchtopk_run_resumes_to_the_same_threshold(cache, tmp_path, capsys):
    """BatchTopK's threshold weighs each step by how many it has taken in (SparseAutoencoder._update_threshold):
    a resumed run must go on from its checkpoint's step, not from the first step's weight of 1."""
    import shutil

    from safetensors.torch import save_file

    args = ("--architecture", "batchtopk")
    assert run_cli(_train(cache, tmp_path / "whole", *args), capsys)[0] == 0
    _run_killed(_train(cache, tmp_path / "r", *args), _KILL_POINTS["between checkpoints"])
    shutil.copytree(tmp_path / "r", tmp_path / "old")
    code, _, err = run_cli(_train(cache, tmp_path / "r", *args), capsys)
    assert code == 0, err
    assert "threshold" in load_file(str(tmp_path / "r" / "sae_0.safetensors"))
    _assert_same_saes(tmp_path / "whole", tmp_path / "r")
    # the checkpoint as a gsae before 2026-11-29 wrote it: SAELens's m itself, and no word of how it was kept;
    # resumed, it is converted (m / (1 − 0.99^step)) and goes on as this gsae would have (helper-77)
    latest = tmp_path / "old" / "checkpoints" / (tmp_path / "old" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "state.json").read_text())
    assert state.pop("threshold")
    (latest / "state.json").write_text(json.dumps(state))
    for i in range(2):
        tensors = load_file(str(latest / f"sae_{i}.safetensors"))
        key = next(key for key in tensors if key.endswith("threshold"))
        tensors[key] = tensors[key] * (1 - 0.99 ** state["step"])
        save_file(tensors, str(latest / f"sae_{i}.safetensors"))
    code, _, err = run_cli(_train(cache, tmp_path / "old", *args), capsys)
    assert code == 0, err
    for i in range(2):
        ours, theirs = (load_file(str(tmp_path / name / f"sae_{i}.safetensors"))["threshold"] for name in ("whole", "old"))
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=0)  # (the division's rounding)


@pytest.mark.parametrize("point", list(_KILL_POINTS))
def test_kill_9_anywhere_then_the_same_command_finishes_the_run(point, cache, whole, tmp_path, capsys):
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS[point])
    if point == "after the summary":  # trained: the same command removes the checkpoints left, trains nothing
        assert Run.open(out).state == "trained" and (out / "checkpoints").exists()
        code, text, err = run_cli(_train(cache, out), capsys)
        assert code == 0 and "trained already (the same arguments): nothing to train" in text + err, err
        assert not (out / "checkpoints").exists() and "saved" not in text + err
        held_out = json.loads((out / "summary.json").read_text())["saes"][1]["held_out_fvu"]
        assert "gsae train" in text and f"{held_out:.3f}" in text  # the summary's table again
        _assert_same_saes(whole, out)
        return
    assert Run.open(out).state in ("planned", "training")
    if point == "during the final write":  # the checkpoint after the last step: weights, no Adam moments
        final = Path(Run.open(out).latest_checkpoint())
        assert final.name == "step-000000012"
        kept = load_file(str(final / "sae_0.safetensors")).keys()
        assert "param.W_enc" in kept and not any(key.startswith("adam.") for key in kept)
    code, _, err = run_cli(_train(cache, out), capsys)
    assert code == 0, err
    assert Run.open(out).state == "trained"
    _assert_same_saes(whole, out)
    steps = [r["step"] for r in Run.open(out).metrics() if r["sae"] == 0]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no step logged twice or lost


def test_kill_9_then_resume_finishes_the_run(cache, whole, tmp_path, capsys):
    """--resume continues the run as it was made: an option typed with another value is refused (it used
    to be ignored without a word), one typed with the run's own value is fine."""
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--resume", "--tokens", 100000,
                            "--architecture", "relu", "--no-tf32"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "--tokens 3072 → 100000" in err and "--architecture topk → relu" in err and "--tf32 on → off" in err
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--resume", "--tokens", 3072], capsys)
    assert code == 0, err
    _assert_same_saes(whole, out)


def test_the_same_directory_with_other_arguments_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--groups", 2, "--tokens", 4096,
                            "--batch-size", 256, "--checkpoint-every", 4], capsys)
    assert code == 1 and "--tokens 3072 → 4096" in err and "--resume" in err and "Traceback" not in err


def test_gsae_run_refuses_a_run_made_with_other_tokens(cache, tmp_path, capsys):
    root = tmp_path / "runs"
    baseline = root / f"{Path(cache).name}-baseline"
    assert run_cli(["train", "--cache", cache, "--baseline", "--tokens", 1024, "--batch-size", 256,
                    "--out", baseline], capsys)[0] == 0
    code, _, err = run_cli(["run", "--cache", cache, "--tokens", 2048, "--batch-size", 256, "--out", root], capsys)
    assert code == 1 and "--tokens 1024 → 2048" in err and str(baseline) in err and "Traceback" not in err


def test_gsae_run_names_the_group_command_that_replaces_a_grouping_in_use(tiny_models, tmp_path, capsys):
    """`gsae run` has no --force: where the saved grouping has other arguments and a run uses it, the line
    says which `gsae group` command replaces it."""
    cache = make_cache(tiny_models["llama"], tmp_path / "c", tokens=4000, context_length=64, batch_size=8,
                       chunk_tokens=500)
    assert run_cli(["group", "--cache", cache, "--layers", "0,1"], capsys)[0] == 0
    assert run_cli(["train", "--cache", cache, "--groups", 1, "--tokens", 1024, "--batch-size", 256,
                    "--out", tmp_path / "r"], capsys)[0] == 0
    code, _, err = run_cli(["run", "--cache", cache, "--tokens", 1024, "--batch-size", 256, "--out", tmp_path / "runs"],
                           capsys)
    assert code == 1 and "Traceback" not in err
    assert "made with other arguments and training runs use it" in err
    assert f"replace it first with `gsae group --cache {cache} --metric amad --force`" in err
    assert "pass --force" not in err


def test_gsae_run_killed_while_training_is_finished_by_the_same_command(cache, tmp_path, capsys):
    args = ["run", "--cache", cache, "--groups", 1, "--tokens", 1024, "--batch-size", 256, "--windows", 2,
            "--out", tmp_path / "runs"]
    _run_killed(args, _KILL_POINTS["between checkpoints"].replace("== 13", "== 3"))
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    runs = json.loads((tmp_path / "runs" / f"{Path(cache).name}-report" / "runs.json").read_text())
    assert [Run.open(r).state for r in runs] == ["evaluated"] * len(runs)


def test_report_keeps_the_amad_a_run_was_trained_with(cache, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(["train", "--cache", cache, "--out", out, "--groups", 2, "--tokens", 1024,
                    "--batch-size", 256], capsys)[0] == 0
    assert run_cli(["eval", "--run", out, "--windows", 0], capsys)[0] == 0
    grouping_file = Path(cache) / "groups" / "amad.json"
    record = json.loads(grouping_file.read_text())
    trained_amad = next(p["amad"] for p in record["curve"] if p["n_groups"] == 2)
    replaced = {**record, "curve": [{**p, "amad": 0.987654} for p in record["curve"]]}  # as after group --force
    grouping_file.write_text(json.dumps(replaced))
    try:
        assert run_cli(["report", "--runs", out, "--out", tmp_path / "rep"], capsys)[0] == 0
    finally:
        grouping_file.write_text(json.dumps(record))
    row = next(line for line in (tmp_path / "rep" / "report.md").read_text().splitlines()
               if line.startswith("| amad-g2 |"))
    assert f"| {trained_amad:.3f} |" in row and "0.988" not in row


def test_a_run_from_before_run_formats_still_loads(whole, tmp_path):
    """config.json as gsae wrote it before run formats: plan fields plus a nested request."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(whole, old)
    config = json.loads((old / "config.json").read_text())
    legacy = {key: config[key] for key in ("label", "groups", "scales", "d_in", "n_latents", "k", "lr", "steps",
                                           "dead_tokens", "train_chunks", "eval_chunks", "eval_rows", "cache",
                                           "cache_fingerprint", "source", "gsae_version")}
    legacy["grouping"] = config["grouping"]["file"]
    legacy["request"] = {**config["arguments"], "cache": config["cache"], "out": str(old), "resume": False}
    (old / "config.json").write_text(json.dumps(legacy))
    run = Run.open(old, need="trained")
    assert run.config.groups == config["groups"] and run.config.batch_size == config["batch_size"]
    assert run.config.metric == "amad" and run.config.grouping["amad"] is None
    (old / "config.json").write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(Exception, match="run format 99"):
        Run.open(old)


def test_eval_refuses_a_model_that_is_not_the_cached_one(tiny_models, tokenizer_dir, tmp_path, capsys):
    from conftest import build_tiny_model

    model = build_tiny_model("neox", tokenizer_dir, tmp_path / "model")
    cache = make_cache(model, tmp_path / "c", tokens=3000, context_length=32, batch_size=8, chunk_tokens=400)
    assert run_cli(["train", "--cache", cache, "--baseline", "--tokens", 512, "--batch-size", 256,
                    "--out", tmp_path / "r"], capsys)[0] == 0
    config = json.loads((model / "config.json").read_text())  # another model in the same folder: the
    (model / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-3}))  # fingerprint sees its config
    code, _, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 2], capsys)
    assert code == 1 and "is not the one" in err and "--windows 0" in err and "Traceback" not in err
    assert run_cli(["eval", "--run", tmp_path / "r", "--windows", 0], capsys)[0] == 0


def test_batchtopk_is_exported_as_it_is_evaluated(cache, tmp_path, capsys):
    """The SAELens export computes what gsae evaluates: a per-token JumpReLU at the running threshold."""
    out = tmp_path / "r"
    assert run_cli(["train", "--cache", cache, "--out", out, "--groups", 1, "--tokens", 4096, "--batch-size", 256,
                    "--architecture", "batchtopk", "--k", 4], capsys)[0] == 0
    assert run_cli(["export", "--run", out, "--out", tmp_path / "e"], capsys)[0] == 0
    [(sae, config)] = Run.open(out).load_saes()
    assert float(sae.threshold) > 0
    store = ActivationStore.open(str(cache))
    layer = config["layers"][0]
    raw = torch.from_numpy(to_float32(store.read_rows(layer, 0, 400), store.dtype))
    scale = config["scales"][str(layer)]
    # load_sae (the public loader, benchmarks/saelens_roundtrip.py's) gives the same SAE: in evaluation mode,
    # keeping the latents above the threshold (in training mode each batch's top k)
    loaded, _ = load_sae(str(out / "sae_0.safetensors"), str(out / "sae_0.json"))
    with torch.no_grad():
        assert not loaded.training and torch.equal(loaded(raw * scale), sae(raw * scale))
        assert not torch.equal(loaded.train()(raw * scale), sae(raw * scale))
    folder = tmp_path / "e" / f"blocks.{layer}.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and w["threshold"].shape == (cfg["d_sae"],)
    with torch.no_grad():
        expected = sae(raw * scale) / scale
        pre = (raw - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        exported = (torch.relu(pre) * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
        l0 = (sae.encode(raw * scale).dense > 0).sum(dim=1).float()
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4 * float(raw.abs().max()))
    assert l0.std() > 0  # per token: not exactly k active on every row, as batch-level top-k would give


def test_a_checkpoint_saved_again_at_the_same_step_keeps_one_complete(whole, tmp_path):
    """Re-saving step N never deletes the directory `latest` names before `latest` moves."""
    import shutil

    run = Run.open(shutil.copytree(whole, tmp_path / "r"))
    assert run.latest_checkpoint() is None  # a trained run keeps none: its SAE files hold the weights
    saes = [sae.train() for sae, _ in run.load_saes()]
    packed = {i: pack_training_state(sae, torch.optim.Adam(sae.parameters()), torch.zeros(sae.n_latents, dtype=torch.int64))
              for i, sae in enumerate(saes)}
    state = {"elapsed": [1.0] * len(saes)}
    first = Path(run.save_checkpoint(7, packed, state))
    assert json.loads((first / "state.json").read_text()) == {**state, "step": 7}
    second = Path(run.save_checkpoint(7, packed, state))
    assert second != first and Path(run.latest_checkpoint()) == second and not first.exists()
    assert sorted(p.name for p in (Path(run.path) / "checkpoints").iterdir()) == sorted(["latest", second.name])


def test_importing_the_training_code_stays_light_and_leaves_warning_filters_alone():
    program = ("import sys, warnings\n"
               "import numpy, torch, zarr, numcodecs, fsspec, rich, safetensors.torch  # their own filters\n"
               "before = list(warnings.filters)\n"
               "import pipeline.train, pipeline.sae, stores\n"
               "heavy = [m for m in ('transformers', 'matplotlib', 'dask') if m in sys.modules]\n"
               "assert not heavy, heavy\nassert warnings.filters == before, 'warning filters changed'\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]


def test_a_run_on_an_fsspec_url_equals_a_local_one(cache, tmp_path, capsys):
    """--out memory://... : train, eval, export and report write through fsspec; same weights as on disk."""
    import fsspec

    args = ["--groups", 2, "--tokens", 1024, "--batch-size", 256, "--device", "cpu"]  # compared bit for bit
    local, remote = tmp_path / "r", "memory://gsae-test/runs/r"
    for out in (local, remote):
        assert run_cli(["train", "--cache", cache, "--out", out, *args], capsys)[0] == 0
        assert run_cli(["eval", "--run", out, "--windows", 0], capsys)[0] == 0
    fs = fsspec.filesystem("memory")
    for i in range(2):
        ours = load_file(str(local / f"sae_{i}.safetensors"))
        theirs = load_bytes(fs.cat_file(f"/gsae-test/runs/r/sae_{i}.safetensors"))
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert Run.open(remote).state == "evaluated"
    assert run_cli(["export", "--run", remote], capsys)[0] == 0
    assert fs.exists("/gsae-test/runs/r/export-saelens/blocks.0.hook_resid_post/sae_weights.safetensors")
    assert run_cli(["report", "--runs", remote, "--out", "memory://gsae-test/report"], capsys)[0] == 0
    assert "| amad-g2 |" in fs.cat_file("/gsae-test/report/report.md").decode()


def test_the_install_declares_only_what_runs_and_extras_for_the_rest():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]}
    assert "pytest" not in names and "psutil" not in names  # a test tool and an unused package
    extras = project["optional-dependencies"]
    assert {"test", "s3", "distributed", "saelens"} <= set(extras)
    assert any(dep.startswith("pytest") for dep in extras["test"])


def test_train_without_a_grouping_says_to_run_gsae_group(tiny_models, tmp_path, capsys):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=2000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    code, _, err = run_cli(["train", "--cache", cache, "--out", tmp_path / "r", "--tokens", 512], capsys)
    assert code == 1 and "gsae group" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-made
    assert run_cli(["train", "--cache", cache, "--out", tmp_path / "r", "--tokens", 512, "--batch-size", 256,
                    "--baseline"], capsys)[0] == 0  # the baseline needs no grouping


def test_resume_without_cache_uses_the_recorded_one(cache, tmp_path, capsys):
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    code, _, err = run_cli(["train", "--out", out, "--resume"], capsys)  # no --cache
    assert code == 0, err
    assert Run.open(out).state == "trained"


def test_a_checkpoint_from_before_buffers_resumes_a_batchtopk_run():
    """Checkpoints written before buffers were saved lack BatchTopK's threshold: it restarts from 0."""
    from pipeline.run import unpack_training_state
    from pipeline.sae import SparseAutoencoder

    sae = SparseAutoencoder(8, 32, "batchtopk", k=2)
    optimizer = torch.optim.Adam(sae.parameters())
    fired = torch.zeros(32, dtype=torch.int64)
    packed = pack_training_state(sae, optimizer, fired)
    old = {key: value for key, value in packed.items() if not key.startswith("buffer.")}
    sae.threshold.fill_(0.5)
    unpack_training_state(old, sae, optimizer, fired)
    assert float(sae.threshold) == 0.5  # left as it was


def test_a_damaged_checkpoint_is_a_one_line_error_and_leaves_no_decode_running(cache, tmp_path, capsys):
    """A resume that cannot load its checkpoint says which file, and the decode threads the start
    already set going are stopped (in-process callers such as `gsae run` keep no stray threads)."""
    import threading
    import time

    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    weights = sorted((out / "checkpoints").glob("*/sae_0.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--resume"], capsys)
    lines = err.strip().splitlines()  # the step it continues from, then the error: one line
    assert code == 1 and "Traceback" not in err and lines[-1].startswith("error: checkpoint file"), err
    assert lines[:-1] == [line for line in lines[:-1] if line.startswith("continuing ")], err
    deadline = time.monotonic() + 10
    while any(t.name.startswith("gsae-decode") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("gsae-decode") for t in threading.enumerate())


def test_a_damaged_sae_file_is_a_one_line_error(whole, cache, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(whole, run)
    (run / "sae_1.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    code, _, err = run_cli(["export", "--run", run, "--format", "saelens", "--out", tmp_path / "x"], capsys)
    assert code == 1 and "Traceback" not in err and "sae_1.safetensors is damaged" in err, err
    for name in ("sae_1.safetensors", "sae_1.json"):  # removed after the summary: named as missing, not as
        shutil.rmtree(run)  # damaged; the json too (the run read as never trained, and train retrained it)
        shutil.copytree(whole, run)
        (run / name).unlink()
        for command in (["export", "--run", run, "--out", tmp_path / "x"], ["eval", "--run", run, "--windows", 0],
                        _train(cache, run)):
            code, _, err = run_cli(command, capsys)
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 1 and lines == [f"error: {run / name} is missing: this run lost SAE 1; train it again into "
                                           "a new --out"], err


def test_a_train_that_cannot_start_leaves_no_run_behind(cache, tmp_path, capsys):
    """Options that fail their checks leave no run folder, so the corrected command is not refused."""
    out = tmp_path / "r"
    bad = [["--lr", "nan"], ["--expansion", "inf"], ["--seed", "-1"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--groups", 2, "--tokens", 512,
                                "--batch-size", 256, *extra], capsys)
        assert code in (1, 2) and "Traceback" not in err and not out.exists(), (extra, err)
    assert run_cli(["train", "--cache", cache, "--out", out, "--groups", 2, "--tokens", 512, "--batch-size", 256,
                    "--device", "cpu"], capsys)[0] == 0


def test_a_run_finds_its_cache_from_any_folder_and_a_finished_one_is_not_resumed(cache, tmp_path, monkeypatch,
                                                                                   capsys):
    """The run records its local cache as an absolute path (it was relative to the folder `train` ran
    in); `--resume` of a finished run trains nothing, like the same command without it."""
    monkeypatch.chdir(Path(cache).parent)
    out = tmp_path / "r"
    assert run_cli(["train", "--cache", Path(cache).name, "--out", out, "--groups", 2, "--tokens", 512,
                    "--batch-size", 256, "--device", "cpu"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["cache"] == str(Path(cache).resolve())
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["eval", "--run", out, "--windows", 0], capsys)
    assert code == 0, err
    code, text, err = run_cli(["train", "--out", out, "--resume"], capsys)
    assert code == 0 and "trained already" in text + err and "Traceback" not in err, err


def test_a_garbled_latest_pointer_is_an_error_not_a_restart(cache, tmp_path, capsys):
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    (out / "checkpoints" / "latest").write_bytes(b"\x00garbage")
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--resume"], capsys)
    assert code == 1 and "names no complete checkpoint" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name,content,message", [("summary.json", b"[1", "summary.json is damaged"),
                                                  ("config.json", b"[1, 2]", "is not a gsae run config")])
def test_a_garbled_run_file_is_one_line_for_eval(whole, tmp_path, capsys, name, content, message):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(whole, run)
    (run / name).write_bytes(content)
    code, _, err = run_cli(["eval", "--run", run, "--windows", 0], capsys)
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_state_without_its_fields_is_named(cache, tmp_path, capsys):
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])
    state = sorted((out / "checkpoints").glob("*/state.json"))[-1]
    state.write_text("{}")
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--resume"], capsys)
    assert code == 1 and "state.json is damaged (no 'step')" in err and "Traceback" not in err, err


def test_saes_that_cannot_fit_the_device_are_refused_before_the_run_is_made(cache, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(["train", "--cache", cache, "--out", out, "--groups", 2, "--expansion", 1e9,
                            "--device", "cpu"], capsys)
    assert code == 1 and "GiB of the cpu" in err and not out.exists(), err


def test_the_fit_check_counts_the_streams_windows(cache, monkeypatch):
    """The streams keep two windows per SAE (on a GPU, and as many device copies): the fit check counted only the
    SAEs' weights, moments and latents. Its estimate against the buffers real streams make, per group (a
    bound by the largest group refused uneven partitions that fit); and the check refuses on it."""
    import pipeline.train as train_module
    from pipeline.errors import GsaeError
    from stores.stream import TrainingStream

    config, store = train_module.plan(train_module.TrainRequest(cache=str(cache), baseline=True, batch_size=64,
                                                                tokens=640, device="cpu"))
    config.groups = [config.groups[0], [layer for group in config.groups[1:] for layer in group]]  # uneven: 1 and 2
    made = []
    for group in config.groups:
        stream = TrainingStream(store, group, [1.0] * len(group), config.train_chunks, config.batch_size, seed=0,
                                window_chunks=config.window_chunks)
        stream.next_batch()  # its first window, and the next one being decoded: both buffers
        made.append(sum(buffer.numel() * buffer.element_size() for buffer in stream._buffers))
        stream.close()
    for i, real in enumerate(made):  # 15 training chunks: windows of 8 and 7
        assert real <= train_module._windows_bytes(config, store, [i]) <= 1.1 * real, (i, real)
    assert train_module._windows_bytes(config, store, [0, 1]) <= 1.1 * sum(made)
    monkeypatch.setattr(train_module, "_windows_bytes", lambda *args: 10**15)
    with pytest.raises(GsaeError, match=r"with their training windows \(931,322\.6 GiB\), need about .*--chunk-tokens"):
        train_module._check_trainable(config, train_module.TrainRequest(cache=str(cache), device="cpu"), store)
    # on a GPU the host keeps a pinned copy of each window too: a GPU with room for them, a host without
    huge = type("Properties", (), {"total_memory": 10**18})()
    monkeypatch.setattr(train_module, "pick_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: huge)
    with pytest.raises(GsaeError, match=r"per rank need 931,322\.6 GiB of pinned host memory, more than the .* of this machine"):
        train_module._check_fits(2, 256, 32, train_module.TrainRequest(cache=str(cache)), windows_bytes=10**15)
    train_module._check_fits(2, 256, 32, train_module.TrainRequest(cache=str(cache)), windows_bytes=2**20)


def test_a_second_process_training_the_same_run_is_refused(cache, whole, tmp_path, capsys):
    """Two `gsae train` on one run at once: the second used to announce "continuing the unfinished run"
    and die on a checkpoint file the first had replaced. The run's lock (an flock, dropped by the system
    when its holder dies, kill -9 included) makes it stop in one line; afterwards the run finishes."""
    out = tmp_path / "r"
    _run_killed(_train(cache, out), _KILL_POINTS["between checkpoints"])  # its lock went with it
    with Run.open(out).training_lock():  # another process's, as far as the command can tell
        code, _, err = run_cli(_train(cache, out), capsys)
    assert code == 1 and "another gsae process is training" in err and "Traceback" not in err
    code, _, err = run_cli(_train(cache, out), capsys)
    assert code == 0, err
    _assert_same_saes(whole, out)


@pytest.mark.parametrize("command", ["export", "report"])
def test_a_failed_write_of_export_or_report_is_one_line(command, whole, tmp_path, capsys, monkeypatch):
    """A full disk (or no permission) while making an export's or a report's folder: one line naming where,
    not "an input gsae does not check, or a bug" (its files' writes said so already)."""
    import errno
    import shutil

    from fsspec.implementations.local import LocalFileSystem

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "r"
    shutil.copytree(whole, run)
    if command == "report":  # a report is of evaluated runs
        assert run_cli(["eval", "--run", run, "--windows", 0], capsys)[0] == 0
    monkeypatch.setattr(LocalFileSystem, "makedirs", full)
    args = ["export", "--run", run] if command == "export" else ["report", "--runs", run]
    code, _, err = run_cli([*args, "--out", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write {tmp_path / 'out'}") and lines[0].endswith(
        ": disk full: free some space and re-run the same command"), err
