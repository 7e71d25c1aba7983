"""`Trainable` adapters for the torch modules (RQAE, codebook) and the dispatch by architecture.

The sae-lens SAEs have their own adapter (`models/sae.py`), which steps sae-lens's
`SAETrainer`; RQAE and the codebook use plain Adam, nanoGPT style.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.models.base import ModelSpec, Trainable
from rqae_pipeline.models.codebook import CodebookAE, CodebookConfig
from rqae_pipeline.models.rqae import RQAE, RQAEConfig


def batch_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU on one batch against the batch mean (progress display only; evaluation uses
    whole-set float64 sums)."""
    x64, e = x.double(), (x - x_hat).double()
    return float(e.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum().clamp_min(1e-30))


class ModuleTrainable:
    """Adam on a module exposing `training_loss(x) -> (loss, x_hat, codes)`."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, device: str):
        self.spec = spec
        self.module = module.to(device)
        self.device = device
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=spec.lr)

    def _loss(self, x):
        return self.module.training_loss(x)

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        self.module.train()
        x = x.to(self.device)
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.spec.dtype == "bfloat16"):
            loss, x_hat, _ = self._loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "fvu": batch_fvu(x, x_hat.detach())}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())

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


def code_usage(codes: torch.Tensor, n_codes: int) -> dict[str, Any]:
    """Per-layer code counts -> perplexity (exp of the usage entropy) and dead codes."""
    from rqae_pipeline.evaluate import code_usage_summary

    counts = torch.zeros(codes.shape[1], n_codes, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes.T, torch.ones_like(codes.T, dtype=torch.float64))
    return {**code_usage_summary(counts.cpu().numpy()), "tokens": int(codes.shape[0])}


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


def build_trainable(spec: ModelSpec, *, total_steps: int, batch_size: int, device: str, seed: int) -> Trainable:
    """Construct the architecture's trainable with seeded init (the global RNG is left alone)."""
    from rqae_pipeline.models.base import TRAIN_DTYPES

    if spec.dtype not in TRAIN_DTYPES:
        raise RQAEError(f"unknown training dtype {spec.dtype!r}; use {' or '.join(TRAIN_DTYPES)}")
    if spec.arch.endswith("-sae"):
        from rqae_pipeline.models.sae import SAEBaseline

        return SAEBaseline(spec, total_steps=total_steps, batch_size=batch_size, device=device, seed=seed)
    builders = {"rqae": RQAETrainable, "codebook": CodebookTrainable}
    if spec.arch not in builders:
        raise RQAEError(f"unknown architecture {spec.arch!r}; use rqae, codebook or <sae-lens architecture>-sae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[spec.arch](spec, device)


def load_model_dir(path: Path, device: str = "cpu"):
    """Open a trained model directory: an RQAE, a codebook or a sae-lens SAE."""
    path = Path(path)
    if (path / "config.json").exists():
        arch = json.loads((path / "config.json").read_text()).get("architecture")
        if arch == "rqae":
            return RQAE.load(path, device)
        if arch == "codebook":
            return CodebookAE.load(path, device)
    if (path / "cfg.json").exists():
        from sae_lens import SAE

        return SAE.load_from_disk(str(path), device=device)
    raise RQAEError(f"{path} is not a trained model directory")
