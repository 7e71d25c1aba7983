"""Residual Quantisation Autoencoder (RQAE).

Spec: the RQAE write-up ("Residual Quantization Autoencoders", "Training a Model",
"Defining a Feature"; seeds/003-rqae-blog.txt) and the public reference model code
(github harish-kamath/rqae). Each of the n_q layers projects the residual to 4 dimensions,
snaps the direction to the nearest of 544 fixed unit codes (a hypersphere FSQ grid),
projects back to d, and subtracts:

    r = x
    for i in 1..n_q:
        p   = r W_in[i] + b_in[i]                     (B, 4)
        c_i = argmax_j <p / |p|, C_j>                  nearest unit code
        q   = C[c_i]    (straight-through from p/|p|, or from p: `RQAEConfig.ste`)
        r  -= q W_out[i] + b_out[i]                    (detached, as the reference)

Weights are layer-stacked tensors, not n_q modules, so encoding and decoding are GEMMs.
Training computes the loop's loss and gradients in closed form from the codes
(`models/rqae_closed_form.py`); `training_loss_loop` is the loop itself, the reference.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from rqae_pipeline import metrics
from rqae_pipeline.models.base import load_module_state, read_module_dir, save_module_dir
from rqae_pipeline.models.rqae_closed_form import (
    PrecomputedGradients,
    chunk_input_bias,
    code_layers,
    loss_and_grads,
    nearest_code_symmetric,
    symmetric_search_tables,
)

LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
CODE_DIM = 4


def hypersphere_codebook() -> torch.Tensor:
    """The 544 distinct unit directions of the non-zero points of {-1,-0.5,0,0.5,1}^4.

    The reference keeps all 625 grid points (zero and duplicate directions included, so
    some indices can never win); we keep each direction once, in grid order of first
    appearance, which gives every index a distinct meaning.
    """
    seen, codes = set(), []
    for point in itertools.product(LEVELS, repeat=CODE_DIM):
        v = torch.tensor(point, dtype=torch.float64)
        if not v.any():
            continue
        u = v / v.norm()
        key = tuple(round(float(a), 9) for a in u)
        if key not in seen:
            seen.add(key)
            codes.append(u)
    return torch.stack(codes).float()


def exact_arithmetic(t: torch.Tensor):
    """Autocast off: codes are argmaxes over nearly equal scores and residuals are differences
    of nearly equal vectors, so they are computed in the weights' dtype whatever a caller's
    autocast says (bf16 keys past +-256 are not integers: wrong codes, silently)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


@dataclass(frozen=True, kw_only=True)
class RQAEConfig:
    d_in: int
    n_q: int = 1024
    # "tied": W_out[i] = W_in[i]^T and zero output biases after the first layer, so an
    # untrained layer adds little noise (measured in docs/training.md: held-out FVU at
    # 32 layers 0.45 vs 0.74 for "reference", nn.Linear's default init, at equal steps).
    init: Literal["tied", "reference"] = "tied"
    # Straight-through estimator: the code's gradient reaches the normalised projection
    # p/|p| ("normalised") or, as the reference implementation, the raw projection p.
    ste: Literal["normalised", "unnormalised"] = "normalised"

    def __post_init__(self):
        if self.d_in < 1 or self.n_q < 1:
            raise ValueError("d_in and n_q must be positive")
        if self.init not in ("tied", "reference"):
            raise ValueError(f"unknown init {self.init!r}; use 'tied' or 'reference'")
        if self.ste not in ("normalised", "unnormalised"):
            raise ValueError(f"unknown ste {self.ste!r}; use 'normalised' or 'unnormalised'")


