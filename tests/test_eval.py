"""`gsae eval`: metric definitions and the spliced forward pass."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import make_cache, run_cli
from pipeline.block_replay import run_with_block_output
from pipeline.evaluate import downstream_metrics, reconstruction_metrics
from pipeline.models import load_model, resolve_model_spec


def test_reconstruction_metrics_of_a_hand_made_reconstruction():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]])
    xhat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
    m = reconstruction_metrics(x, xhat)
    variance = ((x - x.mean(0)) ** 2).sum()  # (1/9+1/9+... ) computed by hand: 2/3 + 8/3 = 10/3
    assert float(variance) == pytest.approx(10 / 3)
    assert m["fvu"] == pytest.approx(1 / (10 / 3))
    assert m["explained_variance"] == pytest.approx(1 - 0.3)
    assert m["mse"] == pytest.approx(1 / 6)
    assert m["cosine_similarity"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx((1 + 0.5 + 1) / 3)
    # per token (SAELens's legacy EV): mean (2/3, 4/3); token 1 misses 1 of its ‖(−2/3, 2/3)‖² = 8/9
    assert m["explained_variance_per_token"] == pytest.approx((1 + (1 - 9 / 8) + 1) / 3)


def test_per_token_ev_centres_on_the_mean_it_is_given():
    from pipeline.evaluate import ReconstructionTotals

    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    xhat = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    totals = ReconstructionTotals()
    totals.add(x, xhat, mean=torch.zeros(2))  # variances 9 and 16 around the origin
    assert totals.metrics(2)["explained_variance_per_token"] == pytest.approx((1 - 1 / 9 + 1) / 2)


def test_identity_splice_gives_zero_delta_and_kl(tiny_llama):
    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    ids = torch.randint(0, 400, (3, 20))
    clean = run_with_block_output(lm, ids, 0, None)
    identity = run_with_block_output(lm, ids, 1, lambda h: h.clone())
    zero = run_with_block_output(lm, ids, 1, lambda h: torch.zeros_like(h))
    m = downstream_metrics(clean, identity, zero, ids)
    assert m["delta_ce_percent"] == pytest.approx(0, abs=1e-5) and m["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert m["ce_recovered"] == pytest.approx(1.0)
    ablated = downstream_metrics(clean, zero, zero, ids)
    assert ablated["ce_spliced"] == pytest.approx(ablated["ce_zero_ablated"]) and ablated["ce_recovered"] == 0
    assert ablated["kl_divergence"] > 0


def test_downstream_metrics_equal_a_float64_position_by_position_reference(tiny_llama):
    """CE over the predictions made at the spliced positions (``first`` on, the last predicting nothing) and KL
    at every spliced position, the last included (as SAELens's evaluator: BOS left out), against sums written
    out position by position in float64; the unspliced positions' logits are equal in both passes."""
    from pipeline.evaluate import DownstreamTotals, token_log_probs

    lm = load_model(resolve_model_spec(str(tiny_llama)), torch.device("cpu"))
    ids = torch.randint(0, 400, (3, 12), generator=torch.Generator().manual_seed(1))
    clean = run_with_block_output(lm, ids, 0, None)
    noisy = run_with_block_output(lm, ids, 1, lambda h: torch.cat([h[:, :1], h[:, 1:].flip(-1)], dim=1))
    zero = run_with_block_output(lm, ids, 1, lambda h: torch.cat([h[:, :1], torch.zeros_like(h[:, 1:])], dim=1))
    assert torch.equal(clean[:, 0], noisy[:, 0])  # causal: BOS's logits do not see the splice
    for first in (0, 1):
        p, q, z = (torch.log_softmax(x.double(), -1) for x in (clean, noisy, zero))
        ce = {name: [] for name in ("clean", "spliced", "zero")}
        kl = []
        for w in range(ids.shape[0]):
            for t in range(first, ids.shape[1]):
                kl.append(float((p[w, t].exp() * (p[w, t] - q[w, t])).sum()))
                if t + 1 < ids.shape[1]:
                    for name, lp in (("clean", p), ("spliced", q), ("zero", z)):
                        ce[name].append(-float(lp[w, t, ids[w, t + 1]]))
        mean = {name: sum(v) / len(v) for name, v in ce.items()}
        assert len(ce["clean"]) == 3 * (11 - first) and len(kl) == 3 * (12 - first)
        m = downstream_metrics(clean, noisy, zero, ids, first)
        assert m["ce_clean"] == pytest.approx(mean["clean"], rel=1e-6)
        assert m["ce_spliced"] == pytest.approx(mean["spliced"], rel=1e-6)
        assert m["ce_zero_ablated"] == pytest.approx(mean["zero"], rel=1e-6)
        # float32 log-probabilities: ~1e-7 absolute per position (leaving position 0 in or out moves it by 1/12)
        assert m["kl_divergence"] == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-7)
        assert m["delta_ce_percent"] == pytest.approx(100 * (mean["spliced"] - mean["clean"]) / mean["clean"], abs=1e-4)
        # a batch of windows at a time gives the same means
        totals = DownstreamTotals(first)
        for w in range(ids.shape[0]):
            totals.add(token_log_probs(clean[w:w + 1]), noisy[w:w + 1], zero[w:w + 1], ids[w:w + 1])
        batched = totals.metrics()
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_divergence"):
            assert batched[key] == pytest.approx(m[key], rel=1e-6, abs=1e-7), key


def test_evaluations_of_older_gsae_are_told_apart_by_where_ce_was_averaged():
    from pipeline.evaluate import eval_argument_changes, eval_arguments

    new = eval_arguments(tokens=1000, windows=8)
    old = {key: value for key, value in new.items() if key != "downstream_positions"}  # before 2026-11-29
    assert eval_argument_changes(new, new) == []
    assert eval_argument_changes(old, new) == ["CE and KL averaged as gsae did before 2026-11-29 → over the spliced "
                                               "positions"]
    assert eval_argument_changes(new, old) == ["CE and KL averaged over the spliced positions → as gsae did before "
                                               "2026-11-29"]
    no_ce = eval_arguments(tokens=1000, windows=0)  # no downstream metrics: nothing averaged differently
    assert eval_argument_changes({k: v for k, v in no_ce.items() if k != "downstream_positions"}, no_ce) == []


