"""The matched-budget table of a comparison: every model at its bits per token and weight
bytes, and for each SAE the RQAE prefixes at the same budgets, side by side in both spaces.

Bits per token (what one token's code costs to store):
- RQAE prefix m: m log2(544) (one of 544 codes per layer; `metrics.rqae_bits_per_token`);
- SAE: log2 C(width, L0) + L0 value bits: which latents fire (an unordered set) and each
  one's value, stored at `metrics.SAE_VALUE_BITS` (16) bits (`metrics.sae_bits_per_token`).
Weight bytes: the model's saved tensors at their dtype (`state_dict`); an RQAE prefix m
needs its first m layers' W_in, b_in, W_out, b_out and the shared rest (the codebook is
derived, not stored).

At each budget the RQAE is taken at its largest evaluated prefix within the SAE's budget
("within") and at the prefix nearest to it ("nearest"); the winner is read off the
within-budget prefix, so the RQAE never gets more than the SAE's cost at its mean L0. (An SAE
whose L0 varies by token, JumpReLU or Gemma Scope, costs less on average than at its mean L0,
log2 C being concave: e.g. 25-32 bits at width 16,384, L0 77 +- 61, about 3 RQAE layers; a
TopK SAE's L0 is fixed.) Lower FVU wins in each
space (equal FVUs are a tie); a CE-delta difference within 2 standard errors of that
difference is a tie. Both models' CE is measured on the same contexts, so the standard error
is the paired one: the per-context difference of their CE-deltas, bootstrapped over contexts
(`paired_ce_delta_se`). Results without per-context sums fall back to the two standard errors
combined as if independent, which is wider; without any standard error (one context) no
winner is called.
"""

from __future__ import annotations

import math

import numpy as np

from rqae_pipeline.metrics import (
    SAE_VALUE_BITS,
    bootstrap_sums,
    prefix_of,
    rqae_bits_per_token,
    sae_bits_per_token,
    weight_bytes,
)

ROW_KEYS = ("fvu_normalised", "fvu_raw", "mse_normalised", "mse_raw")
CE_KEYS = ("ce_delta", "ce_delta_se", "kl", "kl_se", "ce_recovered", "ce_recovered_se")


def rqae_weight_bytes(rqae) -> dict[str, int]:
    """Bytes of an RQAE's saved tensors: per layer (W_in, b_in, W_out, b_out hold one slice
    per layer), and shared by every prefix (the rest; the codebook is derived, not saved)."""
    state = rqae.state_dict().values()
    per_layer = [t for t in state if t.dim() and t.shape[0] == rqae.n_q]
    return {"weight_bytes_per_layer": weight_bytes(per_layer) // rqae.n_q,
            "weight_bytes_shared": weight_bytes(t for t in state if not (t.dim() and t.shape[0] == rqae.n_q))}


def rqae_rows(result: dict) -> list[dict]:
    """One row per evaluated RQAE prefix (`result`: `evaluate`'s output with the comparison's
    `weight_bytes_per_layer` / `weight_bytes_shared`)."""
    rows = []
    for label in sorted(result["metrics"], key=prefix_of):
        m = prefix_of(label)
        weight = result["weight_bytes_shared"] + m * result["weight_bytes_per_layer"]
        rows.append(_row(label, "rqae", result, label, rqae_bits_per_token(m), weight, prefix=m))
    return rows


def sae_row(result: dict, label: str = "sae") -> dict:
    """The SAE's row: its bits per token at its measured L0 and its weight bytes."""
    row = _row(label, "sae", result, "sae", sae_bits_per_token(result["l0"], result["latents"]),
               result["weight_bytes"])
    row.update(l0=result["l0"], dead_latents=result["dead_latents"], latents=result["latents"])
    return row


def _row(name: str, kind: str, result: dict, label: str, bits: float, weight: int, **extra) -> dict:
    m = result["metrics"][label]
    ce = (result.get("ce") or {}).get(label, {})
    return {"label": name, "kind": kind, "bits_per_token": bits, "weight_bytes": int(weight), **extra,
            **{k: m[k] for k in ROW_KEYS}, **{k: ce.get(k) for k in CE_KEYS}}


