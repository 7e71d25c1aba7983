import os

import pytest

# No test may reach the hub: loading code that would is exercised on local models/data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist, each worker's torch (and each command a test starts) gets its share of the
# cores: every worker running a team of all of them oversubscribes the machine, and an OpenMP
# team spin-waits for a member that is descheduled. Set before torch is imported (commands
# inherit it); tests that compare bytes pin their own thread counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def fork_server():
    """The server the tests' `rqae` commands are forked from (helpers.run_rqae), started first."""
    from helpers import start_fork_server

    start_fork_server()


@pytest.fixture(scope="session")
def tiny_lm():
    from rqae_pipeline.lm import load_lm

    return load_lm("tiny-random:0", device="cpu")


@pytest.fixture(scope="session")
def gemma_lm():
    """The real offline Gemma-3-270M (converted from the packaged GGUF once, then cached)."""
    from rqae_pipeline.lm import OFFLINE_GEMMA, load_lm

    return load_lm(OFFLINE_GEMMA, device="cpu")


@pytest.fixture(scope="session")
def trained(tiny_lm, tmp_path_factory):
    """A tiny store (64 contexts, 8 shards) with an 8-layer RQAE and a TopK SAE trained on it
    (a quarter of the contexts held out)."""
    from rqae_pipeline.harvest import harvest
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.train import TrainConfig, train

    from helpers import tiny_config

    root = tmp_path_factory.mktemp("eval")
    store = root / "s.zarr"
    harvest(tiny_config(store, tokens=8192, contexts_per_shard=8), lm=tiny_lm, progress=False)
    runs = {}
    for arch, spec in {"rqae": ModelSpec(arch="rqae", d_in=64, n_q=8, lr=3e-3),
                       "topk-sae": ModelSpec(arch="topk-sae", d_in=64, d_sae=128, k=8, lr=1e-3)}.items():
        runs[arch] = root / arch
        train(TrainConfig(store=store, out=runs[arch], model=spec, batch_size=256, tokens=256 * 20,
                          heldout_fraction=0.25), progress=False)
    return store, runs
