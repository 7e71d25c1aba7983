"""RQAE training without the layer loop, and the nearest-code search by symmetry.

Closed-form step
----------------
In the training loop (`RQAE.training_loss_loop`) every layer's input r_j is detached and
every forward value is fixed once the codes are: with z_j = C[c_j] (a row of Z, (B, N),
N = 4 n_q) and r̂_j = z_j W_out[j] + b_out[j], the residual entering layer j is
r_j = x - Σ_{k<j} r̂_k, and the prefix error after m layers is e_m = r_m. The loss is
L = s Σ_{m∈M} ‖e_m‖² with M = {1..n}, s = 1/(n B d) (prefix loss, the loop's sum of n means
divided by n) or M = {n}, s = 1/(B d) (full loss).

r̂_j enters every e_m with m > j, so ∂L/∂r̂_j = -2s G_j with G_j = Σ_{m∈M, m>j} e_m. Writing
v_j = #{m∈M: m > j} and w_jk = #{m∈M: m > max(j, k)} (prefix: n - j and n - max(j, k);
full: 1 and 1), G_j = v_j x - Σ_k w_jk r̂_k. Everything follows from G:

    dQ_j     = -2s G_j W_out[j]ᵀ          (B, 4): the gradient at the straight-through code
    dW_out_j = -2s z_jᵀ G_j                dB_out_j = -2s colsum(G_j)
    dP_j     = (I - u uᵀ) dQ_j / |p_j|     (u = p_j/|p_j|; "unnormalised" STE: dP_j = dQ_j)
    dW_in_j  = r_jᵀ dP_j = xᵀdP_j - Σ_{k<j} W_out[k]ᵀ (z_kᵀ dP_j) - β_j ⊗ colsum(dP_j)
    db_in_j  = colsum(dP_j)                (β_j = Σ_{k<j} b_out[k])

Stacked, with Wo = W_out as (N, d) and W̃ = w expanded to 4×4 blocks, G Woᵀ =
(x Woᵀ) diag(v) - Z (Wo Woᵀ ∘ W̃) - b̄ (b̄_j = (w b_out)_j W_out[j]ᵀ), Zᵀ G rows =
diag(v) Zᵀ x - (ZᵀZ ∘ W̃) Wo - colsum(Z) ⊗ (w b_out), and the loss expands the same way:
Σ_{m∈M}‖e_m‖² = |M|‖x‖² - 2 Σ_j v_j <x, r̂_j> + Σ_jk w_jk <r̂_j, r̂_k>. The full loss needs
none of the N×N terms: G_j = e_n for every j. The N×N products are formed one column slab
at a time (`SLAB` columns) with the mask applied to the slab, so no N×N matrix is held,
and the strictly-causal Zᵀ dP product only computes the slabs above the diagonal. Loss
sums are accumulated in float64 (the prefix expansion subtracts terms of the size of
n‖x‖²). The codes come from the blocked encoder, which also hands back every layer's
projection p_j (the column of its projection matrix once all corrections have arrived).

Nearest code
------------
The 544 codes are closed under sign flips and permutations of the 4 coordinates, so
max_j <p, C_j> is reached by a code whose coordinates have the signs of p and whose
magnitudes, sorted, pair with the sorted |p| (rearrangement inequality). Only the 10
canonical codes (non-negative, sorted, largest level 1) are scored against sorted |p|;
the winner is mapped back to grid levels through the sort permutation and the signs, and
a 625-entry table turns those levels into the code index. Exact float ties aside, this is
the brute-force argmax over all 544 codes (tests/test_rqae_closed_form.py).
"""

from __future__ import annotations

import itertools

import torch

CODE_DIM = 4
SLAB = 256  # columns (64 layers) of an N×N product formed at a time


# ---------------------------------------------------------------------- nearest code


