"""Sparse autoencoders: TopK (default, the paper's), BatchTopK, ReLU + L1 and JumpReLU.

All share one small interface used by the trainer: ``encode`` → :class:`Codes`, ``decode``,
``loss(x, dead_mask)`` → :class:`StepOutput`, and the decoder-norm maintenance hooks.
TopK codes stay sparse (values and indices of the k kept latents) and are decoded with
``F.embedding_bag`` (a gather-sum over k rows of W_dec instead of a dense B×M×d product). AuxK's
k_aux = d/2 latents are decoded the same way on a CPU and by a dense product on CUDA
(:func:`dense_auxk_decode`: measured faster there).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import GsaeError
from pipeline.requests import ARCHITECTURES, L1_COEFFICIENT, TOP_K_ARCHITECTURES
from stores.messages import first_line

AUXK_ALPHA = 1 / 32
DENSE_AUXK_MAX_RATIO = 32  # dense AuxK decode on CUDA up to M = 32 · k_aux: see dense_auxk_decode
DENSE_AUXK_MAX_BYTES = 1 << 30  # ... and B × M of at most 1 GiB
THRESHOLD_RATE = 0.01  # BatchTopK's inference threshold: SAELens's topk_threshold_lr
#: how checkpoints say they keep BatchTopK's threshold (those of a gsae before 2026-11-29 kept SAELens's m itself)
THRESHOLD_KEPT = "running mean / (1 - 0.99^t)"
ENCODER_INIT_NORM = 1 / math.sqrt(3)


def default_k(d_in: int) -> int:
    """The paper's k = 128 at d = 768 (Pythia-160M), scaled with the width: k ≈ d / 6."""
    return max(1, round(128 * d_in / 768))


def default_lr(n_latents: int) -> float:
    """The paper's rule: 2e-4 / sqrt(n_latents / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


@dataclass
class Codes:
    """Latent codes: sparse (``values``/``indices``, B×k) or dense (``dense``, B×M)."""

    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    pre: torch.Tensor | None = None  # pre-activations, kept for AuxK so the encoder runs once

    def active(self, n_latents: int) -> torch.Tensor:
        """Boolean (n_latents,): latents that fired on at least one token of the batch."""
        if self.dense is not None:
            return (self.dense > 0).any(dim=0)
        # counts by scatter_add, not boolean indexing: no data-dependent shape, so no host sync on CUDA
        counts = torch.zeros(n_latents, dtype=torch.int32, device=self._device())
        counts.scatter_add_(0, self.indices.flatten(), (self.values > 0).flatten().to(torch.int32))
        return counts > 0

    def l0(self) -> float:
        """Mean number of non-zero latents per token."""
        return float(self.mean_l0())

    def mean_l0(self) -> torch.Tensor:
        """:meth:`l0` as a 0-d float32 tensor on the codes' device (no host sync)."""
        source = self.dense if self.dense is not None else self.values
        return (source > 0).sum(dim=-1).float().mean()

    def _device(self) -> torch.device:
        return (self.dense if self.dense is not None else self.values).device


@dataclass
class StepOutput:
    loss: torch.Tensor
    fvu: torch.Tensor
    reconstruction: torch.Tensor
    codes: Codes


