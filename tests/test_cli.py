import pytest
from typer.testing import CliRunner

from rqae_pipeline.cli import app
from rqae_pipeline.harvest import harvest

from helpers import TINY, tiny_config, tree_digest

runner = CliRunner()
SMALL = ["--context-length", "32", "--batch-size", "2", "--contexts-per-shard", "4", "--contexts-per-chunk", "2"]


def invoke(*args):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_help_lists_the_commands():
    r = invoke("--help")
    assert r.exit_code == 0 and "harvest" in r.output and "inspect" in r.output
    r = invoke("harvest", "--help")
    assert r.exit_code == 0 and "--resume" in r.output and "--normalisation" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
        (["--model", TINY, "--layer", "7"], "layer 7 is out of range"),
        (["--model", TINY, "--layer", "blocks.0.hook_nothing"], "unknown hook"),
        (["--model", TINY, "--dataset", "/nonexistent/dir/*.txt"], "no files match"),
        (["--model", TINY, "--dtype", "bf16"], "unknown store dtype"),
        (["--model", TINY, "--normalisation", "layer"], "unknown normalisation"),
        (["--model", TINY, "--tokens", "0"], "tokens must be positive"),
        (["--model", TINY, "--batch-size", "3"], "multiple of the batch size"),
        (["--model", TINY, "--context-length", "4096"], "exceeds"),
    ],
)
def test_bad_harvest_input_is_one_line_and_nonzero(tmp_path, args, needle):
    out = tmp_path / "s.zarr"
    r = invoke("harvest", "--out", str(out), *SMALL, *args)
    assert_one_line_error(r, needle)
    assert not (out / "zarr.json").exists()


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = invoke("harvest", "--model", TINY, "--out", str(tmp_path / "s.zarr"), "--dataset", str(tmp_path / "empty.txt"))
    assert_one_line_error(r, "empty")


def test_corpus_shorter_than_one_context(tmp_path):
    (tmp_path / "short.txt").write_text("just a few words\n")
    r = invoke("harvest", "--model", TINY, "--out", str(tmp_path / "s.zarr"), "--dataset",
               str(tmp_path / "short.txt"), *SMALL)
    assert_one_line_error(r, "fewer tokens than one context")


def test_existing_store_is_never_overwritten(tmp_path, tiny_lm):
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    before = tree_digest(out)
    r = invoke("harvest", "--model", TINY, "--layer", "1", "--out", str(out), *SMALL)
    assert_one_line_error(r, "already holds an activation store")
    r = invoke("harvest", "--model", TINY, "--layer", "0", "--out", str(out), "--resume", *SMALL)
    assert_one_line_error(r, "harvested with hook='blocks.1.hook_resid_post'")
    assert tree_digest(out) == before


def test_harvest_then_inspect(tmp_path):
    out = tmp_path / "s.zarr"
    r = invoke("harvest", "--model", TINY, "--layer", "1", "--out", str(out), "--tokens", "640", *SMALL)
    assert r.exit_code == 0, r.output
    assert "640 tokens committed" in r.stdout
    r = invoke("inspect", str(out))
    assert r.exit_code == 0
    assert "640 tokens in 20 contexts" in r.stdout and "B/token" in r.stdout and "storage FVU" in r.stdout
    r = invoke("inspect", str(out), "--json")
    import json

    s = json.loads(r.stdout)
    assert s["tokens"] == 640 and s["sample"]["finite"] and s["sample"]["flag_fraction"]["bos"] == pytest.approx(1 / 32)


def test_inspect_missing_store(tmp_path):
    assert_one_line_error(invoke("inspect", str(tmp_path / "nope.zarr")), "no activation store")


def test_train_cli_runs_and_reports_heldout_fvu(tmp_path, tiny_lm):
    store = tmp_path / "s.zarr"
    harvest(tiny_config(store, tokens=4096), lm=tiny_lm, progress=False)
    r = invoke("train", "--store", str(store), "--out", str(tmp_path / "run"), "--n-q", "4", "--batch-size", "128",
               "--tokens", "2560")
    assert r.exit_code == 0, r.output
    assert "rqae held-out FVU" in r.stdout and "by prefix 1:" in r.stdout
    r = invoke("archs")
    assert r.exit_code == 0 and {"rqae", "codebook", "topk-sae", "matryoshka_batchtopk-sae"} <= set(r.stdout.split())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--arch", "nope"], "unknown architecture 'nope'"),
        (["--arch", "nope-sae"], "unknown SAE architecture"),
        (["--option", "init=sideways"], "unknown init"),
        (["--option", "garbage"], "expects key=value"),
        (["--batch-size", "64", "--tokens", "32"], "tokens >= batch_size"),
        (["--heldout", "1.5"], "heldout_fraction"),
    ],
)
def test_bad_train_input_is_one_line_and_nonzero(tmp_path, tiny_lm, args, needle):
    store = tmp_path / "s.zarr"
    harvest(tiny_config(store, tokens=1024), lm=tiny_lm, progress=False)
    r = invoke("train", "--store", str(store), "--out", str(tmp_path / "run"), "--n-q", "4", *args)
    assert_one_line_error(r, needle)


def test_train_on_a_missing_store(tmp_path):
    r = invoke("train", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "run"))
    assert_one_line_error(r, "no activation store")


def test_a_zarr_group_of_another_tool_is_refused_without_advising_resume(tmp_path):
    import zarr

    out = tmp_path / "other.zarr"
    zarr.open_group(out, mode="w").attrs["mine"] = 1
    before = tree_digest(out)
    for extra in ([], ["--resume"]):
        r = invoke("harvest", "--model", TINY, "--out", str(out), *SMALL, *extra)
        assert_one_line_error(r, "is a Zarr group but not an rqae activation store")
        assert "--resume" not in r.stderr
    assert tree_digest(out) == before


@pytest.mark.parametrize("args, needle", [(["--steps", "-1"], "--steps"), (["--seeds", "0"], "--seeds")])
def test_bad_demo_input_is_refused_before_the_harvest(tmp_path, args, needle):
    r = invoke("demo", "--out", str(tmp_path / "demo"), *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "demo").exists()
