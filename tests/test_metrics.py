"""metrics.Stats merging and the budget table's edge cases."""

import numpy as np
import torch

from rqae_pipeline.budget import matched_budgets
from rqae_pipeline.metrics import Stats


def test_merged_stats_own_their_arrays():
    # a merged Stats is accumulated into in place (ce.add_ce_sums adds into count slots):
    # that must never write through to the parts it was merged from
    part = Stats().add(torch.ones(2, 3), {}, {"latents": np.array([1.0, 0.0])})
    part.counts["ce:clean"] = np.zeros(4)
    for total in (part.merge(Stats()), Stats().merge(part)):
        total.counts["ce:clean"][1:3] += 5.0
        total.counts["latents"] += 1.0
        total.sum += 1.0
    assert part.counts["ce:clean"].tolist() == [0.0] * 4
    assert part.counts["latents"].tolist() == [1.0, 0.0]
    assert part.sum.tolist() == [2.0] * 3


def test_matched_budgets_with_an_sae_that_never_fires():
    # L0 = 0 (a dead or untrained SAE) costs 0 bits: no RQAE prefix fits that budget, and
    # the nearest prefix is the cheapest, not a math domain error
    keys = {"fvu_normalised": 0.5, "fvu_raw": 0.5, "ce_delta": None, "ce_delta_se": None}
    rqae = [{"label": f"rqae@{m}", "bits_per_token": 9.09 * m, "weight_bytes": 100 * m, **keys} for m in (1, 4)]
    sae = {"label": "sae", "bits_per_token": 0.0, "weight_bytes": 0, **keys}
    bits, weights = matched_budgets(rqae, sae)
    for row in (bits, weights):
        assert row["rqae_within"] is None and row["winner_fvu_normalised"] is None
        assert row["rqae_nearest"] == "rqae@1"
