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

Chunks. Split the layers into chunks of c consecutive layers [a, e) (`CHUNK`, the last
one shorter) and keep the d-space residual only where a chunk starts, R = r_a. Inside the
chunk r_m = R - Σ_{a<=l<m} r̂_l, so for a layer j of the chunk

    G_j = A + α_j R - Σ_{l in chunk} w_jl r̂_l

with A = Σ_{m∈M, m>e} e_m (what the later chunks contribute) and, for the prefix loss,
α_j = e - j, w_jl = e - max(j, l); for the full loss A = e_n and α = w = 0. Stacked over
the chunk's 4c columns (Z_c, Wo_c = its rows of Z and W_out as (4c, d), W̃ = w expanded to
4×4 blocks, b̄_j = (w b_out)_j W_out[j]ᵀ):

    G Wo_cᵀ  = A Wo_cᵀ + (R Wo_cᵀ) diag(α) - Z_c (Wo_c Wo_cᵀ ∘ W̃) - b̄
    Z_cᵀ G   = Z_cᵀ A + diag(α) Z_cᵀ R - (Z_cᵀ Z_c ∘ W̃) Wo_c - colsum(Z_c) ⊗ (w b_out)
    dW_in_c  = Rᵀ dP_c - Wo_cᵀ [(Z_cᵀ dP_c) ∘ (l < j)] - β ⊗ colsum(dP)   (β_j = Σ_{a<=l<j} b_out[l])

and the chunk's share of the prefix loss expands around R:
Σ_{m=a+1}^{e} ‖r_m‖² = c‖R‖² - 2 Σ_l α_l <R, r̂_l> + Σ_jl w_jl <r̂_j, r̂_l>. The chunks are
visited last to first, and A grows by the chunk's Σ_{m=a+1}^{e} r_m = c R - Σ_l α_l r̂_l
on the way. Every product is (B × d) by (d × 4c) or (4c × B) by (B × d), plus 4c × 4c
Grams: about 8 d N + 14 c N multiply-adds per token. Forming the N × N products over all
layers at once costs about 5 d N + 2.5 N² per token and 3.5 N² d per step instead; at
d = 2304, n_q = 1024 and batch 4096 that is ~1.5× the arithmetic (docs/benchmarks.md).
Loss sums are accumulated in float64; the expansion cancels only within a chunk. The codes
come from the same chunked recurrence: each chunk's projections are one GEMM of R, what
earlier layers of the chunk subtract reaches later projections through 4×4 blocks of
Wo_c W_in_c (`code_layers`), and R for the next chunk is R - Z_c Wo_c - Σ b_out, as in the
loop (x_hat = x - r_n).

Centring. The first chunk starts from x itself, whose mean (held in b_out[0] once
`init_from_data` set it) can be far larger than its spread; every projection and loss term
expanded around R would then cancel that mean in float32. So the first chunk is written
around R = x - b_out[0] with that row taken out of its b_out and β shifted by it (β_0 =
-b_out[0]): the same r_j, r̂_j - b_out[0] for j = 0, the same G_j (w_j0 = α_j), hence the
same values and gradients in exact arithmetic, and small terms in float32.

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
from dataclasses import dataclass

import torch

CODE_DIM = 4
CHUNK = 64  # layers whose d-space residual is not formed (module docstring)


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
    # The (10, B) products put B innermost: a GEMM with an inner size of 4 is several times
    # faster that way round, and max(dim) with indices (first maximum, as argmax) is faster
    # than argmax over a last dim of 10 on CPU.
    best = (canon_units @ sorted_abs.T).T.max(-1).indices
    # sign(0) = 0 is safe: the best code never puts a non-zero level where p is exactly 0
    # (zeroing it keeps <p, C> and shortens C), so that coordinate's level is 0 anyway.
    signed_places = (p.sign() * place_values).gather(1, order)
    keys = (canon_levels @ signed_places.T).T.gather(1, best[:, None]).squeeze(1)
    return code_of_key[keys.long()]


# ---------------------------------------------------------------------- closed form


def code_layers(proj: torch.Tensor, cross: torch.Tensor, codebook: torch.Tensor, nearest, block: int) -> torch.Tensor:
    """Code the layers of `proj` (B, 4 m) in order, in place: (B, m) long codes.

    proj holds each layer's projection of its chunk's input; cross[4l:4l+4, 4j:4j+4] =
    W_out[l] W_in[j] is how layer l's output moves layer j's projection. Within a block of
    layers corrections are applied layer by layer; a finished block pushes its contribution
    to all later layers with one GEMM. Once layer j is coded its columns receive no more
    corrections, so they hold p_j when the loop ends.
    """
    B, m, k = proj.shape[0], proj.shape[1] // CODE_DIM, CODE_DIM
    codes = torch.empty(B, m, dtype=torch.long, device=proj.device)
    for b0 in range(0, m, block):
        b1 = min(b0 + block, m)
        for i in range(b0, b1):
            codes[:, i] = nearest(proj[:, i * k : (i + 1) * k])
            if i + 1 < b1:  # in place: no (B, block) temporary per layer
                later = proj[:, (i + 1) * k : b1 * k]
                later.addmm_(codebook[codes[:, i]], cross[i * k : (i + 1) * k, (i + 1) * k : b1 * k], alpha=-1)
        if b1 < m:
            q = codebook[codes[:, b0:b1]].reshape(B, -1)
            proj[:, b1 * k :].addmm_(q, cross[b0 * k : b1 * k, b1 * k :], alpha=-1)
    return codes


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


