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
