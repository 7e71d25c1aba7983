"""Codebook plots (RQAE write-up, Fig 2a and the code-usage table) from `codes.codebook_stats`."""

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