def test_eval_command_writes_records(tiny_models, tmp_path, capsys):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    assert run_cli(["train", "--cache", cache, "--groups", 1, "--out", tmp_path / "r", "--tokens", 20000,
                    "--batch-size", 512], capsys)[0] == 0
    code, out, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 400], capsys)
    assert code == 0, err
    # more than the held-out slice holds: said (16,384 is --tokens' default: nothing was "asked for"), and what
    # was used is recorded
    assert re.search(r"the held-out slice holds [\d,]+ rows \(fewer than the 16,384 to evaluate\): the "
                     r"reconstruction metrics use those", out + err)
    used = re.search(r"the held-out slice holds (\d+) whole windows \(fewer than the 400 to evaluate\): the "
                     r"downstream metrics use \1", out + err)
    assert used and int(used.group(1)) < 400
    assert "asked for" not in out + err
    # the bar over the steps, drawn once at the end where stderr is not a terminal, before the notes
    bar = re.search(r"^eval\b.* (\d+)/\1 steps .*ETA", err, re.MULTILINE)
    assert bar and bar.start() < err.index("the held-out slice holds"), err
    written = json.loads((tmp_path / "r" / "eval.json").read_text())
    records = written["records"]
    assert [r["layer"] for r in records] == [0, 1]
    on_gpu = torch.cuda.is_available()  # eval's --device auto; the run trained with TF32 (the default)
    assert written["measured_on"] == {"device": "cuda" if on_gpu else "cpu", "sae_matmuls": "tf32" if on_gpu else "float32",
                                      "model_matmuls": "float32"}
    for r in records:
        assert 0 < r["explained_variance"] < 1
        # a random tiny model need not get worse when a block is zeroed: assert what always holds
        assert all(r[key] > 0 for key in ("ce_clean", "ce_spliced", "ce_zero_ablated")) and r["kl_divergence"] >= 0
        assert r["delta_ce_percent"] == pytest.approx(100 * (r["ce_spliced"] - r["ce_clean"]) / r["ce_clean"])
        if r["ce_zero_ablated"] != r["ce_clean"]:
            assert r["ce_recovered"] == pytest.approx(
                (r["ce_zero_ablated"] - r["ce_spliced"]) / (r["ce_zero_ablated"] - r["ce_clean"]))
        assert r["l0"] > 0 and 0 <= r["dead_fraction"] <= 1 and r["eval_windows"] == int(used.group(1))


def test_report_from_two_runs(tiny_models, tmp_path, capsys):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    for extra, out in ((["--baseline"], "base"), (["--groups", 1], "g1")):
        assert run_cli(["train", "--cache", cache, *extra, "--out", tmp_path / out, "--tokens", 8000,
                        "--batch-size", 512], capsys)[0] == 0
        assert run_cli(["eval", "--run", tmp_path / out, "--windows", 2], capsys)[0] == 0
    code, out, err = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "g1",
                              "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    text = (tmp_path / "rep" / "report.md").read_text()
    for name in ("base", "g1"):
        records = json.loads((tmp_path / name / "eval.json").read_text())["records"]
        mean_ev = sum(r["explained_variance"] for r in records) / len(records)
        assert f"{mean_ev:.3f}" in text
        mean_per_token = sum(r["explained_variance_per_token"] for r in records) / len(records)
        assert f"{mean_per_token:.3f}" in text
    assert "| baseline |" in text and "| amad-g1 |" in text and "Pythia-160M" in text
    assert (tmp_path / "rep" / "per-layer.png").stat().st_size > 1000 and (tmp_path / "rep" / "cost.png").exists()
    # the paper's total cost from the recorded files, by hand: (A + T·G) / (A + T·L)
    from stores import ActivationStore, read_seconds_writing

    cache_seconds = read_seconds_writing(ActivationStore.open(str(cache)))
    train = {name: json.loads((tmp_path / name / "summary.json").read_text())["train_seconds"] for name in ("base", "g1")}
    # 16 steps of 512 tokens per SAE from a 6,000-token cache: its rows were read again, which ran no forward, so A
    # is the whole cache's time (scaled up, it was 8192 / 6000 of it)
    a = cache_seconds
    total = (a + train["g1"]) / (a + train["base"])
    row = next(line for line in text.splitlines() if line.startswith("| amad-g1 |"))
    assert row.rstrip(" |").endswith(f"{total:.3f}") and f"| {a:.1f} |" in row
    assert "(A + T·G) ÷ (A + T·L)" in text
    assert "Every run trained on more tokens per SAE than the cache holds (6,000): A s is the whole cache's" in text
    code, _, _ = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "g1", "--out", tmp_path / "rep2",
                          "--cache-seconds", 100], capsys)
    assert code == 0 and "| 100.0 |" in (tmp_path / "rep2" / "report.md").read_text()
    # a second amad-g1 run (another seed): the two rows and columns are told apart by their folders
    assert run_cli(["train", "--cache", cache, "--groups", 1, "--seed", 1, "--out", tmp_path / "g1b", "--tokens", 8000,
                    "--batch-size", 512], capsys)[0] == 0
    assert run_cli(["eval", "--run", tmp_path / "g1b", "--windows", 2], capsys)[0] == 0  # as the others: comparable
    code, _, err = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "g1", "--runs", tmp_path / "g1b",
                            "--out", tmp_path / "rep3"], capsys)
    text = (tmp_path / "rep3" / "report.md").read_text()
    assert code == 0, err
    assert "| amad-g1 (g1) |" in text and "| amad-g1 (g1b) |" in text and "| baseline |" in text
    assert "| layer | baseline | amad-g1 (g1) | amad-g1 (g1b) |" in text
    assert "cover different layers" not in text
    # a run over a --layers subset beside the baseline: its means are over fewer layers, and the report says so
    assert run_cli(["group", "--cache", cache, "--metric", "uniform", "--layers", "0,2"], capsys)[0] == 0
    assert run_cli(["train", "--cache", cache, "--metric", "uniform", "--groups", 1, "--out", tmp_path / "u0",
                    "--tokens", 8000, "--batch-size", 512], capsys)[0] == 0
    assert run_cli(["eval", "--run", tmp_path / "u0", "--windows", 2], capsys)[0] == 0
    code, _, err = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "u0", "--out", tmp_path / "rep4"],
                           capsys)
    assert code == 0, err
    text = (tmp_path / "rep4" / "report.md").read_text()
    assert "The runs cover different layers (baseline: 0–1; uniform-g1: 0, 2)" in text
    row = next(line for line in text.splitlines() if line.startswith("| uniform-g1 |"))
    assert row.rstrip(" |").split(" | ")[-2:] == ["–", "–"], row  # layer 2 is not the baseline's: no ratio


def test_a_run_over_fewer_layers_is_compared_with_the_baselines_time_over_those():
    """A run over layers 1–4 beside a baseline over 0–5 read "training ÷ baseline 0.346": part of that was the
    layers it left out (helper-76).  Its baseline time is the baseline's share of its SAEs' own step seconds."""
    from pipeline.report import RunSummary

    def run(label, groups, train_seconds, sae_seconds=()):
        return RunSummary(label, label, None, groups, [], train_seconds, 0.0, None, 1, 10.0, 1, {},
                          sae_seconds=list(sae_seconds))

    baseline = run("baseline", [[0], [1], [2]], 12.0, [([0], 1.0), ([1], 3.0), ([2], 4.0)])
    assert run("g1", [[0, 1, 2]], 6.0).cost(baseline) == pytest.approx(6.0 / 12.0)  # the same layers: all of it
    fewer = run("g1", [[1, 2]], 6.0)
    assert fewer.baseline_seconds(baseline) == pytest.approx(12.0 * (3.0 + 4.0) / 8.0)
    assert fewer.cost(baseline) == pytest.approx(6.0 / 10.5)
    assert fewer.total_cost(baseline) == pytest.approx((10.0 + 6.0) / (10.0 + 10.5))
    assert math.isnan(run("g1", [[2, 3]], 6.0).cost(baseline))  # layer 3 is not the baseline's
    assert math.isnan(fewer.cost(run("baseline", [[0], [1], [2]], 12.0)))  # no per-SAE seconds recorded
    # the cost plot names a run it cannot place, rather than leave it out without a word (helper-77)
    from pipeline.report import cost_figure

    records = [{"layer": 2, "explained_variance_per_token": 0.5}]
    beside = run("g2", [[2, 3]], 6.0)
    beside.records, fewer.records, baseline.records = records, records, records
    figure = cost_figure([baseline, fewer, beside], baseline)
    assert figure.axes[0].get_title(loc="right") == "no cost ÷ baseline: g2"


