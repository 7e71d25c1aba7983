"""Codes store, codebook statistics, query search, vMF features and the feature dictionary."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rqae_pipeline import RQAEError
from rqae_pipeline import codes as codes_mod
from rqae_pipeline.cli import app
from rqae_pipeline.codebook_stats import codebook_stats
from rqae_pipeline.codes import (
    EncodeConfig,
    default_codes_path,
    encode_store,
    open_codes,
    open_codes_for,
)
from rqae_pipeline.features import (
    KAPPA_MAX,
    DictionaryConfig,
    Feature,
    build_feature_dictionary,
    codebook64,
    fit_vmf,
    intensity_feature,
    score_codes,
    search,
    split_feature,
    vmf_feature,
    vmf_log_normaliser,
    vmf_scores,
)
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.rqae import RQAE, RQAEConfig
from rqae_pipeline.queries import encode_tokens, query_codes
from rqae_pipeline.store import ActivationStore, Flags
from rqae_pipeline.token_search import FeaturesResult, FittedFeature, features_lines

from helpers import run_rqae, tiny_config, tiny_rqae, tree_digest

N_Q = 8


def make_model(store_path, out, seed):
    return tiny_rqae(store_path, out, n_q=N_Q, seed=seed)


@pytest.fixture(scope="module")
def env(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    store = root / "s.zarr"
    harvest(tiny_config(store, tokens=4096, contexts_per_shard=8), lm=tiny_lm, progress=False)
    model_dir = make_model(store, root / "rqae", seed=0)
    codes_path = encode_store(EncodeConfig(store=store, model=model_dir), progress=False)
    return {"root": root, "store": store, "model_dir": model_dir, "codes": codes_path,
            "st": ActivationStore.open(store), "model": RQAE.load(model_dir), "cs": open_codes(codes_path)}


def ordinary_row(st, start=100):
    flags = np.asarray(st.group["flags"][:])
    return int(start + np.flatnonzero((flags[start:] & int(Flags.BOS | Flags.OUTLIER)) == 0)[0])


def brute_force_ranking(scores, flags, k):
    keep = np.flatnonzero((flags & int(Flags.BOS | Flags.OUTLIER)) == 0)
    order = np.lexsort((keep, -scores[keep]))[:k]
    return keep[order], scores[keep][order]


# --------------------------------------------------------------------------- codes store


def test_codes_store_equals_encode_on_every_row(env):
    st, cs, model = env["st"], env["cs"], env["model"]
    assert cs.n == st.n_tokens and cs.complete and cs.codes.dtype == np.int16
    assert cs.codes.chunks == (st.spec.chunk_rows, N_Q)
    assert cs.path == default_codes_path(env["store"], env["model_dir"])
    assert np.array_equal(cs.read(), model.encode(st.read().acts).numpy())
    assert np.array_equal(cs.read_rows(np.array([70, 3, 4000])), cs.read()[[70, 3, 4000]])


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_missing_or_damaged_codes_shard_is_an_error_not_codes(env, tmp_path, damage):
    """zarr reads a missing shard as the fill value, code 0 on every layer: search and
    features would rank those rows silently. Every read of the codes is checked instead."""
    import shutil

    from rqae_pipeline.integrity import shard_key

    copy = tmp_path / "codes.zarr"
    shutil.copytree(env["codes"], copy)
    shard_file = copy / shard_key(env["cs"].codes, "codes", 1)
    if damage == "missing":
        shard_file.unlink()
    else:  # garbage inside the shard's first chunk; the shard index at the end stays intact
        data = bytearray(shard_file.read_bytes())
        data[20:60] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
        shard_file.write_bytes(bytes(data))
    codes, rows = open_codes(copy), env["cs"].block_rows
    assert np.array_equal(codes.read(0, rows), env["cs"].read(0, rows))  # the intact shard reads
    reads = [codes.read, lambda: codes.read_rows(np.array([3, rows + 5]))]
    if damage == "missing":  # checked before dask reads (a damaged chunk fails its crc32c inside zarr)
        reads.append(codes.dask)
    for read in reads:
        with pytest.raises(RQAEError, match=rf"array codes: shard file .*c/1/0 is {damage}"):
            read()
    if damage == "damaged":
        with pytest.raises(Exception, match="[Cc]hecksum"):
            codes.dask().compute()


def test_a_model_config_missing_a_field_is_one_error_line(env, tmp_path):
    import shutil

    from rqae_pipeline.codes import model_identity

    bad = tmp_path / "rqae"
    shutil.copytree(env["model_dir"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "n_q"}))
    for load in (RQAE.load, model_identity):
        with pytest.raises(RQAEError, match="config.json lacks n_q"):
            load(bad)


def test_interrupted_encode_resumes_to_identical_codes(env, tmp_path, monkeypatch):
    out = tmp_path / "codes.zarr"
    real, calls = codes_mod._encode_rows, []

    def dying(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while encoding the third shard
        return real(*args)

    monkeypatch.setattr(codes_mod, "_encode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        encode_store(EncodeConfig(store=env["store"], model=env["model_dir"], out=out), progress=False)
    shard = env["st"].spec.shard_rows
    partial = open_codes(out)
    assert partial.n == 2 * shard and not partial.complete
    with pytest.raises(RQAEError, match="finish them"):
        open_codes_for(env["st"], env["model_dir"], out)
    import zarr

    zarr.open_group(str(out), mode="r+")["codes"][2 * shard: 3 * shard] = 7  # a torn, uncommitted shard
    monkeypatch.setattr(codes_mod, "_encode_rows", real)
    encode_store(EncodeConfig(store=env["store"], model=env["model_dir"], out=out), progress=False)
    assert np.array_equal(open_codes(out).read(), env["cs"].read()) and open_codes(out).complete


def test_codes_refuse_another_model_or_store(env, tiny_lm):
    other_model = make_model(env["store"], env["root"] / "rqae-other", seed=1)
    with pytest.raises(RQAEError, match="another model"):
        open_codes_for(env["st"], other_model, env["codes"])
    other_store = env["root"] / "other.zarr"
    harvest(tiny_config(other_store, tokens=256), lm=tiny_lm, progress=False)
    with pytest.raises(RQAEError, match="another store"):
        open_codes_for(ActivationStore.open(other_store), env["model_dir"], env["codes"])
    with pytest.raises(RQAEError, match="another store"):  # appending to them is refused too
        encode_store(EncodeConfig(store=other_store, model=env["model_dir"], out=env["codes"]), progress=False)


# --------------------------------------------------------------------------- codebook statistics


def test_codebook_stats_equal_a_brute_force_count(env):
    cs, model = env["cs"], env["model"]
    stats = codebook_stats(model, cs, prefix_layers=4, pairs_sample=300, progress=False)
    codes = cs.read()
    for p in stats["prefixes"]:
        assert p["distinct"] == len({tuple(r) for r in codes[:, : p["layers"]].tolist()})
    assert [p["layers"] for p in stats["prefixes"]] == [1, 2, 3, 4]
    counts = np.asarray(stats["usage"]["counts"])
    assert counts.shape == (N_Q, 544) and (counts.sum(1) == len(codes)).all()
    assert counts[5, 17] == (codes[:, 5] == 17).sum()
    assert stats["usage"]["used_codes"] == [len(np.unique(codes[:, i])) for i in range(N_Q)]
    proj = stats["projected"]
    direct = (model.codebook @ model.W_out[3].detach()).norm(dim=1) * model.input_scale
    assert proj["norm_mean"][3] == pytest.approx(float(direct.mean()), rel=1e-5)
    cos = proj["cosine"]
    assert cos["pairs"] == sum(cos["hist"]) == 300 * 299 // 2 and 0 <= cos["abs_below_0.2"] <= 1
    assert 0 < cos["across_layers_pairs"] < cos["pairs"]


# --------------------------------------------------------------------------- search


def test_a_stored_tokens_own_address_is_its_top_hit_with_score_1(env):
    st, cs, model = env["st"], env["cs"], env["model"]
    row = ordinary_row(st, 1234)
    hits = search(model, cs, cs.read(row, row + 1)[0], top_k=5, store=st)
    assert hits[0].score == pytest.approx(1.0, abs=1e-12)
    assert hits[0].row == row or np.array_equal(cs.read(hits[0].row, hits[0].row + 1), cs.read(row, row + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize("layers", [1, 3, N_Q])
def test_search_equals_brute_force_and_ignores_block_size(env, monkeypatch, layers):
    st, cs, model = env["st"], env["cs"], env["model"]
    q = cs.read(777, 778)[0]
    hits = search(model, cs, q, layers=layers, top_k=25, store=st)
    brute = model.intensity(torch.from_numpy(q), torch.from_numpy(cs.read()), layers).double().numpy()
    rows, scores = brute_force_ranking(brute, np.asarray(st.group["flags"][:]), 25)
    assert np.allclose([h.score for h in hits], scores, atol=1e-6)
    exact = score_codes(model, intensity_feature(model, q, layers), cs.read())
    assert [h.row for h in hits] == brute_force_ranking(exact, np.asarray(st.group["flags"][:]), 25)[0].tolist()
    if layers > 1:  # the layer-1 ranking is all ties: float32 brute force cannot order them
        assert [h.row for h in hits] == rows.tolist()
    monkeypatch.setattr(type(cs), "block_rows", property(lambda self: 37))
    assert search(model, cs, q, layers=layers, top_k=25, store=st) == hits  # bit-identical scores


def test_query_text_gets_the_stored_codes_of_the_same_tokens(env, tiny_lm):
    st, cs, model = env["st"], env["cs"], env["model"]
    R = st.spec.rows_per_context
    ids = np.asarray(st.group["tokens"][5 * R + 1: 6 * R]).tolist()  # context 5 after its BOS
    got = encode_tokens(tiny_lm, model, st, ids)
    assert (got == cs.read(5 * R + 1, 6 * R)).mean() > 0.99
    text = tiny_lm.tokenizer.decode(ids[:6])
    assert query_codes(tiny_lm, model, st, text, -1).shape == (N_Q,)
    with pytest.raises(RQAEError, match="out of range"):
        query_codes(tiny_lm, model, st, text, 50)
    with pytest.raises(RQAEError, match="no tokens"):
        query_codes(tiny_lm, model, st, "", 0)


# --------------------------------------------------------------------------- vMF


def test_vmf_fit_and_normaliser_match_scipy():
    from scipy.stats import vonmises_fisher

    from rqae_pipeline.features import _mean_resultant_to_kappa

    rng = np.random.default_rng(0)
    mu = np.array([0.5, -0.5, 0.5, 0.5])
    for kappa in (0.5, 5.0, 60.0):
        x = vonmises_fisher(mu, kappa).rvs(200, random_state=rng)
        fit_mu, fit_kappa = vonmises_fisher.fit(x)
        s = x.sum(0)
        assert _mean_resultant_to_kappa(np.array([np.linalg.norm(s) / len(x)]))[0] == pytest.approx(fit_kappa, rel=1e-6)
        assert vmf_log_normaliser(np.array([kappa]))[0] == pytest.approx(
            vonmises_fisher(mu, kappa).logpdf(mu) - kappa, rel=1e-10)
    assert vmf_log_normaliser(np.array([0.0]))[0] == pytest.approx(-np.log(2 * np.pi**2))
    assert np.isfinite(vmf_log_normaliser(np.array([KAPPA_MAX])))
    # query codes that (nearly) all agree: the MLE is past the cap, never NaN (was NaN for
    # 1 - rbar in 1e-12..1e-9: a Newton step from the ~1e12 start)
    rbar = 1 - np.array([0.0, 1e-13, 2e-12, 1e-10, 1e-9, 1e-6, 1e-5])
    assert (_mean_resultant_to_kappa(rbar) == KAPPA_MAX).all()
    assert _mean_resultant_to_kappa(np.array([0.0]))[0] == 0


def test_vmf_kappa_grows_as_the_query_codes_agree(env):
    model = env["model"]
    C = codebook64(model)
    near = np.argsort(-(C @ C[100]))  # codes by closeness to code 100
    rng = np.random.default_rng(0)
    sets = {"identical": [100] * 6, "close": near[:6], "wider": near[:60:10], "random": rng.choice(544, 6)}
    kappas = {}
    for name, layer0 in sets.items():
        codes = np.tile(np.arange(N_Q, dtype=np.int16), (6, 1))
        codes[:, 0] = layer0
        vmf = fit_vmf(model, codes)
        assert np.allclose(np.linalg.norm(vmf.mean, axis=1), 1.0)
        kappas[name] = vmf.kappa[0]
        # layers 2.. hold one code for every query: capped, and said to be
        assert vmf.to_dict()["layers_at_cap"] == vmf.at_cap.sum() == N_Q - (name != "identical")
        title = features_lines(FeaturesResult(layers=N_Q, queries=[], features=[FittedFeature(name, [], vmf, [])]))[1]
        assert f"{N_Q - (name != 'identical')} of {N_Q} layers at the cap" in title
    assert kappas["identical"] == KAPPA_MAX > kappas["close"] > kappas["wider"] > kappas["random"] >= 0


def test_vmf_on_identical_codes_ranks_that_token_first_like_intensity(env):
    st, cs, model = env["st"], env["cs"], env["model"]
    row = ordinary_row(st, 2500)
    q = cs.read(row, row + 1)
    vmf = fit_vmf(model, np.repeat(q, 4, axis=0))
    assert (vmf.kappa == KAPPA_MAX).all()
    hits = search(model, cs, vmf_feature(model, vmf), top_k=10, store=st)
    assert hits[0].row == row or np.array_equal(cs.read(hits[0].row, hits[0].row + 1), q)
    # equal kappas: the log-density is an increasing affine map of the intensity
    assert [h.row for h in hits] == [h.row for h in search(model, cs, q[0], top_k=10, store=st)]
    scores = vmf_scores(model, vmf, cs.read(0, 500))
    assert scores.shape == (500,) and np.isfinite(scores).all()


def test_split_fits_one_feature_per_subset(env):
    cs, model = env["cs"], env["model"]
    codes = cs.read_rows(np.array([40, 41, 900, 901]))
    a, b = split_feature(model, codes, [[0, 1], [2, 3]])
    assert a.n == b.n == 2 and not np.allclose(a.mean, b.mean)
    assert np.allclose(a.kappa, fit_vmf(model, codes[:2]).kappa)
    with pytest.raises(RQAEError, match="out of range"):
        split_feature(model, codes, [[0, 9]])
    with pytest.raises(RQAEError, match="no query tokens"):
        fit_vmf(model, codes[:0])


# --------------------------------------------------------------------------- dictionary


def test_feature_dictionary_lists_prefix_features_with_their_top_examples(env, tmp_path):
    st, cs, model = env["st"], env["cs"], env["model"]
    out = tmp_path / "dict.json"
    build_feature_dictionary(DictionaryConfig(store=env["store"], model=env["model_dir"], out=out, seeds=5,
                                              layers=(2, 4, 16), top_k=6), progress=False)
    d = json.loads(out.read_text())
    assert {f["layers"] for f in d["features"]} == {2, 4, N_Q}  # 16 capped at n_q
    assert d["model"]["weights_sha256"] == cs.meta["model"]["weights_sha256"]
    flags = np.asarray(st.group["flags"][:])
    for f in d["features"][::3]:
        feat = intensity_feature(model, np.asarray(f["prefix"] + [0] * (N_Q - f["layers"])), f["layers"])
        rows, scores = brute_force_ranking(score_codes(model, feat, cs.read()), flags, 6)
        assert [e["row"] for e in f["examples"]] == rows.tolist()
        assert [e["score"] for e in f["examples"]] == pytest.approx(scores.tolist(), abs=1e-12)
        assert f["examples"][0]["score"] == pytest.approx(1.0)  # the seed itself scores 1
        assert f["seed"]["token"] and "left" in f["examples"][0]


def test_feature_is_linear_in_the_unit_codes(env):
    model, cs = env["model"], env["cs"]
    w = np.random.default_rng(1).normal(size=(3, 4))
    codes = cs.read(0, 50)
    direct = np.einsum("nik,ik->n", codebook64(model)[codes[:, :3].astype(np.int64)], w) + 0.5
    assert np.allclose(score_codes(model, Feature(weights=w, bias=0.5), codes), direct)


# --------------------------------------------------------------------------- command line


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_cli_encode_stats_search_features_and_dictionary(env, tmp_path):
    s, m = env["store"], env["model_dir"]
    codes = tmp_path / "c.zarr"
    r = invoke("encode", "--store", s, "--model", m, "--out", codes)
    assert r.exit_code == 0 and f"{env['st'].n_tokens:,} rows x {N_Q} layers" in r.stdout, r.output
    r = invoke("codebook-stats", "--store", s, "--model", m, "--codes", codes, "--out", tmp_path / "stats",
               "--pairs-sample", "200")
    assert r.exit_code == 0, r.output
    written = {p.name for p in (tmp_path / "stats").iterdir()}
    assert {"codebook_stats.json", "codebook_projected.png", "code_usage.png"} <= written
    row = ordinary_row(env["st"], 500)
    seq, pos = (int(env["st"].group[k][row]) for k in ("seq", "pos"))
    r = invoke("search", "--store", s, "--model", m, "--codes", codes, "--address", f"{seq}:{pos}", "--top-k", "3",
               "--out", tmp_path / "hits.json")
    assert r.exit_code == 0, r.output
    hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
    assert hits[0]["score"] == pytest.approx(1.0) and "[[" in r.stdout
    r = invoke("search", "--store", s, "--model", m, "--codes", codes, "--query", "The value of an object",
               "--token-index", "2", "--layers", "4")
    assert r.exit_code == 0 and "layers 1..4 of 8" in r.stdout, r.output
    r = invoke("features", "--store", s, "--model", m, "--codes", codes, "--address", f"{seq}:{pos}",
               "--address", "3:5", "--query", "an object", "--split", "0,1", "--out", tmp_path / "f.json")
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "f.json").read_text())
    assert [x["name"] for x in f["features"]] == ["all", "0,1"] and f["features"][0]["vmf"]["n"] == 3
    r = invoke("feature-dictionary", "--store", s, "--model", m, "--codes", codes, "--out", tmp_path / "d.json",
               "--seeds", "3", "--layers", "2,8", "--top-k", "4", "--seed-draw", "occurrences")
    assert r.exit_code == 0 and "features" in r.stdout, r.output
    assert json.loads((tmp_path / "d.json").read_text())["config"]["seed_draw"] == "occurrences"


@pytest.mark.parametrize("args, needle", [
    (["search", "--query", "The value", "--token-index", "9"], "token index 9 is out of range"),
    (["search", "--query", ""], "tokenises to no tokens"),
    (["search", "--address", "3:5", "--query", "x"], "give one query"),
    (["search", "--address", "3-5"], "SEQ:POS"),
    (["search", "--address", "99999:1"], "context 99999 is not in the store"),
    (["search", "--address", "3:5", "--layers", "9"], "--layers must be in 1..8"),
    (["features"], "no query tokens"),
    (["features", "--address", "3:5", "--split", "0,4"], "query 4 does not exist"),
    # one token twice would fit a vMF at the cap on every layer from one token
    (["features", "--address", "3:5", "--address", "2:1", "--address", "3:5"],
     "--address 3:5 is the same query token as --address 3:5"),
    (["features", "--query", "an object", "--query", "an object"],
     "is the same query token as --query 'an object' token"),
    (["features", "--query", "a b", "--query", "c", "--token-index", "0", "--token-index", "0",
      "--token-index", "1"], "3 --token-index values"),
    # no pairs to take cosines of (was an IndexError); a prefix past the model's layers or the
    # packed key (was capped silently)
    (["search", "--address", "3:5", "--top-k", "0"], "--top-k must be at least 1"),  # before any encoding
    (["codebook-stats", "--pairs-sample", "1"], "--pairs-sample must be at least 2"),
    (["codebook-stats", "--pairs-sample", "-3"], "--pairs-sample must be at least 2"),
    (["codebook-stats", "--prefix-layers", "0"], "--prefix-layers must be 1..6"),
    (["codebook-stats", "--prefix-layers", "7"], "--prefix-layers must be 1..6"),
])
def test_bad_query_input_is_one_line_and_nonzero(env, args, needle):
    before = tree_digest(env["codes"])
    r = invoke(args[0], "--store", env["store"], "--model", env["model_dir"], "--codes", env["codes"], *args[1:])
    assert_one_line_error(r, needle)
    assert tree_digest(env["codes"]) == before


def test_a_model_trained_on_another_hooks_rows_is_refused_by_every_codes_tool(env, tmp_path, tiny_lm):
    """Same width, another hook (or LM, or normalisation): its codes of these rows would rank,
    score and count like any, with exit 0. The run's train.json names what it read."""
    import shutil

    model = tmp_path / "trained"
    shutil.copytree(env["model_dir"], model)
    other = tmp_path / "hook0.zarr"
    harvest(tiny_config(other, tokens=512, hook="0"), lm=tiny_lm, progress=False)
    codes = encode_store(EncodeConfig(store=other, model=model), progress=False)  # before its train.json said
    (model / "train.json").write_text(json.dumps({"store_spec": env["st"].manifest["spec"]}))
    needle = "was trained on rows of hook 'blocks.1.hook_resid_post'; the store's hook is 'blocks.0.hook_resid_post'"
    for args in (["encode", "--out", tmp_path / "c.zarr"], ["search", "--address", "3:5"],
                 ["features", "--address", "3:5", "--address", "4:6"],
                 ["feature-dictionary", "--out", tmp_path / "d.json", "--seeds", "2"],
                 ["codebook-stats", "--out", tmp_path / "stats"]):
        assert_one_line_error(invoke(args[0], "--store", other, "--model", model, *args[1:]), needle)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "d.json").exists()
    # codes made before are not read either (search, features, the dictionary, stats all use them)
    assert_one_line_error(invoke("search", "--store", other, "--model", model, "--codes", codes, "--address", "3:5"),
                          needle)


