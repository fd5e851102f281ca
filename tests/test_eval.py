"""`gsae eval`: metric definitions and the spliced forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_cache, run_cli
from pipeline.evaluate import _run_with_block_output, downstream_metrics, reconstruction_metrics
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
    clean = _run_with_block_output(lm, ids, 0, None)
    identity = _run_with_block_output(lm, ids, 1, lambda h: h.clone())
    zero = _run_with_block_output(lm, ids, 1, lambda h: torch.zeros_like(h))
    m = downstream_metrics(clean, identity, zero, ids)
    assert m["delta_ce_percent"] == pytest.approx(0, abs=1e-5) and m["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert m["ce_recovered"] == pytest.approx(1.0)
    ablated = downstream_metrics(clean, zero, zero, ids)
    assert ablated["ce_spliced"] == pytest.approx(ablated["ce_zero_ablated"]) and ablated["ce_recovered"] == 0
    assert ablated["kl_divergence"] > 0


def test_eval_command_writes_records(tiny_models, tmp_path, capsys):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    assert run_cli(["group", "--cache", cache], capsys)[0] == 0
    assert run_cli(["train", "--cache", cache, "--groups", 1, "--out", tmp_path / "r", "--tokens", 20000,
                    "--batch-size", 512], capsys)[0] == 0
    code, out, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 4], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "r" / "eval.json").read_text())["records"]
    assert [r["layer"] for r in records] == [0, 1]
    for r in records:
        assert 0 < r["explained_variance"] < 1
        # a random tiny model need not get worse when a block is zeroed: assert what always holds
        assert all(r[key] > 0 for key in ("ce_clean", "ce_spliced", "ce_zero_ablated")) and r["kl_divergence"] >= 0
        assert r["delta_ce_percent"] == pytest.approx(100 * (r["ce_spliced"] - r["ce_clean"]) / r["ce_clean"])
        if r["ce_zero_ablated"] != r["ce_clean"]:
            assert r["ce_recovered"] == pytest.approx(
                (r["ce_zero_ablated"] - r["ce_spliced"]) / (r["ce_zero_ablated"] - r["ce_clean"]))
        assert r["l0"] > 0 and 0 <= r["dead_fraction"] <= 1 and r["eval_windows"] == 4


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
    a = cache_seconds * 8192 / 6000  # 16 steps of 512 tokens per SAE, from a 6,000-token cache
    total = (a + train["g1"]) / (a + train["base"])
    row = next(line for line in text.splitlines() if line.startswith("| amad-g1 |"))
    assert row.rstrip(" |").endswith(f"{total:.3f}") and f"| {a:.1f} |" in row
    assert "(A + T·G) ÷ (A + T·L)" in text
    code, _, _ = run_cli(["report", "--runs", tmp_path / "base", "--runs", tmp_path / "g1", "--out", tmp_path / "rep2",
                          "--cache-seconds", 100], capsys)
    assert code == 0 and f"| {100 * 8192 / 6000:.1f} |" in (tmp_path / "rep2" / "report.md").read_text()


def test_run_does_the_whole_comparison_and_reuses_it(tiny_models, tmp_path, capsys):
    cache = make_cache(tiny_models["neox"], tmp_path / "c", tokens=6000, context_length=32, batch_size=8,
                       chunk_tokens=400)
    args = ["run", "--cache", cache, "--tokens", 4096, "--batch-size", 512, "--windows", 2, "--out", tmp_path / "runs"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    runs = json.loads((tmp_path / "runs" / "c-report" / "runs.json").read_text())
    labels = [run.rsplit("-", 2)[-2] + "-" + run.rsplit("-", 1)[-1] if "-g" in run else "baseline" for run in runs]
    assert runs[0].endswith("c-baseline") and any(r.endswith("uniform-g" + r[-1]) for r in runs)
    assert len(labels) >= 3
    before = {run: (tmp_path / "runs" / run.split("/")[-1] / "sae_0.safetensors").stat().st_mtime for run in runs}
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "trained already" in err
    after = {run: (tmp_path / "runs" / run.split("/")[-1] / "sae_0.safetensors").stat().st_mtime for run in runs}
    assert before == after
