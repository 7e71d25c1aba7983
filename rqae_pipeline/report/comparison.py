"""Rendering of `compare.run_comparison`'s report: report.json, the PNG plots and report.html
in the output directory, and the terminal summary of `rqae compare-gemmascope`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.metrics import prefix_of
from rqae_pipeline.io import atomic_write_bytes
from rqae_pipeline.report.html import layers_label


def write_report(report: dict, out: Path) -> None:
    from rqae_pipeline.report.html import render_comparison
    from rqae_pipeline.report.plots import (
        plot_decoder_matching,
        plot_pearson,
        plot_reconstruction_vs_layers,
    )

    out.mkdir(parents=True, exist_ok=True)
    pngs = {
        "reconstruction": plot_reconstruction_vs_layers({"RQAE": report["rqae"], "SAE": report["sae"]},
                                                        out / "reconstruction.png"),
        "pearson": plot_pearson(report["pearson"], out / "pearson.png"),
        "matching": plot_decoder_matching(report["decoder_matching"], out / "decoder_matching.png"),
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1, default=_default).encode())
    atomic_write_bytes(out / "report.html", render_comparison(report, pngs).encode())


def summary_lines(report: dict) -> list[str]:
    """The terminal table."""
    r, s = report["rqae"], report["sae"]
    lines = [f"{'model':28s} {'FVU':>8s} {'MSE':>10s} {'CE delta':>9s} {'KL':>8s}  size"]

    def row(name, metric, ce_key, size):
        ce = (report[ce_key].get("ce") or {}).get(name) or {}
        m = report[ce_key]["metrics"][name]
        lines.append(f"{name:28s} {m['fvu']:8.4f} {m['mse']:10.4g} {ce.get('ce_delta', math.nan):9.4f} "
                     f"{ce.get('kl', math.nan):8.4f}  {size}")

    for label in sorted(r["metrics"], key=prefix_of):
        row(label, "fvu", "rqae", layers_label(label))
    row("sae", "fvu", "sae", f"L0 {s.get('l0', math.nan):.1f}, dead {s.get('dead_latents', 0)}/{s.get('latents', 0)}")
    if "ce" in r:
        z = r["ce"]["zero-ablation"]
        lines.append(f"{'zero-ablation':28s} {'':8s} {'':10s} {z['ce_delta']:9.4f}")
    pa, pb = report["pearson"]["summary"]["a"], report["pearson"]["summary"]["b"]
    lines.append("Pearson (SAE activation vs RQAE intensity), mean over features, by RQAE layers used:")
    lines.append("  " + "  ".join(f"{m}: (a) {pa[m]['mean']:.2f} (b) {pb[m]['mean']:.2f}" for m in pa))
    dm = report["decoder_matching"]
    lines.append(f"decoder matching ({dm['sae_features']:,} SAE features vs {dm['rqae_directions']:,} RQAE "
                 f"directions): mean best cosine {dm['mean_best_cosine']:.3f}, one-to-one mean "
                 f"{dm['mean_assignment_cosine']:.3f}")
    return lines


def _default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)


def jsonable(d: dict) -> dict:
    """`d` with numpy, torch and path values as plain JSON values."""
    return json.loads(json.dumps(d, default=_default))
