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
    assert run_cli(["train", "--cache", cache, "--groups", 1, "--out", tmp_path / "r", "--tokens", 20000,
                    "--batch-size", 512], capsys)[0] == 0
    code, out, err = run_cli(["eval", "--run", tmp_path / "r", "--windows", 4], capsys)
    assert code == 0, err
    records = json.loads((tmp_path / "r" / "eval.json").read_text())["records"]
    assert [r["layer"] for r in records] == [0, 1]
    for r in records:
        assert 0 < r["explained_variance"] < 1 and r["ce_zero_ablated"] > r["ce_clean"]
        assert r["l0"] > 0 and 0 <= r["dead_fraction"] <= 1 and r["eval_windows"] == 4
