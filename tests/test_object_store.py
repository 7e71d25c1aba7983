"""Stores at fsspec URLs, against a real S3-protocol server (moto's threaded server) through
the real CLI and s3fs: the endpoint and dummy credentials reach the subprocesses only through
the AWS environment variables botocore reads, so no test-only code is in the package."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rqae_pipeline.cli import app
from rqae_pipeline.codes import open_codes
from rqae_pipeline.harvest import harvest
from rqae_pipeline.store import ActivationStore, StoreLock

from helpers import REPO, TINY, run_rqae, start_rqae, store_arrays, tiny_config, tree_digest, wait_until

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "rqae-test"
# 192 contexts of 32 tokens in 12 shards: a kill after the first commit lands well before the end.
# A bucket's cost is per object (moto serves each in ~ms): few shards keep these tests short.
TOKENS, CONTEXTS_PER_SHARD = 6144, 16
HARVEST_ARGS = ["--model", TINY, "--layer", "1", "--context-length", "32", "--batch-size", "2",
                "--contexts-per-shard", str(CONTEXTS_PER_SHARD), "--contexts-per-chunk", "2", "--tokens", str(TOKENS)]
TRAIN_ARGS = ["--n-q", "4", "--batch-size", "256", "--tokens", "4096", "--heldout", "0.25",
              "--checkpoint-every", "1000", "--eval-every", "1000", "--device", "cpu"]


def invoke(*args: str):
    """The CLI in this process (the same app and error handling as the console script)."""
    return CliRunner().invoke(app, list(args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port with one bucket; the environment points botocore (in
    this process and in every `rqae` subprocess) at it with dummy credentials."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture(scope="module")
def local_reference(tiny_lm, tmp_path_factory):
    """The same harvest on a local path: what every bucket store must equal."""
    out = tmp_path_factory.mktemp("local") / "ref.zarr"
    harvest(tiny_config(out, tokens=TOKENS, contexts_per_shard=CONTEXTS_PER_SHARD), lm=tiny_lm, progress=False)
    return out


@pytest.fixture(scope="module")
def reading_store(tiny_lm, tmp_path_factory):
    """The same tokens in 6 shards of 32 contexts: what the reading commands take."""
    out = tmp_path_factory.mktemp("reading") / "ref.zarr"
    harvest(tiny_config(out, tokens=TOKENS, contexts_per_shard=32, contexts_per_chunk=16), lm=tiny_lm, progress=False)
    return out


def committed_tokens(fs, key: str) -> int:
    try:
        return json.loads(fs.cat_file(f"{key}/zarr.json"))["attributes"]["rqae"]["committed"]["tokens"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def assert_same_arrays(url, local):
    got, want = store_arrays(url), store_arrays(local)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape and np.array_equal(got[name], want[name]), name


def harvest_killed_after_a_commit(url: str, committed, tmp_path):
    """`rqae harvest --out url` killed with SIGKILL once `committed()` counts a committed
    token (no cleanup runs); the dead process."""
    err = tmp_path / "harvest.stderr"
    proc = start_rqae("harvest", *HARVEST_ARGS, "--out", url, stderr=err)
    try:
        wait_until(lambda: committed() >= 1, proc, err)
    finally:
        proc.kill()
        proc.wait()
    return proc


def test_harvest_kill_9_and_resume_on_the_bucket_equal_the_local_store(s3, local_reference, tmp_path):
    key = f"{BUCKET}/killed.zarr"
    proc = harvest_killed_after_a_commit(f"s3://{key}", lambda: committed_tokens(s3, key), tmp_path)
    killed_at = committed_tokens(s3, key)
    assert 0 < killed_at < TOKENS
    # The arrays were sized once, to the whole target, not grown shard by shard (each growth
    # rewrites every array's metadata object); the resume cuts the reserve back.
    assert ActivationStore.open(f"s3://{key}").group["acts"].shape[0] == TOKENS
    assert StoreLock(f"s3://{key}").read()["pid"] == proc.pid  # the dead writer's lock object is left...
    r = run_rqae("harvest", *HARVEST_ARGS, "--out", f"s3://{key}", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"{TOKENS:,} tokens committed" in r.stdout
    assert StoreLock(f"s3://{key}").read() is None  # ...taken over as stale, then released
    assert_same_arrays(f"s3://{key}", local_reference)
    store = ActivationStore.open(f"s3://{key}")
    assert store.group["acts"].shape[0] == store.n_tokens  # the interrupted tail was dropped
    assert not (REPO / "s3:").exists()  # the old bug: Path("s3://...") wrote a local folder "s3:"

    r = invoke("verify", f"s3://{key}", "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("inspect", f"s3://{key}")
    assert r.exit_code == 0 and f"s3://{key}" in r.stdout


def test_train_and_eval_from_the_bucket_equal_the_local_run(s3, reading_store, tmp_path):
    url = f"s3://{BUCKET}/train.zarr"
    s3.put(str(reading_store), f"{BUCKET}/train.zarr", recursive=True)
    results, codes = {}, {}
    for name, store in {"bucket": url, "local": str(reading_store)}.items():
        run = tmp_path / name
        r = invoke("train", "--store", store, "--out", str(run), *TRAIN_ARGS)
        assert r.exit_code == 0, r.output
        r = invoke("eval", "--store", store, "--model", str(run), "--out", str(tmp_path / f"{name}.json"))
        assert r.exit_code == 0, r.output
        r = invoke("encode", "--store", store, "--model", str(run), "--device", "cpu")
        assert r.exit_code == 0, r.output
        codes[name] = r.stdout.split(": ")[0]  # "<codes store>: N rows x n_q layers of codes"
        train = json.loads((run / "train.json").read_text())
        weights = sorted(p.name for p in run.iterdir() if p.suffix == ".safetensors")
        results[name] = (train["heldout_metrics"], {w: (run / w).read_bytes() for w in weights},
                         _metrics(json.loads((tmp_path / f"{name}.json").read_text())))
    assert results["bucket"][1] and results["bucket"][1] == results["local"][1]  # identical weights
    assert results["bucket"][0] == results["local"][0]
    assert results["bucket"][2] == results["local"][2]
    # `rqae encode` writes the codes beside the store: in the bucket for the bucket's store
    assert codes["bucket"].startswith(f"s3://{BUCKET}/train.codes/bucket-")
    bucket_codes, local_codes = (open_codes(codes[n]).group["codes"][:] for n in ("bucket", "local"))
    assert bucket_codes.shape[0] == TOKENS and np.array_equal(bucket_codes, local_codes)


def test_a_bucket_reads_shard_checks_are_made_at_once_and_name_the_missing_shard(s3, local_reference, monkeypatch):
    """Before a read every shard it covers is checked (zarr would read a missing one as
    zeros); from a bucket the HEAD requests go out together, not one round trip each."""
    from rqae_pipeline import integrity, urls

    key = f"{BUCKET}/checks.zarr"
    s3.put(str(local_reference), key, recursive=True)
    s3.rm(f"{key}/acts/c/5/0")
    url = f"s3://{key}"
    arr = ActivationStore.open(url).group["acts"]
    fs, in_flight, most = urls.filesystem(url)[0], [0], [0]
    real_info = fs._info

    async def counting_info(*args, **kw):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            return await real_info(*args, **kw)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(fs, "_info", counting_info)
    keys = [integrity.shard_key(arr, "acts", i) for i in range(8)]
    present = [size is not None for size in urls.file_sizes(url, keys)]
    assert present == [urls.is_file(url, k) for k in keys] == [i != 5 for i in range(8)]
    assert most[0] == len(keys)  # every request in flight at once
    most[0] = 0
    assert integrity.listing_pages(arr) == 0  # so 4 shards are asked one request each (more are listed)
    assert integrity.missing_shards(url, arr, "acts", [3, 4, 5, 6]) == ["acts/c/5/0"]
    assert most[0] == 4
    flags = ActivationStore.open(url).group["flags"]
    assert integrity.missing_shards(url, flags, "flags", range(8)) == []  # 8 shards: one listing, cached
    s3.rm(f"{key}/flags/c/6")  # gone after that listing: the check must not answer from it
    assert integrity.missing_shards(url, flags, "flags", [6, 7]) == ["flags/c/6"]


def _metrics(evaluation: dict) -> dict:
    """The evaluation without the fields naming where the store and model were."""
    return {k: v for k, v in evaluation.items() if k not in ("store", "model", "path", "store_path")}


@pytest.mark.parametrize("out, message", [
    ("nope://bucket/x.zarr", "unknown URL scheme nope://"),
    ("s3:/rqae-test/x.zarr", "lost its '//'"),
    ("s3://no-such-bucket/x.zarr", "cannot write to s3://no-such-bucket/x.zarr"),
    # no bucket or path: was the local folder "memory:" / "s3:", exit 0
    ("memory://", "memory:// names no bucket or path"),
    ("s3://", "s3:// names no bucket or path"),
    ("s3:///", "names no bucket or path"),
])
def test_bad_store_urls_are_one_error_line_and_write_nothing(s3, tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)  # a relative "s3:" folder would land here
    before_bucket = sorted(s3.find(BUCKET))
    before_cwd = tree_digest(tmp_path)
    r = invoke("harvest", *HARVEST_ARGS, "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
    assert sorted(s3.find(BUCKET)) == before_bucket and tree_digest(tmp_path) == before_cwd
    assert not s3.exists("no-such-bucket")


def test_a_location_is_the_place_the_user_meant(monkeypatch, tmp_path):
    """file:// URLs in their usual forms are local paths (not "./~/x" or "localhost/x"), a
    scheme in capitals is the scheme (fsspec knows lower case only), and ~ is expanded."""
    from rqae_pipeline.urls import location

    monkeypatch.setenv("HOME", str(tmp_path))
    assert location("file:///data/x.zarr") == Path("/data/x.zarr")
    assert location("file://localhost/data/x.zarr") == Path("/data/x.zarr")
    assert location("file://~/x.zarr") == location("~/x.zarr") == tmp_path / "x.zarr"
    assert location("file:///data/a%20b.zarr") == Path("/data/a b.zarr")
    assert location("MEMORY://b/x.zarr/") == "memory://b/x.zarr"


def test_a_local_store_whose_name_holds_a_double_colon_is_that_directory(tmp_path, tiny_lm):
    from rqae_pipeline.harvest import harvest

    from helpers import tiny_config

    out = tmp_path / "run::a.zarr"  # zarr reads a string with "::" as a chained fsspec URL
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    assert ActivationStore.open(str(out)).n_tokens == 256 and (out / "zarr.json").is_file()


def test_the_cache_directory_is_absolute_whatever_the_environment(monkeypatch, tmp_path):
    from rqae_pipeline.paths import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RQAE_CACHE", raising=False)
    for xdg in ("", "relative/cache"):  # the XDG spec: ignore both (a relative one lands in the cwd)
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert cache_root() == tmp_path / ".cache" / "rqae_pipeline"
    monkeypatch.setenv("RQAE_CACHE", "~/models")
    assert cache_root() == tmp_path / "models"


# --------------------------------------------------------------------------- every reading command


@pytest.fixture(scope="module")
def analysis(s3, reading_store, tmp_path_factory):
    """The reference store copied into the bucket, an RQAE trained on it (held-out contexts
    for compare-gemmascope) and a raw-space sae-lens SAE: the inputs every reading command takes."""
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.train import TrainConfig, train

    from helpers import raw_space_sae

    root = tmp_path_factory.mktemp("analysis")
    s3.put(str(reading_store), f"{BUCKET}/analysis/{reading_store.name}", recursive=True)  # same name
    rqae = root / "rqae"
    train(TrainConfig(store=reading_store, out=rqae, model=ModelSpec(arch="rqae", d_in=64, n_q=4, lr=3e-3),
                      batch_size=256, tokens=256 * 8, heldout_fraction=0.25), progress=False)
    sae = raw_space_sae(reading_store, root / "sae", ActivationStore.open(reading_store).spec.hook, d_sae=32)
    return {"url": f"s3://{BUCKET}/analysis/{reading_store.name}", "local": str(reading_store), "rqae": rqae,
            "sae": sae}


def _same_on_both(analysis, tmp_path, command, *args, outputs=("out.json",)):
    """`command` run on the bucket's store and on the local copy: (stdout, {output: text}) of each,
    the store's location replaced by STORE (its folder, where the codes are, by DIR) and creation
    times by TIME and durations by 0 so the two can be compared."""
    def same_form(text: str, name: str, run) -> str:
        text = text.replace(analysis[name], "STORE").replace(analysis[name].rsplit("/", 1)[0], "DIR")
        text = text.replace(str(run), "RUN")
        text = re.sub(r'("[a-z_]*seconds?[a-z_]*"): [-+.e0-9]+', r"\1: 0", text)
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", text)

    runs = {}
    for name in ("url", "local"):
        run = tmp_path / name
        run.mkdir(parents=True)
        r = invoke(command, "--store", analysis[name], *(str(a).replace("RUN", str(run)) for a in args))
        assert r.exit_code == 0, (name, r.output, r.exc_info and "".join(traceback.format_exception(*r.exc_info)))
        runs[name] = (same_form(r.stdout, name, run), {o: same_form((run / o).read_text(), name, run) for o in outputs})
    for got, want in zip(runs["url"][1].values(), runs["local"][1].values()):
        assert got == want, next((g, w) for g, w in zip(got.splitlines(), want.splitlines()) if g != w)
    assert runs["url"] == runs["local"]
    return runs["url"]


def test_search_and_features_on_the_bucket_equal_the_local_run(s3, analysis, tmp_path):
    m = analysis["rqae"]
    stdout, files = _same_on_both(analysis, tmp_path / "search", "search", "--model", m, "--address", "20:7",
                                  "--top-k", "4", "--out", "RUN/out.json")
    assert len(json.loads(files["out.json"])["hits"]) == 4
    # the codes each search encoded first lie beside its store: for the bucket's, in the bucket
    assert s3.find(f"{BUCKET}/analysis/ref.codes")
    _, files = _same_on_both(analysis, tmp_path / "features", "features", "--model", m, "--address", "20:7",
                             "--address", "31:4", "--query", "an object", "--split", "0,1", "--out", "RUN/out.json")
    assert [f["name"] for f in json.loads(files["out.json"])["features"]] == ["all", "0,1"]


def test_steer_and_dashboard_on_the_bucket_equal_the_local_run(analysis, tmp_path):
    m = analysis["rqae"]
    _, files = _same_on_both(analysis, tmp_path / "steer", "steer", "--model", m, "--prompt", "The value of",
                             "--address", "20:7", "--address", "31:4", "--strength", "1", "--top-k-layers", "2",
                             "--max-new-tokens", "4", "--samples", "2", "--temperature", "0", "--device", "cpu",
                             "--word", "the", "--out", "RUN/out.json")
    assert json.loads(files["out.json"])["generations"][0]["steered"]
    _, files = _same_on_both(analysis, tmp_path / "dash", "dashboard", "--model", m, "--out", "RUN/d",
                             "--seeds", "3", "--examples", "3", "--query", "The value", "--top-k", "3",
                             outputs=("d/index.html", "d/features.json"))
    assert json.loads(files["d/features.json"])["features"]


def test_compare_gemmascope_on_the_bucket_equals_the_local_run(analysis, tmp_path):
    _, files = _same_on_both(analysis, tmp_path, "compare-gemmascope", "--rqae", analysis["rqae"], "--sae-path",
                             analysis["sae"], "--out", "RUN/r", "--ce-contexts", "4", "--features", "4",
                             outputs=("r/report.json",))
    assert json.loads(files["r/report.json"])["sae"]["metrics"]


# --------------------------------------------------------------------------- refused and unreachable buckets


def _moto_auth(s3, initial_free_requests: str) -> None:
    """Turn moto's IAM authorisation on ("0": every request is checked) or off ("inf")."""
    import urllib.request

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=initial_free_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