class RQAE(HookedRootModule):
    def __init__(self, cfg: RQAEConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_q, cfg.d_in
        # nn.Linear's default init, layer-stacked: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound_in, bound_out = d**-0.5, CODE_DIM**-0.5
        self.W_in = torch.nn.Parameter(torch.empty(n, d, CODE_DIM).uniform_(-bound_in, bound_in))
        self.b_in = torch.nn.Parameter(torch.empty(n, CODE_DIM).uniform_(-bound_in, bound_in))
        self.W_out = torch.nn.Parameter(torch.empty(n, CODE_DIM, d).uniform_(-bound_out, bound_out))
        self.b_out = torch.nn.Parameter(torch.empty(n, d).uniform_(-bound_out, bound_out))
        if cfg.init == "tied":
            with torch.no_grad():
                self.W_out.copy_(self.W_in.transpose(1, 2))
                self.b_out.zero_()
        self.register_buffer("codebook", hypersphere_codebook(), persistent=False)  # (544, 4)
        for name, table in symmetric_search_tables(self.codebook).items():
            self.register_buffer(name, table, persistent=False)
        # Inputs are divided by this data-derived scalar (set by `init_from_data`) so every
        # store trains at the same learning rate: final-norm activations carry the LM's
        # gain (up to ~280 on Gemma) and are far from unit scale. A scalar is absorbed by
        # the linear maps, so the model class is the reference's.
        self.register_buffer("input_scale", torch.ones(()))
        self.hook_in = HookPoint()  # (B, d)
        self.hook_codes = HookPoint()  # (B, n_q)
        self.hook_recons = HookPoint()  # (B, d)
        self.hook_error = HookPoint()  # (B, d)
        self.setup()
        self._cross_cache: tuple | None = None

    @property
    def n_q(self) -> int:
        return self.cfg.n_q

    # ------------------------------------------------------------------ encode / decode

    def _nearest(self, p: torch.Tensor) -> torch.Tensor:
        # argmin |p/|p| - C_j| = argmax <p, C_j>: the codes are unit vectors and |p| is common.
        # Searched among the 10 canonical codes by symmetry (models/rqae_closed_form.py).
        return nearest_code_symmetric(p, self.canon_units, self.canon_levels, self.place_values, self.code_of_key)

    def _nearest_brute_force(self, p: torch.Tensor) -> torch.Tensor:
        """The same argmax, scoring all 544 codes (the reference for tests and bench)."""
        return (p @ self.codebook.T).argmax(dim=-1)

    @torch.no_grad()
    def encode_naive(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, n_q) int16 codes, the reference loop: n_q passes over (B, d)."""
        with exact_arithmetic(x):
            return self._encode_naive(x)

    def _encode_naive(self, x: torch.Tensor) -> torch.Tensor:
        r = x.to(self.W_in.dtype) / self.input_scale
        codes = torch.empty(x.shape[0], self.n_q, dtype=torch.int16, device=x.device)
        for i in range(self.n_q):
            c = self._nearest(r @ self.W_in[i] + self.b_in[i])
            codes[:, i] = c
            r -= self.codebook[c] @ self.W_out[i] + self.b_out[i]
        return codes

    def _cross_terms(self) -> tuple[torch.Tensor, ...]:
        """W_in stacked as (d, 4 n_q), M[4j:4j+4, 4i:4i+4] = W_out[j] W_in[i] (how layer j's
        output moves layer i's input), the effective input bias of x - b_out[0]:
        b_in[i] - (sum_{j<i} b_out[j] - b_out[0]) W_in[i], and b_out[0]; cached until the
        weights change (optimiser steps bump the tensors' version counters).

        The projections are taken of x - b_out[0] because b_out[0] holds the data mean
        (`init_from_data`), which can be far larger than the spread: projecting x itself
        would cancel it in every later layer's projection, in float32."""
        key = tuple((t.data_ptr(), t._version) for t in (self.W_in, self.b_in, self.W_out, self.b_out))
        if self._cross_cache is None or self._cross_cache[0] != key:
            n, d = self.n_q, self.cfg.d_in
            b_out = self.b_out.detach()
            w_in = self.W_in.detach().permute(1, 0, 2).reshape(d, n * CODE_DIM).contiguous()
            cross = self.W_out.detach().reshape(n * CODE_DIM, d) @ w_in
            bias = chunk_input_bias(self.W_in.detach(), self.b_in.detach(), b_out, 0, n)[0]  # one chunk
            self._cross_cache = (key, w_in, cross, bias.reshape(1, -1), b_out[0].clone())
        return self._cross_cache[1:]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, block: int = 16) -> torch.Tensor:
        """(B, d) -> (B, n_q) int16 codes, same as `encode_naive` up to float ties."""
        return self.encode_with_projections(x.to(self.W_in.dtype) / self.input_scale, block)[0].to(torch.int16)

    @torch.no_grad()
    def encode_with_projections(
        self, x: torch.Tensor, block: int = 16, nearest=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled (B, d) input -> (B, n_q) long codes and (B, 4 n_q) projections p_i.

        All layers' input projections of x are one GEMM; what earlier layers subtract
        reaches later projections through the 4x4 blocks of `_cross_terms`, so the
        recurrence runs on 4-vectors instead of re-reading (B, d) n_q times
        (`code_layers`). Training encodes chunk by chunk instead (`loss_and_grads`).
        """
        with exact_arithmetic(x):
            w_in, cross, bias, b_out0 = self._cross_terms()
            proj = torch.addmm(bias, x - b_out0, w_in)  # (B, n*4)
            return code_layers(proj, cross, self.codebook, nearest or self._nearest, block), proj

    def decode(self, codes: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """(B, n_q) codes -> (B, d): the sum of the first `n_layers` layers' outputs."""
        m = self.n_q if n_layers is None else n_layers
        if not 1 <= m <= self.n_q:
            raise ValueError(f"n_layers must be in 1..{self.n_q}, got {m}")
        with exact_arithmetic(codes):
            q = self.codebook[codes[:, :m].long()]  # (B, m, 4)
            out = torch.einsum("bmk,mkd->bd", q, self.W_out[:m])
            return (out + self.b_out[:m].sum(0)) * self.input_scale

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable reconstruction (straight-through codes); see `training_loss_loop`."""
        return self.training_loss_loop(x, prefix_loss=False)[1]

    def training_loss(
        self, x: torch.Tensor, *, prefix_loss: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, x_hat, codes), the values and parameter gradients of `training_loss_loop`
        (up to float rounding and ties between codes) computed in closed form, chunk by chunk
        of layers, from the codes: large matrix products instead of a loop over layers.
        `loss.backward()` sets the four weights' gradients; x_hat carries no gradient."""
        with exact_arithmetic(x), torch.no_grad():
            x = self.hook_in(x.to(self.W_in.dtype) / self.input_scale)
            params = (self.W_in, self.b_in, self.W_out, self.b_out)
            loss, x_hat, codes, grads = loss_and_grads(params, self.codebook, x, self._nearest,
                                                       prefix_loss=prefix_loss, ste=self.cfg.ste)
            self.hook_codes(codes)
            x_hat = self.hook_recons(x_hat * self.input_scale)
            self.hook_error(x * self.input_scale - x_hat)
        with exact_arithmetic(x):
            loss = PrecomputedGradients.apply(loss, grads, *params)
        return loss, x_hat, codes

    def training_loss_loop(
        self, x: torch.Tensor, *, prefix_loss: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, x_hat, codes) by the layer loop, differentiated by autograd (the reference
        for `training_loss`). With `prefix_loss` the MSE is averaged over every prefix
        reconstruction (layers 1..m for m = 1..n_q), which keeps early layers usable on
        their own (DESIGN §4: held-out FVU at 1/4/16 layers 0.90/0.68/0.29 vs 1.00/0.95/0.74)."""
        with exact_arithmetic(x):  # quantise in fp32
            x = self.hook_in(x.to(self.W_in.dtype) / self.input_scale)
            r = x.detach().clone()
            x_hat = torch.zeros_like(x)
            codes = torch.empty(x.shape[0], self.n_q, dtype=torch.long, device=x.device)
            loss = x.new_zeros(())
            # unbind once: indexing a parameter per layer would make every layer's backward
            # fill a gradient the size of the whole stack (O(n_q^2) memory traffic).
            w_in, b_in, w_out, b_out = (t.unbind(0) for t in (self.W_in, self.b_in, self.W_out, self.b_out))
            for i in range(self.n_q):
                p = r @ w_in[i] + b_in[i]
                p_norm = F.normalize(p, dim=-1)
                c = self._nearest(p_norm.detach())
                codes[:, i] = c
                through = p if self.cfg.ste == "unnormalised" else p_norm
                q = through + (self.codebook[c] - through).detach()  # straight-through estimator
                r_hat = q @ w_out[i] + b_out[i]
                x_hat = x_hat + r_hat
                if prefix_loss:
                    loss = loss + (x - x_hat).pow(2).mean()
                r = r - r_hat.detach()  # the reference detaches the residual update
            loss = loss / self.n_q if prefix_loss else (x - x_hat).pow(2).mean()
            self.hook_codes(codes)
            x_hat = self.hook_recons(x_hat * self.input_scale)
            self.hook_error(x * self.input_scale - x_hat)
        return loss, x_hat, codes

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, *, mean_init: bool = True) -> None:
        """Set `input_scale` to the per-dimension RMS of the centred sample and, with
        `mean_init`, the first layer's output bias to the data mean, as SAEs initialise
        b_dec (DESIGN §4: held-out FVU 0.27 -> 0.12)."""
        x = sample.float()
        mean = x.mean(0)
        self.input_scale.copy_((x - mean).pow(2).mean().sqrt().clamp_min(1e-12))
        if mean_init:
            self.b_out[0].copy_(mean.to(self.b_out) / self.input_scale)

    # ------------------------------------------------------------------ features

    def layer_norms(self) -> torch.Tensor:
        """L_i: mean L2 norm of layer i's 4 decoder vectors (the columns of nn.Linear(4, d).weight)."""
        return self.W_out.detach().norm(dim=-1).mean(-1)

    def intensity(self, query_codes: torch.Tensor, codes: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """Intensity of the feature given by the first `n_layers` of `query_codes` (n_q,) on
        each row of `codes` (N, n_q): sum_i cos(C[t_i], C[f_i]) L_i / sum_i L_i
        (blog, "Defining a Feature"). Accumulated in float64 by `metrics.intensity`, the one
        formula the feature search uses too; returned as float32 on the codes' device."""
        m = self.n_q if n_layers is None else n_layers
        values = metrics.intensity(self.codebook, self.layer_norms(), query_codes, codes, m)
        return torch.from_numpy(values).to(codes.device, torch.float32)

    # ------------------------------------------------------------------ files

    def save(self, out_dir: str | Path, *, extra: dict | None = None) -> None:
        cfg = {"architecture": "rqae", **asdict(self.cfg), "levels": list(LEVELS), "code_dim": CODE_DIM,
               "n_codes": int(self.codebook.shape[0]), **(extra or {})}
        save_module_dir(self, out_dir, cfg)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> RQAE:
        cfg, state = read_module_dir(model_dir, "rqae", required=("d_in", "n_q"))
        model = cls(RQAEConfig(d_in=cfg["d_in"], n_q=cfg["n_q"], init=cfg.get("init", "tied"),
                               ste=cfg.get("ste", "normalised")))
        load_module_state(model, state, model_dir)
        return model.to(device).eval()
