"""`rqae compare-gemmascope`: an RQAE against an SAE on the same held-out tokens.

One pass over the pieces the other modules provide: reconstruction metrics and CE-delta
for both models (`evaluate`, sharded on dask when asked), Pearson feature matching and
decoder-direction matching (`compare`), then JSON, PNG plots and one self-contained HTML
page. The SAE is a sae-lens pretrained release/id (Gemma Scope) or any sae-lens
directory; both go through the same code.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.compare import PearsonConfig, decoder_directions, match_dictionaries, pearson_matching
from rqae_pipeline.evaluate import (EvalConfig, PretrainedSAE, dask_client, default_prefixes, eval_rows, evaluate,
                                    load_model, model_kind, model_space, prefix_of)
from rqae_pipeline.paths import atomic_write_bytes
from rqae_pipeline.report.html import layers_label
from rqae_pipeline.store import ActivationStore


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    store: Path
    rqae: Path
    sae: Path | PretrainedSAE
    out: Path
    prefixes: tuple[int, ...] | None = None  # RQAE prefix lengths (default: powers of two and n_q)
    ce_contexts: int = 32  # held-out contexts for CE-delta / KL; 0 skips them (no LM needed)
    workers: int = 0
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 4096
    pearson: PearsonConfig = PearsonConfig()
    match_candidates: int = 16
    match_layers: int | None = None  # RQAE layers whose projected codebooks enter decoder matching


def run_comparison(cfg: CompareConfig, *, progress: bool = True, echo=print) -> dict:
    store = ActivationStore.open(cfg.store)
    rqae = load_model(cfg.rqae, cfg.device)
    if model_kind(rqae) != "rqae":
        raise RQAEError(f"{cfg.rqae} is not an RQAE model directory")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise RQAEError(f"--out {cfg.out} exists and is not a directory")
    base = EvalConfig(store=cfg.store, model=cfg.rqae, workers=cfg.workers, scheduler=cfg.scheduler,
                      device=cfg.device, ce_contexts=cfg.ce_contexts, batch_size=cfg.batch_size,
                      prefixes=cfg.prefixes or default_prefixes(rqae.n_q))
    rows = eval_rows(base, store)  # the RQAE's held-out rows; the SAE is measured on the same ones
    sae_cfg = replace(base, model=cfg.sae, row_range=rows)
    sae = load_model(cfg.sae, cfg.device)  # errors (unknown release, bad dir) before any work
    if model_kind(sae) != "sae":
        raise RQAEError(f"{cfg.sae} is not a sae-lens SAE")
    t0 = time.perf_counter()
    with dask_client(base) as client:
        echo(f"evaluating {cfg.rqae.name} and {_name(cfg.sae)} on rows {rows[0]:,}..{rows[1]:,}"
             + (f" (dask: {client.dashboard_link or client.scheduler.address})" if client else ""))
        results = {"rqae": evaluate(replace(base, row_range=rows), progress=progress, client=client),
                   "sae": evaluate(sae_cfg, progress=progress, client=client)}
    space = model_space(sae_cfg)
    echo("Pearson feature matching")
    pearson = pearson_matching(rqae, sae, store, cfg.pearson, sae_space=space, prefixes=base.prefixes,
                               rows=rows, exclude=base.exclude)
    echo("decoder-direction matching")
    matching = decoder_matching(rqae, sae, store, space, cfg)
    report = {
        "store": {"path": str(cfg.store), "model": store.spec.model, "hook": store.spec.hook, "d": store.d,
                  "normalisation": store.spec.normalisation},
        "rqae": {"path": str(cfg.rqae), "n_q": rqae.n_q, **results["rqae"]},
        "sae": {"source": str(cfg.sae), "space": space, "d_sae": int(sae.cfg.d_sae),
                "architecture": sae.cfg.architecture(), **results["sae"]},
        "pearson": pearson,
        "decoder_matching": matching,
        "config": _jsonable(asdict(cfg)),
        "seconds": time.perf_counter() - t0,
    }
    write_report(report, cfg.out)
    return report


def decoder_matching(rqae, sae, store, sae_space: str, cfg: CompareConfig) -> dict:
    """Each SAE decoder direction's best match among the RQAE's projected codebooks, and a
    one-to-one assignment. RQAE directions live in the normalised space; for an SAE on raw
    residuals they are mapped to raw space (x_norm = x_raw / scale * gain, so a direction v
    becomes v / gain; the per-token scale does not change a direction)."""
    layers = min(rqae.n_q, cfg.match_layers or rqae.n_q)
    dirs = decoder_directions(rqae)[: layers * rqae.codebook.shape[0]]
    if sae_space == "raw" and store.spec.normalisation == "final-norm":
        dirs = dirs / store.gain
    sae_dirs = decoder_directions(sae)
    result = match_dictionaries(sae_dirs, dirs, candidates=cfg.match_candidates)
    per_layer = np.bincount(result.best_index // rqae.codebook.shape[0], minlength=layers)
    return {**result.summary(), "sae_features": len(sae_dirs), "rqae_directions": len(dirs), "rqae_layers": layers,
            "best_cosine_histogram": np.histogram(result.best_cosine, bins=20, range=(-1, 1))[0].tolist(),
            "assignment_cosine_histogram": np.histogram(result.assignment_cosine[result.assignment >= 0], bins=20,
                                                        range=(-1, 1))[0].tolist(),
            "best_match_layer_counts": per_layer.tolist()}


def write_report(report: dict, out: Path) -> None:
    from rqae_pipeline.report.html import render_comparison
    from rqae_pipeline.report.plots import plot_decoder_matching, plot_pearson, plot_reconstruction_vs_layers

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


def _name(ref) -> str:
    return str(ref)


def _default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=_default))
