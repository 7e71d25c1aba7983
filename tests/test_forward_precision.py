"""The harvest forward's precision (--model-dtype, TF32) and its error against a float32
forward, recorded in the manifest as `forward_error` (rqae_pipeline/forward.py)."""

import json

import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.forward import FORWARD_ERROR_CONTEXTS, cuda_tf32, hook_residuals
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


def forward_calls(lm, cfg) -> int:
    """How many forward passes of `lm.model` a harvest with `cfg` runs."""
    calls = []
    handle = lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        harvest(cfg, lm=lm, progress=False)
    finally:
        handle.remove()
    return len(calls)


def test_the_measured_first_batch_is_not_run_again(tmp_path, tiny_lm, bf16_lm):
    # batches of 8 contexts: the first batch is exactly the contexts the error is measured on
    kw = dict(tokens=1024, batch_contexts=8, contexts_per_shard=8)
    eager_fp32 = forward_calls(tiny_lm, tiny_config(tmp_path / "fp32.zarr", **kw))
    bf16 = forward_calls(bf16_lm, tiny_config(tmp_path / "bf16.zarr", model_dtype="bfloat16", **kw))
    store = ActivationStore.open(tmp_path / "bf16.zarr")
    assert store.manifest["forward_error"]["contexts"] == 8 and store.n_contexts == 32
    assert eager_fp32 == 4 and bf16 == 4  # the reference forward runs on a float32 copy, not counted
    # a first batch larger than 8 contexts is measured whole
    forward_calls(bf16_lm, tiny_config(tmp_path / "b16.zarr", model_dtype="bfloat16", tokens=1024,
                                       batch_contexts=16, contexts_per_shard=16))
    assert ActivationStore.open(tmp_path / "b16.zarr").manifest["forward_error"]["contexts"] == 16


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


# --------------------------------------------------------------------------- --compile


@pytest.fixture(scope="module")
def compiled_store(tiny_lm, tmp_path_factory):
    """990 tokens harvested through torch.compile: 31 contexts of 32, so the last batch of 2
    contexts is short (padded)."""
    out = tmp_path_factory.mktemp("compiled") / "s.zarr"
    harvest(tiny_config(out, tokens=990, compile=True), lm=tiny_lm, progress=False)
    return out


def test_a_compiled_harvest_stores_the_eager_rows_and_records_its_error(compiled_store, tiny_lm, tmp_path):
    eager = tmp_path / "eager.zarr"
    harvest(tiny_config(eager, tokens=990), lm=tiny_lm, progress=False)
    got, want = ActivationStore.open(compiled_store), ActivationStore.open(eager)
    assert got.n_tokens == want.n_tokens == 992
    ours, theirs = got.read_encoded(0, 992), want.read_encoded(0, 992)
    for name in ("tokens", "seq", "pos", "flags"):
        np.testing.assert_array_equal(ours[name], theirs[name])
    # fused kernels round differently: equal to the last bits of the float16 rows
    np.testing.assert_allclose(ours["acts"].astype(np.float32), theirs["acts"].astype(np.float32), atol=4e-3)
    entry = got.manifest["forward_error"]
    assert entry["compiled"] is True and entry["model_dtype"] == "float32" and entry["reference"] == "float32"
    assert 0 < forward_fvu(got.manifest) < 1e-8


def test_a_resumed_compiled_harvest_writes_the_one_run_store(compiled_store, tiny_lm, tmp_path):
    """Every batch goes through one static shape (a short one padded), so a resume after a
    short final batch (9 contexts), whose batches then start at other contexts than the one
    run's, computes every row as the one run did."""
    out = tmp_path / "resumed.zarr"
    harvest(tiny_config(out, tokens=270, compile=True), lm=tiny_lm, progress=False)
    assert ActivationStore.open(out).n_contexts == 9
    harvest(tiny_config(out, tokens=990, compile=True, resume=True), lm=tiny_lm, progress=False)
    ours, theirs = (ActivationStore.open(p).read_encoded(0, 992) for p in (out, compiled_store))
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_resume_without_compile_is_one_error_line_and_changes_nothing(compiled_store):
    before = tree_digest(compiled_store)
    r = run_rqae("harvest", *CLI_ARGS, "--tokens", "2048", "--out", str(compiled_store), "--resume")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "float32 (TF32 off, torch.compile)" in lines[0] and "--compile" in lines[0]
    assert tree_digest(compiled_store) == before


def test_compile_with_a_hook_inside_a_block_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "s.zarr"
    r = run_rqae("harvest", *[a if a != "1" else "blocks.1.hook_mlp_out" for a in CLI_ARGS], "--tokens", "256",
                 "--out", str(out), "--compile")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "hook_mlp_out" in lines[0], r.stderr
    assert not out.exists()


def test_the_compiled_forward_runs_one_batch_shape_whatever_the_number_of_contexts(tiny_lm):
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from rqae_pipeline.forward import hook_residuals

    lm, hook = replace(tiny_lm, compiled_batch=2), "blocks.1.hook_resid_post"
    tokens = torch.randint(0, tiny_lm.model.cfg.d_vocab, (5, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = hook_residuals(tiny_lm, tokens, hook, 1)
        hook_residuals(lm, tokens[:2], hook, 1)  # compiled here (or by an earlier test) for 2 contexts
        graphs = counters["stats"]["unique_graphs"]
        for n in (1, 3, 5):  # a short batch, and batches of 2 and a short one
            torch.testing.assert_close(hook_residuals(lm, tokens[:n], hook, 1), eager[:n], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for the other sizes


@pytest.mark.parametrize("name", ["hook_resid_pre", "hook_resid_post", "hook_mlp_out"])
def test_every_hook_reads_what_run_with_cache_records(tiny_lm, name):
    # residual hooks are read from the forward's own output (no hook added), others from a cache
    tokens = torch.randint(0, tiny_lm.model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for layer in range(tiny_lm.n_layers):
            hook = f"blocks.{layer}.{name}"
            _, cache = tiny_lm.model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
            assert torch.equal(hook_residuals(tiny_lm, tokens, hook, layer), cache[hook])