def test_codes_of_another_model_are_refused_by_the_cli(env):
    other = env["root"] / "rqae-cli-other"
    if not other.exists():
        make_model(env["store"], other, seed=2)
    before = tree_digest(env["codes"])
    r = run_rqae("search", "--store", str(env["store"]), "--model", str(other), "--codes", str(env["codes"]),
                 "--address", "3:5")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another model" in lines[0], r.stderr
    r = invoke("encode", "--store", env["store"], "--model", other, "--out", env["codes"])
    assert_one_line_error(r, "another model")
    assert tree_digest(env["codes"]) == before


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def meta_edit(edit):
    return lambda codes: edit_json(codes / "zarr.json", lambda g: edit(g["attributes"]["rqae_codes"]))


def array_edit(edit):
    return lambda codes: edit_json(codes / "codes" / "zarr.json", edit)


def widen(a):  # the array and its shards twice as wide as the model's n_q
    a["shape"][1] *= 2
    a["chunk_grid"]["configuration"]["chunk_shape"][1] *= 2


DAMAGED_CODES = {
    "committed missing": (meta_edit(lambda m: m.pop("committed")), "committed is missing"),
    "committed not a number": (meta_edit(lambda m: m.update(committed="abc")), "committed is missing or not"),
    "committed past the array": (meta_edit(lambda m: m.update(committed=10**6)), "1000000 committed rows"),
    "model not an object": (meta_edit(lambda m: m.update(model="rqae")), "model.name is missing"),
    "store missing": (meta_edit(lambda m: m.pop("store")), "store.spec.contexts_per_shard is missing"),
    "array wider than the model": (array_edit(widen), "16 codes wide (shards of 16), but its model has n_q = 8"),
    "array of floats": (array_edit(lambda a: a.update(data_type="float16")), "not a 2-d int16 array"),
    "array metadata cut short": (lambda c: (c / "codes" / "zarr.json").write_text('{"shape": [1'),
                                 "the codes array cannot be opened"),
}


