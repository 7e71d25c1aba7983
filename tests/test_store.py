import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.codec import decode_acts, encode_acts
from rqae_pipeline.harvest import harvest
from rqae_pipeline.store import ActivationStore, Flags
from rqae_pipeline.summary import storage_fvu, summarise

from helpers import tiny_config


@pytest.fixture(scope="module")
def store16(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "fp16.zarr"
    harvest(tiny_config(out, tokens=4096), lm=tiny_lm, progress=False)
    return ActivationStore.open(out)


@torch.inference_mode()
def direct_residuals(lm, tokens: np.ndarray, hook: str) -> torch.Tensor:
    _, cache = lm.model.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter=[hook])
    return cache[hook]


def test_manifest_records_how_the_store_was_made(store16):
    m = store16.manifest
    assert m["spec"]["model"] == "tiny-random:0" and m["spec"]["hook"] == "blocks.1.hook_resid_post"
    assert m["spec"]["normalisation"] == "final-norm" and m["spec"]["dtype"] == "float16"
    assert m["spec"]["corpus"]["name"] == "builtin:python-docs"
    prov = m["provenance"]
    assert prov["model_load"]["class"] == "HookedTransformer" and "transformer_lens" in prov["model_load"]["versions"]
    assert {"zarr", "numcodecs", "rqae_pipeline"} <= set(prov)
    assert m["committed"]["tokens"] == store16.n_tokens == 4096 and m["committed"]["complete"]


@pytest.mark.parametrize("change", ["missing", "unknown", "bad-value"])
def test_a_manifest_spec_that_is_not_a_store_spec_is_one_error(store16, tmp_path, change):
    import json
    import shutil

    copy = tmp_path / "s.zarr"
    shutil.copytree(store16.path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    spec = meta["attributes"]["rqae"]["spec"]
    if change == "missing":
        del spec["hook"]
    elif change == "unknown":
        spec["added_later"] = 1
    else:
        spec["dtype"] = "bf17"
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(RQAEError, match="the manifest's spec is not a store spec"):
        ActivationStore.open(copy)


def test_rows_address_their_context_and_position(store16):
    rows = store16.read(0, 64)
    assert list(rows.pos[:32]) == list(range(32)) and (rows.seq[:32] == 0).all() and (rows.seq[32:64] == 1).all()
    assert (rows.flags[rows.pos == 0] & Flags.BOS).all()
    assert not (rows.flags[rows.pos > 0] & Flags.BOS).any()


def test_final_norm_acts_equal_the_models_ln_final_and_raw_round_trips(store16, tiny_lm):
    rows = store16.read(0, 32 * 8)
    tokens = rows.tokens.reshape(8, 32)
    raw = direct_residuals(tiny_lm, tokens, store16.spec.hook).reshape(-1, store16.d)
    with torch.inference_mode():
        ln_final = tiny_lm.model.ln_final(raw)
    # fp16 storage: relative precision ~1e-3
    torch.testing.assert_close(rows.acts, ln_final, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(store16.raw(rows), raw, rtol=2e-3, atol=2e-3)


def test_rms_mode_gives_every_token_norm_sqrt_d(tiny_lm, tmp_path):
    out = tmp_path / "rms.zarr"
    harvest(tiny_config(out, tokens=512, normalisation="rms"), lm=tiny_lm, progress=False)
    store = ActivationStore.open(out)
    rows = store.read()
    norms = rows.acts.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, store.d ** 0.5), rtol=2e-3, atol=0)
    raw = direct_residuals(tiny_lm, rows.tokens.reshape(-1, 32), store.spec.hook).reshape(-1, store.d)
    torch.testing.assert_close(store.raw(rows), raw, rtol=2e-3, atol=2e-3)
    assert (store.gain == 1).all()


