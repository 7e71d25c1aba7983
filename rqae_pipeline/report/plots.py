"""PNG plots written next to the artifacts they describe (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402

from rqae_pipeline.metrics import prefix_of  # noqa: E402


def plot_training(metrics_path: Path, out_dir: Path, heldout: dict | None = None) -> list[Path]:
    """loss_curve.png (training loss and held-out FVU against tokens) and, for RQAE,
    fvu_vs_prefix.png (held-out FVU of the first m layers, log-log)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    written = []
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train loss")
        ev = [r for r in rows if "heldout" in r]
        if ev:
            ax2 = ax.twinx()
            ax2.plot([r["tokens"] for r in ev], [r["heldout"]["fvu"] for r in ev], "o-", color="C1",
                     label="held-out FVU")
            ax2.set_ylabel("held-out FVU")
            ax2.legend(loc="upper center")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
        fig.tight_layout()
        written.append(out_dir / "loss_curve.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    curve = (heldout or {}).get("fvu_by_prefix")
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ms = [int(m) for m in curve]
        ax.plot(ms, [curve[str(m)] for m in ms], "o-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("RQAE layers used (prefix length)")
        ax.set_ylabel("held-out FVU")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "fvu_vs_prefix.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_reconstruction_vs_layers(results: dict[str, dict], out_png: Path) -> Path:
    """Held-out MSE and FVU (stored space), FVU in raw space and (where measured) CE-delta
    with its bootstrap standard error against RQAE layers used, with SAEs as points at
    their L0: the layout of the blog's Fig 2b. `results` maps a model name to what
    `evaluate` returned for it."""
    panels = [("mse", "held-out MSE (stored space)"), ("fvu", "held-out FVU (stored space)"),
              ("fvu_raw", "held-out FVU (raw space)")]
    if any("ce" in r for r in results.values()):
        panels.append(("ce_delta", "CE delta (nats), ± bootstrap SE"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for name, r in results.items():
            _plot_model(ax, name, r, metric)
        ax.set_xscale("log", base=2)
        if metric == "ce_delta":  # a negative CE delta (a reconstruction that helps) must still show
            ax.set_yscale("symlog", linthresh=1e-2)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("RQAE layers used / SAE L0")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _plot_model(ax, name: str, r: dict, metric: str) -> None:
    source = r.get("ce") if metric == "ce_delta" else r["metrics"]
    if not source:
        return
    if r["kind"] == "rqae":
        pts = sorted((prefix_of(k), v.get(metric), v.get(f"{metric}_se")) for k, v in source.items()
                     if k.startswith("rqae@") and v.get(metric) is not None)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], fmt="o-",
                    capsize=3, label=f"{name} (layers used)")
    elif r["kind"] in source and "l0" in r and source[r["kind"]].get(metric) is not None:
        v = source[r["kind"]]
        ax.errorbar([r["l0"]], [v[metric]], yerr=[v.get(f"{metric}_se") or 0.0], fmt="s", markersize=8, capsize=3,
                    label=f"{name} (L0)")


def plot_pearson(pearson: dict, out_png: Path) -> Path:
    """Pearson correlation of SAE activations with RQAE intensities against RQAE layers used:
    mean and interquartile band over features, for query (a) the SAE's encoder vector and
    (b) its top-activating token (the layout of the blog's Fig 5a)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"a": "(a) SAE encoder vector, encoded", "b": "(b) top-activating token"}
    n = max((v["n"] for v in pearson["summary"]["a"].values()), default=0)
    if n == 0:  # nothing to draw: say so on the figure instead of plotting NaNs on log axes
        ax.text(0.5, 0.5, "no SAE feature qualified for Pearson matching", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(out_png, dpi=110)
        plt.close(fig)
        return out_png
    for key, colour in (("a", "C0"), ("b", "C1")):
        s = pearson["summary"][key]
        ms = sorted(int(m) for m in s)
        mean = [s[str(m)]["mean"] for m in ms]
        ax.plot(ms, mean, "o-", color=colour, label=labels[key])
        ax.fill_between(ms, [s[str(m)]["q25"] for m in ms], [s[str(m)]["q75"] for m in ms], color=colour, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("RQAE layers used")
    ax.set_ylabel("Pearson r (SAE activation, RQAE intensity)")
    ax.set_title(f"{n} SAE features; band: interquartile range", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_decoder_matching(matching: dict, out_png: Path) -> Path:
    """Histograms of each SAE decoder direction's best cosine with an RQAE projected code
    and of the one-to-one assignment's cosines; and which RQAE layer holds the best match."""
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(-1, 1, 21)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, matching["best_cosine_histogram"], width=0.1, alpha=0.6, label="best match")
    ax.bar(centres, matching["assignment_cosine_histogram"], width=0.1, alpha=0.6, label="one-to-one (Hungarian)")
    ax.set_xlabel("cosine with RQAE projected code")
    ax.set_ylabel("SAE features")
    ax.legend(fontsize=8)
    counts = matching["best_match_layer_counts"]
    ax2.bar(range(1, len(counts) + 1), counts)
    ax2.set_xlabel("RQAE layer of the best match")
    ax2.set_ylabel("SAE features")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
