"""The SAE's efficient TopK step: same loss and gradients as plain dense autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pipeline.sae as sae_module
from pipeline.sae import AUXK_ALPHA, SparseAutoencoder, dense_auxk_decode


def dense_reference_loss(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The TopK + AuxK loss written densely, every step through autograd (no custom backward)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, indices, F.relu(values))
    reconstruction = codes @ sae.W_dec + sae.b_dec
    error = x - reconstruction
    total_variance = (x - x.mean(dim=0)).pow(2).sum()
    n_dead = int(dead.sum())
    k_aux = min(sae.k_aux, n_dead)
    aux_scale = min(n_dead / (x.shape[1] // 2), 1.0)  # Gao et al.'s k_aux = d/2, fewer dead: smaller term
    aux_values, aux_indices = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(1, aux_indices, F.relu(aux_values))
    aux = aux_scale * (aux_codes @ sae.W_dec - error.detach()).pow(2).sum() / total_variance
    return error.pow(2).sum() / total_variance + AUXK_ALPHA * aux


def gradients(sae: SparseAutoencoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("auxk_decode", ["gather", "dense"])  # the CPU's and (up to M = 32 k_aux) CUDA's
@pytest.mark.parametrize("k,dead_fraction", [(1, 0.4), (7, 0.4), (24, 0.4), (7, 0.05)])
def test_sparse_topk_backward_matches_dense_autograd(k, dead_fraction, auxk_decode, monkeypatch):
    monkeypatch.setattr(sae_module, "dense_auxk_decode", lambda pre, k_aux: auxk_decode == "dense")
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=48, n_latents=192, k=k, seed=1)
    with torch.no_grad():  # non-trivial biases and an encoder that is no longer W_decᵀ
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    x = torch.randn(300, 48, dtype=torch.float32) * 2 + 1
    dead = torch.rand(192) < dead_fraction  # 0.05: ~10 dead of k_aux = 24, the AuxK term scaled down
    fast = sae.loss(x, dead)
    reference = dense_reference_loss(sae, x, dead)
    assert fast.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    fast_grads, reference_grads = gradients(sae, fast.loss), gradients(sae, reference)
    for name, expected in reference_grads.items():
        scale = float(expected.abs().max())
        assert scale > 0, name
        assert float((fast_grads[name] - expected).abs().max()) <= 1e-4 * scale, name


def test_sparse_gather_gives_the_input_gradient_when_asked():
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, n_latents=64, k=5)
    x = torch.randn(40, 16, requires_grad=True)
    sae.encode(x).values.sum().backward()
    fast = x.grad.clone()
    x.grad = None
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    F.relu(pre.topk(5, dim=-1).values).sum().backward()
    assert torch.allclose(fast, x.grad, atol=1e-5)


def test_sparse_step_works_in_half_precision_and_without_a_graph():
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, n_latents=64, k=5)
    x = torch.randn(40, 16)
    with_graph = sae.encode(x)
    assert with_graph.values.requires_grad
    with torch.no_grad():
        without = sae.encode(x)
    assert torch.equal(with_graph.values.detach(), without.values) and torch.equal(with_graph.indices, without.indices)
    half = SparseAutoencoder(d_in=16, n_latents=64, k=5).to(torch.bfloat16)
    half.loss(x.to(torch.bfloat16), torch.rand(64) < 0.5).loss.backward()
    assert half.W_enc.grad.dtype == torch.bfloat16 and torch.isfinite(half.W_enc.grad.float()).all()


def test_encoder_starts_as_the_decoder_transpose_at_linear_init_norm():
    sae = SparseAutoencoder(d_in=64, n_latents=256, k=8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((256,), 1 / math.sqrt(3)))
    linear = torch.nn.Linear(64, 256)  # what sparsify starts from: rows of norm ≈ 1/√3
    assert float(linear.weight.detach().norm(dim=1).mean()) == pytest.approx(1 / math.sqrt(3), rel=0.05)
    torch.testing.assert_close(sae.W_enc.T * math.sqrt(3), sae.W_dec)


@pytest.mark.parametrize("n_dead,hint", [(0, 0), (3, 3), (40, 40), (40, 25), (40, 90), (150, 150), (500, 500)])
def test_top_dead_latents_match_a_brute_force_over_every_latent(n_dead, hint):
    """AuxK's choice: each row's k largest pre-activations among the dead latents, by a Python loop over
    every latent, with a host count up to half the true one (stale), larger than it, and where so many
    are dead that the whole row is searched."""
    from pipeline.sae import _top_dead

    generator = torch.Generator().manual_seed(n_dead + hint)
    n_latents, k = 512, 16
    pre = torch.randn(20, n_latents, generator=generator, dtype=torch.float64)
    dead = torch.zeros(n_latents, dtype=torch.bool)
    dead[torch.randperm(n_latents, generator=generator)[:n_dead]] = True
    k_used = max(1, min(k, hint))
    chosen = _top_dead(pre, dead, hint, k_used)
    assert chosen.shape == (20, k_used)
    for row in range(20):
        ranked = sorted((i for i in range(n_latents) if dead[i]), key=lambda i: -float(pre[row, i]))
        got = chosen[row].tolist()
        assert len(set(got)) == k_used
        assert set(ranked[:k_used]) <= set(got)  # every dead latent that belongs is there ...
        assert all(not dead[i] for i in set(got) - set(ranked))  # ... and the rest (too few dead) are alive


def test_auxk_decodes_by_a_gather_on_the_cpu():
    """The dense AuxK decode is for CUDA only: on a CPU it ran at 0.46-0.59x the gather's speed."""
    assert not dense_auxk_decode(torch.zeros(4, 192), k_aux=24)


