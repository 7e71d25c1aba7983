"""Metrics every stage shares: mergeable float64 sums, RQAE prefix labels, code usage and
the RQAE intensity.

Imports nothing of the project but its error type, so models, training, evaluation and
the reports can all use it without an import cycle.

- `Stats`: float64 sufficient statistics (token count, Σx, Σ|x|², Σ|x − x̂|² per
  reconstruction, usage counts) that merge by addition, so FVU uses the mean of the whole
  set, whatever the batching (sae-lens's `ExplainedVarianceCalculator`; STYLE §10).
- Code usage: per-layer counts of an RQAE's codes and their perplexity (exp of the usage
  entropy; n_codes when perfectly uniform).
- Bootstrap: resampled column sums of per-context values, for standard errors over contexts.
- Budgets: bits per token of an RQAE prefix (m log2(544)) and of an SAE (log2 C(width, L0)
  + L0 value bits), and a model's weight bytes.
- Intensity (blog, "Defining a Feature"): I(t) = sum_i L_i cos(C[q_i], C[t_i]) / sum_i L_i,
  as per-layer lookup tables summed layer by layer in float64, in a fixed order, so a row's
  value has the same bits whatever block it is computed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rqae_pipeline import RQAEError


@dataclass
class Stats:
    """Mergeable float64 sums for a set of rows."""

    n: int = 0
    sum: np.ndarray | None = None  # (d,)
    sumsq: float = 0.0
    sse: dict[str, float] = field(default_factory=dict)  # per reconstruction label
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # usage counts, e.g. SAE latent firing

    def add(self, x: torch.Tensor, recons: dict[str, torch.Tensor], counts: dict[str, np.ndarray] | None = None):
        x64 = x.double()
        s = x64.sum(0).cpu().numpy()
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq += float(x64.pow(2).sum())
        self.n += int(x.shape[0])
        for label, x_hat in recons.items():
            self.sse[label] = self.sse.get(label, 0.0) + float((x64 - x_hat.double()).pow(2).sum())
        for label, c in (counts or {}).items():
            self.counts[label] = self.counts[label] + c if label in self.counts else c.astype(np.float64)
        return self

    def add_sum(self, key: str, value: float) -> None:
        """Accumulate a named scalar sum (CE and KL totals) in `sse`."""
        self.sse[key] = self.sse.get(key, 0.0) + value

    def merge(self, other: Stats) -> Stats:
        sums = [t for t in (self.sum, other.sum) if t is not None]
        out = Stats(n=self.n + other.n, sumsq=self.sumsq + other.sumsq,
                    sum=None if not sums else sums[0] + sums[1] if len(sums) == 2 else sums[0].copy())
        for label in set(self.sse) | set(other.sse):
            out.sse[label] = self.sse.get(label, 0.0) + other.sse.get(label, 0.0)
        for label in set(self.counts) | set(other.counts):
            a, b = self.counts.get(label), other.counts.get(label)
            # a copy where one side lacks the label: the result is accumulated into in place
            # (`ce.add_ce_sums`), which must not write through to a part
            out.counts[label] = b.copy() if a is None else a.copy() if b is None else a + b
        return out

    def total_variance(self) -> float:
        return self.sumsq - float(self.sum @ self.sum) / self.n

    def metrics(self, d: int) -> dict[str, dict[str, float]]:
        if self.n < 2:
            raise RQAEError(f"{self.n} row(s) to evaluate (all excluded or too short a range): an FVU needs "
                            f"at least 2 rows that differ")
        total = self.total_variance()
        if not total > 0:
            raise RQAEError(f"the {self.n} evaluated rows do not vary (total variance {total}): no FVU")
        bad = [label for label, sse in sorted(self.sse.items()) if not math.isfinite(sse)]
        if bad:  # NaN/inf weights or reconstructions: a table of nan is not a result
            raise RQAEError(f"the {bad[0]} reconstruction is not finite (NaN/inf) on the evaluated rows; "
                            f"the model's weights are damaged or it diverged")
        return {label: {"mse": sse / (self.n * d), "fvu": sse / total} for label, sse in sorted(self.sse.items())}


# --------------------------------------------------------------------------- RQAE prefixes


def default_prefixes(n_q: int) -> tuple[int, ...]:
    """Powers of two below n_q, then n_q: the prefix lengths evaluated by default."""
    m, out = 1, []
    while m < n_q:
        out.append(m)
        m *= 2
    return (*out, n_q)


def prefix_label(m: int) -> str:
    """The metrics label of the reconstruction from an RQAE's first m layers."""
    return f"rqae@{m}"


def prefix_of(label: str) -> int:
    """The prefix length an RQAE metrics label names: 'rqae@16' -> 16 (see `prefix_label`)."""
    return int(label.split("@")[1])


# --------------------------------------------------------------------------- code usage


def code_counts(codes: torch.Tensor | np.ndarray, n_codes: int) -> np.ndarray:
    """(N, n_q) integer codes -> (n_q, n_codes) int64 counts of each code in each layer."""
    if isinstance(codes, torch.Tensor):
        codes = codes.cpu().numpy()
    n_q = codes.shape[1]
    offsets = (np.arange(n_q, dtype=np.int64) * n_codes)[None, :]
    return np.bincount((codes.astype(np.int64) + offsets).ravel(), minlength=n_q * n_codes).reshape(n_q, n_codes)


