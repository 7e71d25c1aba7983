import numpy as np
import torch

from rqae_pipeline.compare import decoder_directions, match_dictionaries, top_matches
from rqae_pipeline.models.rqae import RQAE, RQAEConfig


def test_a_permuted_noisy_copy_is_matched_one_to_one():
    torch.manual_seed(0)
    b = torch.randn(300, 32)
    perm = torch.randperm(300)[:200]
    a = b[perm] + 0.05 * torch.randn(200, 32)
    for dense_limit in (10**9, 0):  # dense Hungarian, then the sparse candidate graph
        r = match_dictionaries(a, b, candidates=8, chunk=64, dense_limit=dense_limit)
        assert (r.best_index == perm.numpy()).all()
        assert (r.assignment == perm.numpy()).all()
        assert r.summary()["mean_assignment_cosine"] > 0.99 and r.summary()["assigned"] == 200


def test_chunked_top_matches_equal_the_full_matrix():
    torch.manual_seed(1)
    a, b = torch.randn(77, 16), torch.randn(131, 16)
    v, i = top_matches(a, b, k=3, chunk=10)
    full = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    fv, fi = full.topk(3, dim=1)
    torch.testing.assert_close(v, fv)
    assert torch.equal(i, fi)


def test_assignment_is_one_to_one_where_best_matches_collide():
    b = torch.eye(4)
    a = torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0.0, 0.2, 0], [0, 0, 0, 1.0]])
    r = match_dictionaries(a, b)
    assert r.best_index.tolist() == [0, 0, 3]  # both of the first two prefer direction 0
    assert len(set(r.assignment.tolist())) == 3 and r.assignment[2] == 3


def test_rqae_projected_codebooks_are_the_decoder_directions():
    model = RQAE(RQAEConfig(d_in=8, n_q=3))
    dirs = decoder_directions(model)
    assert dirs.shape == (3 * 544, 8)
    torch.testing.assert_close(dirs[544 + 5], (model.codebook[5] @ model.W_out[1]).detach())
    assert np.isfinite(match_dictionaries(dirs[:50], dirs).best_cosine).all()


def test_pearson_matching_finds_an_rqae_feature_that_tracks_an_sae_feature(tiny_lm, tmp_path):
    """An SAE feature reading a direction of the stored rows: query (a) (its encoder column
    through the final norm, with the store's gain, encoded) must track it."""
    from sae_lens import SAE

    from rqae_pipeline.harvest import harvest
    from rqae_pipeline.pearson import PearsonConfig, pearson_matching
    from rqae_pipeline.store import ActivationStore

    from helpers import tiny_config

    harvest(tiny_config(tmp_path / "s.zarr", tokens=4096), lm=tiny_lm, progress=False)
    store = ActivationStore.open(tmp_path / "s.zarr")
    torch.manual_seed(0)
    rqae = RQAE(RQAEConfig(d_in=64, n_q=4))
    x = store.read().acts
    rqae.init_from_data(x)
    sae = SAE.from_dict({"architecture": "standard", "d_in": 64, "d_sae": 8, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": False})
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        # feature 0 reads the centred activation along a direction: a linear, positive feature
        direction = torch.nn.functional.normalize(x[5] - x.mean(0), dim=0)
        sae.W_enc[:, 0] = direction
        sae.b_enc[0] = -float(x.mean(0) @ direction)
    out = pearson_matching(rqae, sae, store, PearsonConfig(features=(0,)), sae_space="normalised", prefixes=(1, 4))
    assert out["features"] and out["features"][0]["tokens"] > 10
    corr_a = out["summary"]["a"]["4"]["mean"]
    # an untrained 4-layer RQAE on the tiny LM's store: a positive correlation that grows
    # with the prefix length (0.16 at 1 layer, 0.41 at 4 here)
    assert 0.25 < corr_a <= 1 and corr_a > out["summary"]["a"]["1"]["mean"]
    assert out["summary"]["b"]["4"]["n"] == 1
