"""The static dashboard, rendered by headless Chromium and checked on the rendered DOM."""

import html
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from rqae_pipeline.cli import app
from rqae_pipeline.codes import EncodeConfig, encode_store, open_codes
from rqae_pipeline.dashboard import DashboardConfig, build_dashboard
from rqae_pipeline.features import DictionaryConfig, build_feature_dictionary, intensity_feature, score_codes, search
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.rqae import RQAE
from rqae_pipeline.queries import query_codes
from rqae_pipeline.store import ActivationStore

from helpers import tiny_config, tiny_rqae, tree_digest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# .ci/run sets it: there a missing Chromium fails the render test instead of skipping it
REQUIRE_CHROMIUM = os.environ.get("RQAE_REQUIRE_CHROMIUM") == "1"
QUERY = "The value of an object"


class Elements(HTMLParser):
    """Every element of a document as (tag, attrs, owner): owner is the id of the nearest
    enclosing element that has one (a feature's <details>, a section)."""

    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        owner = next((e[1]["id"] for e in reversed(self.stack) if "id" in e[1]), None)
        el = (tag, attrs, owner)
        self.elements.append(el)
        if tag not in ("img", "input", "meta", "br", "link"):
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def find(self, tag=None, cls=None, owner=None):
        return [e for e in self.elements if (tag is None or e[0] == tag) and (owner is None or e[2] == owner)
                and (cls is None or cls in e[1].get("class", "").split())]