def test_runs_that_share_a_label_are_told_apart_by_their_folders():
    from pipeline.report import RunSummary, name_runs

    def run(path: str, label: str) -> RunSummary:
        return RunSummary(path, label, None, [[0]], [], 1.0, 0.0, None, 1, None, 1, {})

    runs = [run("runs/a/base", "baseline"), run("runs/seed1", "amad-g3"), run("runs/seed2", "amad-g3"),
            run("x/same", "uniform-g2"), run("y/same", "uniform-g2"), run("s3://b/one", "amad-g1"),
            run("s3://b/p|q/", "relu-g1"), run("s3://c/r", "relu-g1")]
    name_runs(runs)
    assert [r.name for r in runs] == ["baseline", "amad-g3 (seed1)", "amad-g3 (seed2)",
                                      f"uniform-g2 ({os.path.realpath('x/same')})",
                                      f"uniform-g2 ({os.path.realpath('y/same')})", "amad-g1",
                                      "relu-g1 (p\\|q)", "relu-g1 (r)"]  # a "|" would end a table cell
    assert [r.label for r in runs][:3] == ["baseline", "amad-g3", "amad-g3"]  # what the report's logic keys on


def test_run_does_the_whole_comparison_and_reuses_it(tiny_models, tmp_path, capsys, monkeypatch):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    args = ["run", "--cache", cache, "--tokens", 4096, "--batch-size", 512, "--windows", 2, "--out", tmp_path / "runs"]
    # a baseline run stopped before its first checkpoint, made with other arguments: nothing trained, replaced
    assert run_cli(["train", "--cache", cache, "--baseline", "--tokens", 1024, "--batch-size", 512,
                    "--out", tmp_path / "runs" / "c-baseline"], capsys)[0] == 0
    for name in ("summary.json", "sae_0.json"):  # as a kill before the first checkpoint leaves it: planned
        (tmp_path / "runs" / "c-baseline" / name).unlink()
    import pipeline.evaluate as evaluate

    loads = []  # the evaluations share one load of the language model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "replacing the unfinished run" in err and "--tokens 1024 → 4096" in err, err
    runs = json.loads((tmp_path / "runs" / "c-report" / "runs.json").read_text())
    assert len(loads) == 1 and len(runs) >= 3
    # each evaluation shows its bar over its forward passes (two layers and a batch of windows here: 1 + 2 × 2),
    # under `gsae run` as under `gsae eval`
    assert len(re.findall(r"^eval\b.* 5/5 steps .*ETA", err, re.MULTILINE)) == len(runs), err
    labels = [run.rsplit("-", 2)[-2] + "-" + run.rsplit("-", 1)[-1] if "-g" in run else "baseline" for run in runs]
    assert runs[0].endswith("c-baseline") and any(r.endswith("uniform-g" + r[-1]) for r in runs)
    assert len(labels) >= 3
    before = {run: (tmp_path / "runs" / run.split("/")[-1] / "sae_0.safetensors").stat().st_mtime for run in runs}
    left = tmp_path / "runs" / "c-baseline" / "checkpoints"  # as a kill after the run's summary leaves them
    (left / "step-000000008").mkdir(parents=True)
    (left / "latest").write_text("step-000000008")
    # trained runs are found so where they could not be trained (SAEs too large for this machine, say
    # trained on a GPU and reported from a laptop): the check that they fit is made before training only
    import pipeline.train as train_module
    from pipeline.errors import GsaeError

    def too_large(*_):
        raise GsaeError("the SAEs do not fit")

    monkeypatch.setattr(train_module, "_check_fits", too_large)
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "trained already" in err, err
    assert err.count("evaluated already, with these arguments") == len(runs), err  # said, not silently reused
    assert not left.exists()
    monkeypatch.undo()
    after = {run: (tmp_path / "runs" / run.split("/")[-1] / "sae_0.safetensors").stat().st_mtime for run in runs}
    assert before == after
    # an eval.json made with other arguments (or recording none) is made again with this command's
    baseline, other = tmp_path / "runs" / "c-baseline", Path(runs[1])
    assert run_cli(["eval", "--run", baseline, "--windows", 0], capsys)[0] == 0
    recorded = json.loads((other / "eval.json").read_text())
    assert recorded["arguments"] == {"tokens": 16384, "windows": 2, "context_length": None,
                                     "downstream_positions": "spliced"}
    (other / "eval.json").write_text(json.dumps({key: recorded[key] for key in ("run", "records")}))
    kept = {run: (Path(run) / "eval.json").stat().st_mtime_ns for run in runs[2:]}
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "evaluating baseline again" in err and "--windows 0 → 2" in err
    assert f"evaluating {other.name.split('-', 1)[1]} again" in err and "does not record the arguments" in err
    for run in (baseline, other):
        data = json.loads((run / "eval.json").read_text())
        assert data["arguments"]["windows"] == 2
        assert all(r["eval_windows"] == 2 and r["delta_ce_percent"] == r["delta_ce_percent"] for r in data["records"])
    assert kept == {run: (Path(run) / "eval.json").stat().st_mtime_ns for run in runs[2:]}  # the others reused


