"""The harvest and evaluation on a CUDA device: the automatic bf16 forward with TF32, workers
spread over the GPUs, `eval --device cuda`. Skipped where torch sees no GPU (CI has none);
on a GPU machine: `python -m pytest -q -n 0 tests/test_gpu.py`."""

import numpy as np
import pytest
import torch

from rqae_pipeline import forward
from rqae_pipeline.evaluate import EvalConfig, evaluate
from rqae_pipeline.harvest import harvest
from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel
from rqae_pipeline.lm import cuda_ampere_or_newer
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.summary import forward_fvu

from helpers import store_files, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

TOKENS = 2048


def rows(path, column):
    store = ActivationStore.open(path)
    return store.column(column, slice(0, store.n_tokens))


def acts_fvu(reference, other) -> float:
    x = ActivationStore.open(reference).read(0, TOKENS).acts.double()
    y = ActivationStore.open(other).read(0, TOKENS).acts.double()
    return float(((x - y) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.fixture(scope="module")
def stores(tiny_lm, tmp_path_factory):
    """The same harvest on the CPU in float32 and on cuda in the automatic precision."""
    root = tmp_path_factory.mktemp("gpu")
    harvest(tiny_config(root / "cpu.zarr", tokens=TOKENS, dtype="float32"), lm=tiny_lm, progress=False)
    harvest(tiny_config(root / "cuda.zarr", tokens=TOKENS, dtype="float32", device="cuda"), progress=False)
    return root


def test_a_cuda_harvest_runs_bf16_with_tf32_records_its_error_and_stays_near_the_cpu_store(stores):
    device = torch.device("cuda")
    bf16 = torch.cuda.is_bf16_supported() and cuda_ampere_or_newer(device)
    error = ActivationStore.open(stores / "cuda.zarr").manifest["forward_error"]
    assert error["model_dtype"] == ("bfloat16" if bf16 else "float32")
    assert error["tf32"] == (error["model_dtype"] == "float32" and cuda_ampere_or_newer(device))
    for column in ("tokens", "seq", "pos"):  # the same contexts, whatever the device
        assert np.array_equal(rows(stores / "cpu.zarr", column), rows(stores / "cuda.zarr", column)), column
    drift = acts_fvu(stores / "cpu.zarr", stores / "cuda.zarr")
    assert drift < 1e-2, drift
    recorded = forward_fvu(ActivationStore.open(stores / "cuda.zarr").manifest)
    if error["model_dtype"] != "float32" or error["tf32"]:
        assert recorded is not None and 0 < recorded < 1e-2, recorded


def test_two_workers_on_the_gpus_write_the_single_process_cuda_store(stores, tmp_path):
    """Worker i runs on cuda:(i mod G); with one settings the store is the single process's."""
    from dask.distributed import Client

    from rqae_pipeline.tasks import local_cluster

    out = tmp_path / "two.zarr"
    with local_cluster(2) as cluster, Client(cluster) as client:
        harvest_parallel(tiny_config(out, tokens=TOKENS, dtype="float32", device="cuda"), DaskConfig(workers=2),
                         client=client, progress=False)
        devices = client.run(lambda: sorted({key[1] for key in forward._MODELS}))
    gpus = torch.cuda.device_count()
    assert sorted(d for per_worker in devices.values() for d in per_worker) == sorted(
        f"cuda:{i % gpus}" for i in range(2))
    got, want = store_files(out), store_files(stores / "cuda.zarr")
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


def test_eval_on_cuda_equals_the_cpu(trained):
    store, runs = trained
    for arch in ("rqae", "topk-sae"):
        cpu = evaluate(EvalConfig(store=store, model=runs[arch], device="cpu"), progress=False)["metrics"]
        cuda = evaluate(EvalConfig(store=store, model=runs[arch], device="cuda"), progress=False)["metrics"]
        assert sorted(cpu) == sorted(cuda)
        for name in cpu:
            assert cuda[name]["fvu"] == pytest.approx(cpu[name]["fvu"], rel=1e-3, abs=1e-5), (arch, name)
