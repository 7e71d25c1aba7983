"""Self-contained HTML reports: one file, plots inlined as base64 PNG, no scripts or
external assets, so it opens offline and can be attached to a message."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from rqae_pipeline.evaluate import prefix_of

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #666; font-size: .9em; } code { background: #f3f3f3; padding: 0 3px; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def layers_label(label: str) -> str:
    """'rqae@1' -> '1 layer', 'rqae@16' -> '16 layers'."""
    m = prefix_of(label)
    return f"{m} layer" if m == 1 else f"{m} layers"


def _num(v, fmt: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt) if isinstance(v, (int, float)) else html.escape(str(v))


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i else f"<td>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def render_comparison(report: dict, pngs: dict[str, Path]) -> str:
    st, r, s = report["store"], report["rqae"], report["sae"]
    parts = [f'<p class="note">Store: {html.escape(st["model"])} <code>{html.escape(st["hook"])}</code>, '
             f'd = {st["d"]}, {html.escape(st["normalisation"])} normalisation. Held-out rows '
             f'{r["rows"][0]:,}..{r["rows"][1]:,} ({r["tokens"]:,} tokens after masking BOS and outliers). '
             f'RQAE: <code>{html.escape(r["path"])}</code> ({r["n_q"]} layers). SAE: '
             f'<code>{html.escape(s["source"])}</code> ({html.escape(s["architecture"])}, {s["d_sae"]:,} latents, '
             f'reads {html.escape(s["space"])} activations).</p>']

    parts.append("<h2>Reconstruction</h2>")
    rows = []
    ce_r, ce_s = r.get("ce", {}), s.get("ce", {})
    for label in sorted(r["metrics"], key=prefix_of):
        m, c = r["metrics"][label], ce_r.get(label, {})
        rows.append([f"RQAE, {layers_label(label)}", _num(m["fvu"]), _num(m["mse"], ".4g"),
                     _num(c.get("ce_delta")), _num(c.get("kl")), _num(c.get("ce_recovered"), ".3f")])
    m, c = s["metrics"]["sae"], ce_s.get("sae", {})
    rows.append([f"SAE (L0 {_num(s.get('l0'), '.1f')}, dead {s.get('dead_latents', 0):,}/{s.get('latents', 0):,})",
                 _num(m["fvu"]), _num(m["mse"], ".4g"), _num(c.get("ce_delta")), _num(c.get("kl")),
                 _num(c.get("ce_recovered"), ".3f")])
    if "zero-ablation" in ce_r:
        rows.append(["zero-ablation (reference)", "", "", _num(ce_r["zero-ablation"]["ce_delta"]), "", ""])
    parts.append(table(["model", "FVU", "MSE", "CE delta (nats)", "KL", "CE recovered"], rows, "recon"))
    if "ce" in r:
        parts.append(f'<p class="note">CE on held-out contexts {r["ce_contexts"][0]}..{r["ce_contexts"][1]}: '
                     f'clean {r["ce"]["clean"]["ce"]:.4f} nats/token; the reconstruction replaces the activation at '
                     f'every non-BOS position.</p>')
    if "code_usage" in r:
        u = r["code_usage"]
        parts.append(f'<p class="note">RQAE code usage: perplexity {u["perplexity_mean"]:.1f} of 544 on average '
                     f'(first layers {u["perplexity_first_layers"]}), {u["dead_codes_mean"]:.1f} unused codes per layer.</p>')
    parts.append(_img(pngs["reconstruction"], "MSE, FVU and CE delta against RQAE layers used, SAE at its L0"))

    parts.append("<h2>Pearson feature matching</h2>")
    p = report["pearson"]
    parts.append(f'<p class="note">{len(p["features"])} SAE features; for each, the tokens where it fires in its '
                 f"top, median and bottom contexts. RQAE feature (a): the SAE encoder vector through the final norm, "
                 f"encoded; (b): the codes of the feature's top-activating token. Rows {p['rows'][0]:,}..{p['rows'][1]:,}.</p>")
    pa, pb = p["summary"]["a"], p["summary"]["b"]
    parts.append(table(["RQAE layers", "(a) mean r", "(a) std", "(b) mean r", "(b) std", "features"],
                       [[m, _num(pa[m]["mean"], ".3f"), _num(pa[m]["std"], ".3f"), _num(pb[m]["mean"], ".3f"),
                         _num(pb[m]["std"], ".3f"), pa[m]["n"]] for m in pa], "pearson"))
    parts.append(_img(pngs["pearson"], "Pearson correlation against RQAE layers used"))

    parts.append("<h2>Decoder-direction matching</h2>")
    d = report["decoder_matching"]
    parts.append(table(["measure", "value"], [
        ["SAE decoder directions", f"{d['sae_features']:,}"],
        [f"RQAE projected codes (first {d['rqae_layers']} layers x 544)", f"{d['rqae_directions']:,}"],
        ["mean best cosine", _num(d["mean_best_cosine"], ".3f")],
        ["median best cosine", _num(d["median_best_cosine"], ".3f")],
        ["share of SAE features with best cosine > 0.9", _num(d["frac_best_above_0.9"], ".3f")],
        ["one-to-one assignment: mean cosine", _num(d["mean_assignment_cosine"], ".3f")],
        ["one-to-one assignment: features placed", f"{d['assigned']:,}"],
    ], "matching"))
    parts.append(_img(pngs["matching"], "Decoder matching histograms"))
    parts.append(f'<p class="note">Generated by <code>rqae compare-gemmascope</code> in {report["seconds"]:.1f} s.</p>')
    return page("RQAE vs SAE", "".join(parts))
