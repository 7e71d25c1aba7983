"""Sparse-autoencoder baselines as real sae-lens objects, trained by sae-lens's own `SAETrainer`.

We do not re-implement SAE losses: the architecture comes from sae-lens's training
registry (every entry works: standard, gated, jumprelu, topk, abstopk, batchtopk,
matryoshka_batchtopk, matching_pursuit in sae-lens 6.54), and each step is
`SAETrainer.step` driven from our loop, as sae-lens's own `MultiSAETrainer` does. The
result is saved with sae-lens's inference format, so `sae_lens.SAE.load_from_disk` and
every sae-lens tool open it.

Activations are scaled to mean norm sqrt(d) during training (sae-lens's
"expected_average_only_in"), estimated on the first batch; the factor is folded into the
weights on save, exactly as `SAETrainer.fit` does, so the saved SAE reads store acts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.models.base import ModelSpec


def _registry() -> dict:
    import sae_lens  # noqa: F401  (importing registers every architecture)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return SAE_TRAINING_CLASS_REGISTRY


def sae_architectures() -> list[str]:
    return sorted(_registry())


def parse_sae_arch(arch: str) -> str:
    """`topk-sae`, `matryoshka-batchtopk-sae`, `matryoshka_batchtopk` -> the registry key."""
    name = arch.removesuffix("-sae").replace("-", "_")
    if name not in _registry():
        raise RQAEError(f"unknown SAE architecture {arch!r}; available: "
                        f"{', '.join(a + '-sae' for a in sae_architectures())}")
    return name


def _defaults(name: str, spec: ModelSpec, fields: set[str]) -> dict[str, Any]:
    d: dict[str, Any] = {"d_in": spec.d_in, "d_sae": spec.d_sae, "normalize_activations": "expected_average_only_in"}
    if "k" in fields:
        d["k"] = spec.k
    if name == "matryoshka_batchtopk":
        # nested dictionaries of 1/16, 1/4 and all of the latents
        d["matryoshka_widths"] = sorted({max(1, spec.d_sae // 16), max(1, spec.d_sae // 4), spec.d_sae})
    if name == "matching_pursuit":
        d["max_iterations"] = spec.k  # greedy residual selection of at most k latents, like TopK's k
    return d


class SAEBaseline:
    def __init__(self, spec: ModelSpec, *, total_steps: int, batch_size: int, device: str = "cpu", seed: int = 0):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.spec, self.device, self.name = spec, device, parse_sae_arch(spec.arch)
        sae_cls, cfg_cls = _registry()[self.name]
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        unknown = set(spec.options) - fields
        if unknown:
            raise RQAEError(f"unknown option(s) {sorted(unknown)} for {spec.arch}; valid: "
                            f"{', '.join(sorted(fields - {'d_in', 'd_sae', 'metadata'}))}")
        kwargs = {**_defaults(self.name, spec, fields), **spec.options, "device": device}
        try:
            cfg = cfg_cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise RQAEError(f"bad options for {spec.arch}: {e}") from None
        with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG untouched
            torch.manual_seed(seed)
            self.sae = sae_cls(cfg)
        trainer_cfg = SAETrainerConfig(total_training_samples=total_steps * batch_size,
                                       train_batch_size_samples=batch_size, lr=spec.lr, lr_end=spec.lr / 10,
                                       device=device)  # lr_end: set by the runner config sae-lens normally uses
        self.trainer = SAETrainer(trainer_cfg, self.sae, data_provider=iter(()))

    def init_from_data(self, sample: torch.Tensor) -> None:
        scaler = self.trainer.activation_scaler
        if self.sae.cfg.normalize_activations == "expected_average_only_in":
            # sae-lens's estimate (ActivationScaler.estimate_scaling_factor), on this sample
            scaler.scaling_factor = float(self.spec.d_in**0.5 / sample.float().norm(dim=-1).mean())
        if self.spec.mean_init:
            with torch.no_grad():
                self.sae.b_dec.copy_(scaler(sample.to(self.device)).mean(0))

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        out = self.trainer.step(x)
        self.trainer.n_training_steps += 1
        self.trainer.maybe_reset_sparsity()  # as SAETrainer.fit: roll the dead-latent window
        with torch.no_grad():
            sae_in, sae_out = out.sae_in.float(), out.sae_out.float()
            fvu = (sae_out - sae_in).pow(2).sum() / (sae_in - sae_in.mean(0)).pow(2).sum().clamp_min(1e-30)
            l0 = (out.feature_acts != 0).float().sum(-1).mean()
        return {"loss": float(out.loss.detach()), "fvu": float(fvu), "l0": float(l0)}

    def inference_sae(self):
        """The SAE as `save` would write it (activation scale folded in, training-only
        behaviour converted, e.g. BatchTopK's batch-level top-k to its learned JumpReLU
        threshold), built in memory; evaluation uses this, so reported metrics are those
        of the saved model. Cached until the next training step."""
        import copy

        from sae_lens import SAE

        key = self.trainer.n_training_steps
        if getattr(self, "_inference", (None, None))[0] != key:
            sae = copy.deepcopy(self.sae)
            if self.trainer.activation_scaler.scaling_factor is not None:
                sae.fold_activation_norm_scaling_factor(self.trainer.activation_scaler.scaling_factor)
            state = sae.state_dict()
            sae.process_state_dict_for_saving_inference(state)
            inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
            inference.load_state_dict(state)
            self._inference = (key, inference.to(self.device).eval())
        return self._inference[1]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.inference_sae()(x.to(self.device))

    @torch.no_grad()
    def health(self, x: torch.Tensor) -> dict[str, Any]:
        acts = self.inference_sae().encode(x.to(self.device))
        return {"l0": float((acts != 0).float().sum(-1).mean()), "dead": int(self.trainer.dead_neurons.sum()),
                "tokens": int(x.shape[0])}

    def checkpoint_state(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "sae": self.sae.state_dict(), "optimizer": t.optimizer.state_dict(),
            "lr_scheduler": t.lr_scheduler.state_dict(), "n_training_samples": t.n_training_samples,
            "n_training_steps": t.n_training_steps, "act_freq_scores": t.act_freq_scores.clone(),
            "n_forward_passes_since_fired": t.n_forward_passes_since_fired.clone(),
            "n_frac_active_samples": t.n_frac_active_samples,
            "coefficient_schedulers": {k: s.state_dict() for k, s in t.coefficient_schedulers.items()},
            "scaling_factor": t.activation_scaler.scaling_factor,
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        t = self.trainer
        self.sae.load_state_dict(state["sae"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for key in ("n_training_samples", "n_training_steps", "act_freq_scores", "n_forward_passes_since_fired",
                    "n_frac_active_samples"):
            setattr(t, key, state[key])
        for k, s in state["coefficient_schedulers"].items():
            t.coefficient_schedulers[k].load_state_dict(s)
        t.activation_scaler.scaling_factor = state["scaling_factor"]

    def save(self, out_dir: Path) -> None:
        """sae-lens's inference format, with the activation scale folded in (as `fit()` does)."""
        scaler = self.trainer.activation_scaler
        if scaler.scaling_factor is not None:
            self.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
            scaler.scaling_factor = None
        self.trainer.set_final_sae_metadata()
        self.sae.save_inference_model(str(out_dir))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sae.state_dict().values())
