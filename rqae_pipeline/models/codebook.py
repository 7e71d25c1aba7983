"""Codebook Features bottleneck as an autoencoder baseline.

Codebook Features (Tamkin et al., 2023, arXiv:2310.17230; seeds/000-002) replace a
layer's activation by the sum of the k codebook vectors most cosine-similar to it, with
no coefficients: each code is on or off. The paper inserts the bottleneck into the LM and
finetunes the whole network, so upstream layers learn to produce activations near codes.
Here the LM is frozen and only the codebook learns from stored activations, which makes
this a k-sparse, binary-coefficient dictionary (a close cousin of k-means); we add a
learned decoder bias initialised to the data mean, as SAEs do, so codes model deviations
from the mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rqae_pipeline.models.base import load_module_state, read_module_dir, save_module_dir


@dataclass(frozen=True, kw_only=True)
class CodebookConfig:
    d_in: int
    n_codes: int = 4096  # C
    k: int = 32  # active codes per token

    def __post_init__(self):
        if not 1 <= self.k <= self.n_codes:
            raise ValueError("need 1 <= k <= n_codes")


class CodebookAE(torch.nn.Module):
    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook = torch.nn.Parameter(torch.randn(cfg.n_codes, cfg.d_in) / cfg.d_in**0.5)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in))

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, seed: int = 0) -> None:
        """b_dec = data mean; codes = random centred data rows scaled by 1/k, so a sum of k
        codes starts at the data's scale (the paper starts from random vectors)."""
        mean = sample.mean(0)
        self.b_dec.copy_(mean)
        idx = torch.randint(len(sample), (self.cfg.n_codes,), generator=torch.Generator().manual_seed(seed))
        self.codebook.copy_((sample[idx] - mean) / self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, k) indices of the k codes most cosine-similar to x - b_dec."""
        sims = F.normalize(x - self.b_dec, dim=-1) @ F.normalize(self.codebook, dim=-1).T
        return sims.topk(self.cfg.k, dim=-1).indices

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codebook[idx].sum(1) + self.b_dec

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.encode(x.detach())  # selection is not differentiable; chosen codes get the gradient
        x_hat = self.decode(idx)
        return (x - x_hat).pow(2).mean(), x_hat, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def save(self, out_dir: str | Path, *, extra: dict | None = None) -> None:
        save_module_dir(self, out_dir, {"architecture": "codebook", **asdict(self.cfg), **(extra or {})})

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> CodebookAE:
        cfg, state = read_module_dir(model_dir, "codebook", required=("d_in", "n_codes", "k"))
        model = cls(CodebookConfig(d_in=cfg["d_in"], n_codes=cfg["n_codes"], k=cfg["k"]))
        load_module_state(model, state, model_dir)
        return model.to(device).eval()
