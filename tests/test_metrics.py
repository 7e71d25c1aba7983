"""metrics.Stats merging."""

import numpy as np
import torch

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

