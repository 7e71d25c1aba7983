"""A trained SAE's directory, read by sae-lens and by `rqae eval`: neither may misread it.

The SAE is trained on a store's normalised rows; saved, it reads raw hook activations
("<arch>-<normalisation>", `models/sae_format.py`), so sae-lens's own `HookedSAETransformer`
must splice in exactly the reconstruction the pipeline reports (the normalised one mapped
back with the stored scale and gain), and `rqae eval` must know its space from the
directory alone.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from safetensors.torch import load_file

from rqae_pipeline import RQAEError
from rqae_pipeline.evaluate import EvalConfig, evaluate, load_model, model_space, reconstruct
from rqae_pipeline.models.sae_format import load_sae_dir, stored_space_sae
from rqae_pipeline.store import ActivationStore

from helpers import tiny_config

CONTEXTS = 6  # spliced through the LM in the sae-lens test


@pytest.fixture(scope="module", params=["final-norm", "rms"])
def run(request, tiny_lm, tmp_path_factory):
    """A float32 tiny store (so stored rows equal sae-lens's own normalisation bit for bit)
    and a TopK SAE trained on it by `rqae train`'s loop."""
    from rqae_pipeline.harvest import harvest
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp(f"interop-{request.param}")
    store = root / "s.zarr"
    harvest(tiny_config(store, tokens=4096, dtype="float32", normalisation=request.param), lm=tiny_lm, progress=False)
    out = root / "topk"
    spec = ModelSpec(arch="topk-sae", d_in=64, d_sae=128, k=8, lr=1e-3)
    train(TrainConfig(store=store, out=out, model=spec, batch_size=256, tokens=256 * 15, heldout_fraction=0.25),
          progress=False)
    return store, out


def _hooked(tiny_lm) -> HookedSAETransformer:
    model = HookedSAETransformer(tiny_lm.model.cfg)
    model.load_state_dict(tiny_lm.model.state_dict())
    return model.eval()


def test_cfg_json_names_the_lm_hook_context_and_store_normalisation(run, tiny_lm):
    store_path, out = run
    store = ActivationStore.open(store_path)
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["architecture"] == f"topk-{store.spec.normalisation}"
    assert cfg["input_normalisation"] == store.spec.normalisation
    assert cfg["norm_eps"] == tiny_lm.model.cfg.eps
    assert meta["model_name"] == store.spec.model == "tiny-random:0"
    assert meta["hook_name"] == store.spec.hook == "blocks.1.hook_resid_post"
    assert meta["context_size"] == 32 and meta["prepend_bos"] is True
    assert meta["dataset_path"] == store.spec.corpus["name"]
    assert meta["model_from_pretrained_kwargs"] == {"fold_ln": False, "center_writing_weights": False,
                                                    "center_unembed": False}
    gain = load_file(out / "sae_weights.safetensors")["norm_gain"]
    assert torch.equal(gain, store.gain)
    assert (store.spec.normalisation == "rms") == bool((gain == 1).all())  # the tiny LM's gain is not ones


@torch.no_grad()
def test_sae_lens_splices_in_the_reconstruction_the_pipeline_reports(run, tiny_lm):
    store_path, out = run
    store = ActivationStore.open(store_path)
    rows = store.read(0, CONTEXTS * 32)
    tokens = torch.from_numpy(rows.tokens.astype(np.int64)).reshape(CONTEXTS, 32)
    # what the pipeline reports: the stored-space reconstruction, mapped back to raw space
    ours = reconstruct(load_model(out), rows.acts, None)[0]["sae"]
    ours_raw = ours / store.gain * rows.scale[:, None]

    sae = SAE.load_from_disk(str(out))
    lm = _hooked(tiny_lm)
    hook = sae.cfg.metadata.hook_name
    _, cache = lm.run_with_cache_with_saes(tokens, saes=[sae], names_filter=[f"{hook}.hook_sae_input",
                                                                           f"{hook}.hook_sae_output"])
    raw = cache[f"{hook}.hook_sae_input"].reshape(-1, store.d)
    spliced = cache[f"{hook}.hook_sae_output"].reshape(-1, store.d)
    assert torch.allclose(raw, store.raw(rows), rtol=1e-5, atol=1e-5)  # the same residuals
    assert torch.allclose(spliced, ours_raw, rtol=1e-4, atol=1e-5)
    assert (spliced - raw).norm() < 0.9 * raw.norm()  # a reconstruction, not a trivially equal pair of zeros
    # sae-lens's input is the stored row, eps included (the LM's 1e-5 for 1e-6 moves rows by ~5e-6)
    assert torch.allclose(sae.run_time_activation_norm_fn_in(raw), rows.acts, rtol=1e-6, atol=1e-6)

    # the failure this format prevents: the same weights read as a plain raw-residual SAE
    misread = stored_space_sae(sae)
    _, cache = lm.run_with_cache_with_saes(tokens, saes=[misread], names_filter=[f"{hook}.hook_sae_output"])
    assert not torch.allclose(cache[f"{hook}.hook_sae_output"].reshape(-1, store.d), ours_raw, rtol=1e-2, atol=1e-2)


def test_the_pipeline_loads_the_stored_space_sae_with_the_saved_tensors(run):
    _, out = run
    sae = load_sae_dir(out)
    assert sae.cfg.architecture() == "topk" and type(sae).__name__ == "TopKSAE"
    saved = load_file(out / "sae_weights.safetensors")
    state = sae.state_dict()
    assert state.keys() == saved.keys() - {"norm_gain"}
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_rqae_eval_reads_the_space_from_the_directory_alone(run, tmp_path):
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    store_path, out = run
    alone = tmp_path / "alone"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns("train.json"))
    assert not (alone / "train.json").exists()
    assert model_space(EvalConfig(store=store_path, model=alone)) == "normalised"
    with_run = evaluate(EvalConfig(store=store_path, model=out, rows="all"), progress=False)
    r = CliRunner().invoke(app, ["eval", "--store", str(store_path), "--model", str(alone), "--rows", "all",
                                 "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == with_run["metrics"]
    assert with_run["metrics"]["sae"]["fvu"] < 1  # better than the mean: read in the right space
    with pytest.raises(RQAEError, match="drop --space raw"):
        evaluate(EvalConfig(store=store_path, model=alone, rows="all", space="raw"), progress=False)


def test_an_sae_saved_before_this_format_evaluates_as_it_did(run, tmp_path):
    """A plain "topk" directory: normalised with train.json beside it, raw without."""
    store_path, out = run
    old = tmp_path / "old"
    load_sae_dir(out).save_model(str(old))  # the stored-space weights under "topk", as saves were
    assert json.loads((old / "cfg.json").read_text())["architecture"] == "topk"
    assert model_space(EvalConfig(store=store_path, model=old)) == "raw"
    shutil.copy(out / "train.json", old / "train.json")
    assert model_space(EvalConfig(store=store_path, model=old)) == "normalised"
    new = evaluate(EvalConfig(store=store_path, model=out, rows="all"), progress=False)
    assert evaluate(EvalConfig(store=store_path, model=old, rows="all"), progress=False)["metrics"] == new["metrics"]


def test_an_sae_of_one_normalisation_is_refused_on_a_store_of_the_other(run, tmp_path):
    store_path, out = run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    cfg = json.loads((other / "cfg.json").read_text())
    flip = {"final-norm": "rms", "rms": "final-norm"}[cfg["input_normalisation"]]
    cfg.update(input_normalisation=flip, architecture=f"topk-{flip}")
    (other / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(RQAEError, match=f"trained on {flip} rows"):
        evaluate(EvalConfig(store=store_path, model=other, rows="all"), progress=False)


def test_an_unknown_input_normalisation_is_an_error_not_a_guessed_space(run, tmp_path):
    store_path, out = run
    other = tmp_path / "unknown"
    shutil.copytree(out, other)
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**cfg, "input_normalisation": "layer-norm"}))
    with pytest.raises((RQAEError, ValueError), match="input_normalisation.*'layer-norm'"):  # the CLI: one error line
        evaluate(EvalConfig(store=store_path, model=other, rows="all"), progress=False)
    from rqae_pipeline.models.sae_format import recorded_normalisation

    with pytest.raises(RQAEError, match="input_normalisation 'layer-norm' is not one of final-norm, rms"):
        recorded_normalisation(other)  # what decides the space of directories saved before the architectures