def test_harvest_into_a_bucket_it_may_only_read_is_one_error_line_and_writes_nothing(s3, monkeypatch):
    """An IAM user whose policy allows only reads of the bucket, with moto checking every request."""
    import boto3

    bucket = "read-only-bucket"
    s3.mkdir(bucket)
    s3.pipe(f"{bucket}/keep.txt", b"kept")
    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])  # the subprocess's credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    _moto_auth(s3, "0")
    try:
        r = run_rqae("harvest", *HARVEST_ARGS, "--out", f"s3://{bucket}/x.zarr")
    finally:
        _moto_auth(s3, "inf")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: cannot write to s3://{bucket}/x.zarr: Access Denied", r.stderr
    s3.invalidate_cache()
    assert s3.find(bucket) == [f"{bucket}/keep.txt"]


def test_presence_checks_against_an_unreachable_endpoint_fail_rather_than_report_absence(s3):
    """The concurrent checks keep `is_file`'s rule: a failed request is an error, never
    "the shard is missing" (nor, worse, present)."""
    import subprocess
    import sys

    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    code = f"from rqae_pipeline.urls import file_sizes; print(file_sizes('s3://{BUCKET}/x.zarr', ['a', 'b']))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "None" not in r.stdout
    assert "ConnectionError" in r.stderr or "Could not connect" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("command", [["harvest", *HARVEST_ARGS, "--out"], ["inspect"],
                                     ["search", "--model", "no-model", "--address", "1:1", "--store"]])
def test_an_unreachable_endpoint_is_one_error_line(s3, monkeypatch, command):
    """Not "no activation store": the endpoint's failure is named (fsspec's isfile answered False)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would only make the test slow
    r = run_rqae(*command, f"s3://{BUCKET}/x.zarr")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read s3://{BUCKET}/x.zarr: "), r.stderr
    assert "Could not connect" in lines[0]
    assert not (REPO / "s3:").exists()