def matched_budgets(rqae: list[dict], sae: dict) -> list[dict]:
    """The SAE against the RQAE at equal bits per token and at equal weight bytes."""
    return [_match(rqae, sae, "bits_per_token"), _match(rqae, sae, "weight_bytes")]


def paired_ce_delta_se(rqae_result: dict, sae_result: dict, label: str) -> float | None:
    """Bootstrap standard error of CE-delta(RQAE prefix `label`) - CE-delta(SAE), resampling
    the contexts both were measured on with the evaluations' own resamples and seed; None
    when the two did not measure the same contexts per context."""
    a, b = rqae_result.get("ce_per_context"), sae_result.get("ce_per_context")
    same = (a and b and rqae_result.get("ce_contexts") == sae_result.get("ce_contexts")
            and rqae_result.get("ce_bootstrap") == sae_result.get("ce_bootstrap")
            and f"ce:{label}" in a and "ce:sae" in b and a["ce_tokens"] == b["ce_tokens"])
    if not same:
        return None
    boot = rqae_result["ce_bootstrap"]
    if boot["contexts"] < 2:
        return math.nan
    delta_rqae = np.asarray(a[f"ce:{label}"]) - np.asarray(a["ce:clean"])  # per-context CE sums
    diff = delta_rqae - (np.asarray(b["ce:sae"]) - np.asarray(b["ce:clean"]))
    sums = bootstrap_sums(np.stack([diff, np.asarray(a["ce_tokens"], np.float64)], 1), boot["resamples"], boot["seed"])
    return float(np.std(sums[:, 0] / sums[:, 1], ddof=1))


def _match(rqae: list[dict], sae: dict, budget: str) -> dict:
    value = sae[budget]
    within = [r for r in rqae if r[budget] <= value]
    best = max(within, key=lambda r: r[budget]) if within else None
    # in log ratio; an SAE that never fires (L0 0, budget 0) is nearest the cheapest prefix
    nearest = min(rqae, key=lambda r: abs(math.log(r[budget] / value)) if value > 0 else r[budget])
    out = {"budget": budget, "sae": sae["label"], "value": value,
           "rqae_within": best and best["label"], "rqae_nearest": nearest["label"]}
    for key in ("fvu_normalised", "fvu_raw"):
        out[f"winner_{key}"] = None if best is None else _lower_wins(best[key], sae[key])
    out["winner_ce_delta"] = None if best is None else _ce_winner(best, sae)
    return out


def _lower_wins(rqae: float, sae: float) -> str:
    return "tie" if rqae == sae else "rqae" if rqae < sae else "sae"


def _ce_winner(rqae: dict, sae: dict) -> str | None:
    if rqae["ce_delta"] is None or sae["ce_delta"] is None:
        return None  # CE is measured at a few prefixes only
    diff = rqae["ce_delta"] - sae["ce_delta"]
    se = rqae.get("ce_delta_diff_se")
    if se is None:  # no per-context sums: as if independent (wider than the paired SE)
        se = math.hypot(rqae["ce_delta_se"], sae["ce_delta_se"])
    if not math.isfinite(se):
        return "undecided (no standard error)"
    return "tie (within 2 SE)" if abs(diff) <= 2 * se else "rqae" if diff < 0 else "sae"


def budget_table(rqae_result: dict, sae_result: dict) -> dict:
    """The comparison report's "budget" entry: assumptions, model rows, matched budgets."""
    rqae, sae = rqae_rows(rqae_result), sae_row(sae_result)
    for row in rqae:  # the paired SE of this prefix's CE-delta difference from the SAE's
        if row["ce_delta"] is not None:
            row["ce_delta_diff_se"] = paired_ce_delta_se(rqae_result, sae_result, row["label"])
    return {"assumptions": {"rqae_bits_per_layer": rqae_bits_per_token(1), "sae_value_bits": SAE_VALUE_BITS,
                            "sae_bits_per_token": "log2 C(d_sae, L0) + L0 * value bits",
                            "weight_bytes": "saved tensors at their dtype; RQAE prefix m: its first m layers"},
            "models": [*rqae, sae], "matched": matched_budgets(rqae, sae)}
