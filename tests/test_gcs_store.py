"""Stores at gs:// URLs, against a GCS JSON-API server (gcp-storage-emulator, in this
process) through the real CLI and gcsfs: the endpoint reaches the subprocesses only through
STORAGE_EMULATOR_HOST, the variable gcsfs itself reads, so no test-only code is in the package.

The emulator does not enforce `ifGenerationMatch=0`, the precondition gcsfs sends for an
exclusive create (the store lock's), so these tests check the data path: what a harvest
killed with -9 and resumed leaves in the bucket, and training and evaluation read from it.
Lock exclusivity on object stores is tested against S3 (test_object_store.py).
"""

from __future__ import annotations

import json
import os

import pytest
from test_object_store import (
    HARVEST_ARGS,
    TOKENS,
    TRAIN_ARGS,
    _free_port,
    _metrics,
    assert_same_arrays,
    committed_tokens,
    harvest_killed_after_a_commit,
    invoke,
    local_reference,  # noqa: F401  (the fixture: the same harvest on a local path)
)

from rqae_pipeline.store import ActivationStore

from helpers import REPO, run_rqae

pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "rqae-gcs-test"


@pytest.fixture(scope="module")
def gcs():
    """An in-memory GCS emulator on a free port with one bucket, and the environment that
    points gcsfs (here and in every `rqae` subprocess) at it."""
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # gcsfs's probe for zonal / hierarchical buckets uses a gRPC API the emulator lacks (each
    # probe waits 60 s); off, gcsfs is the plain JSON-API filesystem. Read when gcsfs is imported.
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import gcsfs

    yield gcsfs.GCSFileSystem(skip_instance_cache=True)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def test_harvest_kill_9_resume_train_and_eval_on_gcs_equal_the_local_runs(gcs, local_reference, tmp_path):  # noqa: F811
    key = f"{BUCKET}/killed.zarr"
    harvest_killed_after_a_commit(f"gs://{key}", lambda: committed_tokens(gcs, key), tmp_path)
    assert 0 < committed_tokens(gcs, key) < TOKENS
    r = run_rqae("harvest", *HARVEST_ARGS, "--out", f"gs://{key}", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"{TOKENS:,} tokens committed" in r.stdout
    assert_same_arrays(f"gs://{key}", local_reference)
    store = ActivationStore.open(f"gs://{key}")
    assert store.group["acts"].shape[0] == store.n_tokens  # the interrupted tail was dropped
    assert not (REPO / "gs:").exists()
    assert invoke("verify", f"gs://{key}", "--no-progress").exit_code == 0

    results = {}
    for name, where in {"bucket": f"gs://{key}", "local": str(local_reference)}.items():
        run = tmp_path / name
        r = invoke("train", "--store", where, "--out", str(run), *TRAIN_ARGS)
        assert r.exit_code == 0, r.output
        r = invoke("eval", "--store", where, "--model", str(run), "--out", str(tmp_path / f"{name}.json"))
        assert r.exit_code == 0, r.output
        weights = sorted(p.name for p in run.iterdir() if p.suffix == ".safetensors")
        results[name] = ({w: (run / w).read_bytes() for w in weights},
                         _metrics(json.loads((tmp_path / f"{name}.json").read_text())))
    assert results["bucket"][0] and results["bucket"] == results["local"]  # identical weights and metrics
