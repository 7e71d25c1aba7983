"""Codebook plots (RQAE write-up, Fig 2a and the code-usage table) from `codebook_stats.codebook_stats`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_codebook_stats(stats: dict, out_dir: Path) -> list[Path]:
    """codebook_projected.png (Fig 2a: pairwise cosine of projected codes; their norms by
    layer) and code_usage.png (used codes and usage perplexity by layer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proj = stats["projected"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cos = proj["cosine"]
    edges = np.asarray(cos["edges"])
    left.stairs(np.asarray(cos["hist"]) / max(cos["pairs"], 1), edges, fill=True)
    left.set_yscale("log")
    left.axvspan(-0.2, 0.2, color="C1", alpha=0.15, label=f"|cos| < 0.2: {cos['abs_below_0.2']:.1%}")
    left.set_xlabel("cosine similarity")
    left.set_ylabel("fraction of pairs")
    left.set_title(f"projected codebooks, {cos['sampled_vectors']:,} sampled")
    left.legend()
    layers = np.arange(1, len(proj["norm_mean"]) + 1)
    right.fill_between(layers, proj["norm_min"], proj["norm_max"], alpha=0.25, label="min-max over codes")
    right.plot(layers, proj["norm_mean"], label="mean over codes")
    right.plot(layers, proj["layer_norm_L"], "--", label="L_i (mean decoder column norm)")
    right.set_xlabel("RQAE layer")
    right.set_ylabel("L2 norm")
    right.set_yscale("log")
    right.set_title("norm of projected codebooks by layer")
    right.legend()
    fig.tight_layout()
    written = [out_dir / "codebook_projected.png"]
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    usage = stats["usage"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, usage["used_codes"], label="codes used")
    ax.plot(layers, usage["perplexity"], label="usage perplexity")
    ax.axhline(stats["n_codes"], color="grey", ls=":", label=f"{stats['n_codes']} codes")
    ax.set_xlabel("RQAE layer")
    ax.set_ylabel("codes")
    ax.set_title(f"code usage on {stats['tokens']:,} tokens")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "code_usage.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def codebook_stats_lines(stats: dict, files: list[Path]) -> list[str]:
    """The terminal summary of `rqae codebook-stats`."""
    lines = [f"{'layers':>6s} {'distinct prefixes':>18s} {'tokens / prefix':>16s}"]
    for p in stats["prefixes"]:
        lines.append(f"{p['layers']:6d} {p['distinct']:18,d} {p['tokens_per_prefix']:16.2f}")
    used, cos = stats["usage"]["used_codes"], stats["projected"]["cosine"]
    lines.append(f"codes used per layer: min {min(used)}, median {sorted(used)[len(used) // 2]}, max {max(used)} "
                 f"of {stats['n_codes']} ({stats['tokens']:,} tokens)")
    lines.append(f"projected codebooks: {cos['abs_below_0.2']:.1%} of {cos['pairs']:,} sampled pairs have |cos| < 0.2 "
                 f"({cos['across_layers_abs_below_0.2']:.1%} of the pairs from different layers); "
                 f"mean norm layer 1 {stats['projected']['norm_mean'][0]:.3g}, "
                 f"layer {stats['n_q']} {stats['projected']['norm_mean'][-1]:.3g}")
    lines.append("wrote " + ", ".join(str(p) for p in files))
    return lines