@dataclass(frozen=True)
class _Chunk:
    """One chunk's weights and constants: layers a..e-1, stacked as (4c, ...) matrices."""

    a: int
    e: int
    W_in: torch.Tensor  # (d, 4c)
    b_in: torch.Tensor  # (4c,) effective: b_in[j] - β_j W_in[j] (chunk_input_bias)
    Wo: torch.Tensor  # (4c, d)
    b_out: torch.Tensor  # (c, d)
    before: torch.Tensor  # (c, d) β_j = Σ_{a<=l<j} b_out[l] (first chunk: less b_out[0])


def chunk_input_bias(W_in, b_in, b_out, a: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layers a..e-1 projected from their chunk's input residual R_a rather than each from its
    own: the effective input biases b_in[j] - β_j W_in[j] (c, 4), the output biases the chunk
    subtracts (c, d), and β_j = Σ_{a<=l<j} b_out[l] (c, d). The first chunk reads x - b_out[0]
    (b_out[0] holds the data mean), so it subtracts b_out[0] as zero and its β_j lack b_out[0]:
    β_0 = -b_out[0], β_j = Σ_{1<=l<j} b_out[l]."""
    b_out_c = b_out[a:e] if a else torch.cat([torch.zeros_like(b_out[:1]), b_out[1:e]])
    before = torch.cumsum(b_out_c, 0) - b_out[a:e]
    return b_in[a:e] - torch.einsum("cd,cdk->ck", before, W_in[a:e]), b_out_c, before


def _chunks(params: tuple[torch.Tensor, ...], chunk: int) -> list[_Chunk]:
    """The chunks' constants; the first is written around x - b_out[0] (module docstring)."""
    W_in, b_in, W_out, b_out = (t.detach() for t in params)
    n, d = b_out.shape
    out = []
    for a in range(0, n, chunk):
        e = min(a + chunk, n)
        bias, b_out_c, before = chunk_input_bias(W_in, b_in, b_out, a, e)
        out.append(_Chunk(a, e, W_in[a:e].permute(1, 0, 2).reshape(d, -1), bias.reshape(-1),
                          W_out[a:e].reshape(-1, d), b_out_c, before))
    return out


def _encode(chunks: list[_Chunk], codebook, x, b_out0, nearest) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Codes (B, n), projections (B, 4n) and each chunk's input residual R_k (B, d) (the
    first x - b_out[0]), and the final residual appended: the loop's recurrence with
    d-space residuals kept only at chunk boundaries."""
    B, n = x.shape[0], chunks[-1].e
    codes = torch.empty(B, n, dtype=torch.long, device=x.device)
    proj = torch.empty(B, n * CODE_DIM, dtype=x.dtype, device=x.device)
    residuals = [x - b_out0]
    for ch in chunks:
        R, p = residuals[-1], proj[:, ch.a * CODE_DIM : ch.e * CODE_DIM]
        torch.addmm(ch.b_in, R, ch.W_in, out=p)
        codes[:, ch.a : ch.e] = code_layers(p, ch.Wo @ ch.W_in, codebook, nearest, block=16)
        Z = codebook[codes[:, ch.a : ch.e]].reshape(B, -1)
        residuals.append(torch.addmm(R, Z, ch.Wo, alpha=-1).sub_(ch.b_out.sum(0)))
    return codes, proj, residuals


def _prefix_counts(c: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of c layers under the prefix loss: α_j = e - j, the errors of the chunk
    after layer j, and w_jl = e - max(j, l), those after both (layers counted from the
    chunk's start)."""
    layer = torch.arange(c, device=device)
    return (c - layer).to(dtype), (c - torch.maximum(layer[:, None], layer[None, :])).to(dtype)