@pytest.mark.parametrize("damage", DAMAGED_CODES)
def test_damaged_codes_attributes_or_array_metadata_are_one_error_line(env, tmp_path, damage):
    import shutil

    copy = tmp_path / "codes.zarr"
    shutil.copytree(env["codes"], copy)
    edit, needle = DAMAGED_CODES[damage]
    edit(copy)
    before = tree_digest(copy)
    for cmd in (["search", "--address", "3:5"], ["encode"]):
        args = ("--out", copy) if cmd == ["encode"] else ("--codes", copy, *cmd[1:])
        r = invoke(cmd[0], "--store", env["store"], "--model", env["model_dir"], *args)
        assert_one_line_error(r, needle)
    assert tree_digest(copy) == before


def test_codes_of_a_longer_copy_of_the_store_are_refused_and_left_intact(env, tmp_path):
    """The store's identity leaves out its row count (a store grows); codes that cover rows a
    copy of it does not commit would be read as that copy's, past its end."""
    import shutil

    shorter = tmp_path / "s.zarr"
    shutil.copytree(env["store"], shorter)
    half = env["st"].spec.shard_rows
    edit_json(shorter / "zarr.json", lambda g: g["attributes"]["rqae"]["committed"].update(
        tokens=half, contexts=half // env["st"].spec.rows_per_context))
    before = tree_digest(env["codes"])
    r = invoke("search", "--store", shorter, "--model", env["model_dir"], "--codes", env["codes"], "--address", "3:5")
    assert_one_line_error(r, f"the store commits only {half:,}")
    r = invoke("encode", "--store", shorter, "--model", env["model_dir"], "--out", env["codes"])
    assert_one_line_error(r, f"the store commits only {half:,}")
    assert tree_digest(env["codes"]) == before


@pytest.mark.slow
def test_query_text_of_a_bfloat16_store_is_encoded_by_a_bfloat16_forward(tmp_path):
    """A store harvested in bfloat16 (a GPU's default) records it; a text query of its own
    tokens must get its stored codes, which a float32 forward does not give."""
    from rqae_pipeline.lm import load_lm
    from rqae_pipeline.queries import load_store_lm

    store = tmp_path / "bf16.zarr"
    harvest(tiny_config(store, tokens=1024, model_dtype="bfloat16"), lm=None, progress=False)
    st = ActivationStore.open(store)
    model = RQAE.load(make_model(store, tmp_path / "rqae", seed=0))
    cs = open_codes(encode_store(EncodeConfig(store=store, model=tmp_path / "rqae"), progress=False))
    R, match = st.spec.rows_per_context, {}
    lms = {"store's": load_store_lm(st, device="cpu"), "float32": load_lm(st.spec.model, device="cpu")}
    assert next(lms["store's"].model.parameters()).dtype == torch.bfloat16
    for name, lm in lms.items():
        got = [encode_tokens(lm, model, st, np.asarray(st.group["tokens"][c * R + 1: (c + 1) * R]).tolist())
               for c in range(st.n_contexts)]
        match[name] = float((np.concatenate(got) == np.concatenate(
            [cs.read(c * R + 1, (c + 1) * R) for c in range(st.n_contexts)])).all(1).mean())
    assert match["store's"] == 1.0 and match["float32"] < 0.95, match


def test_real_gemma_query_text_gets_the_stored_codes(gemma_lm, tmp_path):
    from rqae_pipeline.harvest import HarvestConfig
    from rqae_pipeline.lm import OFFLINE_GEMMA

    store = tmp_path / "g.zarr"
    harvest(HarvestConfig(out=store, model=OFFLINE_GEMMA, tokens=256, batch_contexts=2, contexts_per_shard=2,
                          contexts_per_chunk=2), lm=gemma_lm, progress=False)
    st = ActivationStore.open(store)
    torch.manual_seed(0)
    model = RQAE(RQAEConfig(d_in=640, n_q=16))
    model.init_from_data(st.read().acts)
    model.save(tmp_path / "rqae")
    cs = open_codes(encode_store(EncodeConfig(store=store, model=tmp_path / "rqae"), progress=False))
    ids = np.asarray(st.group["tokens"][129:256]).tolist()  # context 1 after its BOS
    assert (encode_tokens(gemma_lm, model, st, ids) == cs.read(129, 256)).mean() > 0.99
    hits = search(model, cs, cs.read(200, 201)[0], top_k=3, store=st)
    assert hits[0].row == 200 and hits[0].score == pytest.approx(1.0)


@pytest.mark.parametrize("command, extra", [
    ("search", ["--address", "3:5"]),
    ("features", ["--address", "3:5", "--address", "4:6"]),
    ("feature-dictionary", ["--seeds", "2"]),
    ("steer", ["--address", "3:5", "--prompt", "The"]),
])
def test_an_out_that_is_a_directory_is_refused_before_the_work(env, tmp_path, command, extra):
    """Refused up front (it was refused after the search or the generations, leaving a temp file)."""
    (tmp_path / "x").write_text("a file where a folder would be")
    for out, needle in ((tmp_path, "is a directory"), (tmp_path / "x" / "y.json", "is a file, not a directory")):
        r = invoke(command, "--store", env["store"], "--model", env["model_dir"], "--codes", env["codes"],
                   "--out", out, *extra)
        assert_one_line_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_encoding_a_store_with_no_tokens_is_refused_and_writes_nothing(env, tmp_path):
    empty = ActivationStore.create(tmp_path / "empty.zarr", env["st"].spec, env["st"].gain, {})
    codes = tmp_path / "codes.zarr"
    with pytest.raises(RQAEError, match="commits no tokens yet"):
        encode_store(EncodeConfig(store=empty.path, model=env["model_dir"], out=codes), progress=False)
    r = invoke("codebook-stats", "--store", empty.path, "--model", env["model_dir"], "--out", tmp_path / "stats")
    assert_one_line_error(r, "commits no tokens yet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.zarr"]
