"""Next-token CE and KL of the LM with activations spliced in at the store's hook, per
context, with bootstrap standard errors over contexts.

`evaluate.ce_stats` reads a block of contexts and the model's reconstructions; this module
runs the LM on them and reduces the sums. Every sum is kept per context (a (contexts,)
float64 array in `Stats.counts`, zero outside the task's own contexts, so tasks merge by
addition as the reconstruction sums do); `ce_summary` resamples contexts with replacement
(`metrics.bootstrap_sums`) for the standard errors, so a reader sees how much of a CE-delta
is the sample of contexts.

Two zero-ablations, both kept:
- `ZERO_ALL` ("zero-ablation"): every position of the hook's activation zeroed, BOS and
  norm outliers included: what sae-lens's `evals.get_recons_loss` does (its
  `standard_zero_ablate_hook`), so "CE recovered" here is comparable with sae-lens figures.
- `ZERO_KEPT`: zeros only where a reconstruction is spliced; BOS and outlier positions keep
  their clean activation, as every reconstruction here does.
"CE recovered" = (CE_zero - CE_model) / (CE_zero - CE_clean) with `ZERO_ALL`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.metrics import Stats, bootstrap_sums

ZERO_ALL = "zero-ablation"  # sae-lens: every position zeroed
ZERO_KEPT = "zero-ablation-special-kept"  # BOS and outlier positions keep their clean activation
CE_CONTEXTS_PER_FORWARD = 2
BOOTSTRAP_RESAMPLES = 1000
# relative squared error between the LM's clean activations and the stored rows above which
# they are another model's: fp16 / fp8 storage and a bf16 forward stay orders of magnitude below
REPRODUCTION_TOLERANCE = 1e-2


def default_ce_prefixes(prefixes: tuple[int, ...], n_q: int) -> tuple[int, ...]:
    """RQAE prefixes whose CE is measured by default: 1, 4, 16 and n_q, among the evaluated
    ones (a spliced variant costs a forward pass of the LM from the hook to the logits)."""
    return tuple(m for m in prefixes if m in (1, 4, 16, n_q))


def residual_start_layer(hook: str) -> int | None:
    """The block a forward pass can start at with the activation of `hook` as its residual
    input: L + 1 for blocks.L.hook_resid_post, L for blocks.L.hook_resid_pre; else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    return None if m is None else int(m.group(1)) + (m.group(2) == "post")


