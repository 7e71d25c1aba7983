"""The seam between the training loop and an architecture.

`train.py` owns data (shuffled store batches, held-out split), progress, metrics,
checkpoints and resume; a `Trainable` owns its parameters, optimiser and step. A
checkpoint is `checkpoint_state()` saved with torch.save, so resuming restores the
weights, the optimiser and any counters bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import read_json

TrainDtype = Literal["float32", "bfloat16"]
TRAIN_DTYPES: tuple[str, ...] = get_args(TrainDtype)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture hyperparameters; part of a run's identity (resuming with others is refused)."""

    arch: str  # "rqae", "codebook", or "<sae-lens architecture>-sae"
    d_in: int
    n_q: int = 64  # RQAE layers
    d_sae: int = 4096  # SAE latents / codebook size
    k: int = 32  # active latents (TopK-style SAEs) / active codes (codebook)
    # None: the architecture's measured rate (`default_lr`, docs/training.md), filled in at
    # construction so the spec, and the run identity saved from it, hold the value used
    lr: float | None = None
    prefix_loss: bool = True  # RQAE: average MSE over every prefix reconstruction
    mean_init: bool = True  # initialise the output bias to the data mean
    # "bfloat16": autocast the forward pass (SAEs through SAETrainer's own autocast, the
    # codebook through torch.autocast). RQAE always trains in fp32: its quantisation and
    # residual arithmetic run with autocast off, as vector-quantize-pytorch's FSQ does.
    dtype: TrainDtype = "float32"
    options: dict[str, Any] = field(default_factory=dict)  # architecture-specific extras

    def __post_init__(self):
        from rqae_pipeline.models.registry import kind_of_spec_arch

        if self.dtype not in TRAIN_DTYPES:
            raise RQAEError(f"unknown training dtype {self.dtype!r}; use {' or '.join(TRAIN_DTYPES)}")
        kind_of_spec_arch(self.arch)  # raises naming the valid architectures
        if self.lr is None:
            object.__setattr__(self, "lr", default_lr(self.arch))
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):  # NaN fails too
            raise RQAEError(f"--lr must be a positive finite number, got {self.lr!r}")


def default_lr(arch: str) -> float:
    """Adam learning rates measured on real Gemma-3-270M activations (docs/training.md);
    SAEs keep sae-lens's own default. Each architecture's value lives in its registration."""
    from rqae_pipeline.models.registry import default_lr as registered_lr

    return registered_lr(arch)


class Trainable(Protocol):
    spec: ModelSpec

    def init_from_data(self, sample: torch.Tensor) -> None:
        """Data-dependent initialisation from a (n, d) fp32 sample (e.g. bias = data mean)."""

    def train_step(self, x: torch.Tensor, *, metrics: bool = True) -> dict[str, torch.Tensor]:
        """One optimiser step on a (B, d) fp32 batch; returns {"loss": ...} and, with
        `metrics`, the batch's other metrics (FVU, ...), as 0-d tensors on the model's device
        (reading them is a host sync; the loop asks for and reads them only when it logs)."""

    def data_parallel(self, ranks: Any) -> None:
        """Become one of `ranks` (`distributed.Ranks`) of a data-parallel run: average the
        gradients over the ranks in every step, and keep any per-step state the global batch's."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) reconstruction in eval mode, no grad."""

    def eval_model(self) -> Any:
        """The model as evaluation and its saved file see it (an RQAE / codebook module or
        a sae-lens SAE), for `evaluate.reconstruct`."""

    def health(self, x: torch.Tensor) -> dict[str, Any]:
        """Cheap diagnostics on a batch (code usage, dead latents, L0, ...)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (weights, optimiser, counters)."""

    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...

    def save(self, out_dir: Path) -> None:
        """Write the final artifact files (weights + architecture config) into `out_dir`."""

    def weight_bytes(self) -> int:
        """Bytes of the saved weights."""


def save_module_dir(module: torch.nn.Module, out_dir: str | Path, config: dict) -> None:
    """`config.json` (with an `architecture` key) + `model.safetensors`, the layout every
    non-sae-lens model directory uses (sae-lens's own is `cfg.json` + `sae_weights.safetensors`)."""
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=1))


def read_module_dir(model_dir: str | Path, architecture: str,
                    required: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a directory written by `save_module_dir`, checking its
    architecture and that its config has the `required` fields."""

    from safetensors.torch import load_file

    from rqae_pipeline.models.registry import architecture_of

    d = Path(model_dir)
    found = architecture_of(d)
    if found != architecture:
        raise RQAEError(f"{d} holds a {found!r} model, not {architecture!r}")
    weights = d / "model.safetensors"
    if not weights.exists():
        raise RQAEError(f"{weights} is missing; the model directory is incomplete")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises SafetensorError / OSError for a truncated or foreign file
        raise RQAEError(f"{weights} is damaged or truncated ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    return read_config(d, required), state


def read_config(model_dir: Path, required: tuple[str, ...]) -> dict:
    """A model directory's config.json, with the `required` fields present (one error line
    naming the missing ones, not a KeyError)."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    missing = [k for k in required if k not in cfg]
    if missing:
        raise RQAEError(f"{path} lacks {', '.join(missing)}; the model directory is incomplete")
    return cfg


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], model_dir: str | Path) -> None:
    """`module.load_state_dict(state)`; weights that do not fit the config are the directory's
    fault, said in one line (torch lists every mismatched tensor)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e)[:200])
        raise RQAEError(f"{model_dir}/model.safetensors does not fit its config.json: {detail}") from None