def test_dense_and_gathered_auxk_agree_under_bfloat16_autocast(monkeypatch):
    """Under autocast the dense decode multiplies in bfloat16 (the gather stays float32): the same loss
    and gradients to bfloat16's precision, for a step as `gsae train --precision bfloat16` runs it."""
    torch.manual_seed(0)
    x = torch.randn(256, 48) * 2 + 1
    dead = torch.rand(192) < 0.4
    results = []
    for dense in (False, True):
        monkeypatch.setattr(sae_module, "dense_auxk_decode", lambda pre, k_aux, dense=dense: dense)
        sae = SparseAutoencoder(d_in=48, n_latents=192, k=7, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sae.loss(x, dead).loss
        results.append((loss.detach().float(), gradients(sae, loss)))
    (loss_gather, grads_gather), (loss_dense, grads_dense) = results
    assert float(loss_dense) == pytest.approx(float(loss_gather), rel=1e-2)
    for name, expected in grads_gather.items():
        assert torch.isfinite(grads_dense[name]).all(), name
        assert float((grads_dense[name] - expected).abs().max()) <= 3e-2 * float(expected.abs().max()), name


def test_batchtopk_threshold_is_saelens_running_mean_corrected_for_its_start():
    """SAELens keeps m ← 0.99·m + 0.01·(smallest kept activation) from m = 0: after 49 steps m was 39% of its
    settled value, and a short run's exported threshold kept 14× k latents (helper-76).  gsae keeps
    m / (1 − 0.99^t), computed here in float64 from the same batches; from a few hundred steps on it is
    SAELens's m itself."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, "batchtopk", k=2).train()
    m, smallest_seen = 0.0, []
    for t in range(1, 601):
        x = torch.randn(16, 8) * (1 + t / 100)  # a drifting scale: the mean moves, as in training
        codes = sae.encode(x)
        smallest = float(codes.dense[codes.dense > 0].min().detach())
        sae._update_threshold(codes.dense)
        m = 0.99 * m + 0.01 * smallest
        smallest_seen.append(smallest)
        if t == 1:
            assert float(sae.threshold) == pytest.approx(smallest, rel=1e-6)  # the first step's value, not 1% of it
        if t in (1, 49, 600):
            assert float(sae.threshold) == pytest.approx(m / (1 - 0.99 ** t), rel=1e-5), t
    assert float(sae.threshold) == pytest.approx(m, rel=0.003)  # 0.99^600 = 0.0024: SAELens's value by then
    before = float(sae.threshold)
    sae._update_threshold(torch.zeros(4, 32))  # nothing kept: unchanged
    assert float(sae.threshold) == before
