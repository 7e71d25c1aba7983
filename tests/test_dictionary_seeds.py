"""Feature-dictionary seeds (features.sample_seed_rows): uniformly over unique token ids (the
write-up's) or over token occurrences."""

import numpy as np
import pytest
import torch

from rqae_pipeline.features import DictionaryConfig, sample_seed_rows
from rqae_pipeline.store import Flags

from helpers import synthetic_store


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """2048 rows: token 0 on 1948 of them, tokens 1..100 once each; every 10th row is BOS."""
    tokens = np.zeros(2048, np.int64)
    tokens[np.random.default_rng(0).choice(2048, 100, replace=False)] = np.arange(1, 101)
    flags = np.zeros(2048, np.uint8)
    flags[::10] = Flags.BOS
    store = synthetic_store(tmp_path_factory.mktemp("seeds") / "s.zarr", torch.randn(2048, 8), tokens=tokens,
                            flags=flags)
    return store, tokens, flags


def test_unique_token_seeds_are_distinct_tokens_drawn_uniformly(skewed):
    store, tokens, flags = skewed
    ids = sorted(set(tokens[flags == 0].tolist()))  # token 0 and the rare tokens on ordinary rows
    hits0 = 0
    for seed in range(20):
        rows = sample_seed_rows(store, 10, seed, Flags.BOS, "unique-tokens")
        assert len(rows) == 10 and (np.diff(rows) > 0).all() and (flags[rows] == 0).all()
        assert len(set(tokens[rows].tolist())) == 10  # one row per token id
        hits0 += int((tokens[rows] == 0).any())
    # token 0 is 1 of ~91 ids: drawn in about 10/91 of the samples, not in nearly every seed as by occurrence
    assert hits0 <= 8
    everything = sample_seed_rows(store, 10_000, 0, Flags.BOS, "unique-tokens")
    assert sorted(tokens[everything].tolist()) == ids


def test_occurrence_seeds_follow_token_frequency(skewed):
    store, tokens, flags = skewed
    rows = sample_seed_rows(store, 50, 0, Flags.BOS, "occurrences")
    assert len(rows) == 50 and len(set(rows.tolist())) == 50 and (flags[rows] == 0).all()
    assert (tokens[rows] == 0).mean() > 0.8  # 1948 of 2048 rows hold token 0
    assert np.array_equal(rows, sample_seed_rows(store, 50, 0, Flags.BOS, "occurrences"))


def test_seed_draw_defaults_to_the_write_up_and_is_checked(tmp_path):
    cfg = DictionaryConfig(store=tmp_path, model=tmp_path, out=tmp_path / "d.json")
    assert cfg.seed_draw == "unique-tokens"
    with pytest.raises(ValueError, match="unknown seed_draw 'tokens'"):
        DictionaryConfig(store=tmp_path, model=tmp_path, out=tmp_path / "d.json", seed_draw="tokens")
