"""Rendering of an `evaluate.evaluate` result: the terminal table of `rqae eval`, and its
`--out` files (the result as JSON, the reconstruction-vs-layers plot beside it)."""

from __future__ import annotations

import math
from pathlib import Path

from rqae_pipeline import RQAEError
from rqae_pipeline.io import atomic_write_text, check_output_file, json_text


def check_evaluation_out(out: Path) -> None:
    """`rqae eval --out` names the JSON file; its plot goes beside it with a .png suffix."""
    if out.suffix.lower() == ".png":
        raise RQAEError(f"--out {out} would be overwritten by its own plot (written beside it as .png); "
                        f"name the JSON file, e.g. {out.with_suffix('.json')}")
    check_output_file(out)


def write_evaluation(result: dict, out: Path, model_name: str) -> list[Path]:
    """OUT (JSON) and OUT with a .png suffix (`plot_reconstruction_vs_layers`)."""
    from rqae_pipeline.report.plots import plot_reconstruction_vs_layers

    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # the JSON last, the old one first: never a new plot beside an old JSON
    png = plot_reconstruction_vs_layers({model_name: result}, out.with_suffix(".png"))
    atomic_write_text(out, json_text(result))
    return [out, png]


def evaluation_lines(result: dict, model: Path) -> list[str]:
    """The terminal table: FVU and MSE in the stored (normalised) and the raw space, usage,
    and CE-delta / KL with bootstrap standard errors."""
    lines = [f"{model} on {result['tokens']:,} tokens (rows {result['rows'][0]:,}..{result['rows'][1]:,}), "
             f"reads {result.get('space', '?')} activations",
             f"{'reconstruction':16s} {'FVU stored':>10s} {'FVU raw':>10s} {'MSE stored':>12s} {'MSE raw':>12s}"]
    for label, m in sorted(result["metrics"].items(), key=lambda kv: (len(kv[0]), kv[0])):
        lines.append(f"{label:16s} {m['fvu_normalised']:10.5f} {m['fvu_raw']:10.5f} {m['mse_normalised']:12.5g} "
                     f"{m['mse_raw']:12.5g}")
    lines.append("FVU against the variance of the evaluated rows in each space (stored: the store's normalised rows)")
    if "latents" in result:
        lines.append(f"l0: {result.get('l0', float('nan')):.2f}; dead latents: {result['dead_latents']:,} of "
                     f"{result['latents']:,} (never fired on the {result['dead_window_tokens']:,} evaluated tokens"
                     + (f", {result['dead_window_firings_per_latent']:.1f} firings per latent if spread evenly)"
                        if "dead_window_firings_per_latent" in result else ")"))
    if "code_usage" in result:
        lines.append(f"code_usage: {result['code_usage']}")
    if "ce" in result:
        lines += ce_lines(result)
    return lines


def ce_lines(result: dict) -> list[str]:
    b = result["ce_bootstrap"]
    lines = [f"next-token CE on contexts {result['ce_contexts'][0]}..{result['ce_contexts'][1]} "
             f"({b['predictions']:,} predictions; ± bootstrap SE over {b['contexts']} contexts, "
             f"{b['resamples']} resamples):"]
    for label, m in result["ce"].items():
        extra = "".join(f"  {k} {m[k]:.4f}" + (f" ± {m[k + '_se']:.4f}" if math.isfinite(m[k + "_se"]) else "")
                        for k in ("ce_delta", "kl", "ce_recovered") if k in m)  # no ± for one context
        lines.append(f"  {label:28s} CE {m['ce']:.4f}{extra}")
    lines.append("  zero-ablation: every position zeroed (as sae-lens); ce_recovered = (CE_zero - CE) / "
                 "(CE_zero - CE_clean) against it")
    return lines + ["  " + line for line in clean_positions_lines(result)]


def clean_positions_lines(result: dict) -> list[str]:
    """A line when CE left positions other than BOS clean (norm outliers), which sae-lens splices."""
    n = result.get("ce_clean_positions_not_bos")
    return [f"{n:,} positions besides BOS (norm outliers) kept their clean activation in every spliced run; "
            f"sae-lens's get_recons_loss would splice them"] if n else []