def chromium() -> str:
    if CHROMIUM is None:
        if REQUIRE_CHROMIUM:
            pytest.fail("RQAE_REQUIRE_CHROMIUM=1 but no chromium is installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def rendered_dom(index) -> Elements:
    """The DOM after the page's scripts ran, dumped by headless Chromium."""
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", index.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    dom = Elements()
    dom.feed(r.stdout)
    return dom


@pytest.fixture(scope="module")
def env(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    store = root / "s.zarr"
    harvest(tiny_config(store, tokens=2048, contexts_per_shard=8), lm=tiny_lm, progress=False)
    tiny_rqae(store, root / "rqae", n_q=8, init_rows=1024)
    codes = encode_store(EncodeConfig(store=store, model=root / "rqae"), progress=False)
    dictionary = root / "dict.json"
    build_feature_dictionary(DictionaryConfig(store=store, model=root / "rqae", out=dictionary, seeds=5,
                                              layers=(4, 8), top_k=6), progress=False)
    out = root / "dash"
    index = build_dashboard(DashboardConfig(store=store, model=root / "rqae", out=out, features=dictionary,
                                            texts=(QUERY,), top_k=5, examples=4, context=3, pairs_sample=256),
                            progress=False, lm=tiny_lm)
    return {"root": root, "store": store, "model_dir": root / "rqae", "model": RQAE.load(root / "rqae"),
            "codes": open_codes(codes), "dict": json.loads(dictionary.read_text()), "dict_path": dictionary,
            "out": out, "index": index, "st": ActivationStore.open(store)}


def test_dashboard_is_self_contained(env):
    files = sorted(p.name for p in env["out"].iterdir())
    assert files == ["code_usage.png", "codebook_projected.png", "codebook_stats.json", "index.html"]
    text = env["index"].read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    assert 'src="code_usage.png"' in text and 'src="codebook_projected.png"' in text


def test_rendered_dashboard_shows_features_intensities_searches_and_plots(env, tiny_lm):
    dom = rendered_dom(env["index"])
    feats = env["dict"]["features"]
    shown = dom.find("details", "feature")
    assert [e[1]["id"] for e in shown] == [f["id"] for f in feats]
    assert dom.find("body")[0][1].get("data-ready") == "1"  # the inline script ran after load

    # every example's own token is outlined and carries the feature's intensity there, which
    # is the example's score in the dictionary (recomputed from the codes, not copied)
    per_feature = [min(4, len(f["examples"])) for f in feats]
    assert len(dom.find("span", "hit")) == sum(per_feature) + 5  # + the search's 5 hits
    model, codes, R = env["model"], env["codes"], env["st"].spec.rows_per_context
    for f in feats:
        hits = dom.find("span", "hit", owner=f["id"])
        assert [float(e[1]["data-intensity"]) for e in hits] == pytest.approx(
            [x["score"] for x in f["examples"][:4]], abs=1e-4)
    # the other tokens are shaded by the feature's intensity on them
    f = feats[-1]
    feature = intensity_feature(model, np.asarray(f["prefix"]), f["layers"])
    row = f["examples"][0]["row"]
    spans = dom.find("span", "tok", owner=f["id"])
    i = spans.index(dom.find("span", "hit", owner=f["id"])[0])
    nxt = row + 1 if row % R + 1 < R else row - 1  # a neighbour in the same context
    want = score_codes(model, feature, codes.read_rows(np.array([nxt]))[:, : f["layers"]])[0]
    got = spans[i + (1 if nxt > row else -1)][1]
    assert float(got["data-intensity"]) == pytest.approx(want, abs=1e-4)
    alpha = float(got["style"].split(",")[-1].rstrip(")"))
    assert alpha == pytest.approx(max(0.0, min(1.0, want)) ** 3, abs=2e-3)

    # the search section ranks as `search` does
    q = query_codes(tiny_lm, model, env["st"], QUERY, -1)
    want_rows = [h.row for h in search(model, codes, q, top_k=5, store=env["st"])]
    section = dom.find("li", owner="searches")
    assert [int(e[1]["data-row"]) for e in section] == want_rows

    imgs = dom.find("img", "plot")
    assert len(imgs) == 2 and all(e[1].get("data-loaded") == "1" for e in imgs)  # decoded, naturalWidth > 0


def test_cli_dashboard_builds_a_dictionary_and_refuses_bad_input(env, tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    r = runner.invoke(app, [str(a) for a in ("dashboard", "--store", env["store"], "--model", env["model_dir"],
                                              "--out", out, "--seeds", "3", "--examples", "3")])
    assert r.exit_code == 0 and "index.html" in r.stdout, r.output
    assert (out / "features.json").exists() and (out / "index.html").exists()
    before = tree_digest(out)
    other = tmp_path / "other.zarr"  # the dictionary is from another store
    harvest(tiny_config(other, tokens=256), progress=False)
    cut = tmp_path / "cut.json"  # an example cut down by hand: the dashboard reads its row
    data = json.loads(env["dict_path"].read_text())
    del data["features"][1]["examples"][0]["row"]
    cut.write_text(json.dumps(data))
    longer = tmp_path / "longer.json"  # ranked rows this store does not commit
    longer.write_text(json.dumps({**json.loads(env["dict_path"].read_text()), "store_tokens": 10**9}))
    torn = tmp_path / "torn-run"  # a model whose train.json was cut short
    shutil.copytree(env["model_dir"], torn)
    (torn / "train.json").write_text('{"store_spec": {"model"')
    bad = [(["--store", other, "--model", env["model_dir"], "--features", env["dict_path"]], "another store"),
           (["--store", env["store"], "--model", env["model_dir"], "--features", tmp_path / "none.json"],
            "cannot read the feature dictionary"),
           (["--store", env["store"], "--model", env["model_dir"], "--examples", "0"], "must be positive"),
           (["--store", env["store"], "--model", env["model_dir"], "--features", cut],
            "cut.json: features.1.examples.0.row is missing or not of type int"),
           (["--store", env["store"], "--model", torn], "torn-run/train.json cannot be read as JSON"),
           (["--store", env["store"], "--model", env["model_dir"], "--features", longer],
            "built from a longer copy of the store"),
           (["--store", env["store"], "--model", env["model_dir"], "--serve", "--port", "99999"],
            "--port must be in 1..65535")]
    for args, needle in bad:
        r = runner.invoke(app, [str(a) for a in ("dashboard", *args, "--out", out)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
        assert tree_digest(out) == before  # the earlier dashboard is untouched
    # a dictionary from before the store grew: said on stderr and on the page
    n = ActivationStore.open(env["store"]).n_tokens
    shorter = tmp_path / "shorter.json"
    shorter.write_text(json.dumps({**json.loads(env["dict_path"].read_text()), "store_tokens": n - 64}))
    r = runner.invoke(app, [str(a) for a in ("dashboard", "--store", env["store"], "--model", env["model_dir"],
                                              "--out", tmp_path / "d2", "--features", shorter)])
    note = f"ranked the store's first {n - 64:,} tokens; the 64 harvested since are in none of its examples"
    assert r.exit_code == 0 and note in r.stderr, r.output
    assert note in html.unescape((tmp_path / "d2" / "index.html").read_text())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = runner.invoke(app, [str(a) for a in ("dashboard", "--store", env["store"], "--model", env["model_dir"],
                                              "--out", tmp_path / "mine")])
    assert r.exit_code == 2 and "holds no dashboard" in r.stderr and (tmp_path / "mine" / "notes.txt").exists()