def symmetric_search_tables(codebook: torch.Tensor) -> dict[str, torch.Tensor]:
    """Constant tensors for `nearest_code_symmetric`, registered as RQAE buffers."""
    grid = torch.tensor(list(itertools.product((-2, -1, 0, 1, 2), repeat=CODE_DIM)), dtype=torch.float64)
    nonzero = grid.any(1)
    # canonical magnitudes in half-steps, one per direction: sorted, largest level 2 (= 1.0)
    canon = sorted({tuple(sorted(g.abs().tolist(), reverse=True)) for g in grid[nonzero]}, reverse=True)
    levels = torch.tensor([c for c in canon if c[0] == 2], dtype=torch.float64)
    # indexed by key = Σ_i level_i 5^(3-i) in -312..312 (negative keys wrap, as in Python);
    # p = 0 has key 0 and gets code 0, the brute-force argmax of an all-zero score row
    code_of_key = torch.zeros(len(grid), dtype=torch.long)
    unit = grid[nonzero] / grid[nonzero].norm(dim=1, keepdim=True)
    keys = (grid[nonzero] @ torch.tensor([125.0, 25.0, 5.0, 1.0], dtype=torch.float64)).long()
    code_of_key[keys] = (unit @ codebook.double().T).argmax(1)
    return {"canon_units": (levels / levels.norm(dim=1, keepdim=True)).to(codebook.dtype),
            "canon_levels": levels.to(codebook.dtype),
            "place_values": torch.tensor([5.0**3, 5.0**2, 5.0, 1.0], dtype=codebook.dtype),
            "code_of_key": code_of_key}


def nearest_code_symmetric(p: torch.Tensor, canon_units, canon_levels, place_values, code_of_key) -> torch.Tensor:
    """(B, 4) projections -> (B,) index of the code with the largest <p, C_j>."""
    sorted_abs, order = p.abs().sort(dim=-1, descending=True)
    best = (sorted_abs @ canon_units.T).argmax(-1)
    # sign(0) = 0 is safe: the best code never puts a non-zero level where p is exactly 0
    # (zeroing it keeps <p, C> and shortens C), so that coordinate's level is 0 anyway.
    signed_places = (p.sign() * place_values).gather(1, order)
    return code_of_key[(canon_levels[best] * signed_places).sum(-1).long()]


# ---------------------------------------------------------------------- closed form


def _layers(start: int, stop: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device) // CODE_DIM


def _prefix_weights_slab(n: int, rows: int, c0: int, c1: int, dtype, device) -> torch.Tensor:
    """w_jk = n - max(j, k) for element rows 0..rows and element columns c0..c1."""
    return (n - torch.maximum(_layers(0, rows, device)[:, None], _layers(c0, c1, device)[None, :])).to(dtype)


def _gram_weighted(A: torch.Tensor, Wo: torch.Tensor, n: int, prefix: bool) -> torch.Tensor:
    """A (Wo Woᵀ ∘ W̃), slab by slab: (B, N)."""
    if not prefix:
        return (A @ Wo) @ Wo.T
    N = Wo.shape[0]
    out = torch.empty(A.shape[0], N, dtype=A.dtype, device=A.device)
    for c0 in range(0, N, SLAB):
        c1 = min(c0 + SLAB, N)
        slab = (Wo @ Wo[c0:c1].T) * _prefix_weights_slab(n, N, c0, c1, A.dtype, A.device)
        out[:, c0:c1] = A @ slab
    return out


def _codes_gram_times(Z: torch.Tensor, Wo: torch.Tensor, n: int) -> torch.Tensor:
    """(ZᵀZ ∘ W̃) Wo for the prefix weights, accumulated over column slabs: (N, d). The
    weighted Gram matrix is symmetric, so each slab is formed only down to its own
    columns and its part above them is used twice (as itself and transposed)."""
    N = Wo.shape[0]
    out = torch.zeros_like(Wo)
    for c0 in range(0, N, SLAB):
        c1 = min(c0 + SLAB, N)
        slab = (Z[:, :c1].T @ Z[:, c0:c1]) * _prefix_weights_slab(n, c1, c0, c1, Z.dtype, Z.device)
        out[:c1] += slab @ Wo[c0:c1]
        out[c0:c1] += slab[:c0].T @ Wo[:c0]
    return out


def _earlier_layers_term(Z: torch.Tensor, dP: torch.Tensor, Wo: torch.Tensor) -> torch.Tensor:
    """Woᵀ [(Zᵀ dP) ∘ (layer(k) < layer(j))]: (d, N); only the blocks above the diagonal."""
    N = Wo.shape[0]
    out = torch.zeros(Wo.shape[1], N, dtype=Wo.dtype, device=Wo.device)
    for c0 in range(CODE_DIM, N, SLAB):
        c1 = min(c0 + SLAB, N)
        block = Z[:, : c1 - CODE_DIM].T @ dP[:, c0:c1]  # rows: every layer before the slab's last
        block *= _layers(0, c1 - CODE_DIM, Z.device)[:, None] < _layers(c0, c1, Z.device)[None, :]
        out[:, c0:c1] = Wo[: c1 - CODE_DIM].T @ block
    return out


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dtype=torch.float64)


