"""The seam between the training loop and an architecture.

`train.py` owns data (shuffled store batches, held-out split), progress, metrics,
checkpoints and resume; a `Trainable` owns its parameters, optimiser and step. A
checkpoint is `checkpoint_state()` saved with torch.save, so resuming restores the
weights, the optimiser and any counters bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture hyperparameters; part of a run's identity (resuming with others is refused)."""

    arch: str  # "rqae", "codebook", or "<sae-lens architecture>-sae"
    d_in: int
    n_q: int = 64  # RQAE layers
    d_sae: int = 4096  # SAE latents / codebook size
    k: int = 32  # active latents (TopK-style SAEs) / active codes (codebook)
    lr: float = 1e-2  # see default_lr: measured per family (docs/training.md)
    prefix_loss: bool = True  # RQAE: average MSE over every prefix reconstruction
    mean_init: bool = True  # initialise the output bias to the data mean
    options: dict[str, Any] = field(default_factory=dict)  # architecture-specific extras


def default_lr(arch: str) -> float:
    """Adam learning rates measured on real Gemma-3-270M activations (docs/training.md);
    SAEs keep sae-lens's own default."""
    return {"rqae": 1e-2, "codebook": 1e-3}.get(arch, 3e-4)


class Trainable(Protocol):
    spec: ModelSpec

    def init_from_data(self, sample: torch.Tensor) -> None:
        """Data-dependent initialisation from a (n, d) fp32 sample (e.g. bias = data mean)."""

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a (B, d) fp32 batch; returns at least {"loss": float}."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) reconstruction in eval mode, no grad."""

    def health(self, x: torch.Tensor) -> dict[str, Any]:
        """Cheap diagnostics on a batch (code usage, dead latents, L0, ...)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (weights, optimiser, counters)."""

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    def save(self, out_dir: Path) -> None:
        """Write the final artifact files (weights + architecture config) into `out_dir`."""

    def weight_bytes(self) -> int:
        """Bytes of the saved weights."""
