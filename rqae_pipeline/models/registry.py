"""The architecture registry: the one place that knows which architectures exist, what a
model directory holds, and how to load, run and train each kind.

An architecture registers itself where its adapter is defined (`models/trainables.py` for
the RQAE and the codebook, `models/sae.py` for sae-lens SAEs), as sae-lens's `registry.py`
does. Everything that used to guess (evaluation, codes, steering, the training loop)
asks here:

- `architecture_of(model_dir)`: what a directory holds, from its `config.json`
  (`"architecture"`: rqae / codebook) or sae-lens's `cfg.json`; anything else is refused;
- `kind_of(model)`: the kind of a loaded model; an unknown object is refused, not guessed;
- `load_model_dir`, `reconstruct`, `build_trainable`, `default_lr`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import read_json

ArchitectureKind = Literal["rqae", "codebook", "sae"]
KINDS: tuple[str, ...] = get_args(ArchitectureKind)
SAE_SUFFIX = "-sae"  # ModelSpec.arch of an SAE: "<sae-lens architecture>-sae"

# (recons by label, usage counts by label) of one batch; see `reconstruct`
Reconstruction = tuple[dict[str, torch.Tensor], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """What the pipeline needs of one kind of model."""

    kind: ArchitectureKind
    is_instance: Callable[[Any], bool]  # does a loaded object belong to this kind?
    load: Callable[[Path, str], Any]  # (model dir, device) -> model in eval mode
    reconstruct: Callable[[Any, torch.Tensor, tuple[int, ...] | None], Reconstruction]
    default_lr: float  # Adam learning rate measured per family (docs/training.md)
    # (ModelSpec, *, total_steps, batch_size, device, seed) -> a `models.base.Trainable`; the
    # registry names no type of base.py, which itself asks the registry for defaults
    build: Callable[..., Any]
    encode: Callable[[Any, torch.Tensor], torch.Tensor] | None = None  # x -> codes / latent acts

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown architecture kind {self.kind!r}; use one of {', '.join(KINDS)}")


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.kind in _REGISTRY:
        raise ValueError(f"architecture {arch.kind!r} is registered twice")
    _REGISTRY[arch.kind] = arch
    return arch


def _registered() -> dict[str, Architecture]:
    # the registering modules are light at import (sae-lens itself loads on first use)
    import rqae_pipeline.models.sae
    import rqae_pipeline.models.trainables  # noqa: F401

    return _REGISTRY


def architecture(kind: str) -> Architecture:
    arch = _registered().get(kind)
    if arch is None:
        raise RQAEError(f"unknown architecture kind {kind!r}; use one of {', '.join(KINDS)}")
    return arch


def kind_of_spec_arch(arch: str) -> ArchitectureKind:
    """The kind a `ModelSpec.arch` names: "rqae", "codebook" or "<sae-lens architecture>-sae"."""
    if arch.endswith(SAE_SUFFIX):
        return "sae"
    if arch in ("rqae", "codebook"):
        return arch
    raise RQAEError(f"unknown architecture {arch!r}; use rqae, codebook or <sae-lens architecture>-sae")


# --------------------------------------------------------------------------- model directories


def architecture_of(model_dir: str | Path) -> ArchitectureKind:
    """What a trained model directory holds: the ONLY place that decides it.

    `config.json` with "architecture" rqae or codebook (written by `save_module_dir`), or
    sae-lens's `cfg.json` (any SAE it saved); anything else raises naming the directory."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if cfg_path.exists():
        arch = read_json(cfg_path).get("architecture")
        if arch in ("rqae", "codebook"):
            return arch
        if not (d / "cfg.json").exists():
            raise RQAEError(f"{d} holds a model of unknown architecture {arch!r} "
                            "(known: rqae, codebook, sae-lens SAEs)")
    if (d / "cfg.json").exists():
        return "sae"
    raise RQAEError(f"{d} is not a trained model directory (no config.json or sae-lens cfg.json)")


def load_model_dir(path: str | Path, device: str = "cpu"):
    """Open a trained model directory: an RQAE, a codebook or a sae-lens SAE."""
    return architecture(architecture_of(path)).load(Path(path), device)


# --------------------------------------------------------------------------- loaded models


def kind_of(model) -> ArchitectureKind:
    """The kind of a loaded model; an object of no registered kind is an error."""
    for arch in _registered().values():
        if arch.is_instance(model):
            return arch.kind
    raise RQAEError(f"{type(model).__name__} is not a model of a known architecture ({', '.join(KINDS)})")


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, prefixes: tuple[int, ...] | None = None) -> Reconstruction:
    """{label: x_hat} and {label: usage counts} for one batch, whatever the model's kind
    (labels: "rqae@m" for each prefix length m, "codebook", "sae")."""
    return architecture(kind_of(model)).reconstruct(model, x, prefixes)


# --------------------------------------------------------------------------- training


def default_lr(arch: str) -> float:
    """The learning rate a spec of `arch` ("rqae", "codebook", "<name>-sae") trains at by
    default (measured per family; SAEs keep sae-lens's own default)."""
    return architecture(kind_of_spec_arch(arch)).default_lr


def build_trainable(spec, *, total_steps: int, batch_size: int, device: str, seed: int):
    """The `Trainable` of a `ModelSpec` (checked when the spec was made), with seeded init
    (the global RNG is left alone)."""
    arch = architecture(kind_of_spec_arch(spec.arch))
    return arch.build(spec, total_steps=total_steps, batch_size=batch_size, device=device, seed=seed)
