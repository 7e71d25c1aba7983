"""Rendering of an `evaluate.evaluate` result: the terminal table of `rqae eval`, and its
`--out` files (the result as JSON, the reconstruction-vs-layers plot beside it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_evaluation(result: dict, out: Path, model_name: str) -> list[Path]:
    """OUT (JSON) and OUT with a .png suffix (`plot_reconstruction_vs_layers`)."""
    from rqae_pipeline.report.plots import plot_reconstruction_vs_layers

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return [out, plot_reconstruction_vs_layers({model_name: result}, out.with_suffix(".png"))]


def evaluation_lines(result: dict, model: Path) -> list[str]:
    lines = [f"{model} on {result['tokens']:,} tokens (rows {result['rows'][0]:,}..{result['rows'][1]:,})",
             f"{'reconstruction':16s} {'FVU':>10s} {'MSE':>12s}"]
    for label, m in sorted(result["metrics"].items(), key=lambda kv: (len(kv[0]), kv[0])):
        lines.append(f"{label:16s} {m['fvu']:10.5f} {m['mse']:12.5g}")
    for key in ("l0", "dead_latents", "code_usage"):
        if key in result:
            lines.append(f"{key}: {result[key]}")
    if "ce" in result:
        lines.append(f"next-token CE on contexts {result['ce_contexts'][0]}..{result['ce_contexts'][1]}:")
        for label, m in result["ce"].items():
            extra = "".join(f"  {k} {v:.4f}" for k, v in m.items() if k != "ce")
            lines.append(f"  {label:16s} CE {m['ce']:.4f}{extra}")
    return lines
