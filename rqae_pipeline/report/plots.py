"""PNG plots written next to the artifacts they describe (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402


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
            ax2.plot([r["tokens"] for r in ev], [r["heldout"]["fvu"] for r in ev], "o-", color="C1", label="held-out FVU")
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
    """Held-out FVU (and CE-delta where measured) against RQAE layers used, with SAEs as
    points at their L0: the layout of the blog's Fig 2b. `results` maps a model name to
    what `evaluate` returned for it."""
    has_ce = any("ce" in r for r in results.values())
    fig, axes = plt.subplots(1, 2 if has_ce else 1, figsize=(11 if has_ce else 6, 4), squeeze=False)
    for name, r in results.items():
        for ax, metric in zip(axes[0], ("fvu", "ce_delta")):
            if metric == "fvu":
                source = r["metrics"]
            elif "ce" in r:
                source = r["ce"]
            else:
                continue
            if r["kind"] == "rqae":
                pts = sorted((int(k.split("@")[1]), v[metric]) for k, v in source.items() if k.startswith("rqae@"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name} (layers used)")
            else:
                label = r["kind"]
                if label in source and "l0" in r:
                    ax.plot([r["l0"]], [source[label][metric]], "s", markersize=8, label=f"{name} (L0)")
    for ax, ylabel in zip(axes[0], ("held-out FVU", "CE delta (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("RQAE layers used / SAE L0")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
