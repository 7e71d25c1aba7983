"""Steering: the vMF pull, the splice through a TransformerLens hook, the topic measure,
Codebook Features-style code activation, and the `rqae steer` command."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rqae_pipeline.cli import app
from rqae_pipeline.codes import EncodeConfig, encode_store, open_codes
from rqae_pipeline.features import KAPPA_MAX, VMF, DictionaryConfig, build_feature_dictionary, fit_vmf
from rqae_pipeline.generation import GenerationConfig, concept_frequency, concept_words, generate
from rqae_pipeline.harvest import harvest
from rqae_pipeline.lm import normalise
from rqae_pipeline.models.codebook import CodebookAE, CodebookConfig
from rqae_pipeline.models.rqae import RQAE, RQAEConfig
from rqae_pipeline.steer import (
    Norm,
    SteerConfig,
    pull_toward_mean,
    reference_kappa,
    splice_hook,
    steer_codebook,
    steer_rqae,
    steering_layers,
    strength_multiplier,
)
from rqae_pipeline.store import ActivationStore

from helpers import tiny_config, tiny_rqae, tree_digest

N_Q = 8
PROMPT = "The value of an object is"


@pytest.fixture(scope="module")
def env(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    store = root / "s.zarr"
    harvest(tiny_config(store, tokens=2048, contexts_per_shard=8), lm=tiny_lm, progress=False)
    st = ActivationStore.open(store)
    tiny_rqae(store, root / "rqae", n_q=N_Q, init_rows=1024)
    model = RQAE.load(root / "rqae")
    codes = open_codes(encode_store(EncodeConfig(store=store, model=root / "rqae"), progress=False))
    norm = Norm(gain=st.gain, eps=float(tiny_lm.model.cfg.eps), mode=st.spec.normalisation)
    # a feature: the vMF of 16 stored tokens' codes (its mean is off the code grid)
    vmf = fit_vmf(model, codes.read(100, 116))
    return {"root": root, "store": store, "st": st, "model": model, "model_dir": root / "rqae", "codes": codes,
            "norm": norm, "vmf": vmf}


def orthogonal_rqae(d=64, seed=0) -> RQAE:
    """Layers on orthogonal 4-dim subspaces with zero biases: encode(decode(c)) = c and the
    codes do not depend on the activation's scale, so re-encoding a spliced reconstruction
    must give back exactly the codes that were spliced."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g))[0]  # (d, d) orthonormal columns
    model = RQAE(RQAEConfig(d_in=d, n_q=d // 4))
    with torch.no_grad():
        model.W_in.copy_(U.T.reshape(d // 4, 4, d).transpose(1, 2))
        model.W_out.copy_(3.0 * U.T.reshape(d // 4, 4, d))
        model.b_in.zero_()
        model.b_out.zero_()
    return model.eval()


def nearest_codes(model, mean: np.ndarray) -> np.ndarray:
    return (torch.as_tensor(mean, dtype=torch.float32) @ model.codebook.T).argmax(-1).numpy()


# --------------------------------------------------------------------------- the pull


def test_strength_anchors_of_the_exponential_kappa_scaling():
    assert strength_multiplier(0.0) == 0.0 and strength_multiplier(0.5) == 1.0 and strength_multiplier(1.0) == np.inf
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(50, 3, 4, generator=g), dim=-1)
    mean = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    kappa = torch.tensor([0.5, 4.0, 40.0], dtype=torch.float64)
    assert torch.equal(pull_toward_mean(u, mean, kappa, 0.0), u)  # uniform: nothing moves
    assert torch.equal(pull_toward_mean(u, mean, kappa, 1.0), mean.expand_as(u))  # point mass
    half = pull_toward_mean(u, mean, kappa, 0.5)  # the fitted distribution: posterior mode
    assert torch.allclose(half, torch.nn.functional.normalize(u + kappa.float()[None, :, None] * mean, dim=-1))
    cos = [(pull_toward_mean(u, mean, kappa, s) * mean).sum(-1) for s in (0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)]
    for a, b in zip(cos, cos[1:]):
        assert (b >= a - 1e-6).all()  # every code only turns toward the mean
    assert (cos[3][:, 2] > cos[3][:, 0]).float().mean() > 0.9  # a concentrated layer pulls harder


def test_steering_layers_are_the_top_kappa_layers():
    vmf = VMF(mean=np.zeros((6, 4)), kappa=np.array([1.0, 50.0, 3.0, 50.0, 0.0, 7.0]), n=3)
    assert steering_layers(vmf, 3).tolist() == [1, 3, 5]
    assert steering_layers(vmf, 6).tolist() == list(range(6))


def test_layers_at_the_cap_do_not_set_the_pull_of_the_others():
    """A capped kappa (the queries agree on a layer) is not an estimate. Counted in the
    reference, one more agreeing layer past half of them made the cap the reference and
    the other layers' pull all but vanished at any strength."""
    model, g = orthogonal_rqae(), torch.Generator().manual_seed(1)
    raw = torch.randn(32, 64, generator=g)
    mean = torch.nn.functional.normalize(torch.randn(16, 4, generator=g), dim=-1)
    norm = Norm(gain=torch.ones(64), eps=1e-6, mode="rms")
    estimated = np.array([12, 13, 14, 15])  # kappa 50: the feature's typical layers
    steered = []
    for capped in (7, 8, 9):
        kappa = np.full(16, 50.0)
        kappa[:capped] = KAPPA_MAX
        vmf = VMF(mean=mean.double().numpy(), kappa=kappa, n=4)
        assert vmf.at_cap.sum() == capped and reference_kappa(vmf) == 50.0
        steered.append(steer_rqae(model, raw, vmf, estimated, SteerConfig(strength=0.9), norm).steered)
    assert torch.equal(steered[0], steered[1]) and torch.equal(steered[1], steered[2])
    assert ((steered[2] * mean[estimated]).sum(-1) > 0.98).all()  # strength 0.9 on a typical layer: a strong pull
    assert reference_kappa(VMF(mean=mean.double().numpy(), kappa=np.full(16, KAPPA_MAX), n=4)) == KAPPA_MAX


# --------------------------------------------------------------------------- the splice


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(repetition_penalty=float("nan")),
                                 dict(temperature=float("inf")), dict(temperature=-1.0)])
def test_a_sampling_setting_that_is_nan_infinite_or_negative_is_refused(bad):
    with pytest.raises(ValueError, match="--temperature must be >= 0"):
        GenerationConfig(**bad)


def test_strength_zero_leaves_logits_and_generation_identical(env, tiny_lm):
    st, model, vmf = env["st"], env["model"], env["vmf"]
    gen = GenerationConfig(max_new_tokens=6, samples=3, temperature=0.8, seed=3)
    ids = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    layers = steering_layers(vmf, N_Q)
    runs = {}
    for label, strength in (("clean", None), ("s0", 0.0), ("s1", 1.0)):
        hook = None if strength is None else splice_hook(
            lambda raw, s=strength: steer_rqae(model, raw, vmf, layers, SteerConfig(strength=s, top_k_layers=N_Q),
                                               env["norm"]).raw)
        logits = []
        runs[label] = (generate(tiny_lm, st.spec.hook, ids, gen, hook=hook, logits_out=logits), torch.stack(logits))
    assert torch.equal(runs["s0"][0], runs["clean"][0]) and torch.equal(runs["s0"][1], runs["clean"][1])
    assert not torch.allclose(runs["s1"][1][0], runs["clean"][1][0], atol=1e-3)  # steering does move the logits


def test_strength_one_on_every_layer_reencodes_to_the_mean_codes(env, tiny_lm):
    """Captured at the hook, the spliced activation re-encodes to the feature's mean codes
    (the model round-trips codes exactly; 'replace' splices the steered reconstruction)."""
    st, norm = env["st"], env["norm"]
    model = orthogonal_rqae()
    vmf = fit_vmf(model, model.encode(st.read(200, 216).acts).numpy())
    cfg = SteerConfig(strength=1.0, top_k_layers=model.n_q, splice="replace")
    layers = steering_layers(vmf, model.n_q)
    record = []
    hook = splice_hook(lambda raw: steer_rqae(model, raw, vmf, layers, cfg, norm).raw, record)
    ids = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generate(tiny_lm, st.spec.hook, ids, GenerationConfig(max_new_tokens=3, samples=2, temperature=0.0), hook=hook)
    assert [r[1].shape[1] for r in record] == [len(ids), 1, 1]  # the prompt without BOS, then one token a step
    after = torch.cat([r[1].reshape(-1, 64) for r in record])
    before = torch.cat([r[0].reshape(-1, 64) for r in record])
    want = nearest_codes(model, vmf.mean)
    assert not (model.encode(normalise(before, norm.gain, norm.eps, norm.mode)[0]).numpy() == want).all(1).any()
    got = model.encode(normalise(after, norm.gain, norm.eps, norm.mode)[0]).numpy()
    assert (got == want[None]).all()


def test_delta_splice_adds_the_change_of_the_reconstruction(env):
    """The spliced activation is raw + (x_hat_steered - x_hat) / gain * scale: the part the
    RQAE does not reconstruct is kept, and unsteered layers are untouched."""
    st, model, vmf, norm = env["st"], env["model"], env["vmf"], env["norm"]
    rows = st.read(300, 340)
    raw = st.raw(rows)
    layers = steering_layers(vmf, 3)
    step = steer_rqae(model, raw, vmf, layers, SteerConfig(strength=0.7, top_k_layers=3), norm)
    x, scale = normalise(raw, norm.gain, norm.eps, norm.mode)
    assert torch.equal(step.codes, model.encode(x).long())
    q = model.codebook[step.codes].clone()
    q[:, layers] = step.steered
    x_hat_steered = (torch.einsum("nmk,mkd->nd", q, model.W_out) + model.b_out.sum(0)) * model.input_scale
    want = raw + (x_hat_steered - model.decode(step.codes)) / norm.gain * scale[:, None]
    assert torch.allclose(step.raw, want, atol=1e-4 * float(raw.abs().max()))
    unsteered = [i for i in range(N_Q) if i not in layers]
    assert torch.equal(q[:, unsteered], model.codebook[step.codes[:, unsteered]])


def test_higher_strength_moves_the_reencoded_intensity_toward_the_feature(env):
    st, model, vmf, norm = env["st"], env["model"], env["vmf"], env["norm"]
    raw = st.raw(st.read(600, 1000))
    layers = steering_layers(vmf, N_Q)
    L = model.layer_norms()
    mean = torch.as_tensor(vmf.mean, dtype=torch.float32)

    def intensity(strength):  # sum_i L_i cos(C[c_i], mu_i) / sum_i L_i of the re-encoded activation
        new = steer_rqae(model, raw, vmf, layers, SteerConfig(strength=strength, top_k_layers=N_Q), norm).raw
        c = model.encode(normalise(new, norm.gain, norm.eps, norm.mode)[0]).long()
        return float(((model.codebook[c] * mean).sum(-1) * L).sum(-1).mean() / L.sum())

    values = [intensity(s) for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert all(b >= a for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0] + 0.2, values


# --------------------------------------------------------------------------- the measure


def test_topic_measure_counts_whole_words_case_insensitively():
    words = concept_words([" Dragon", "dragon", " castle", ",", " a", "7", "\n"])
    assert words == ("dragon", "castle")
    texts = ["The dragon slept.", "no match: dragonfly, castles", "A CASTLE and a Dragon and a dragon", ""]
    m = concept_frequency(texts, words)
    assert m["contains"] == [True, False, True, False] and m["fraction"] == 0.5 and m["mean_count"] == 1.0


# --------------------------------------------------------------------------- Codebook Features baseline


def test_codebook_steering_activates_the_chosen_code(env):
    st, norm = env["st"], env["norm"]
    torch.manual_seed(0)
    model = CodebookAE(CodebookConfig(d_in=64, n_codes=16, k=2))
    with torch.no_grad():  # orthogonal codes, no bias: the active set of a sum of codes is those codes
        model.codebook.copy_(torch.linalg.qr(torch.randn(64, 64))[0][:, :16].T * 5)
    raw = st.raw(st.read(0, 200))
    x, scale = normalise(raw, norm.gain, norm.eps, norm.mode)
    before = model.encode(x)
    code = int(torch.bincount(before.flatten(), minlength=16).argmin())  # the least used code
    assert (before == code).any(1).float().mean() < 0.5
    step = steer_codebook(model, raw, code, norm)
    assert (step.active == code).any(1).all()
    change = model.codebook[step.active].sum(1) - model.codebook[before].sum(1)
    assert torch.allclose(step.raw, raw + change / norm.gain * scale[:, None], atol=1e-4)
    replaced = steer_codebook(model, raw, code, norm, splice="replace")
    again = model.encode(normalise(replaced.raw, norm.gain, norm.eps, norm.mode)[0])
    assert (again == code).any(1).all()


# --------------------------------------------------------------------------- the command

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def dictionary(env):
    out = env["root"] / "dict.json"
    build_feature_dictionary(DictionaryConfig(store=env["store"], model=env["model_dir"], out=out, seeds=2,
                                              layers=(4,), top_k=6), progress=False)
    return out, json.loads(out.read_text())["features"][0]["id"]


def test_cli_steer_with_a_dictionary_feature_and_a_codebook_code(env, dictionary, tmp_path):
    path, fid = dictionary
    out = tmp_path / "steer.json"
    r = invoke("steer", "--store", env["store"], "--model", env["model_dir"], "--prompt", PROMPT,
               "--feature", f"{path}#{fid}", "--strength", "1", "--top-k-layers", "4", "--max-new-tokens", "5",
               "--samples", "2", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["feature"]["name"] == fid and len(res["feature"]["layers"]) == 4
    assert len(res["generations"][0]["steered"]) == 2 and res["words"]
    assert "generations containing the concept: baseline" in r.stdout
    q = invoke("steer", "--store", env["store"], "--model", env["model_dir"], "--prompt", PROMPT,
               "--query", "The value of an object", "--query", "a list object", "--strength", "0",
               "--top-k-layers", "2", "--max-new-tokens", "4", "--samples", "2", "--temperature", "0",
               "--word", "object", "--out", tmp_path / "q.json")
    assert q.exit_code == 0, q.output
    qres = json.loads((tmp_path / "q.json").read_text())
    g = qres["generations"][0]
    assert g["steered"] == g["baseline"] and qres["words"] == ["object"]  # strength 0: unchanged

    cb = env["root"] / "codebook"
    torch.manual_seed(0)
    CodebookAE(CodebookConfig(d_in=64, n_codes=32, k=4)).save(cb)
    r = invoke("steer", "--store", env["store"], "--model", cb, "--prompt", PROMPT, "--code", "5", "--word", "the",
               "--max-new-tokens", "3", "--samples", "2")
    assert r.exit_code == 0 and "steering code 5" in r.stdout, r.output
    # a codebook code is activated fully: a strength or layer count would be recorded, not applied
    for extra in (["--strength", "0"], ["--top-k-layers", "2"]):
        r = invoke("steer", "--store", env["store"], "--model", cb, "--prompt", PROMPT, "--code", "5", "--word",
                   "the", "--max-new-tokens", "3", "--samples", "2", *extra)
        assert r.exit_code == 2 and "steer an RQAE only" in r.stderr, r.output


def test_a_vmf_feature_file_steers_only_the_model_that_fitted_it(env, tmp_path):
    """`rqae features --out` records its model; another RQAE of the same size would read the
    same numbers as a different feature."""
    f = tmp_path / "f.json"
    r = invoke("features", "--store", env["store"], "--model", env["model_dir"], "--address", "3:5",
               "--address", "4:6", "--out", f)
    assert r.exit_code == 0, r.output
    other = tmp_path / "other-rqae"
    with torch.no_grad():
        changed = type(env["model"])(env["model"].cfg)
        changed.load_state_dict(env["model"].state_dict())
        changed.W_out.mul_(1.5)
    changed.save(other)
    args = ["--store", env["store"], "--prompt", PROMPT, "--feature", f, "--strength", "0.5", "--top-k-layers", "2",
            "--max-new-tokens", "2", "--samples", "1", "--word", "the"]
    r = invoke("steer", "--model", env["model_dir"], *args)
    assert r.exit_code == 0, r.output
    r = invoke("steer", "--model", other, *args)
    assert r.exit_code == 2 and "were fitted with model" in r.stderr and "refit them" in r.stderr, r.output
    good = json.loads(f.read_text())

    def damaged(edit, needle):  # a hand-edited file: one error line, never steering by its numbers
        data = json.loads(json.dumps(good))
        edit(data, data["features"][0])
        f.write_text(json.dumps(data))
        r = invoke("steer", "--model", env["model_dir"], *args)
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output

    damaged(lambda d, e: e["vmf"].pop("kappa"), "has no readable vMF")
    damaged(lambda d, e: e["vmf"]["mean"][0].__setitem__(0, float("nan")), "not finite unit vectors")
    damaged(lambda d, e: e["vmf"]["mean"].__setitem__(1, [0.0, 0.0, 0.0, 0.0]), "not finite unit vectors")
    damaged(lambda d, e: e["vmf"]["kappa"].__setitem__(0, -50.0), "concentrations outside 0..10000")
    damaged(lambda d, e: d.pop("model"), "does not record the model its features were fitted with")
    damaged(lambda d, e: e["hits"][0].pop("token"), "names queries or hits without tokens")
    damaged(lambda d, e: d["features"].append(3), "there is no feature")


def test_a_split_feature_counts_only_its_own_query_tokens_as_words(env, tmp_path):
    """`rqae features --split` fits one feature per split; the topic measure of each must come
    from its own queries (and hits), not every query of the file."""
    from rqae_pipeline.steer_features import load_feature

    f = tmp_path / "f.json"
    r = invoke("features", "--store", env["store"], "--model", env["model_dir"], "--address", "3:5",
               "--address", "4:6", "--split", "0", "--split", "1", "--out", f)
    assert r.exit_code == 0, r.output
    data = json.loads(f.read_text())
    split = next(e for e in data["features"] if e["queries"] == [0])  # ("all" is fitted on both)
    split["hits"] = []  # only the queries' words remain
    data["queries"][0]["token"], data["queries"][1]["token"] = " alpha", " omega"  # tiny-BPE tokens are no words
    f.write_text(json.dumps(data))
    assert load_feature(f"{f}#{split['name']}", env["st"], env["model_dir"], env["model"]).words == ("alpha",)


def _other_store_model(env):
    """An RQAE whose train.json says it was trained on a store with another hook."""
    d = env["root"] / "rqae-other-store"
    env["model"].save(d)
    spec = dict(env["st"].manifest["spec"], hook="blocks.0.hook_resid_post", layer=0)
    (d / "train.json").write_text(json.dumps({"store_spec": spec, "status": "done"}))
    return d


@pytest.mark.parametrize("case",
                         ["strength", "unknown-file", "unknown-id", "empty-prompt", "other-store", "no-feature",
                          "no-record", "no-examples", "short-prefix", "negative-code", "too-many-layers",
                          "empty-word", "long-prompt"])
def test_cli_steer_bad_input_is_one_error_line_and_writes_nothing(env, dictionary, tmp_path, case):
    path, fid = dictionary
    model, feature, prompt, extra = env["model_dir"], f"{path}#{fid}", PROMPT, []
    needle = {"strength": "--strength must be in [0, 1]", "unknown-file": "unknown feature",
              "unknown-id": "no feature 'nope'", "empty-prompt": "tokenises to no tokens",
              "other-store": "trained on another store (hook", "no-feature": "give one feature",
              "no-record": "does not record the model and store",
              "no-examples": "features.0.examples is missing or not of type list",
              "short-prefix": "its prefix must be", "negative-code": "its prefix must be",
              "too-many-layers": "layers; the model has 1..",
              "empty-word": "--word needs letters or digits",  # "" would be found in every generation
              "long-prompt": "tokens; tiny-random:0 takes 256"}[case]
    if case == "strength":
        extra = ["--strength", "1.5"]
    elif case == "unknown-file":
        feature = str(tmp_path / "missing.json")
    elif case == "unknown-id":
        feature = f"{path}#nope"
    elif case == "empty-prompt":
        prompt = ""
    elif case == "other-store":
        model = _other_store_model(env)
    elif case == "no-record":  # a dictionary without the record of what it was built from
        bare = tmp_path / "bare.json"
        bare.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "model"}))
        feature = f"{bare}#{fid}"
    elif case == "no-examples":  # an entry cut down by hand: steering fits its vMF to the examples' codes
        data = json.loads(path.read_text())
        del data["features"][0]["examples"]
        cut = tmp_path / "cut.json"
        cut.write_text(json.dumps(data))
        feature = f"{cut}#{fid}"
    elif case == "empty-word":
        extra = ["--word", ""]
    elif case == "long-prompt":  # past the LM's positions: was an IndexError mid-generation
        prompt = " ".join(["object"] * 300)
    elif case in ("short-prefix", "negative-code", "too-many-layers"):  # a feature nobody built
        data = json.loads(path.read_text())
        entry = data["features"][0]
        if case == "short-prefix":  # would be broadcast over the entry's layers
            entry["prefix"] = entry["prefix"][:1]
            entry["layers"] = max(entry["layers"], 2)
        elif case == "negative-code":  # would index from the codebook's end
            entry["prefix"][0] = -1
        else:
            entry["layers"] = env["model"].n_q + 1
        cut = tmp_path / "cut.json"
        cut.write_text(json.dumps(data))
        feature = f"{cut}#{fid}"
    args = ["steer", "--store", env["store"], "--model", model, "--prompt", prompt, "--out", tmp_path / "o.json",
            *extra]
    if case != "no-feature":
        args += ["--feature", feature]
    before = tree_digest(env["store"])
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("loading ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "o.json").exists() and tree_digest(env["store"]) == before
