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