def test_a_damaged_sae_directory_is_one_error_line(run, tmp_path):
    """A cfg.json cut short, lacking a field (a TopK SAE's k too) or naming an architecture sae-lens does not know,
    or weights gone: `rqae eval` says so in one line naming the file (sae-lens's loader raised
    JSONDecodeError, KeyError or TypeError from deep inside)."""
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    store_path, out = run
    text = (out / "cfg.json").read_text()
    cfg = json.loads(text)
    damages = {"cut-short": ("cfg.json", text[:200], "cfg.json cannot be read as JSON"),
               "no-d_in": ("cfg.json", json.dumps({k: v for k, v in cfg.items() if k != "d_in"}),
                           "cfg.json: d_in is missing or not of type int"),
               "no-k": ("cfg.json", json.dumps({k: v for k, v in cfg.items() if k != "k"}),
                        "cfg.json: k is missing or not of type int"),  # sae-lens would build its default k
               "unknown": ("cfg.json", json.dumps({**cfg, "architecture": "nonsense"}),
                           "cfg.json: architecture 'nonsense' is not one sae-lens knows"),
               "no-weights": ("sae_weights.safetensors", None, "sae-lens cannot load the SAE in")}
    for name, (file, damaged, needle) in damages.items():
        d = tmp_path / name
        shutil.copytree(out, d)
        if damaged is None:
            (d / file).unlink()
        else:
            (d / file).write_text(damaged)
        r = CliRunner().invoke(app, ["eval", "--store", str(store_path), "--model", str(d), "--rows", "all"])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_sae_lens_alone_refuses_the_directory_instead_of_misreading_it(run, monkeypatch):
    from sae_lens.registry import SAE_CLASS_REGISTRY

    _, out = run
    name = json.loads((out / "cfg.json").read_text())["architecture"]
    monkeypatch.delitem(SAE_CLASS_REGISTRY, name)  # sae-lens as it is without rqae_pipeline imported
    with pytest.raises(KeyError, match=name):
        SAE.load_from_disk(str(out))
