import copy
import itertools

import pytest
import torch

from rqae_pipeline.models.rqae import RQAE, RQAEConfig, hypersphere_codebook


def random_rqae(d=48, n_q=96, seed=0, init="reference"):
    torch.manual_seed(seed)
    return RQAE(RQAEConfig(d_in=d, n_q=n_q, init=init))


def test_codebook_is_the_544_unit_directions_of_the_fsq_grid():
    C = hypersphere_codebook()
    assert C.shape == (544, 4)
    torch.testing.assert_close(C.norm(dim=1), torch.ones(544))
    assert torch.unique(C.round(decimals=6), dim=0).shape[0] == 544
    grid = torch.tensor([p for p in itertools.product((-1, -0.5, 0, 0.5, 1), repeat=4) if any(p)], dtype=torch.float32)
    dirs = grid / grid.norm(dim=1, keepdim=True)
    # every non-zero grid point's direction is one of the codes
    assert ((dirs @ C.T).max(dim=1).values > 1 - 1e-6).all()


def first_mismatch_is_a_tie(model, x, naive, fast, tol=1e-3):
    """For a row whose codes differ, replay the naive loop to the first differing layer and
    check that the two candidate codes score within `tol` of each other."""
    i = int((naive != fast).nonzero()[0, 0]) if (naive != fast).any() else None
    if i is None:
        return True
    r = x.clone()
    for j in range(i):
        r -= model.codebook[naive[j].long()] @ model.W_out[j] + model.b_out[j]
    p = torch.nn.functional.normalize(r @ model.W_in[i] + model.b_in[i], dim=-1)
    scores = p @ model.codebook.T
    return abs(float(scores[naive[i].long()] - scores[fast[i].long()])) < tol


@pytest.mark.parametrize("block, init",
                         [(1, "reference"), (7, "tied"), (64, "reference"), (64, "tied"), (500, "reference")])
def test_fast_encoder_gives_the_naive_codes(block, init):
    model = random_rqae(n_q=200, init=init)
    x = torch.randn(400, 48) * 4
    with torch.no_grad():
        naive = model.encode_naive(x)
        fast = model.encode(x, block=block)
    assert naive.dtype == fast.dtype == torch.int16 and fast.shape == (400, 200)
    same_rows = (naive == fast).all(1)
    assert same_rows.float().mean() >= 0.99
    with torch.no_grad():
        assert all(first_mismatch_is_a_tie(model, x[r], naive[r], fast[r]) for r in (~same_rows).nonzero()[:, 0])


def test_an_input_far_off_centre_gets_the_float64_codes():
    """The fast encoder projects x - b_out[0] (the data mean once `init_from_data` set it), so
    a mean ~300x the spread is not cancelled in every layer's float32 projection: 98% of rows
    get the float64 loop's codes, as many as the float32 loop gives (projecting x itself:
    88%). The rest is the float32 input's own rounding."""
    model = random_rqae(n_q=200, init="tied")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 48, generator=gen, dtype=torch.float64) @ torch.randn(48, 48, generator=gen,
                                                                              dtype=torch.float64) * 0.5 + 1000
    model.init_from_data(x[:1000].float())
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        want = reference.encode_naive(x[1000:])
        got = model.encode(x[1000:].float())
    assert (got == want).all(1).float().mean() >= 0.95


def test_decode_sums_layer_outputs_and_prefixes_are_partial_sums():
    model = random_rqae(n_q=20)
    x = torch.randn(64, 48)
    with torch.no_grad():
        codes = model.encode(x)
        _, x_hat, train_codes = model.training_loss(x)
        torch.testing.assert_close(model.decode(codes), x_hat, rtol=1e-4, atol=1e-4)
        assert torch.equal(train_codes.to(torch.int16), codes)
        manual = torch.zeros(64, 48)
        for m in range(1, 21):
            manual += model.codebook[codes[:, m - 1].long()] @ model.W_out[m - 1] + model.b_out[m - 1]
            torch.testing.assert_close(model.decode(codes, m), manual, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        model.decode(codes, 0)


def test_a_callers_bf16_autocast_changes_no_code_and_no_reconstruction():
    # Codes are argmaxes over close scores: a bf16 GEMM under a caller's autocast picked
    # other codes for most rows (and the symmetric search's integer keys past 256 broke).
    model = random_rqae(n_q=40)
    x = torch.randn(256, 48) * 30
    with torch.no_grad():
        codes, naive = model.encode(x), model.encode_naive(x)
        recons = model.decode(codes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.encode(x), codes)
            assert torch.equal(model.encode_naive(x), naive)
            assert torch.equal(model.decode(codes), recons)


def test_straight_through_gradients_reach_both_projections():
    model = random_rqae(n_q=8)
    loss, _, _ = model.training_loss(torch.randn(32, 48))
    loss.backward()
    for p in (model.W_in, model.b_in, model.W_out, model.b_out):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # every layer's input projection gets a gradient, not just the first
    assert (model.W_in.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_intensity_matches_the_blog_formula():
    model = random_rqae(n_q=10)
    x = torch.randn(50, 48)
    codes = model.encode(x)
    L = model.layer_norms()
    assert L.shape == (10,)
    torch.testing.assert_close(L, torch.stack([model.W_out[i].norm(dim=1).mean() for i in range(10)]).detach())
    m = 6
    got = model.intensity(codes[0], codes, m)
    C = model.codebook
    want = torch.tensor([
        sum(float(C[codes[0, i].long()] @ C[codes[t, i].long()]) * float(L[i]) for i in range(m)) / float(L[:m].sum())
        for t in range(50)
    ])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[0] == pytest.approx(1.0) and (got <= 1 + 1e-6).all() and (got >= -1 - 1e-6).all()


def test_save_and_load_round_trip(tmp_path):
    model = random_rqae(n_q=12)
    model.save(tmp_path / "m")
    loaded = RQAE.load(tmp_path / "m")
    x = torch.randn(16, 48)
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "model.safetensors").exists()


def test_hook_points_expose_codes_and_error():
    model = random_rqae(n_q=4)
    x = torch.randn(8, 48)
    _, cache = model.run_with_cache(x)
    assert cache["hook_codes"].shape == (8, 4) and cache["hook_error"].shape == (8, 48)
    torch.testing.assert_close(cache["hook_recons"] + cache["hook_error"], x)
