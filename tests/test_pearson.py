"""Pearson feature matching (pearson.py): query (a) on a final-norm store with an uneven
gain, the reference's feature pool, context selection and worst-feature drop."""

import numpy as np
import pytest
import torch
from sae_lens import SAE

from rqae_pipeline.models.rqae import RQAE, RQAEConfig
from rqae_pipeline.pearson import (
    PearsonConfig,
    drop_worst,
    eligible_features,
    encoder_query,
    example_tokens,
    middle_prefix,
    pearson_matching,
)
from rqae_pipeline.store import Flags

from helpers import synthetic_store

D, N = 64, 8192


def linear_sae(columns: list[torch.Tensor], biases: list[float] | None = None) -> SAE:
    """A sae-lens SAE whose feature j is relu(x . columns[j] + biases[j])."""
    sae = SAE.from_dict({"architecture": "standard", "d_in": len(columns[0]), "d_sae": len(columns),
                         "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False})
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.zero_()
        for j, c in enumerate(columns):
            sae.W_enc[:, j] = c
            sae.b_enc[j] = (biases or [0.0] * len(columns))[j]
    return sae


@pytest.fixture(scope="module", params=[0, 1])
def planted(request, tmp_path_factory):
    """Raw residuals: isotropic noise plus, on 30% of tokens, alpha * u along a planted unit
    direction u. Stored with a gain spanning e^-1.5..e^1.5. The stored-space feature that
    reads alpha is v = u / gain (x_s . v = x_raw . u / rms)."""
    torch.manual_seed(request.param)
    gain = torch.exp(torch.linspace(-1.5, 1.5, D))[torch.randperm(D)]
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    alpha = torch.where(torch.rand(N) < 0.3, 3 * torch.rand(N), torch.zeros(N))
    raw = torch.randn(N, D) / D**0.5 + alpha[:, None] * u
    path = tmp_path_factory.mktemp("pearson") / "s.zarr"
    store = synthetic_store(path, raw, gain=gain)
    rqae = RQAE(RQAEConfig(d_in=D, n_q=8))
    rqae.init_from_data(store.read().acts)
    return store, rqae, u, gain


def test_query_a_recovers_a_planted_feature_of_a_stored_space_sae_on_an_uneven_gain(planted):
    """The stored rows lie on the ellipsoid x_hat * gain, so the rows where x_s . v peaks point
    along v * gain**2, not v: (a) must be built from that (the stored-space encoder used as is
    gave 0.44 / 0.61 here)."""
    store, rqae, u, gain = planted
    out = pearson_matching(rqae, linear_sae([u / gain]), store, PearsonConfig(features=(0,), min_firing=0),
                           sae_space="normalised", prefixes=(1, 2, 4, 8))
    (f,) = out["features"]
    assert f["tokens"] > 300
    assert f["a"]["8"] > 0.8 and np.mean(list(f["a"].values())) > 0.7
    assert f["a"]["8"] > f["b"]["8"] - 0.05  # as good as the top token's own codes


def test_a_signed_sae_is_matched_on_its_positive_side_and_says_so(planted):
    """AbsTopK keeps negative activations; matching reads positive ones as firings (as the
    reference, written for SAEs that are >= 0), so the result counts the negative ones and
    says so. A ReLU SAE on the same rows has none."""
    store, rqae, u, gain = planted
    v = u / gain
    sae = SAE.from_dict({"architecture": "abstopk", "d_in": D, "d_sae": 2, "k": 2, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": False})
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec):
            p.zero_()
        sae.W_enc[:, 0], sae.W_enc[:, 1] = v, -0.5 * v  # feature 1 is negative wherever feature 0 is positive
    cfg = PearsonConfig(features=(0, 1), min_firing=0)
    out = pearson_matching(rqae, sae, store, cfg, sae_space="normalised", prefixes=(8,))
    assert out["negative_activations"] > 0.3 * out["nonzero_activations"]
    assert f"negative on {out['negative_activations']:,} of the {out['nonzero_activations']:,}" in out["signed"]
    relu = pearson_matching(rqae, linear_sae([v, -0.5 * v]), store, cfg, sae_space="normalised", prefixes=(8,))
    assert relu["negative_activations"] == 0 and relu["signed"] is None


def test_a_stored_space_sae_and_its_raw_space_twin_give_the_same_query(planted):
    """v = u / gain on stored rows and u on raw residuals read the same direction: the
    reference's norm(W_enc) query must not depend on the space the SAE was trained in."""
    store, rqae, u, gain = planted
    stored, raw = encoder_query(linear_sae([u / gain]), 0, store, "normalised"), encoder_query(linear_sae([u]), 0,
                                                                                              store, "raw")
    torch.testing.assert_close(stored, raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored / stored.norm(), torch.nn.functional.normalize(u * gain, dim=0))
    assert torch.equal(rqae.encode(stored[None]), rqae.encode(raw[None]))


def test_the_feature_pool_needs_enough_firing_tokens_and_no_bos_top_examples(tmp_path):
    """Feature 0 fires on about half the rows; feature 1 on a handful (too few); feature 2
    fires most on a few BOS rows planted mid-context (the reference skips such features)."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(D), dim=0)
    raw = torch.randn(N, D) / D**0.5
    flags = np.zeros(N, np.uint8)
    flags[100::997] = Flags.BOS
    raw[torch.from_numpy(flags != 0)] += 4 * z
    store = synthetic_store(tmp_path / "s.zarr", raw, gain=torch.ones(D), flags=flags)
    w = torch.nn.functional.normalize(torch.randn(D), dim=0)
    sae = linear_sae([w, w, z], [0.0, -2.2, 0.0])
    cfg = PearsonConfig(min_firing=300)
    assert 0 < int((sae.encode(store.read().acts)[:, 1] > 0).sum()) < 300
    assert eligible_features(sae, store, (0, N), cfg, "normalised", exclude=Flags.BOS).tolist() == [0]
    lax = PearsonConfig(min_firing=1, top_not_bos=0)
    assert eligible_features(sae, store, (0, N), lax, "normalised", exclude=Flags.BOS).tolist() == [0, 1, 2]
    out = pearson_matching(RQAE(RQAEConfig(d_in=D, n_q=2)), sae, store, PearsonConfig(n_features=5, drop_worst=0),
                           sae_space="normalised", prefixes=(2,), exclude=Flags.BOS)
    assert [f["feature"] for f in out["features"]] == [0]


def test_contexts_come_from_those_of_the_top_middle_and_bottom_tokens():
    """8 contexts of 4 rows; context c peaks at c + 1 and has three tokens of 0.1 * (c + 1).
    With one token per group, the contexts ranked are those of the top, middle and bottom
    firing tokens (the reference's feature files); without it, every firing context."""
    ctx = torch.arange(8).repeat_interleave(4)
    a = torch.zeros(32)
    for c in range(8):
        a[4 * c] = c + 1
        a[4 * c + 1: 4 * c + 4] = 0.1 * (c + 1)
    # tokens by activation: the 8 peaks, then 0.8 x3, 0.7 x3, 0.6 x3 (middle = index 16: context 5), ...
    tok = example_tokens(a, ctx, per_group=1, tokens_per_group=1)
    assert sorted(set((tok // 4).tolist())) == [0, 5, 7] and (a[tok] > 0).all() and len(tok) == 12
    # all 8 contexts ranked by max: 7..0, the middle one (index 4) is context 3
    assert sorted(set((example_tokens(a, ctx, per_group=1) // 4).tolist())) == [0, 3, 7]


def test_the_worst_features_are_dropped_at_the_middle_prefix():
    assert middle_prefix((1, 2, 4, 8, 16), 16) == 8 and middle_prefix((1, 16, 512, 1024), 1024) == 512
    rows = [{"feature": i, "a": {"8": v}} for i, v in enumerate([0.9, float("nan"), 0.1, 0.5, 0.7])]
    assert [r["feature"] for r in drop_worst(rows, 8, 2)] == [0, 3, 4]
    assert drop_worst(rows, 8, 0) == rows


def test_summary_drop_worst_leaves_out_drop_worst_features(planted):
    store, rqae, u, gain = planted
    sae = linear_sae([u / gain, -u / gain, u / gain + 0.3 * torch.randn(D)])
    out = pearson_matching(rqae, sae, store, PearsonConfig(features=(0, 1, 2), min_firing=0, drop_worst=1),
                           sae_space="normalised", prefixes=(2, 8))
    assert out["summary"]["a"]["8"]["n"] == 3
    worst = min(f["a"]["8"] for f in out["features"])
    dropped = out["summary_drop_worst"]
    assert dropped["ranked_at"] == 8 and dropped["a"]["8"]["n"] == 2
    kept = [f["a"]["8"] for f in out["features"] if f["a"]["8"] != worst]
    assert dropped["a"]["8"]["mean"] == pytest.approx(np.mean(kept))


def test_bad_pearson_config():
    with pytest.raises(ValueError, match="positive"):
        PearsonConfig(contexts_per_group=0)
    with pytest.raises(ValueError, match=">= 0"):
        PearsonConfig(drop_worst=-1)