def _chunk_terms(ch: _Chunk, Z, R, A, prefix: bool):
    """For one chunk, with G_j = A + α_j R - Σ_l w_jl r̂_l (module docstring): G_j W_out[j]ᵀ
    stacked (B, 4c), z_jᵀ G_j stacked (4c, d), colsum(G_j) (c, d) and the chunk's loss sum.
    A is None where it is zero (the last chunk of the prefix loss)."""
    if not prefix:  # G_j = A = r_n for every layer
        return A @ ch.Wo.T, Z.T @ A, A.sum(0).expand(ch.e - ch.a, -1), None
    B, c = Z.shape[0], ch.e - ch.a
    alpha, w = _prefix_counts(c, Z.dtype, Z.device)
    w4, alpha4 = w.repeat_interleave(CODE_DIM, 0).repeat_interleave(CODE_DIM, 1), alpha.repeat_interleave(CODE_DIM)
    w_b = w @ ch.b_out  # (c, d): Σ_l w_jl b_out[l]
    b_bar = torch.einsum("cd,ckd->ck", w_b, ch.Wo.reshape(c, CODE_DIM, -1)).reshape(-1)
    z_gram = Z @ ((ch.Wo @ ch.Wo.T) * w4)
    RW = (R @ ch.Wo.T).mul_(alpha4)
    GW = (RW - z_gram if A is None else torch.addmm(RW, A, ch.Wo.T).sub_(z_gram)).sub_(b_bar)  # RW is kept
    z_sum, R_sum = Z.sum(0), R.sum(0)
    ZtG = (alpha4[:, None] * (Z.T @ R) - ((Z.T @ Z) * w4) @ ch.Wo - z_sum[:, None] * w_b.repeat_interleave(CODE_DIM, 0))
    z_sum_wo = torch.einsum("ck,ckd->cd", z_sum.reshape(c, CODE_DIM), ch.Wo.reshape(c, CODE_DIM, -1))
    G_sum = alpha[:, None] * R_sum - w @ (z_sum_wo + B * ch.b_out)
    if A is not None:
        ZtG.addmm_(Z.T, A)
        G_sum += A.sum(0)
    # Σ_{m=a+1}^{e} ‖r_m‖², expanded around R (float64 sums)
    loss = (c * R.pow(2).sum(dtype=torch.float64) - 2 * (_dot64(Z, RW) + _dot64(R_sum, alpha @ ch.b_out))
            + _dot64(Z, z_gram) + 2 * _dot64(z_sum, b_bar) + B * _dot64(ch.b_out, w_b))
    return GW, ZtG, G_sum, loss


def _input_grads(ch: _Chunk, Z, R, dP) -> torch.Tensor:
    """dW_in_j = r_jᵀ dP_j with r_j = R - Σ_{a<=l<j} r̂_l, stacked (d, 4c)."""
    layer = torch.arange(ch.e - ch.a, device=Z.device).repeat_interleave(CODE_DIM)
    earlier = (Z.T @ dP) * (layer[:, None] < layer[None, :])
    dP_sum = dP.sum(0).reshape(-1, CODE_DIM)
    return R.T @ dP - ch.Wo.T @ earlier - torch.einsum("cd,ck->dck", ch.before, dP_sum).reshape(R.shape[1], -1)


def _add_chunk_sum(A, ch: _Chunk, Z, R) -> torch.Tensor:
    """A for the chunk before: A + Σ_{m=a+1}^{e} r_m = A + c R - Σ_l α_l r̂_l, in place."""
    c = ch.e - ch.a
    alpha, _ = _prefix_counts(c, R.dtype, R.device)
    A = R * c if A is None else A.add_(R, alpha=c)
    return A.addmm_(Z * alpha.repeat_interleave(CODE_DIM), ch.Wo, alpha=-1).sub_(alpha @ ch.b_out)


def loss_and_grads(params: tuple[torch.Tensor, ...], codebook: torch.Tensor, x: torch.Tensor, nearest, *,
                   prefix_loss: bool, ste: str, chunk: int = CHUNK) -> tuple:
    """(loss, x_hat, codes, (dW_in, db_in, dW_out, db_out)) of the loop's loss; x is already
    divided by the input scale. No autograd."""
    n, d = params[3].shape
    B = x.shape[0]
    s = 1.0 / (n * B * d) if prefix_loss else 1.0 / (B * d)
    chunks = _chunks(params, chunk)
    codes, proj, residuals = _encode(chunks, codebook, x, params[3][0].detach(), nearest)
    final = residuals[-1]
    A = None if prefix_loss else final  # Σ_{m>e} r_m for the last chunk (zero); r_n
    total = x.new_zeros((), dtype=torch.float64) if prefix_loss else final.pow(2).sum(dtype=torch.float64)
    dW_in, db_in, dW_out, db_out = [], [], [], []
    for ch, R in zip(reversed(chunks), reversed(residuals[:-1])):
        Z = codebook[codes[:, ch.a : ch.e]].reshape(B, -1)
        GW, ZtG, G_sum, loss = _chunk_terms(ch, Z, R, A, prefix_loss)
        dP = straight_through(-2 * s * GW, proj[:, ch.a * CODE_DIM : ch.e * CODE_DIM], ste)
        dW_in.append(_input_grads(ch, Z, R, dP))
        db_in.append(dP.sum(0))
        dW_out.append(-2 * s * ZtG)
        db_out.append(-2 * s * G_sum)
        if prefix_loss:
            total += loss
            A = _add_chunk_sum(A, ch, Z, R) if ch.a > 0 else None
    grads = (torch.cat(dW_in[::-1], 1).reshape(d, n, CODE_DIM).permute(1, 0, 2).contiguous(),
             torch.cat(db_in[::-1]).reshape(n, CODE_DIM), torch.cat(dW_out[::-1]).reshape(n, CODE_DIM, d),
             torch.cat(db_out[::-1]))
    return (s * total).to(x.dtype), x - final, codes, grads


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