class _JumpStep(torch.autograd.Function):
    """Heaviside step H(z − θ) with a rectangle-kernel straight-through gradient for θ (JumpReLU)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
        return None, (-grad * window).sum(dim=0), None


class _GatherLatents(torch.autograd.Function):
    """``pre.gather(1, indices)`` where ``pre = (x − b_dec) @ W_enc + b_enc`` was computed without a
    graph; the backward works through the gathered latents only (DESIGN §1, "an efficient step").

    A dense TopK backward scatters the B×k gradient into B×M and runs two B×M×d matmuls. Here one
    sparse (M×B CSR) × dense (B×(d+1)) product gives W_enc's gradient and the per-latent gradient sums
    (b_enc's gradient); b_dec's is one matrix-vector product. There is no B×k×d temporary (sparsify's
    backward builds one) and no float atomics.  The step is bit-reproducible on the CPU; on CUDA the
    CSR product (cuSPARSE) sums in a varying order, so two runs agree to ~1e-8 per gradient entry, not
    bit for bit (measured on an H200; docs/benchmarks.md, GPU section).
    Timings: docs/benchmarks.md.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre, indices):
        ctx.save_for_backward(x, b_dec, W_enc, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad):
        x, b_dec, W_enc, indices = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)  # bfloat16 under autocast; the weights' gradients are in their dtype
        centred = x - b_dec
        sums = _sum_per_latent(indices, grad, torch.cat([centred, centred.new_ones(len(centred), 1)], dim=1),
                               W_enc.shape[1])
        per_latent = sums[:, -1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        return grad_x, -(W_enc @ per_latent), sums[:, :-1].T, per_latent, None, None


def _sum_per_latent(indices: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(M × rows' width): out[m] = Σ over tokens b and slots j with indices[b, j] = m of grad[b, j] · rows[b],
    as a CSR (M×B) × dense product. Rows of the CSR matrix are sorted by a stable sort of the indices."""
    flat_indices, order = torch.sort(indices.flatten(), stable=True)
    tokens = torch.div(order, indices.shape[1], rounding_mode="floor")
    bounds = torch.arange(n_latents + 1, device=indices.device, dtype=flat_indices.dtype)
    row_starts = torch.searchsorted(flat_indices, bounds)
    compute = grad.dtype if grad.dtype in (torch.float32, torch.float64) or grad.is_cuda else torch.float32
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": the CSR × dense product is all we use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        # torch 2.11 (not 2.13) warns that the checks are off even where check_invariants=False turns them off
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
        sparse = torch.sparse_csr_tensor(row_starts, tokens, grad.flatten()[order].to(compute),
                                         (n_latents, indices.shape[0]), check_invariants=False)
    return (sparse @ rows.to(compute)).to(grad.dtype)  # CPU CSR matmul has no float16/bfloat16 kernel


def _top_dead(pre: torch.Tensor, dead: torch.Tensor, n_dead: int, k: int) -> torch.Tensor:
    """(B, k) indices of each row's k largest pre-activations among the ``dead`` latents (where fewer
    are dead, the rest are alive latents, which the caller zeroes), as
    ``pre.masked_fill(~dead, -inf).topk(k)`` gives them.

    Few latents are dead in practice (2-18% of 8,192 after 400k tokens of a Pythia-70M-shaped cache), so
    the top-k runs over a column subset: the first ``2 · n_dead + k`` latents in dead-first order
    (``n_dead`` is the host's count, two steps old in `gsae train`: :class:`pipeline.train.DeadCount`; the
    margin keeps every dead latent a candidate unless their number more than doubled since).  It is found
    without a host sync (a stable sort of the mask).  On this CPU at B = 2048, M = 8192, k = 256: 5 ms
    instead of 47 with 100 dead, 31 instead of 68 with 1,500; past about two thirds of the latents the
    gather costs more than it saves, and the whole row is used."""
    width = min(pre.shape[1], 2 * n_dead + k)
    if 3 * width > 2 * pre.shape[1]:
        return pre.masked_fill(~dead, -math.inf).topk(k, dim=-1, sorted=False).indices
    candidates = torch.argsort(dead.to(torch.uint8), descending=True, stable=True)[:width]
    local = pre.index_select(1, candidates).masked_fill_(~dead[candidates], -math.inf)
    return candidates[local.topk(k, dim=-1, sorted=False).indices]


def dense_auxk_decode(pre: torch.Tensor, k_aux: int) -> bool:
    """Whether AuxK decodes its latents by a dense (B × M) @ W_dec matmul rather than a gather-sum
    (``embedding_bag``): on CUDA, up to M = 32 · k_aux (an expansion of 16 at the SAE's k_aux = d / 2),
    while a B × M matrix of ``pre``'s dtype takes at most 1 GiB (the dense codes and their gradient are
    two more of them).

    Measured on an H200 (``sparsify_speed.py``, 512 → 8192, k 32, batch 8192, TF32; 2026-11-28): the
    whole step with AuxK ran 1.58× faster dense with 2% of the latents dead (164 drawn per row), 1.87×
    with 18% (256 drawn) (5.1 against 8.0 ms, 5.8 against 10.8 ms).  The dense product grows with M, the
    gather with the latents drawn, so the dense one loses past some M / k_aux; 32 is the one shape
    measured, not a measured crossover (``--other-auxk`` times the other decode).  On a CPU the dense
    decode ran at 0.46–0.59× the gather's speed, so it stays a gather there."""
    return (pre.is_cuda and pre.shape[1] <= DENSE_AUXK_MAX_RATIO * k_aux
            and pre.numel() * pre.element_size() <= DENSE_AUXK_MAX_BYTES)


class SparseAutoencoder(nn.Module):
    """x̂ = W_decᵀ f(W_encᵀ (x − b_dec) + b_enc) + b_dec with f set by ``architecture``."""

    def __init__(self, d_in: int, n_latents: int, architecture: str = "topk", k: int | None = None,
                 l1_coefficient: float = L1_COEFFICIENT, jump_bandwidth: float = 0.05, seed: int = 0):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}")
        self.d_in, self.n_latents, self.architecture = d_in, n_latents, architecture
        self.k = k if k is not None else default_k(d_in)
        self.k_aux = max(1, min(d_in // 2, n_latents))
        self.l1_coefficient, self.jump_bandwidth = l1_coefficient, jump_bandwidth
        generator = torch.Generator().manual_seed(seed)
        decoder = F.normalize(torch.randn(n_latents, d_in, generator=generator), dim=1)
        self.W_dec = nn.Parameter(decoder)
        # Encoder = decoderᵀ at init, with rows of norm 1/√3: the norm of PyTorch's Linear init
        # (U(±1/√d) per weight) that sparsify starts from. Unit-norm rows learned slower per token:
        # held-out FVU 0.2893 against sparsify's 0.2703 after 2 epochs, 0.2705 with this scale (issue 11).
        self.W_enc = nn.Parameter((decoder.T * ENCODER_INIT_NORM).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(0.01)))
        if architecture == "batchtopk":
            # Inference threshold: a running mean of each training batch's smallest kept activation, as
            # SAELens's BatchTopK keeps it, corrected for its start at 0 (_update_threshold); evaluation and
            # export use it per token (a JumpReLU), so what gsae eval measures is what the exported SAE computes.
            self.register_buffer("threshold", torch.zeros(()))
        self.threshold_updates = 0  # training steps the threshold has taken in (a resume sets it: the run's step)

    # ------------------------------------------------------------------ the forward pass
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # bias added inside the matmul: no extra B×M pass

    def encode(self, x: torch.Tensor) -> Codes:
        if self.architecture == "topk":
            with torch.no_grad():  # only the k kept latents get a gradient: see _GatherLatents
                pre = self.pre_activations(x)
            indices = pre.topk(self.k, dim=-1, sorted=False).indices
            values = self._gather(x, pre, indices)
            return Codes(values=F.relu(values), indices=indices, pre=pre)  # ReLU commutes with TopK
        pre = self.pre_activations(x)
        if self.architecture == "batchtopk":
            if not self.training:
                return Codes(dense=F.relu(pre) * (pre > self.threshold), pre=pre)
            flat = F.relu(pre).flatten()
            kept = flat.topk(self.k * x.shape[0], sorted=False).indices
            dense = torch.zeros_like(flat).scatter_(0, kept, flat[kept]).view_as(pre)
            return Codes(dense=dense, pre=pre)
        if self.architecture == "relu":
            return Codes(dense=F.relu(pre))
        threshold = self.log_threshold.exp()
        return Codes(dense=F.relu(pre) * _JumpStep.apply(pre, threshold, self.jump_bandwidth))

    def _gather(self, x: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """pre[b, indices[b, j]], differentiable in the SAE's parameters whether or not ``pre`` is."""
        if pre.requires_grad or not torch.is_grad_enabled():
            return pre.gather(1, indices)
        return _GatherLatents.apply(x, self.b_dec, self.W_enc, self.b_enc, pre, indices)

    def decode(self, codes: Codes) -> torch.Tensor:
        if codes.dense is not None:
            return codes.dense @ self.W_dec + self.b_dec
        # embedding_bag is not autocast-aware: under bfloat16 autocast the codes come out bfloat16
        weights = codes.values.to(self.W_dec.dtype)
        return F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=weights, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ the loss
    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None, n_dead_hint: int | None = None) -> StepOutput:
        """FVU plus the architecture's term: AuxK on dead latents (TopK, BatchTopK), L1 (ReLU),
        an L0 penalty through the threshold's straight-through gradient (JumpReLU).

        ``n_dead_hint``: a recent host-side count of dead latents, so AuxK needs no host sync on CUDA
        (its k must be known on the host); without it the count is read from ``dead``."""
        codes = self.encode(x)
        if self.architecture == "batchtopk" and self.training:
            self._update_threshold(codes.dense)
        reconstruction = self.decode(codes)
        error = x - reconstruction
        total_variance = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        fvu = error.pow(2).sum() / total_variance
        loss = fvu
        if self.architecture in TOP_K_ARCHITECTURES and dead is not None:
            n_dead = int(dead.sum()) if n_dead_hint is None else n_dead_hint
            if n_dead > 0:
                loss = loss + AUXK_ALPHA * self._auxk(x, codes.pre, error, dead, n_dead, total_variance)
        elif self.architecture == "relu":
            loss = loss + self.l1_coefficient * codes.dense.abs().sum(dim=-1).mean() / self.d_in
        elif self.architecture == "jumprelu":
            step = _JumpStep.apply(self.pre_activations(x), self.log_threshold.exp(), self.jump_bandwidth)
            loss = loss + self.l1_coefficient * step.sum(dim=-1).mean() / self.n_latents
        return StepOutput(loss, fvu.detach(), reconstruction.detach(), codes)

    def _auxk(self, x: torch.Tensor, pre: torch.Tensor, error: torch.Tensor, dead: torch.Tensor, n_dead: int,
              total_variance: torch.Tensor) -> torch.Tensor:
        """Reconstruct the residual error from the top k_aux dead latents (Gao et al.).

        ``n_dead`` (host) sets how many latents are drawn; the current ``dead`` mask decides which
        count, so a slightly stale ``n_dead`` only drops or zeroes a few terms."""
        k_aux = min(self.k_aux, n_dead)
        indices = _top_dead(pre.detach(), dead, n_dead, k_aux)
        values = F.relu(self._gather(x, pre, indices)) * dead[indices]  # a latent alive again adds nothing
        if dense_auxk_decode(pre, self.k_aux):
            predicted = torch.zeros_like(pre).scatter_(1, indices, values.to(pre.dtype)) @ self.W_dec
        else:
            predicted = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype),
                                        mode="sum")
        # few dead latents: a weaker pull (Gao et al., as sparsify), min(n_dead / k_aux, 1) on the device
        scale = (dead.sum() / self.k_aux).clamp(max=1.0)
        return scale * (predicted - error.detach()).pow(2).sum() / total_variance

    @torch.no_grad()
    def _update_threshold(self, dense: torch.Tensor) -> None:
        """The running mean m ← 0.99·m + 0.01·(smallest positive kept activation) of SAELens's rule and rate,
        kept as m / (1 − 0.99^t) after t steps, as Adam corrects its moments: SAELens's m starts at 0, so
        after 49 steps it was 39% of its settled value and a short run exported a threshold that kept 14× k
        latents (helper-76); from a few hundred steps on the two agree.  Kept so, the update is
        threshold ← threshold + w·(smallest − threshold) with w = 0.01 / (1 − 0.99^t) (1 at the first step).
        On the device, without a host sync: a batch with nothing kept leaves it unchanged, but t counts steps (to
        count only the others t would live on the device; such a batch needs every pre-activation ≤ 0, or NaN)."""
        self.threshold_updates += 1
        weight = THRESHOLD_RATE / (1 - (1 - THRESHOLD_RATE) ** self.threshold_updates)
        smallest = torch.where(dense > 0, dense.float(), torch.inf).min()
        updated = self.threshold * (1 - weight) + weight * smallest
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    # ------------------------------------------------------------------ decoder norm
    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient that would change the row's norm."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data = F.normalize(self.W_dec.data, dim=1)

    def config(self) -> dict:
        return {"architecture": self.architecture, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k,
                "k_aux": self.k_aux, "l1_coefficient": self.l1_coefficient, "jump_bandwidth": self.jump_bandwidth}


