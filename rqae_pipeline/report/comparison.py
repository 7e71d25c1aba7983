"""Rendering of `compare.run_comparison`'s report: report.json, the PNG plots and report.html
in the output directory, and the terminal summary of `rqae compare-gemmascope`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import atomic_write_bytes, json_text
from rqae_pipeline.report.evaluation import clean_positions_lines
from rqae_pipeline.report.html import layers_label

REPORT_FILES = ("report.json", "report.html", "reconstruction.png", "pearson.png", "decoder_matching.png")


def check_report_dir(out: Path) -> None:
    """`--out` must be new, empty or a comparison report's folder (which is replaced file by
    file): never a model directory, a store or a home folder with other files in it."""
    if out.exists() and not out.is_dir():
        raise RQAEError(f"--out {out} exists and is not a directory")
    # hidden names are a killed run's temp files, or a file manager's (.DS_Store)
    others = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES
                    and not p.name.startswith(".")) if out.is_dir() else []
    if others:
        raise RQAEError(f"--out {out} holds files that are not a comparison report ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")


def write_report(report: dict, out: Path) -> None:
    from rqae_pipeline.report.html import render_comparison
    from rqae_pipeline.report.plots import (
        plot_decoder_matching,
        plot_pearson,
        plot_reconstruction_vs_layers,
    )

    out.mkdir(parents=True, exist_ok=True)
    # report.json is written last and the previous run's report goes first, so a folder that
    # holds a report.json holds one run's files, whatever point a kill stopped this one at
    for name in ("report.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    pngs = {
        "reconstruction": plot_reconstruction_vs_layers({"RQAE": report["rqae"], "SAE": report["sae"]},
                                                        out / "reconstruction.png"),
        "pearson": plot_pearson(report["pearson"], out / "pearson.png"),
        "matching": plot_decoder_matching(report["decoder_matching"], out / "decoder_matching.png"),
    }
    atomic_write_bytes(out / "report.html", render_comparison(report, pngs).encode())
    atomic_write_bytes(out / "report.json", json_text(report, default=_default).encode())


def model_rows(report: dict) -> list[dict]:
    """One row per model (each RQAE prefix, the SAE): FVU and MSE in both spaces, CE-delta
    and KL with standard errors, bits per token, weight bytes, L0 and dead latents
    (`budget.budget_table`'s "models")."""
    return report["budget"]["models"]


def _pm(value, se, fmt: str = ".4f") -> str:
    """value ± se; the value alone where there is no standard error (None, or NaN: one context)."""
    if value is None:
        return "–"
    return f"{value:{fmt}}±{se:{fmt}}" if se is not None and math.isfinite(se) else f"{value:{fmt}}"


def summary_lines(report: dict) -> list[str]:
    """The terminal table: every model in both spaces with CE-delta ± SE, then the matched budgets."""
    lines = [f"{'model':10s} {'FVU stored':>10s} {'FVU raw':>9s} {'CE delta ± SE':>16s} {'KL ± SE':>16s} "
             f"{'bits/tok':>9s} {'weights':>9s}  L0 / dead"]
    for r in model_rows(report):
        usage = (f"L0 {r['l0']:.1f}, dead {r['dead_latents']:,}/{r['latents']:,}" if r["kind"] == "sae"
                 else layers_label(r["label"]))
        lines.append(f"{r['label']:10s} {r['fvu_normalised']:10.4f} {r['fvu_raw']:9.4f} "
                     f"{_pm(r['ce_delta'], r['ce_delta_se']):>16s} {_pm(r['kl'], r['kl_se']):>16s} "
                     f"{r['bits_per_token']:9.1f} {_mb(r['weight_bytes']):>9s}  {usage}")
    ce = report["rqae"].get("ce")
    if ce:
        z, k = ce["zero-ablation"], ce["zero-ablation-special-kept"]
        lines.append(f"zero-ablation CE delta {_pm(z['ce_delta'], z['ce_delta_se'])} (every position, as sae-lens; "
                     f"CE recovered is against it), {_pm(k['ce_delta'], k['ce_delta_se'])} with BOS/outliers kept; "
                     f"± bootstrap SE over {report['rqae']['ce_bootstrap']['contexts']} contexts")
        lines += clean_positions_lines(report["rqae"])
    lines += budget_lines(report["budget"])
    lines += pearson_lines(report["pearson"])
    dm = report["decoder_matching"]
    lines.append(f"decoder matching ({dm['sae_features']:,} SAE features vs {dm['rqae_directions']:,} RQAE "
                 f"directions): mean best cosine {dm['mean_best_cosine']:.3f}, one-to-one mean "
                 f"{dm['mean_assignment_cosine']:.3f}")
    return lines


def pearson_lines(pearson: dict) -> list[str]:
    """The Pearson means by RQAE layers used, over how many of the requested features."""
    pa, pb = pearson["summary"]["a"], pearson["summary"]["b"]
    scored, requested = pearson.get("features_scored"), pearson.get("features_requested")
    if scored == 0:
        return [f"Pearson: {pearson['shortfall']}"]
    over = f"{scored} of {requested} requested features" if scored is not None else "features"

    def fewer(part: dict) -> str:  # a feature whose correlation is undefined there (NaN) is left out
        return f" (of {part['n']})" if scored is not None and part["n"] != scored else ""

    return [f"Pearson (SAE activation vs RQAE intensity), mean over {over}, by RQAE layers used:",
            "  " + "  ".join(f"{m}: (a) {pa[m]['mean']:.2f}{fewer(pa[m])} (b) {pb[m]['mean']:.2f}{fewer(pb[m])}"
                             for m in pa)]


def budget_lines(budget: dict) -> list[str]:
    """One line per matched budget: the SAE against the RQAE within the same budget."""
    rows = {r["label"]: r for r in budget["models"]}
    lines = [f"matched budgets (SAE values at {budget['assumptions']['sae_value_bits']} bits; "
             f"RQAE {budget['assumptions']['rqae_bits_per_layer']:.2f} bits per layer):"]
    for m in budget["matched"]:
        sae, what = rows[m["sae"]], "bits/token" if m["budget"] == "bits_per_token" else "weight bytes"
        value = f"{m['value']:.1f}" if m["budget"] == "bits_per_token" else _mb(m["value"])
        if m["rqae_within"] is None:
            lines.append(f"  {what} {value}: no evaluated RQAE prefix fits (nearest {m['rqae_nearest']})")
            continue
        r = rows[m["rqae_within"]]
        lines.append(f"  {what} {value}: SAE FVU {sae['fvu_normalised']:.4f} stored / {sae['fvu_raw']:.4f} raw vs "
                     f"{r['label']} {r['fvu_normalised']:.4f} / {r['fvu_raw']:.4f} -> stored: "
                     f"{m['winner_fvu_normalised']}, raw: {m['winner_fvu_raw']}, CE delta: "
                     f"{m['winner_ce_delta'] or 'not measured'} (nearest prefix {m['rqae_nearest']})")
    return lines


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)


def jsonable(d: dict) -> dict:
    """`d` with numpy, torch and path values as plain JSON values."""
    return json.loads(json.dumps(d, default=_default))
