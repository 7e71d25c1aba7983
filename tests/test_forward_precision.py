"""The harvest forward's precision (--model-dtype, TF32) and its error against a float32
forward, recorded in the manifest as `forward_error` (rqae_pipeline/forward.py)."""

import json

import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.forward import FORWARD_ERROR_CONTEXTS, cuda_tf32
from rqae_pipeline.harvest import harvest
from rqae_pipeline.lm import load_lm, normalise, resolve_model_dtype
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.summary import forward_fvu

from helpers import TINY, run_rqae, tiny_config, tree_digest

CLI_ARGS = ["--model", TINY, "--layer", "1", "--context-length", "32", "--batch-size", "2",
            "--contexts-per-shard", "4", "--contexts-per-chunk", "2"]


@pytest.fixture(scope="module")
def bf16_lm():
    return load_lm(TINY, device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16_store(bf16_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "s.zarr"
    harvest(tiny_config(out, tokens=1024, model_dtype="bfloat16"), lm=bf16_lm, progress=False)
    return out


def independent_fvu(store: ActivationStore, fp32_lm, bf16_lm) -> float:
    """FVU of a bfloat16 forward of the store's first contexts against a float32 one, in numpy."""
    R = store.spec.rows_per_context
    tokens = torch.from_numpy(store.column("tokens", slice(0, FORWARD_ERROR_CONTEXTS * R)).astype(np.int64))
    hook, eps = store.spec.hook, float(fp32_lm.model.cfg.eps)

    def normalised(lm):
        _, cache = lm.model.run_with_cache(tokens.reshape(FORWARD_ERROR_CONTEXTS, R), names_filter=[hook],
                                           stop_at_layer=store.spec.layer + 1)
        acts, _ = normalise(cache[hook], store.gain, eps, store.spec.normalisation)
        return acts.reshape(-1, store.d).double().numpy()

    ref, low = normalised(fp32_lm), normalised(bf16_lm)
    return float(((ref - low) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())


def test_a_bf16_harvest_records_its_forward_error_against_float32(bf16_store, tiny_lm, bf16_lm):
    store = ActivationStore.open(bf16_store)
    e = store.manifest["forward_error"]
    assert (e["model_dtype"], e["tf32"], e["reference"], e["contexts"]) == ("bfloat16", False, "float32", 8)
    assert e["n"] == 8 * store.spec.rows_per_context and len(e["sum"]) == store.d
    fvu = forward_fvu(store.manifest)
    assert 0 < fvu < 1e-2  # bf16 keeps ~3 significant digits: small, but not nothing
    assert fvu == pytest.approx(independent_fvu(store, tiny_lm, bf16_lm), rel=1e-6)


def test_a_float32_harvest_records_its_precision_and_no_error(tmp_path, tiny_lm):
    out = tmp_path / "fp32.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    manifest = ActivationStore.open(out).manifest
    assert manifest["forward_error"] == {"model_dtype": "float32", "tf32": False}
    assert forward_fvu(manifest) is None


def test_resume_keeps_the_recorded_error_and_writes_the_one_run_store(tmp_path, bf16_store, bf16_lm):
    out = tmp_path / "resumed.zarr"
    harvest(tiny_config(out, tokens=512, model_dtype="bfloat16"), lm=bf16_lm, progress=False)
    harvest(tiny_config(out, tokens=1024, model_dtype="bfloat16", resume=True), lm=bf16_lm, progress=False)
    # measured again, the error would come from contexts 16..23, not the store's first 8
    resumed, one_run = ActivationStore.open(out), ActivationStore.open(bf16_store)
    assert resumed.manifest["forward_error"] == one_run.manifest["forward_error"]
    assert resumed.manifest["storage_error"] == one_run.manifest["storage_error"]


def test_resume_with_another_model_dtype_is_one_error_line_and_changes_nothing(bf16_store):
    before = tree_digest(bf16_store)
    r = run_rqae("harvest", *CLI_ARGS, "--tokens", "2048", "--out", str(bf16_store), "--resume",
                 "--model-dtype", "float32")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "bfloat16 (TF32 off)" in lines[0] and "float32 (TF32 off)" in lines[0]
    assert tree_digest(bf16_store) == before


def test_a_store_from_before_forward_error_is_held_to_its_load_dtype(tmp_path, tiny_lm, bf16_lm):
    out = tmp_path / "old.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["rqae"]["forward_error"]  # as a store written before it was recorded
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(RQAEError, match="harvested with a float32 .TF32 off. forward, not bfloat16"):
        harvest(tiny_config(out, tokens=512, model_dtype="bfloat16", resume=True), lm=bf16_lm, progress=False)
    harvest(tiny_config(out, tokens=512, resume=True), lm=tiny_lm, progress=False)
    assert ActivationStore.open(out).manifest["forward_error"] == {"model_dtype": "float32", "tf32": False}


def test_inspect_prints_the_forward_fvu(bf16_store):
    r = run_rqae("inspect", str(bf16_store))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("forward FVU"))
    fvu = forward_fvu(ActivationStore.open(bf16_store).manifest)
    assert f"{fvu:.3e}" in line and "bfloat16" in line and "first 8 contexts" in line


def test_auto_model_dtype_is_bf16_only_on_a_cuda_device_with_native_bf16():
    assert resolve_model_dtype("auto", "cuda", True) == "bfloat16"
    assert resolve_model_dtype("auto", "cuda", False) == "float32"
    assert resolve_model_dtype("auto", "cpu", True) == "float32"
    assert resolve_model_dtype("float16", "cuda", True) == "float16"
    assert resolve_model_dtype("float32", "cuda", True) == "float32"


def test_an_unknown_model_dtype_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(RQAEError, match="unknown --model-dtype 'float8'"):
        tiny_config(tmp_path / "s.zarr", model_dtype="float8")
    assert not (tmp_path / "s.zarr").exists()


def test_tf32_switch_is_restored_after_the_forward():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy allow_tf32 flag")
    before = matmul.fp32_precision
    with cuda_tf32(True):
        assert matmul.fp32_precision == "tf32"
        with cuda_tf32(False):  # the float32 reference inside a TF32 harvest
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