def test_compact_fp8_store_is_small_and_accurate(tiny_lm, tmp_path, store16):
    out = tmp_path / "fp8.zarr"
    harvest(tiny_config(out, tokens=4096, dtype="fp8"), lm=tiny_lm, progress=False)
    store = ActivationStore.open(out)
    fvu = storage_fvu(store.manifest)
    assert fvu is not None and fvu < 2e-3
    ref = store16.read().acts
    got = store.read().acts
    assert ((got - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum()) < 2e-3
    assert store.group["acts"].dtype == np.uint8
    assert summarise(store)["bytes_on_disk"] < 0.7 * summarise(store16)["bytes_on_disk"]
    # Without its mean the committed rows cannot be decoded: an error, not a fresh mean (a
    # resumed harvest would compute one and every earlier row would decode wrong).
    import shutil

    shutil.rmtree(out / "mean")
    with pytest.raises(RQAEError, match="array mean is missing"):
        ActivationStore.open(out).read(0, 10)
    with pytest.raises(RQAEError, match="array mean is missing"):
        harvest(tiny_config(out, tokens=8192, dtype="fp8", resume=True), lm=tiny_lm, progress=False)
    from rqae_pipeline.verify import verify_store

    report = verify_store(ActivationStore.open(out))
    assert not report.ok and "mean: array missing" in report.problems  # listed, not a crash


def test_encode_decode_round_trip_each_dtype():
    x = torch.randn(100, 48) * 3 + 1
    mean = x.mean(0).numpy()
    for dtype, tol in (("float32", 0), ("float16", 1e-2), ("fp8", 0.2)):
        cols = encode_acts(x, dtype, mean)
        y = decode_acts(cols["acts"], dtype, cols.get("row_scale"), mean)
        assert (y - x).abs().max() <= tol * x.abs().max()


def test_shuffled_batches_mix_contexts_and_cover_every_row_once(store16):
    seen, distinct = [], []
    for acts, rows in store16.batches(128, seed=3, exclude=0, buffer_rows=1024, return_rows=True):
        seen.append(rows)
        distinct.append(len(np.unique(store16.read_rows(np.sort(rows.numpy())).seq)))
        assert acts.shape[1] == store16.d
    allrows = torch.cat(seen).sort().values
    assert torch.equal(allrows, torch.arange(store16.n_tokens))
    # 128 rows drawn from a 1024-row buffer of many contexts: far more than the 4 a
    # sequential read would touch.
    assert np.median(distinct) >= 20


def test_batches_match_rows_and_masking_is_chosen_at_read_time(store16):
    acts, rows = next(store16.batches(64, seed=0, return_rows=True))
    ref = store16.read_rows(np.sort(rows.numpy()))
    order = np.argsort(rows.numpy())
    torch.testing.assert_close(acts[order], ref.acts)
    kept = torch.cat([r for _, r in store16.batches(256, return_rows=True)])  # default: BOS excluded
    assert len(kept) == store16.n_tokens - store16.n_contexts
    assert not (store16.read_rows(np.sort(kept.numpy())).pos == 0).any()
    a = [b for b in store16.batches(100, seed=1)]
    b = [b for b in store16.batches(100, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_dask_view_matches_reads(store16):
    arrays = store16.dask()
    assert arrays["acts"].shape == (store16.n_tokens, store16.d)
    assert arrays["acts"].chunks[0][0] == store16.spec.shard_rows
    np.testing.assert_allclose(arrays["acts"].astype("float64").sum(0).compute(),
                               store16.read().acts.double().sum(0).numpy(), rtol=1e-6)


def test_opening_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(RQAEError, match="no activation store"):
        ActivationStore.open(tmp_path / "missing")
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(RQAEError, match="not an rqae activation store"):
        ActivationStore.open(tmp_path / "plain")


def test_a_store_reads_the_rows_it_appended_after_reading_earlier_ones(tmp_path):
    """Reads keep the zarr arrays open; a write that grows them must not leave a read of the
    new rows looking at the old shape (it would come back short, or as zeros)."""
    from rqae_pipeline.store import StoreSpec

    d, n = 16, 256
    spec = StoreSpec(model="random", hook="blocks.0.hook_resid_post", layer=0, d_model=d, corpus={"name": "random"},
                     tokenizer="none", context_length=16, skip_bos=False, normalisation="rms", dtype="float16",
                     contexts_per_shard=16, contexts_per_chunk=4, batch_contexts=4, outlier_factor=10.0)
    store = ActivationStore.create(tmp_path / "s.zarr", spec, torch.ones(d), {})
    acts = np.random.default_rng(0).standard_normal((2 * n, d)).astype(np.float16)
    for start in (0, n):
        rows = np.arange(start, start + n)
        store.write_rows(start, {"acts": acts[start : start + n], "scale": np.ones(n, np.float32),
                                 "tokens": np.zeros(n, np.int32), "seq": rows // 16,
                                 "pos": (rows % 16).astype(np.int16), "flags": np.zeros(n, np.uint8)})
        store.commit(tokens=start + n, contexts=(start + n) // 16, corpus_state=(0, 0))
        np.testing.assert_array_equal(store.read(0, start + n).acts.numpy(), acts[: start + n].astype(np.float32))