def straight_through(dQ: torch.Tensor, proj: torch.Tensor, ste: str) -> torch.Tensor:
    """Gradient at the projection p from the gradient at the code, per layer."""
    if ste == "unnormalised":
        return dQ
    B = proj.shape[0]
    p = proj.reshape(B, -1, CODE_DIM)
    norm = p.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
    u, g = p / norm, dQ.reshape(B, -1, CODE_DIM)
    return ((g - u * (u * g).sum(-1, keepdim=True)) / norm).reshape(B, -1)


def loss_and_grads(params: tuple[torch.Tensor, ...], codebook: torch.Tensor, x: torch.Tensor, codes: torch.Tensor,
                   proj: torch.Tensor, *, prefix_loss: bool, ste: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(loss, x_hat, (dW_in, db_in, dW_out, db_out)) of the loop's loss, from the codes and
    projections; x is already divided by the input scale. No autograd."""
    W_in, b_in, W_out, b_out = (t.detach() for t in params)
    n, d = b_out.shape
    B, N = x.shape[0], n * CODE_DIM
    Wo = W_out.reshape(N, d)
    Z = codebook[codes].reshape(B, N)
    x_hat = Z @ Wo + b_out.sum(0)
    z_sum, x_sum = Z.sum(0), x.sum(0)
    if prefix_loss:
        s = 1.0 / (n * B * d)
        v = torch.arange(n, 0, -1, dtype=x.dtype, device=x.device)  # n - j
        layer = torch.arange(n, device=x.device)
        w = (n - torch.maximum(layer[:, None], layer[None, :])).to(x.dtype)  # (n, n) layer weights
        w_b = w @ b_out
        b_bar = torch.einsum("nd,nkd->nk", w_b, W_out).reshape(N)
        xw_v = (x @ Wo.T) * v.repeat_interleave(CODE_DIM)
        z_gram = _gram_weighted(Z, Wo, n, prefix=True)
        G_wo = xw_v - z_gram - b_bar  # G Woᵀ
        total = (n * x.pow(2).sum(dtype=torch.float64) - 2 * (_dot64(Z, xw_v) + _dot64(x_sum, v @ b_out))
                 + _dot64(Z, z_gram) + 2 * _dot64(z_sum, b_bar) + B * _dot64(b_out, w_b))
        zt_g = (v.repeat_interleave(CODE_DIM)[:, None] * (Z.T @ x) - _codes_gram_times(Z, Wo, n)
                - z_sum[:, None] * w_b.repeat_interleave(CODE_DIM, 0))
        z_sum_wo = torch.einsum("nk,nkd->nd", z_sum.reshape(n, CODE_DIM), W_out)
        g_sum = v[:, None] * x_sum - w @ (z_sum_wo + B * b_out)
    else:
        s = 1.0 / (B * d)
        error = x - x_hat
        G_wo = error @ Wo.T
        total = error.pow(2).sum(dtype=torch.float64)
        zt_g = Z.T @ error
        g_sum = error.sum(0).expand(n, d)
    dP = straight_through(-2 * s * G_wo, proj, ste)
    dP_sum = dP.sum(0).reshape(n, CODE_DIM)
    before = torch.cumsum(b_out, 0) - b_out  # β_j, exclusive prefix sums
    dW_in = x.T @ dP - _earlier_layers_term(Z, dP, Wo) - torch.einsum("nd,nk->dnk", before, dP_sum).reshape(d, N)
    grads = (dW_in.reshape(d, n, CODE_DIM).permute(1, 0, 2).contiguous(), dP_sum,
             (-2 * s * zt_g).reshape(n, CODE_DIM, d), -2 * s * g_sum.contiguous())
    return (s * total).to(x.dtype), x_hat, grads


class PrecomputedGradients(torch.autograd.Function):
    """The loss value as a node whose backward hands each parameter its precomputed
    gradient (scaled by the incoming gradient), so `loss.backward()` and optimisers work
    as with the loop."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(grad_output * g for g in ctx.grads))