def sae_files(sae: SparseAutoencoder, extra: dict) -> tuple[bytes, str]:
    """(weights as safetensors: W_enc [d, M], W_dec [M, d], b_enc, b_dec[, log_threshold | threshold];
    config as JSON) of a trained SAE's two files."""
    import json

    from safetensors.torch import save

    weights = save({name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()})
    return weights, json.dumps({**sae.config(), **extra}, indent=1)


def load_sae(weights_path: str, config_path: str) -> tuple[SparseAutoencoder, dict]:
    """The SAE whose :func:`sae_files` were written to these paths (in evaluation mode), and its JSON config."""
    with open(weights_path, "rb") as weights, open(config_path, "rb") as config:
        return sae_from_files(weights.read(), config.read(), weights_path, config_path)


def read_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes; a damaged file is a :class:`GsaeError` naming ``name``."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error type (a bad header, a short file)
        raise GsaeError(f"{name} is damaged ({first_line(exc)})") from None


def sae_from_files(weights: bytes, config: bytes | str, name: str = "the SAE",
                   config_name: str | None = None) -> tuple[SparseAutoencoder, dict]:
    """The SAE of :func:`sae_files`' two files' contents, in evaluation mode (a BatchTopK SAE then keeps the
    latents above its threshold, as `gsae eval` and the SAELens export do, not each batch's top k), and its
    config; ``name`` (the weights) and ``config_name`` (the config, default "the config of ``name``") say which
    file in an error."""
    import json

    try:
        config = json.loads(config)
        sae = SparseAutoencoder(config["d_in"], config["n_latents"], config["architecture"], k=config["k"],
                                l1_coefficient=config.get("l1_coefficient", L1_COEFFICIENT),
                                jump_bandwidth=config.get("jump_bandwidth", 0.05))
    except (ValueError, KeyError, TypeError) as exc:
        raise GsaeError(f"{config_name or f'the config of {name}'} is damaged ({type(exc).__name__}: {exc})") from None
    tensors = read_tensors(weights, name)
    if config["architecture"] == "batchtopk" and "threshold" not in tensors:
        raise GsaeError(f"{name} is a BatchTopK SAE from a gsae that kept no inference threshold; "
                        "train it again to evaluate or export it")
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as exc:  # missing keys or other shapes than its config says
        raise GsaeError(f"{name} does not match its config ({first_line(exc)})") from None
    return sae.eval(), config