def test_run_reuses_only_runs_of_this_cache_and_these_groups(tiny_models, tmp_path, capsys):
    """`gsae run` names runs by the cache's folder name: a run of another cache of that name (here chunked
    otherwise: other held-out rows) was reported as this cache's, and one trained on a grouping replaced
    since was reused.  `--layers` groups a subset, and the baseline covers the same layers."""
    a = make_cache(tiny_models["neox"], tmp_path / "a" / "c", tokens=6000, context_length=32, batch_size=8,
                   chunk_tokens=400)
    b = make_cache(tiny_models["neox"], tmp_path / "b" / "c", tokens=6000, context_length=32, batch_size=8,
                   chunk_tokens=500)
    args = ["run", "--tokens", 1024, "--batch-size", 512, "--windows", 0, "--groups", 1]
    code, _, err = run_cli([*args, "--cache", a, "--out", tmp_path / "runs"], capsys)
    assert code == 0 and "layers 0–1: G* = " in err, err
    line = _one_line_error(*run_cli([*args, "--cache", b, "--out", tmp_path / "runs"], capsys)[::2])
    assert "c-baseline already holds a finished run, made otherwise (another cache" in line
    assert "chunk tokens 400 vs 500" in line
    # eval compares the same settings (report: test_report_refuses_runs_that_cannot_be_compared)
    line = _one_line_error(*run_cli(["eval", "--run", tmp_path / "runs" / "c-baseline", "--windows", 0,
                                     "--cache", b], capsys)[::2])
    assert "is not the one" in line and "chunk tokens 400 vs 500" in line
    # --layers: the groupings runs use are replaced only with gsae group --force, and named so
    line = _one_line_error(*run_cli([*args, "--cache", a, "--out", tmp_path / "runs", "--layers", "1-2"], capsys)[::2])
    assert "--layers 1-2 --force" in line
    for metric in ("amad", "uniform"):
        assert run_cli(["group", "--cache", a, "--metric", metric, "--layers", "1-2", "--force"], capsys)[0] == 0
    line = _one_line_error(*run_cli([*args, "--cache", a, "--out", tmp_path / "runs", "--layers", "1-2"], capsys)[::2])
    assert "c-baseline already holds a finished run, made otherwise (layer groups [0] [1] → [1] [2])" in line
    # a run stopped before its first checkpoint holds nothing trained: replaced, also where its groups changed
    stopped = tmp_path / "sub" / "c-amad-g1"
    stopped.mkdir(parents=True)
    (stopped / "config.json").write_bytes((tmp_path / "runs" / "c-amad-g1" / "config.json").read_bytes())
    code, _, err = run_cli([*args, "--cache", a, "--out", tmp_path / "sub", "--layers", "1-2"], capsys)
    assert code == 0 and "layers 1–2: G* = " in err, err
    assert "replacing the unfinished run" in err and "layer groups [0–1] → [1–2]" in err
    for label, groups in (("baseline", [[1], [2]]), ("amad-g1", [[1, 2]])):
        assert json.loads((tmp_path / "sub" / f"c-{label}" / "config.json").read_text())["groups"] == groups
    # `gsae train --baseline` follows the grouping too, and names a damaged one rather than take other layers
    base = ["train", "--cache", a, "--baseline", "--tokens", 1024, "--batch-size", 512, "--out", tmp_path / "base"]
    assert run_cli(base, capsys)[0] == 0
    assert json.loads((tmp_path / "base" / "config.json").read_text())["groups"] == [[1], [2]]
    (a / "groups" / "amad.json").write_text('{"broken')
    line = _one_line_error(*run_cli(base, capsys)[::2])
    assert "amad.json" in line and "damaged" in line


def test_an_evaluation_is_compared_by_what_it_measured():
    """--tokens and --windows above what the held-out slice holds read all of it: the same evaluation as
    any other that reads all of it; --context-length left out is the cache's windows."""
    from types import SimpleNamespace

    from pipeline.report import _evaluated_with

    config = SimpleNamespace(source={"context_length": 64})
    records = [{"layer": 0, "tokens": 400, "eval_windows": 15}, {"layer": 1, "tokens": 400, "eval_windows": 15}]
    for asked in ({"tokens": 16384, "windows": 40, "context_length": None},
                  {"tokens": 1000, "windows": 15, "context_length": 64}):
        assert _evaluated_with(asked, records, config) == {"tokens": 400, "windows": 15, "context_length": 64}
    assert _evaluated_with({"tokens": 16384, "windows": 0, "context_length": None}, [{"layer": 0, "tokens": 400}],
                           config) == {"tokens": 400, "windows": 0, "context_length": 64}
    assert _evaluated_with(None, records, config) is None


def test_report_refuses_runs_evaluated_otherwise(pair, tmp_path, capsys):
    """dead % (latents that never fired on the evaluation's tokens) and the means depend on what was
    evaluated: runs evaluated with other arguments were put side by side without a word."""
    import shutil

    other = tmp_path / "g1"
    shutil.copytree(pair["g1"], other)
    # --tokens 1000 reads all of the 400 held-out rows, as the default does: the same evaluation
    assert run_cli(["eval", "--run", other, "--windows", 0, "--tokens", 1000], capsys)[0] == 0
    assert run_cli(["report", "--runs", pair["base"], "--runs", other, "--out", tmp_path / "rep"], capsys)[0] == 0
    assert run_cli(["eval", "--run", other, "--windows", 0, "--tokens", 200], capsys)[0] == 0
    line = _one_line_error(*run_cli(["report", "--runs", pair["base"], "--runs", other, "--out", tmp_path / "rep"],
                                    capsys)[::2])
    assert "evaluated otherwise (--tokens 400 → 200" in line
    # compared pairwise: the two group runs, beside a baseline whose eval.json records no arguments (an
    # older gsae's), were compared with that baseline only
    recorded = json.loads((pair["base"] / "eval.json").read_text())
    older = tmp_path / "older"
    shutil.copytree(pair["base"], older)
    (older / "eval.json").write_text(json.dumps({key: recorded[key] for key in ("run", "records")}))
    line = _one_line_error(*run_cli(["report", "--runs", older, "--runs", pair["g1"], "--runs", other,
                                     "--out", tmp_path / "rep"], capsys)[::2])
    assert "evaluated otherwise" in line and str(other) in line
    assert run_cli(["report", "--runs", pair["base"], "--runs", pair["g1"], "--out", tmp_path / "rep"], capsys)[0] == 0
    # an eval.json with CE and KL but no arguments (older still: averaged as before 2026-11-29) beside a new one
    # with them: refused, naming it
    assert run_cli(["eval", "--run", other, "--windows", 2, "--tokens", 1000], capsys)[0] == 0
    older_ce = tmp_path / "older_ce"
    shutil.copytree(pair["base"], older_ce)
    assert run_cli(["eval", "--run", older_ce, "--windows", 2, "--tokens", 1000], capsys)[0] == 0
    recorded = json.loads((older_ce / "eval.json").read_text())
    (older_ce / "eval.json").write_text(json.dumps({key: recorded[key] for key in ("run", "records")}))
    for runs in ((older_ce, other), (other, older_ce)):
        line = _one_line_error(*run_cli(["report", *[a for run in runs for a in ("--runs", run)],
                                         "--out", tmp_path / "rep"], capsys)[::2])
        assert f"the eval.json of {older_ce} comes from a gsae before 2026-11-29" in line, line
        assert line.endswith(f"evaluate it again with `gsae eval --run {older_ce}`"), line
    # one without CE (made with --windows 0) has nothing averaged otherwise: compared as before
    assert run_cli(["report", "--runs", older, "--runs", other, "--out", tmp_path / "rep"], capsys)[0] == 0


# ---------------------------------------------------------------- bad inputs and comparisons (one line each)


