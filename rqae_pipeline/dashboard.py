"""A static, self-contained feature dashboard: `DIR/index.html` plus the codebook PNGs beside it.

In the spirit of the RQAE write-up's dashboard (Fig 7a): the feature dictionary's features
with their top examples, every token of an example's context shaded by the feature's
intensity on it (blog, "Defining a Feature": sum_i L_i cos(C[f_i], C[t_i]) / sum_i L_i over
the feature's layers), query-search results shown the same way, and the codebook plots
(Fig 2a and code usage) with the distinct-prefix table. No server and no network: open
the file. A few lines of inline script filter the feature list and mark each image as
decoded once the page has loaded (`data-loaded`), which the tests read back from a
headless browser.

The directory is written beside the target and swapped in whole, so an interrupted or
refused run leaves an earlier dashboard as it was.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.io import staging_dir, swap_in
from rqae_pipeline.report.html import CSS, table
from rqae_pipeline.urls import name_of

GENERATOR = "rqae dashboard"

DASH_CSS = CSS + """
body { max-width: 1200px; } nav a { margin-right: 1em; }
.ctx { font: 13px/1.6 ui-monospace, monospace; white-space: pre-wrap; }
.tok { border-radius: 2px; } .tok.hit { outline: 1.5px solid #c04000; font-weight: 600; }
details.feature { border-bottom: 1px solid #eee; padding: 2px 0; } details.feature summary { cursor: pointer; }
ol.examples { margin: .3em 0 .6em; } ol.examples li { margin: 1px 0; }
.score { display: inline-block; width: 4.5em; color: #666; font-variant-numeric: tabular-nums; }
.meta { color: #666; } #filter { width: 20em; padding: 3px; margin: .5em 0; }
"""

SCRIPT = """
document.getElementById('filter').addEventListener('input', function (e) {
  var q = e.target.value.toLowerCase(), n = 0;
  document.querySelectorAll('details.feature').forEach(function (d) {
    var show = !q || d.dataset.search.indexOf(q) >= 0; d.style.display = show ? '' : 'none'; n += show;
  });
  document.getElementById('shown').textContent = n;
});
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (i) {
    i.dataset.loaded = (i.complete && i.naturalWidth > 0) ? '1' : '0';
  });
  document.body.dataset.ready = '1';
});
"""


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    store: Path
    model: Path  # an RQAE model directory
    out: Path  # directory; index.html goes in it
    features: Path | None = None  # a feature dictionary; default: built (and saved in OUT)
    codes: Path | None = None
    texts: tuple[str, ...] = ()  # search queries, as `rqae search` takes them
    token_indices: tuple[int, ...] = ()
    addresses: tuple[str, ...] = ()
    query_layers: int | None = None  # prefix length of the searches (default: all layers)
    top_k: int = 10  # hits per search
    examples: int = 8  # examples shown per feature
    context: int = 8  # tokens either side of an example
    seeds: int = 64  # when the dictionary is built here
    layers: tuple[int, ...] = (16, 64, 256)
    pairs_sample: int = 2048

    def __post_init__(self):
        if min(self.top_k, self.examples, self.seeds) < 1 or self.context < 0:
            raise ValueError("--top-k, --examples and --seeds must be positive and --context >= 0")


@dataclass(frozen=True)
class Shown:
    """One example as shown: its row, score, and the tokens around it with intensities."""

    row: int
    seq: int
    pos: int
    score: float
    tokens: list[str]
    intensity: np.ndarray  # (len(tokens),)
    hit: int  # index of the example's own token in `tokens`


# --------------------------------------------------------------------------- data


def _windows(store, rows: list[int], width: int) -> dict[int, tuple[int, int]]:
    """Each row's window [a, b) of rows inside its own context."""
    R = store.spec.rows_per_context
    out = {}
    for r in rows:
        start = r - r % R
        out[r] = (max(start, r - width), min(start + R, r + width + 1))
    return out


def examples_shown(model, codes, store, tokenizer, items: list[tuple[object, list[tuple[int, float]]]],
                   width: int) -> list[list[Shown]]:
    """For each (feature, [(row, score)]): the examples with per-token intensities of the
    feature on their context (one read of all the rows involved)."""
    from rqae_pipeline.features import score_codes

    wins = _windows(store, sorted({r for _, hits in items for r, _ in hits}), width)
    rows = np.array(sorted({x for a, b in wins.values() for x in range(a, b)}), dtype=np.int64)
    if len(rows) == 0:
        return [[] for _ in items]
    code_rows = codes.read_rows(rows)
    cols = store.columns(rows, "tokens", "seq", "pos")
    token_ids, seqs, poss = cols["tokens"], cols["seq"], cols["pos"]
    where = {int(r): i for i, r in enumerate(rows)}
    text: dict[int, str] = {}

    def tok(i: int) -> str:
        if i not in text:
            text[i] = tokenizer.decode([i])
        return text[i]

    out = []
    for feature, hits in items:
        shown = []
        for r, score in hits:
            a, b = wins[r]
            idx = [where[x] for x in range(a, b)]
            inten = score_codes(model, feature, code_rows[idx][:, : feature.layers])
            shown.append(Shown(row=r, seq=int(seqs[where[r]]), pos=int(poss[where[r]]), score=score,
                               tokens=[tok(int(t)) for t in token_ids[idx]], intensity=inten, hit=r - a))
        out.append(shown)
    return out


def read_dictionary(cfg: DashboardConfig, store, identity: dict) -> dict:
    """The given feature dictionary, checked against the model and the store."""
    from rqae_pipeline.feature_checks import check_dictionary

    try:
        data = json.loads(Path(cfg.features).read_text())
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise RQAEError(f"cannot read the feature dictionary {cfg.features}: {reason}") from None
    if not isinstance(data, dict) or data.get("kind") != "rqae-feature-dictionary":
        raise RQAEError(f"{cfg.features} is not a feature dictionary (write one with `rqae feature-dictionary`)")
    check_dictionary(data, Path(cfg.features), store, identity, cfg.model)
    return data


# --------------------------------------------------------------------------- rendering


def _token_html(text: str) -> str:
    return html.escape(text.replace("\n", "↵").replace("\t", "⇥"))


def render_context(s: Shown) -> str:
    spans = []
    for i, (t, v) in enumerate(zip(s.tokens, s.intensity)):
        alpha = float(np.clip(v, 0.0, 1.0)) ** 3  # cubed: only strong intensities stand out
        cls = "tok hit" if i == s.hit else "tok"
        spans.append(f'<span class="{cls}" data-intensity="{v:.4f}" title="{v:.4f}" '
                     f'style="background: rgba(255,120,0,{alpha:.3f})">{_token_html(t)}</span>')
    return f'<span class="ctx">{"".join(spans)}</span>'


def render_examples(shown: list[Shown]) -> str:
    items = "".join(f'<li data-row="{s.row}" data-score="{s.score:.4f}"><span class="score">{s.score:.3f}</span>'
                    f'{render_context(s)} <span class="meta">{s.seq}:{s.pos}</span></li>' for s in shown)
    return f'<ol class="examples">{items}</ol>'


def render_feature(f: dict, shown: list[Shown], open_: bool) -> str:
    seed = f["seed"]
    label = f'{seed["left"][-30:]}[[{seed["token"]}]]{seed["right"][:30]}'
    search = " ".join([f["id"], seed["token"], *(t for s in shown for t in s.tokens[s.hit: s.hit + 1])]).lower()
    top = shown[0].score if shown else float("nan")
    return (f'<details class="feature" id="{html.escape(f["id"])}" data-layers="{f["layers"]}" '
            f'data-search="{html.escape(search)}"{" open" if open_ else ""}><summary><b>{html.escape(f["id"])}</b> '
            f'<span class="meta">{f["layers"]} layers, top {top:.3f}</span> · seed '
            f'<span class="ctx">{_token_html(label)}</span></summary>{render_examples(shown)}</details>')


def render_codebook(stats: dict, pngs: list[Path]) -> str:
    rows = [[p["layers"], f'{p["distinct"]:,}', f'{p["tokens_per_prefix"]:.2f}'] for p in stats["prefixes"]]
    used, cos = stats["usage"]["used_codes"], stats["projected"]["cosine"]
    note = (f'<p class="note">{stats["tokens"]:,} tokens, {stats["n_q"]} layers of {stats["n_codes"]} codes. '
            f'Codes used per layer: min {min(used)}, max {max(used)}. '
            f'Projected codebooks: {cos["abs_below_0.2"]:.1%} of {cos["pairs"]:,} sampled pairs have |cos| &lt; 0.2 '
            f'({cos["across_layers_abs_below_0.2"]:.1%} across layers).</p>')
    imgs = "".join(f'<p><img class="plot" alt="{html.escape(p.stem)}" src="{html.escape(p.name)}"></p>' for p in pngs)
    return table(["layers", "distinct prefixes", "tokens / prefix"], rows, "prefixes") + note + imgs


def render_page(meta: dict, features_html: list[str], searches_html: list[str], codebook_html: str) -> str:
    n = len(features_html)
    searches = "".join(searches_html) or "<p class=note>No queries given.</p>"
    body = (f'<p class="note">{html.escape(meta["summary"])}</p>'
            '<nav><a href="#features">Features</a><a href="#search">Search</a><a href="#codebook">Codebook</a></nav>'
            f'<h2 id="features">Features ({n})</h2><p class="note">{html.escape(meta["features_note"])}</p>'
            f'<input id="filter" placeholder="filter by id or token"> <span class="meta"><span id="shown">{n}'
            f'</span> shown</span><div id="feature-list">{"".join(features_html)}</div>'
            f'<h2 id="search">Search</h2><div id="searches">{searches}</div>'
            f'<h2 id="codebook">Codebook</h2>{codebook_html}')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">'
            f'<title>RQAE dashboard</title><style>{DASH_CSS}</style></head><body><h1>RQAE dashboard</h1>{body}'
            f'<script>{SCRIPT}</script></body></html>')