def usage_perplexity(counts: np.ndarray) -> np.ndarray:
    """(n_q, n_codes) usage counts -> (n_q,) exp of each layer's usage entropy."""
    p = counts / counts.sum(1, keepdims=True)
    return np.exp(-(p * np.log(np.clip(p, 1e-300, None))).sum(1))


def code_usage_summary(counts: np.ndarray) -> dict[str, Any]:
    """(n_q, n_codes) usage counts -> per-layer perplexity (exp of the usage entropy; n_codes
    is perfectly uniform) and codes never used."""
    perplexity = usage_perplexity(counts)
    return {"perplexity_mean": float(perplexity.mean()), "perplexity_min": float(perplexity.min()),
            "perplexity_first_layers": perplexity[:4].round(1).tolist(),
            "dead_codes_mean": float((counts == 0).sum(1).mean())}


def code_usage(codes: torch.Tensor, n_codes: int) -> dict[str, Any]:
    """Code usage of a batch of (N, n_q) codes: the summary and the token count."""
    return {**code_usage_summary(code_counts(codes, n_codes).astype(np.float64)), "tokens": int(codes.shape[0])}


# --------------------------------------------------------------------------- bootstrap


def bootstrap_sums(per_context: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """(contexts, k) per-context values -> (resamples, k) float64 column sums over contexts
    drawn with replacement (a seeded multinomial count of each context per resample), so any
    metric that is a function of column sums can be recomputed on each resample."""
    x = np.asarray(per_context, np.float64)
    n = len(x)
    if n == 0:
        raise RQAEError("no contexts to resample")
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return weights.astype(np.float64) @ x


def bootstrap_se(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of the mean of `values` (one per context)."""
    v = np.asarray(values, np.float64)
    return float(np.std(bootstrap_sums(v[:, None], resamples, seed)[:, 0] / len(v), ddof=1))


# --------------------------------------------------------------------------- budgets

RQAE_CODES = 544  # the hypersphere codebook's size
SAE_VALUE_BITS = 16  # an SAE's latent value, stored as a 16-bit float


def rqae_bits_per_token(m: int, n_codes: int = RQAE_CODES) -> float:
    """Bits to store one token's code with the first m layers: m log2(n_codes)."""
    return m * math.log2(n_codes)


def sae_bits_per_token(l0: float, d_sae: int, value_bits: int = SAE_VALUE_BITS) -> float:
    """Bits to store one token's SAE code: which L0 of the d_sae latents fire, an unordered set,
    log2 C(d_sae, L0), and a `value_bits` value for each. (L0 indices of log2(d_sae) bits each
    would also store their order: log2(L0!) bits more, 296 at L0 = 64, charged to the SAE.)
    A mean L0 is fractional: C through lgamma. log2 C is concave in L0, so at the mean L0 it
    is at least the tokens' mean: never less than the SAE's own cost."""
    if math.isnan(l0):  # not measured
        return math.nan
    if not 0 <= l0 <= d_sae:
        raise RQAEError(f"L0 {l0} is outside [0, {d_sae}] for an SAE of {d_sae} latents")
    ln_choose = math.lgamma(d_sae + 1) - math.lgamma(l0 + 1) - math.lgamma(d_sae - l0 + 1)
    return max(ln_choose, 0.0) / math.log(2) + l0 * value_bits


def weight_bytes(tensors) -> int:
    """Bytes of a model's weights as held (numel x element size, summed)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


# --------------------------------------------------------------------------- intensity


def unit_codebook64(codebook: torch.Tensor | np.ndarray) -> np.ndarray:
    """(n_codes, 4) unit codes in float64, renormalised so a code's cosine with itself is 1."""
    if isinstance(codebook, torch.Tensor):
        codebook = codebook.detach().double().cpu().numpy()
    c = np.asarray(codebook, np.float64)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def layer_weights(layer_norms: torch.Tensor | np.ndarray, m: int) -> np.ndarray:
    """L_i / sum_{i<m} L_i over the first m layers, float64."""
    if isinstance(layer_norms, torch.Tensor):
        layer_norms = layer_norms.detach().double().cpu().numpy()
    L = np.asarray(layer_norms, np.float64)[:m]
    return L / L.sum()


def intensity_weights(codebook64: np.ndarray, layer_norms, query_codes, m: int) -> np.ndarray:
    """(m, 4) weights w_i = L_i / sum L * C[q_i]: intensity is sum_i <w_i, C[t_i]>."""
    q = np.asarray(query_codes).astype(np.int64)
    return layer_weights(layer_norms, m)[:, None] * codebook64[q[:m]]


def table_scores(table: np.ndarray, codes: np.ndarray, bias: float = 0.0) -> np.ndarray:
    """(n,) float64 sum_i table[i, codes[:, i]] + bias, summed in layer order (identical bits
    in any block)."""
    out = np.zeros(len(codes), dtype=np.float64)
    for i in range(len(table)):
        out += table[i][codes[:, i]]
    return out + bias


def intensity(codebook: torch.Tensor | np.ndarray, layer_norms, query_codes, codes, m: int) -> np.ndarray:
    """(N,) float64 intensity on each row of `codes` (N, >= m) of the feature given by the first
    m of `query_codes` (n_q,)."""
    c64 = unit_codebook64(codebook)
    table = intensity_weights(c64, layer_norms, _np(query_codes), m) @ c64.T  # (m, n_codes)
    return table_scores(table, _np(codes)[:, :m].astype(np.int64))


def _np(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