def _one_line_error(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_ce_recovered_is_noted_where_zero_ablation_barely_raises_ce():
    """CE recovered = (zero − spliced) / (zero − clean): where zeroing a layer raised CE by under 1% its
    denominator is about 0, and the column read 11.3 or −4.5 on tiny random models without a word."""
    from pipeline.evaluate import ce_recovered_note

    def record(layer, clean, zero):
        return {"layer": layer, "ce_clean": clean, "ce_zero_ablated": zero}

    assert ce_recovered_note([record(0, 3.0, 9.0), record(1, 3.0, 3.05)]) is None  # +300%, +1.7%
    assert ce_recovered_note([{"layer": 0, "fvu": 0.1}]) is None  # --windows 0: nothing downstream measured
    said = ce_recovered_note([record(4, 6.2469, 6.2505), record(0, 3.0, 9.0), record(2, 3.0, 2.9),
                              record(3, 3.0, float("nan"))])
    assert said.startswith("note: CE rec. means little at layers 2–4: zero-ablating them raised CE by under 1%"), said


def test_eval_finds_a_moved_model_folder_with_model(tiny_models, tmp_path, capsys):
    """A cache's model folder moved: eval said "model ... is neither a folder saved with save_pretrained nor a
    .gguf file" and had no way to name the new place (helper-73)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["neox"], model)
    cache = make_cache(model, tmp_path / "c", tokens=3000, context_length=32, batch_size=8, chunk_tokens=200)
    assert run_cli(["train", "--cache", cache, "--baseline", "--out", tmp_path / "r", "--tokens", 1024,
                    "--batch-size", 256], capsys)[0] == 0
    model.rename(tmp_path / "moved")
    code, _, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 2], capsys)
    assert code == 1 and "is no longer there; if it moved, pass --model with its new place" in " ".join(err.split()), err
    code, _, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 2, "--model", tmp_path / "moved"], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "r" / "eval.json").read_text())["records"]
    assert all(r["ce_clean"] > 0 for r in records)


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    """A baseline and a one-group run of one cache, both evaluated without the downstream metrics."""
    root = tmp_path_factory.mktemp("pair")
    cache = make_cache(tiny_models["neox"], root / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    assert run_cli(["group", "--cache", cache])[0] == 0
    for extra, out in ((["--baseline"], "base"), (["--groups", 1], "g1")):
        code, _, err = run_cli(["train", "--cache", cache, *extra, "--out", root / out, "--tokens", 2048,
                                "--batch-size", 512])
        assert code == 0, err
        assert run_cli(["eval", "--run", root / out, "--windows", 0])[0] == 0
    return {"root": root, "cache": cache, "base": root / "base", "g1": root / "g1"}


@pytest.mark.parametrize("args, words", [
    (["--tokens", 0], "--tokens must be at least 100"), (["--tokens", -5], "--tokens must be at least 100"),
    (["--tokens", 1], "--tokens must be at least 100"), (["--windows", -1], "--windows must be 0"),
    (["--context-length", 1], "--context-length must be at least 2"),
    (["--context-length", 0], "--context-length must be at least 2"),
    # BOS in front is never spliced: two tokens leave no spliced position that predicts anything
    (["--context-length", 2, "--windows", 2], "--context-length must be at least 3"),
])
def test_eval_refuses_arguments_without_a_meaningful_metric(pair, args, words, capsys):
    before = (pair["g1"] / "eval.json").read_bytes()
    line = _one_line_error(*run_cli(["eval", "--run", pair["g1"], *args], capsys)[::2])
    assert words in line
    assert (pair["g1"] / "eval.json").read_bytes() == before  # refused before any work


def test_eval_of_a_run_whose_cache_moved_takes_its_new_place(pair, tmp_path, capsys):
    """A run records its cache's path; after a move eval named only the old path ("create one with gsae
    cache"). It now says to pass --cache, and with it gives the records of the cache in its old place."""
    import shutil

    run, moved = tmp_path / "g1", tmp_path / "moved"
    shutil.copytree(pair["g1"], run)
    shutil.copytree(pair["cache"], moved)
    config = json.loads((run / "config.json").read_text())
    config["cache"] = str(tmp_path / "gone")  # where the cache was when the run was trained
    (run / "config.json").write_text(json.dumps(config))
    line = _one_line_error(*run_cli(["eval", "--run", run, "--windows", 0], capsys)[::2])
    assert "no longer at" in line and "--cache" in line
    code, _, err = run_cli(["eval", "--run", run, "--windows", 0, "--cache", moved], capsys)
    assert code == 0, err
    got = json.loads((run / "eval.json").read_text())["records"]
    want = json.loads((pair["g1"] / "eval.json").read_text())["records"]
    assert [r["fvu"] for r in got] == [r["fvu"] for r in want] and [r["l0"] for r in got] == [r["l0"] for r in want]
    line = _one_line_error(*run_cli(["eval", "--run", run, "--windows", 0, "--cache", pair["root"] / "base"],
                                    capsys)[::2])  # not a cache at all
    assert "Traceback" not in line


def test_eval_shows_its_progress_over_its_steps(pair, tmp_path, monkeypatch):
    """`gsae eval` printed nothing for minutes after the model loaded. Its bar counts the steps (each layer's
    reconstruction, then per batch of windows the clean pass and each layer's spliced and zero-ablated ones),
    with the layer and stage in its description; in a log (a console that is not a terminal) it prints a plain
    line every PROGRESS_EVERY seconds, and the bar once at the end, before the notes."""
    import io
    import shutil
    import time

    from rich.console import Console

    import pipeline.evaluate as evaluate

    run = tmp_path / "g1"
    shutil.copytree(pair["g1"], run)
    assert len(evaluate.evaluate_run(str(run), windows=0, console=None)) == 2  # no console: no progress

    def slowed(stage):  # each stage long enough for a few lines
        def slow(*args, **kwargs):
            time.sleep(0.15)
            return stage(*args, **kwargs)
        return slow

    import pipeline.block_replay as block_replay

    for module, name in ((evaluate, "layer_reconstruction"), (block_replay, "run_with_block_output")):
        monkeypatch.setattr(module, name, slowed(getattr(module, name)))
    monkeypatch.setattr(evaluate, "PROGRESS_EVERY", 0.03)
    log = io.StringIO()
    records = evaluate.evaluate_run(str(run), windows=2, console=Console(file=log, force_terminal=False, width=200))
    text = log.getvalue()
    assert [r["layer"] for r in records] == [0, 1]
    lines = re.findall(r"^eval (.*): (\d)/5 steps, 00:00:\d\d elapsed(, ETA 00:00:\d\d)?$", text, re.MULTILINE)
    # one batch of windows here: 2 reconstructions, 1 clean pass, 2 × 2 passes with a layer replaced, in this
    # order; the bar counts the forward passes alone (a reconstruction is quick beside one: the ETA)
    order = ["layer 0 (reconstruction)", "layer 1 (reconstruction)", "(clean forward pass)",
             "layer 0 (spliced forward pass)", "layer 0 (zero-ablated forward pass)",
             "layer 1 (spliced forward pass)", "layer 1 (zero-ablated forward pass)"]
    assert {stage for stage, _, _ in lines} == set(order), text
    assert all(done == str(max(0, order.index(stage) - 2)) for stage, done, _ in lines), text
    assert all(eta for stage, done, eta in lines if done != "0"), text  # a step done: an ETA
    assert "steps/s" not in text  # no rate: it would read "0 steps/s" at a step every few seconds
    end = re.search(r"^eval\b.* 5/5 steps .*ETA", text, re.MULTILINE)  # the bar, drawn once at the end
    assert end and end.start() > text.rindex("(zero-ablated forward pass): "), text
    assert end.start() < text.index("rows (fewer than the 16,384 to evaluate)"), text
    # on a terminal: the bar alone, redrawn in place, no plain lines (PROGRESS_EVERY is still 0.03 s)
    screen = io.StringIO()
    evaluate.evaluate_run(str(run), windows=0, console=Console(file=screen, force_terminal=True, width=120))
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # colours and cursor moves
    assert re.search(r"\reval .* 2/2 steps .*ETA", drawn) and "elapsed" not in drawn, drawn


def test_eval_at_the_shortest_context_gives_finite_downstream_metrics(pair, tmp_path, capsys):
    import shutil

    run = tmp_path / "g1"
    shutil.copytree(pair["g1"], run)
    code, _, err = run_cli(["eval", "--run", run, "--windows", 2, "--context-length", 3, "--tokens", 100], capsys)
    assert code == 0, err
    data = json.loads((run / "eval.json").read_text())
    assert data["arguments"] == {"tokens": 100, "windows": 2, "context_length": 3, "downstream_positions": "spliced"}
    for r in data["records"]:
        assert r["tokens"] == 100 and r["eval_windows"] == 2
        assert all(r[key] == r[key] for key in ("ce_clean", "ce_spliced", "delta_ce_percent", "kl_divergence"))


def test_downstream_metrics_a_window_at_a_time_equal_all_at_once(pair, tmp_path, capsys, monkeypatch):
    """The spliced and zero-ablated passes run a batch of windows at a time (bounded logits): the sums give the
    means of one pass over every window."""
    import shutil

    import pipeline.evaluate as evaluate

    results = {}
    for name, budget in (("whole", 2**40), ("one", 1)):  # every window in one pass; one window per pass
        run = tmp_path / name
        shutil.copytree(pair["g1"], run)
        monkeypatch.setattr(evaluate, "_LOGITS_BYTES", budget)
        # on the CPU: on CUDA the SAE runs in TF32, whose kernels may differ with the batch's shape, and a TopK
        # near-tie would then flip; what this checks (the sums over batches) does not depend on the device
        code, _, err = run_cli(["eval", "--run", run, "--windows", 3, "--tokens", 100, "--device", "cpu"], capsys)
        assert code == 0, err
        results[name] = json.loads((run / "eval.json").read_text())["records"]
    # a window's logits alone and in a batch differ in the last bits of float32 matmuls; ΔCE % and CE
    # recovered are differences of CEs, so their tolerance is the CEs' absolute one
    tolerance = {"ce_clean": 1e-6, "ce_spliced": 1e-6, "ce_zero_ablated": 1e-6, "kl_divergence": 1e-6,
                 "delta_ce_percent": 1e-3, "ce_recovered": 1e-3}
    for whole, one in zip(results["whole"], results["one"]):
        assert whole["eval_windows"] == one["eval_windows"] == 3
        for key, abs_tolerance in tolerance.items():
            assert one[key] == pytest.approx(whole[key], rel=1e-6, abs=abs_tolerance), key


def test_report_refuses_runs_that_cannot_be_compared(pair, tiny_models, tmp_path, capsys):
    other_cache = make_cache(tiny_models["llama"], tmp_path / "c2", tokens=3000, context_length=32, batch_size=8,
                             chunk_tokens=400)
    assert run_cli(["group", "--cache", other_cache], capsys)[0] == 0
    for cache, tokens, out, extra in ((other_cache, 2048, "other", []), (pair["cache"], 1024, "short", []),
                                      (pair["cache"], 2048, "wide", ["--expansion", 8])):
        assert run_cli(["train", "--cache", cache, "--groups", 1, "--out", tmp_path / out, "--tokens", tokens,
                        "--batch-size", 512, *extra], capsys)[0] == 0
        assert run_cli(["eval", "--run", tmp_path / out, "--windows", 0], capsys)[0] == 0

    def report(*runs):
        return run_cli(["report", *[a for r in runs for a in ("--runs", r)], "--out", tmp_path / "rep"], capsys)

    line = _one_line_error(*report(pair["base"], tmp_path / "other")[::2])
    assert "different caches" in line and str(pair["base"]) in line and str(tmp_path / "other") in line
    assert "n layers 3 vs 4" in line
    line = _one_line_error(*report(pair["base"], tmp_path / "short")[::2])
    assert "2,048 vs 1,024 training tokens per SAE" in line and str(tmp_path / "short") in line
    line = _one_line_error(*report(pair["base"], tmp_path / "wide")[::2])
    assert "their SAEs differ (n_latents" in line and str(tmp_path / "wide") in line
    line = _one_line_error(*report(pair["base"], pair["g1"], f"{pair['base']}/")[::2])
    assert "given twice" in line and str(pair["base"]) in line
    assert not (tmp_path / "rep").exists()


def test_report_without_a_baseline_or_a_cache_says_so_instead_of_nan(pair, tmp_path, capsys):
    code, out, err = run_cli(["report", "--runs", pair["g1"], "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    text = (tmp_path / "rep" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| amad-g1 |"))
    assert "nan" not in text and row.rstrip(" |").endswith("| – | –") and "No baseline among the runs" in out
    import shutil

    for name in ("base", "g1"):  # the cache moved away: no timing.json for A
        shutil.copytree(pair[name], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "cache": str(tmp_path / "gone")}))
    code, out, err = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "g1",
                              "--out", tmp_path / "rep2"], capsys)
    assert code == 0, err
    text = (tmp_path / "rep2" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| amad-g1 |"))
    assert "nan" not in text and row.rstrip(" |").endswith("| –") and "| – |" in row
    assert f"the cache {tmp_path / 'gone'} cannot be opened" in out and "--cache-seconds" in out


@pytest.mark.parametrize("name", ["summary.json", "eval.json", "sae_0.json"])
@pytest.mark.parametrize("content", ['{"train_sec', "[1, 2]", "\xff"])
def test_report_names_a_damaged_file_in_one_line(pair, tmp_path, name, content, capsys):
    import shutil

    run = tmp_path / "g1"
    shutil.copytree(pair["g1"], run)
    (run / name).write_bytes(content.encode("latin-1"))
    line = _one_line_error(*run_cli(["report", "--runs", pair["base"], "--runs", run, "--out", tmp_path / "rep"],
                                    capsys)[::2])
    assert f"{run / name} is damaged" in line


def test_export_and_eval_name_a_damaged_sae_config(pair, tmp_path, capsys):
    import shutil

    run = tmp_path / "g1"
    shutil.copytree(pair["g1"], run)
    (run / "sae_0.json").write_text('{"d_in": ')
    for args in (["export", "--run", run, "--out", tmp_path / "e"], ["eval", "--run", run, "--windows", 0]):
        line = _one_line_error(*run_cli(args, capsys)[::2])
        assert f"{run / 'sae_0.json'} is damaged" in line


def summary_k(run) -> int:
    return json.loads((run / "config.json").read_text())["k"]


def test_batchtopk_eval_shows_the_l0_of_its_threshold(pair, tmp_path, capsys, monkeypatch):
    """A BatchTopK SAE is evaluated with its inference threshold: the L0 in eval.json (and the table) is
    the one that threshold gives on the held-out rows, and a threshold far from k is pointed out."""
    from pipeline.models import matmul_precision, pick_device
    from pipeline.run import Run
    from pipeline.sae import SparseAutoencoder
    from stores import ActivationStore

    @torch.no_grad()
    def from_zero(self, dense):  # SAELens's running mean from 0, uncorrected: two steps leave it far too low
        smallest = torch.where(dense > 0, dense.float(), torch.inf).min()
        self.threshold.copy_(torch.where(torch.isfinite(smallest), 0.99 * self.threshold + 0.01 * smallest,
                                         self.threshold))

    monkeypatch.setattr(SparseAutoencoder, "_update_threshold", from_zero)
    out = tmp_path / "btk"
    code, trained, _ = run_cli(["train", "--cache", pair["cache"], "--groups", 1, "--architecture", "batchtopk",
                                "--out", out, "--tokens", 1024, "--batch-size", 512], capsys)
    assert code == 0 and "has not settled" in trained  # the training summary says so too
    summary = json.loads((out / "summary.json").read_text())["saes"][0]
    assert "has not settled" in summary["note"] and summary["held_out_l0"] > 2 * summary_k(out)
    code, _, err = run_cli(["eval", "--run", out, "--windows", 0, "--tokens", 400], capsys)
    assert code == 0, err
    records = json.loads((out / "eval.json").read_text())["records"]
    run = Run.open(out, need="trained")
    device = pick_device("auto")  # as eval ran: on CUDA where there is one, in TF32 as the run trained
    (sae, sae_config), = run.load_saes(device)
    store = ActivationStore.open(str(pair["cache"]))
    start = run.config.eval_rows[0]
    for record in records:
        layer = record["layer"]
        x = torch.from_numpy(store.read_rows(layer, start, start + 400)).float() * sae_config["scales"][str(layer)]
        with torch.no_grad(), matmul_precision(device, run.config.tf32):
            assert record["l0"] == pytest.approx(sae.encode(x.to(device)).l0(), rel=1e-5)
    assert records[0]["l0"] > 2 * sae.k  # after two steps the threshold has not settled ...
    mean_l0 = sum(r["l0"] for r in records) / len(records)
    assert "has not settled" in err and f"k = {sae.k}" in err and f"L0 {mean_l0:.1f}" in err  # ... and eval says so


def test_gsae_run_refuses_negative_windows_before_any_work(pair, tmp_path, capsys):
    line = _one_line_error(*run_cli(["run", "--cache", pair["cache"], "--windows", -1, "--out", tmp_path / "runs"],
                                    capsys)[::2])
    assert "--windows must be 0" in line and not (tmp_path / "runs").exists()


def test_report_refuses_penalty_saes_of_different_l1_coefficients(pair, tmp_path, capsys):
    """Two ReLU runs trained with other --l1-coefficient values differ in sparsity by construction."""
    runs = []
    for extra, coefficient in ((["--baseline"], 1.0), (["--groups", 1], 20.0)):
        out = tmp_path / f"relu{coefficient:g}"
        code, _, err = run_cli(["train", "--cache", pair["cache"], *extra, "--architecture", "relu",
                                "--l1-coefficient", coefficient, "--out", out, "--tokens", 2048, "--batch-size", 512],
                               capsys)
        assert code == 0, err
        assert run_cli(["eval", "--run", out, "--windows", 0], capsys)[0] == 0
        runs += ["--runs", out]
    line = _one_line_error(*run_cli(["report", *runs, "--out", tmp_path / "report"], capsys)[::2])
    assert "l1_coefficient 1.0 vs 20.0" in line and "--l1-coefficient" in line


def _summary(label: str, groups: list[list[int]], delta_ce: bool, seconds: float):
    """A run as the report holds it, built in memory: per-layer records with or without the downstream
    metrics (a run evaluated with `gsae eval --windows 0` has no delta_ce_percent, ce_recovered or KL)."""
    from pipeline.report import RunSummary

    records = []
    for group in groups:
        for layer in group:
            record = {"layer": layer, "sae_layers": group, "explained_variance_per_token": 0.8 + 0.01 * layer,
                      "explained_variance": 0.9, "l0": 32.0, "dead_fraction": 0.0}
            if delta_ce:
                record.update(delta_ce_percent=5.0 + 0.3 * layer, ce_recovered=0.9, kl_divergence=0.1)
            records.append(record)
    return RunSummary(f"/runs/{label}", label, None, groups, records, seconds, 0.0, None, 1000, None, 1000, {})


def _report_runs(measured: tuple[bool, bool, bool]):
    return [_summary("baseline", [[i] for i in range(4)], measured[0], 40.0),
            _summary("amad-g2", [[0, 1], [2, 3]], measured[1], 20.0),
            _summary("uniform-g1", [[0, 1, 2, 3]], measured[2], 10.0)]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_report_figures_say_when_no_run_measured_delta_ce():
    from pipeline.plots import plt
    from pipeline.report import cost_figure, cost_plot, per_layer_figure, per_layer_plot

    runs = _report_runs((False, False, False))
    figure = per_layer_figure(runs)
    ev, dce = figure.axes
    assert len(ev.lines) >= 3 and {line.get_label() for line in ev.lines} >= {"baseline", "amad-g2", "uniform-g1"}
    assert ev.get_xlabel() == "layer" and any(t.get_text() for t in ev.get_xticklabels())  # layers still labelled
    assert not dce.lines and dce.get_xticks().size == 0 and dce.get_yticks().size == 0  # no −0.04…0.04 axis
    assert _texts(dce) == ["ΔCE not measured (gsae eval --windows 0)"]
    plt.close(figure)

    figure = cost_figure(runs, runs[0])
    ev, dce = figure.axes
    assert sum(len(c.get_offsets()) for c in ev.collections) == 3 and _texts(ev) == ["baseline", "amad-g2", "uniform-g1"]
    assert not dce.collections and dce.get_xticks().size == 0 and dce.get_yticks().size == 0
    assert _texts(dce) == ["ΔCE not measured (gsae eval --windows 0)"]
    plt.close(figure)
    assert per_layer_plot(runs).startswith(b"\x89PNG") and cost_plot(runs, runs[0]).startswith(b"\x89PNG")


def test_report_figures_plot_the_runs_that_measured_delta_ce():
    from pipeline.plots import plt
    from pipeline.report import cost_figure, per_layer_figure

    runs = _report_runs((True, False, True))  # amad-g2 evaluated with --windows 0
    figure = per_layer_figure(runs)
    ev, dce = figure.axes
    assert [line.get_label() for line in dce.lines if not line.get_label().startswith("_")] == ["baseline", "uniform-g1"]
    assert list(dce.lines[0].get_ydata()) == pytest.approx([5.0, 5.3, 5.6, 5.9])
    assert dce.get_yticks().size > 0 and "not measured" not in " ".join(_texts(dce))
    assert "amad-g2" in dce.get_title(loc="right")  # the run left out is named
    colour = {line.get_label(): line.get_color() for line in ev.lines}
    assert all(line.get_color() == colour[line.get_label()] for line in dce.lines
               if not line.get_label().startswith("_"))  # a run keeps its colour in both panels
    plt.close(figure)

    figure = cost_figure(runs, runs[0])
    ev, dce = figure.axes
    assert _texts(dce) == ["baseline", "uniform-g1"] and "amad-g2" in dce.get_title(loc="right")
    points = [float(v) for c in dce.collections for p in c.get_offsets() for v in p]
    assert points == pytest.approx([1.0, 5.45, 0.25, 5.45])  # (cost ÷ baseline, mean ΔCE %) of the two
    plt.close(figure)

    figure = per_layer_figure(_report_runs((True, True, True)))  # all measured: both panels, no note
    assert all(ax.get_title(loc="right") == "" and len(ax.lines) >= 3 for ax in figure.axes)
    plt.close(figure)


@pytest.mark.parametrize("measured", [(True, True, True), (False, False, False)])
def test_report_cost_figure_panels_do_not_overlap(measured):
    from pipeline.plots import plt
    from pipeline.report import cost_figure, per_layer_figure

    runs = _report_runs(measured)
    for figure in (cost_figure(runs, runs[0]), per_layer_figure(runs)):
        renderer = figure.canvas.get_renderer()
        figure.draw(renderer)  # the layout is made at draw time
        first, second = (ax.get_tightbbox(renderer) for ax in figure.axes)  # labels and tick labels included
        assert not first.overlaps(second), (first, second)
        plt.close(figure)


def test_the_model_of_a_cache_is_found_at_its_commit_or_by_its_files(tiny_neox, tmp_path):
    """A hub model loads at the commit the cache resolved it to: its fingerprint names the revision asked for
    (main) and is not compared, or every hub cache's downstream metrics were refused (hub:id@<sha> against
    hub:id@main). A folder's files must still be those the cache recorded."""
    import shutil
    from types import SimpleNamespace

    from pipeline.errors import GsaeError
    from pipeline.evaluate import spec_from_store
    from pipeline.models import resolve_model_spec

    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = SimpleNamespace(path="c", attrs={"model_source": "hub", "model_id": "EleutherAI/pythia-70m",
                                           "model_revision": sha, "model_fingerprint": "hub:EleutherAI/pythia-70m@main"})
    spec = spec_from_store(hub)  # resolved without the network: nothing is loaded yet
    assert (spec.location, spec.revision) == ("EleutherAI/pythia-70m", sha)
    folder = tmp_path / "model"
    shutil.copytree(tiny_neox, folder)
    local = SimpleNamespace(path="c", attrs={"model_source": "local", "model_id": str(folder),
                                             "model_fingerprint": resolve_model_spec(str(folder)).fingerprint})
    assert spec_from_store(local).location == str(folder)
    # moved: named so, and found again with --model (by the same fingerprint); a hub model is found by its id
    moved = tmp_path / "moved"
    folder.rename(moved)
    with pytest.raises(GsaeError, match=f"the model {folder} the cache c was made with is no longer there; if it "
                                        "moved, pass --model with its new place"):
        spec_from_store(local)
    assert spec_from_store(local, str(moved)).location == str(moved)
    with pytest.raises(GsaeError, match="--model finds a model folder or file that moved; .* the hub model"):
        spec_from_store(hub, str(moved))
    with pytest.raises(GsaeError, match=f"model {tmp_path / 'nowhere'} does not exist"):
        spec_from_store(local, str(tmp_path / "nowhere"))
    moved.rename(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(GsaeError, match="is not the one the cache c was made with .*; put that model back"):
        spec_from_store(local)
    with pytest.raises(GsaeError, match="found at --model .* is not the one the cache c was made with .*; pass --model "
                                        "with that model"):
        spec_from_store(local, str(folder))


@pytest.mark.parametrize("kept", ["default", 0])
def test_eval_splices_each_layer_as_passes_composed_by_hand(pair, tmp_path, capsys, monkeypatch, kept):
    """eval.json's CE and KL per layer equal downstream_metrics of whole-model passes composed here, each with
    that layer's own SAE and scale, one window at a time or all at once; with the passes from the replaced block
    on (the default) and with every pass through the whole model (nothing kept)."""
    import shutil

    import pipeline.block_replay as block_replay
    import pipeline.evaluate as evaluate
    from pipeline.run import Run
    from stores import ActivationStore

    if kept != "default":
        monkeypatch.setattr(block_replay, "KEPT_BYTES", kept)
    monkeypatch.setattr(evaluate, "_LOGITS_BYTES", 1)  # a window per pass: three batches
    run = tmp_path / "g1"
    shutil.copytree(pair["base"], run)  # one SAE per layer: a layer spliced with another's SAE shows
    code, _, err = run_cli(["eval", "--run", run, "--windows", 3, "--tokens", 100, "--device", "cpu"], capsys)
    assert code == 0, err
    records = json.loads((run / "eval.json").read_text())["records"]
    trained = Run.open(str(run), need="trained")
    store = ActivationStore.open(trained.config.cache)
    lm = load_model(evaluate.spec_from_store(store), torch.device("cpu"))
    ids = evaluate.held_out_windows(store, int(trained.config.eval_rows[0]), 3, None)
    first = 1 if store.attrs.get("prepend_bos") else 0
    clean = run_with_block_output(lm, ids, 0, None)
    layers = {layer: (sae, config) for sae, config in trained.load_saes() for layer in config["layers"]}
    assert [r["layer"] for r in records] == sorted(layers) and len(layers) >= 2
    for record in records:
        sae, config = layers[record["layer"]]
        splice = evaluate._splicer(sae, config["scales"][str(record["layer"])], first, torch.device("cpu"), False)
        spliced = run_with_block_output(lm, ids, record["layer"], splice)
        zero = run_with_block_output(lm, ids, record["layer"], lambda h: torch.cat(
            [h[:, :first], torch.zeros_like(h[:, first:])], dim=1))
        expected = downstream_metrics(clean, spliced, zero, ids, first)
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_divergence"):
            assert record[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (record["layer"], key)