@dataclass(frozen=True)
class Splice:
    """Forward passes of the LM with an activation spliced in at `hook`.

    At a residual-stream hook the clean run's residual there is computed once and each
    spliced run starts from it (TransformerLens `start_at_layer`), skipping the layers
    below the hook; any other hook splices through a forward hook on a full run."""

    lm: Any
    hook: str
    start: int | None  # `residual_start_layer(hook)`
    offset: int  # 1 when the store skipped BOS: stored rows start at position 1

    def clean_run(self, toks: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(the residual spliced runs start from, or None; the clean run's next-token
        log-probabilities; its activation at the hook, (B, T, d))."""
        if self.start is not None:
            resid = self.lm.model(toks, stop_at_layer=self.start)
            return resid, self.log_probs(toks, resid, None, None), resid
        seen = {}

        def capture(act, hook=None):
            seen["act"] = act.detach().clone()
            return act

        logits = self.lm.model.run_with_hooks(toks, fwd_hooks=[(self.hook, capture)])
        return None, logits[:, :-1].float().log_softmax(-1), seen["act"]

    def log_probs(self, toks: torch.Tensor, resid: torch.Tensor | None, new: torch.Tensor | str | None,
                  keep: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities with `new` (B, R, d) written where `keep` (B, R);
        `ZERO_ALL`: every position zeroed; None: the clean run."""
        def splice(act, hook=None):
            if isinstance(new, str):  # ZERO_ALL, as sae-lens's zero-ablation hook
                return torch.zeros_like(act)
            act[:, self.offset:][keep] = new.to(act.device, act.dtype)[keep]
            return act

        if resid is not None:
            logits = self.lm.model(resid if new is None else splice(resid.clone()), start_at_layer=self.start)
        else:
            hooks = [] if new is None else [(self.hook, splice)]
            logits = self.lm.model.run_with_hooks(toks, fwd_hooks=hooks)
        return logits[:, :-1].float().log_softmax(-1)


def add_ce_sums(stats: Stats, splice: Splice, toks: torch.Tensor, keep: torch.Tensor, stored: torch.Tensor,
                replacements: dict[str, torch.Tensor | str], slots: slice, n_contexts: int) -> None:
    """Per-context CE sums of the clean run and of each replacement, and KL(clean || spliced),
    for a block of contexts that sit at `slots` of the `n_contexts` evaluated. `stored`
    (B, R, d): the store's rows of these contexts as raw residuals, which the clean run must
    reproduce (`check_reproduced`) before any CE is taken from this LM."""
    def put(key: str, values: torch.Tensor) -> None:
        if key not in stats.counts:
            stats.counts[key] = np.zeros(n_contexts)
        stats.counts[key][slots] += values.double().cpu().numpy()

    resid, clean, act = splice.clean_run(toks)
    err, norm = reproduction_sums(act[:, splice.offset:], stored, keep)
    check_reproduced(float(err.sum()), float(norm.sum()), splice.hook)
    put("lm:sq_err", err)
    put("lm:sq_norm", norm)
    target = toks[:, 1:, None]
    put("ce:clean", -clean.gather(-1, target)[..., 0].double().sum(1))
    put("ce_tokens", torch.full((len(toks),), float(target.shape[1])))
    for label, new in replacements.items():
        logp = splice.log_probs(toks, resid, new, keep)
        put(f"ce:{label}", -logp.gather(-1, target)[..., 0].double().sum(1))
        kl = torch.nn.functional.kl_div(logp, clean, log_target=True, reduction="none").sum(-1)
        put(f"kl:{label}", kl.double().sum(1))
        del logp


def reproduction_sums(act: torch.Tensor, stored: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per context: Σ|act − stored|² and Σ|stored|² over the kept positions (float64)."""
    a, s, k = act.double(), stored.to(act.device).double(), keep.to(act.device)
    return ((a - s).pow(2).sum(-1) * k).sum(1), (s.pow(2).sum(-1) * k).sum(1)


def check_reproduced(sq_err: float, sq_norm: float, hook: str) -> None:
    """The LM's clean activations must be the store's rows, up to storage and precision
    error; otherwise its CE belongs to another model (a store whose model name was edited,
    weights changed at the hub since the harvest) and every CE-delta would mix two models."""
    if sq_norm > 0 and sq_err / sq_norm > REPRODUCTION_TOLERANCE:
        raise RQAEError(f"the LM does not reproduce the store's rows at {hook} (relative squared error "
                        f"{sq_err / sq_norm:.3g}, tolerance {REPRODUCTION_TOLERANCE:g}): the store was harvested "
                        f"from other weights or settings, so no CE is taken from this LM")


def ce_metrics(sums: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """CE, CE-delta, KL and CE recovered (against `ZERO_ALL`) per label from summed columns;
    each value is an array over resamples (or a 0-d array for the point estimate)."""
    n = sums["ce_tokens"]
    clean = sums["ce:clean"] / n
    out = {"clean": {"ce": clean}}
    zero = sums[f"ce:{ZERO_ALL}"] / n if f"ce:{ZERO_ALL}" in sums else None
    for key in sums:
        if not key.startswith("ce:") or key == "ce:clean":
            continue
        label = key[3:]
        ce = sums[key] / n
        out[label] = {"ce": ce, "ce_delta": ce - clean, "kl": sums[f"kl:{label}"] / n}
        if zero is not None and label not in (ZERO_ALL, ZERO_KEPT):
            with np.errstate(divide="ignore", invalid="ignore"):
                out[label]["ce_recovered"] = (zero - ce) / (zero - clean)
    return out


def ce_summary(stats: Stats, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, dict[str, float]]:
    """Point estimates over all contexts and, as `<metric>_se`, their bootstrap standard
    errors: contexts resampled with replacement `resamples` times (seeded), the metric
    recomputed from each resample's sums, the standard deviation of those values."""
    keys = sorted(k for k in stats.counts if k == "ce_tokens" or k.startswith(("ce:", "kl:")))
    per_context = np.stack([stats.counts[k] for k in keys], 1)  # (contexts, columns)
    point = ce_metrics(dict(zip(keys, per_context.sum(0))))
    boot = ce_metrics(dict(zip(keys, bootstrap_sums(per_context, resamples, seed).T)))
    # one context resamples to itself: its spread, 0, is no standard error (nan: none)
    has_se = resamples > 1 and len(per_context) > 1
    out = {}
    for label, values in point.items():
        out[label] = {}
        for metric, v in values.items():
            out[label][metric] = float(v)
            out[label][f"{metric}_se"] = float(np.std(boot[label][metric], ddof=1)) if has_se else float("nan")
    return out


def ce_bootstrap_info(stats: Stats, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """What the standard errors rest on: contexts, predictions and the resampling."""
    return {"contexts": int(len(stats.counts["ce_tokens"])), "predictions": int(stats.counts["ce_tokens"].sum()),
            "resamples": resamples, "seed": seed, "unit": "context"}