# --------------------------------------------------------------------------- the build


def _staging(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise RQAEError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        if not index.exists() or f'content="{GENERATOR}"' not in index.read_text(errors="replace")[:2000]:
            raise RQAEError(f"{out} is not empty and holds no dashboard; choose another --out")
    try:
        return staging_dir(out)
    except OSError as e:
        raise RQAEError(f"cannot write to {out.parent}: {e.strerror or e}") from None


def build_dashboard(cfg: DashboardConfig, *, progress: bool = True, echo: Callable[[str], None] | None = None,
                    lm=None) -> Path:
    """Write OUT/index.html (+ the codebook PNGs, + features.json when built here). Every
    input (store, model, queries, a given dictionary) is checked before anything is written."""
    from rqae_pipeline.codes import model_identity
    from rqae_pipeline.feature_checks import check_model_store
    from rqae_pipeline.features import check_layers
    from rqae_pipeline.models.rqae import RQAE
    from rqae_pipeline.queries import query_set
    from rqae_pipeline.store import ActivationStore

    store = ActivationStore.open(cfg.store)
    identity = model_identity(cfg.model)
    model = RQAE.load(cfg.model)
    check_model_store(cfg.model, model.cfg.d_in, store)
    m_query = check_layers(model, cfg.query_layers)
    queries = (query_set(store, model, addresses=list(cfg.addresses), texts=list(cfg.texts),
                         token_indices=list(cfg.token_indices), lm=lm, width=cfg.context)
               if cfg.addresses or cfg.texts else [])
    dictionary = read_dictionary(cfg, store, identity) if cfg.features is not None else None
    out = Path(cfg.out)
    tmp = _staging(out)
    try:
        _write_into(tmp, cfg, store, model, dictionary, queries, m_query, progress, echo or (lambda m: None))
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _write_into(tmp: Path, cfg: DashboardConfig, store, model, dictionary: dict | None, queries: list,
                m_query: int, progress: bool, say: Callable[[str], None]) -> None:
    """The dashboard's files, written into the staging directory."""
    from rqae_pipeline.codebook_stats import codebook_stats
    from rqae_pipeline.codes import ensure_codes
    from rqae_pipeline.feature_checks import dictionary_coverage_note
    from rqae_pipeline.features import DictionaryConfig, build_feature_dictionary
    from rqae_pipeline.report.codebook import plot_codebook_stats

    codes = ensure_codes(store, cfg.model, cfg.codes, progress=progress)
    if dictionary is None:
        dictionary = build_feature_dictionary(DictionaryConfig(
            store=cfg.store, model=cfg.model, out=tmp / "features.json", codes=cfg.codes, seeds=cfg.seeds,
            layers=cfg.layers, top_k=cfg.examples, context=cfg.context), progress=progress)
    say(f"{len(dictionary['features'])} features; codebook statistics ...")
    stats = codebook_stats(model, codes, pairs_sample=cfg.pairs_sample, progress=progress)
    pngs = plot_codebook_stats(stats, tmp)
    (tmp / "codebook_stats.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "usage"}))
    features_html, searches_html = _examples_html(cfg, store, model, codes, dictionary["features"], queries,
                                                  m_query)
    sp = store.spec
    stale = dictionary_coverage_note(dictionary, store)
    if stale:
        say(f"note: {stale}")
    meta = {"summary": f"Store {name_of(store.path)}: {sp.model} {sp.hook}, {store.n_tokens:,} tokens, "
                       f"{sp.normalisation} normalisation. Model {Path(cfg.model).name}: {model.n_q} RQAE layers.",
            "features_note": "Each example's context is shaded by the feature's intensity on every token "
                             "(sum_i L_i cos(C[f_i], C[t_i]) / sum_i L_i over the feature's layers; hover for "
                             "the value); the example's own token is outlined." + (f" {stale}" if stale else "")}
    (tmp / "index.html").write_text(render_page(meta, features_html, searches_html, render_codebook(stats, pngs)),
                                    encoding="utf-8")


def _examples_html(cfg: DashboardConfig, store, model, codes, feats: list[dict], queries: list,
                   m_query: int) -> tuple[list[str], list[str]]:
    """The features' and the searches' examples, shaded (one read of all their rows)."""
    from rqae_pipeline.features import intensity_feature, search
    from rqae_pipeline.queries import load_tokenizer, query_codes_matrix

    items = [(intensity_feature(model, np.asarray(f["prefix"]), f["layers"]),
              [(e["row"], e["score"]) for e in f["examples"][: cfg.examples]]) for f in feats]
    qcodes = query_codes_matrix(queries, codes) if queries else np.empty((0, model.n_q), np.int16)
    for q in qcodes:
        qf = intensity_feature(model, q, m_query)
        items.append((qf, [(h.row, h.score) for h in search(model, codes, qf, top_k=cfg.top_k, store=store)]))
    shown = examples_shown(model, codes, store, load_tokenizer(store.spec.model), items, cfg.context)
    features_html = [render_feature(f, s, open_=i < 3) for i, (f, s) in enumerate(zip(feats, shown))]
    searches_html = [f'<section class="query"><h3>query <span class="ctx">{_token_html(q.context.render())}'
                     f'</span> <span class="meta">layers 1..{m_query}</span></h3>{render_examples(s)}</section>'
                     for q, s in zip(queries, shown[len(feats):])]
    return features_html, searches_html


def serve_dashboard(out: Path, port: int, echo: Callable[[str], None] = print) -> None:
    """Serve OUT on http://127.0.0.1:PORT until Ctrl-C."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except (OSError, OverflowError) as e:  # in use, not ours to bind, out of range
        raise RQAEError(f"cannot serve on port {port}: {getattr(e, 'strerror', None) or e}; the dashboard is "
                        f"written to {out}") from None
    with server:
        echo(f"serving http://127.0.0.1:{port}/ (Ctrl-C stops)")
        server.serve_forever()
