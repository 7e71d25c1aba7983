"""`Trainable` adapters for the torch modules (RQAE, codebook), and their registrations.

The sae-lens SAEs have their own adapter (`models/sae.py`), which steps sae-lens's
`SAETrainer`; RQAE and the codebook use plain Adam, nanoGPT style. Dispatch by
architecture is `models/registry.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.distributed import Ranks, average_gradients
from rqae_pipeline.metrics import code_counts, code_usage, default_prefixes, prefix_label, weight_bytes
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.codebook import CodebookAE, CodebookConfig
from rqae_pipeline.models.registry import Architecture, register
from rqae_pipeline.models.rqae import RQAE, RQAEConfig


def batch_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """FVU on one batch against the batch mean, a 0-d tensor on the batch's device (progress
    display only; evaluation uses whole-set float64 sums)."""
    x64, e = x.double(), (x - x_hat).double()
    return e.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum().clamp_min(1e-30)


class ModuleTrainable:
    """Adam on a module exposing `training_loss(x) -> (loss, x_hat, codes)`."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, device: str):
        self.spec = spec
        self.module = module.to(device)
        self.device = device
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=spec.lr)
        self._averager = None

    def _loss(self, x):
        return self.module.training_loss(x)

    def data_parallel(self, ranks: Ranks) -> None:
        """Train as one of `ranks`: gradients averaged over the ranks in every backward pass."""
        self._averager = average_gradients(self.module, ranks)

    def train_step(self, x: torch.Tensor, *, metrics: bool = True) -> dict[str, torch.Tensor]:
        # metrics stay 0-d device tensors: no host sync per step (the loop reads them when it logs)
        self.module.train()
        x = x.to(self.device)
        bf16 = self.spec.dtype == "bfloat16"
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss, x_hat, _ = self._loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not metrics:  # the batch FVU's float64 passes cost ~3-9% of a step (profiled on 2 ranks)
            return {"loss": loss.detach()}
        return {"loss": loss.detach(), "fvu": batch_fvu(x, x_hat.detach())}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def weight_bytes(self) -> int:
        return weight_bytes(self.module.state_dict().values())

    def eval_model(self) -> torch.nn.Module:
        """The model as evaluation sees it (the module itself, in eval mode)."""
        return self.module.eval()

    def save(self, out_dir: Path) -> None:
        self.module.save(out_dir)


class RQAETrainable(ModuleTrainable):
    def __init__(self, spec: ModelSpec, device: str):
        try:
            cfg = RQAEConfig(d_in=spec.d_in, n_q=spec.n_q, **spec.options)
        except TypeError as e:
            raise RQAEError(f"unknown RQAE option in {sorted(spec.options)}; valid: init, ste") from e
        except ValueError as e:
            raise RQAEError(str(e)) from None
        super().__init__(spec, RQAE(cfg), device)

    def _loss(self, x):
        return self.module.training_loss(x, prefix_loss=self.spec.prefix_loss)

    def init_from_data(self, sample: torch.Tensor) -> None:
        self.module.init_from_data(sample.to(self.device), mean_init=self.spec.mean_init)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        self.module.eval()
        x = x.to(self.device)
        return self.module.decode(self.module.encode(x), n_layers)

    @torch.no_grad()
    def health(self, x: torch.Tensor) -> dict[str, Any]:
        codes = self.module.encode(x.to(self.device)).long()
        return code_usage(codes, int(self.module.codebook.shape[0]))


class CodebookTrainable(ModuleTrainable):
    def __init__(self, spec: ModelSpec, device: str):
        super().__init__(spec, CodebookAE(CodebookConfig(d_in=spec.d_in, n_codes=spec.d_sae, k=spec.k)), device)

    def init_from_data(self, sample: torch.Tensor) -> None:
        if self.spec.mean_init:
            self.module.init_from_data(sample.to(self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x.to(self.device))

    @torch.no_grad()
    def health(self, x: torch.Tensor) -> dict[str, Any]:
        idx = self.module.encode(x.to(self.device))
        used = torch.zeros(self.spec.d_sae, dtype=torch.bool, device=idx.device)
        used[idx.reshape(-1)] = True
        return {"dead_codes": int((~used).sum()), "tokens": int(x.shape[0])}


# --------------------------------------------------------------------------- registrations


def _seeded(cls):
    def build(spec: ModelSpec, *, total_steps: int, batch_size: int, device: str, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(spec, device)

    return build


@torch.no_grad()
def reconstruct_rqae(model: RQAE, x: torch.Tensor, prefixes: tuple[int, ...] | None):
    """One reconstruction per prefix length ("rqae@m") and the per-layer code counts."""
    codes = model.encode(x)
    recons = {prefix_label(m): model.decode(codes, m) for m in (prefixes or default_prefixes(model.n_q))}
    return recons, {"codes": code_counts(codes, int(model.codebook.shape[0])).astype(np.float64)}


@torch.no_grad()
def reconstruct_codebook(model: CodebookAE, x: torch.Tensor, prefixes=None):
    idx = model.encode(x)
    fired = torch.zeros(model.cfg.n_codes, dtype=torch.float64).index_add_(
        0, idx.reshape(-1).cpu(), torch.ones(idx.numel(), dtype=torch.float64))
    return {"codebook": model.decode(idx)}, {"latents": fired.numpy()}


register(Architecture(kind="rqae", is_instance=lambda m: isinstance(m, RQAE), load=RQAE.load,
                      reconstruct=reconstruct_rqae, encode=RQAE.encode, default_lr=1e-2, build=_seeded(RQAETrainable)))
register(Architecture(kind="codebook", is_instance=lambda m: isinstance(m, CodebookAE), load=CodebookAE.load,
                      reconstruct=reconstruct_codebook, encode=CodebookAE.encode, default_lr=1e-3,
                      build=_seeded(CodebookTrainable)))
