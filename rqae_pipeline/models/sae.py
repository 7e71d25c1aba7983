"""Sparse-autoencoder baselines as real sae-lens objects, trained by sae-lens's own `SAETrainer`.

We do not re-implement SAE losses, activations or dead-latent bookkeeping: the model and
its config class come from sae-lens's training registry (every entry works), and each of
our steps is `SAETrainer.step`, driven from our loop exactly as `SAETrainer.fit` and
`MultiSAETrainer.fit` drive it (sparsity-window reset, step, `n_training_steps += 1`).
Any comparison with the RQAE is therefore a comparison with sae-lens's own training code.

Inputs are scaled to mean norm sqrt(d_in) (sae-lens's `expected_average_only_in`,
Anthropic's April 2024 update), estimated as sae-lens's `ActivationScaler` does, on the
init sample; this makes the sparsity coefficients below independent of the store's
activation scale. Like `fit()`, the factor is folded into the weights of what is saved
(`save_inference_model`, the format sae-lens's runners write). Evaluation uses that same
inference SAE, built in memory, so reported metrics are the saved model's. Trained on a
store, it is saved for raw hook activations, with the store's normalisation around the
same weights (`models/sae_format.py`), and loaded back into the stored space here.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.distributed import SINGLE, Ranks, all_reduce_sum, average_gradients, broadcast_buffers
from rqae_pipeline.metrics import weight_bytes
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.registry import Architecture, register

# SAETrainerConfig fields a spec may set through `options`; the others belong to our loop
# (sizes, lr, device, checkpoints, logging) or to `fit()` alone.
TRAINER_OPTIONS = ("lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "lr_end", "n_restart_cycles",
                   "adam_beta1", "adam_beta2", "autocast", "dead_feature_window", "feature_sampling_window")
_OWN_FIELDS = {"d_in", "d_sae", "device", "metadata"}  # set from the spec / constructor


def _registry() -> dict:
    import sae_lens  # noqa: F401  (importing the package registers every architecture)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return SAE_TRAINING_CLASS_REGISTRY


def sae_architectures() -> list[str]:
    """The architectures sae-lens can train (its training registry), e.g. "topk"."""
    return sorted(_registry())


def parse_sae_arch(arch: str) -> str:
    """`topk-sae`, `topk_sae`, `matryoshka-batchtopk-sae`, `matryoshka_batchtopk` -> the registry key."""
    name = arch.replace("-", "_").removesuffix("_sae")
    if name not in _registry():
        raise RQAEError(f"unknown SAE architecture {arch!r}; available: "
                        f"{', '.join(a + '-sae' for a in sae_architectures())}")
    return name


def _defaults(name: str, spec: ModelSpec, fields: set[str], total_steps: int) -> dict[str, Any]:
    d: dict[str, Any] = {"normalize_activations": "expected_average_only_in"}
    if "k" in fields:
        d["k"] = spec.k
    if name == "matryoshka_batchtopk":
        # nested dictionaries of 1/16, 1/4 and all of the latents (the paper's are similar fractions)
        d["matryoshka_widths"] = sorted({w for w in (spec.d_sae // 16, spec.d_sae // 4) if w > 0} | {spec.d_sae})
    if name == "matching_pursuit":
        # at most k greedy selections, the budget TopK gets; unit decoder rows (sae-lens forces them)
        d |= {"max_iterations": spec.k, "decoder_init_norm": 1.0}
    if name in ("standard", "gated"):
        # Anthropic's April 2024 update: lambda=5 on the decoder-norm-weighted L1 for inputs at
        # norm sqrt(d) with a sum-over-d MSE (sae-lens's loss), warmed up over the first 5%
        d |= {"l1_coefficient": 5.0, "l1_warm_up_steps": total_steps // 20}
    if name == "jumprelu":
        # Gemma Scope 2's quadratic L0 penalty around a target, so L0 lands near k as for TopK.
        # The straight-through gradient also reaches the encoder (Anthropic's setting): with
        # DeepMind's threshold-only gradient the threshold moves <= lr per Adam step and the
        # encoder outgrows it (Gemma-3 store, d_sae 2048, k 32: L0 1233 of 2048 after 250 steps;
        # with it L0 44 and FVU 0.21 after 400 steps, TopK 0.16 after 250)
        d |= {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(min(spec.k, spec.d_sae)),
              "jumprelu_ste_to_input": True}
    return d


def _windows(total_steps: int) -> dict[str, int]:
    """sae-lens's dead-latent and sparsity windows (1000 and 2000 steps) scaled to the run:
    a twentieth of it, and twice that, capped at sae-lens's values, so runs of 20k steps
    or more get sae-lens's own and a short run still switches on the TopK family's
    dead-latent auxiliary loss (200 steps under a 1000-step window left half of a TopK
    SAE's latents dead). A latent silent for a twentieth of a short run is dead by any
    measure here: at k 32 of 2048 an average latent fires ~16 times per 1024-token batch."""
    dead = min(1000, max(1, total_steps // 20))
    return {"dead_feature_window": dead, "feature_sampling_window": min(2000, 2 * dead)}


class SAEBaseline:
    """A sae-lens `TrainingSAE` + `SAETrainer`, implementing `models.base.Trainable`."""

    def __init__(self, spec: ModelSpec, *, total_steps: int, batch_size: int | None = None, device: str = "cpu",
                 seed: int = 0):
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.spec, self.device, self.name = spec, str(device), parse_sae_arch(spec.arch)
        self.total_steps = int(total_steps)
        sae_cls, cfg_cls = _registry()[self.name]
        fields = {f.name for f in dataclasses.fields(cfg_cls)} - _OWN_FIELDS
        unknown = set(spec.options) - fields - set(TRAINER_OPTIONS)
        if unknown:
            raise RQAEError(f"unknown option(s) {sorted(unknown)} for {spec.arch}; valid: "
                            f"{', '.join(sorted(fields | set(TRAINER_OPTIONS)))}")
        sae_kw = {**_defaults(self.name, spec, fields, self.total_steps),
                  **{k: v for k, v in spec.options.items() if k in fields}}
        trainer_kw = {"lr_end": spec.lr / 10,  # sae-lens's runner default; only cosine/decay read it
                      "autocast": spec.dtype == "bfloat16", **_windows(self.total_steps),
                      **{k: v for k, v in spec.options.items() if k in TRAINER_OPTIONS}}
        with torch.random.fork_rng(devices=[]):
            # built on the CPU from a seeded CPU generator (only: torch.manual_seed would also
            # reseed CUDA), so the init is the same on every device and the caller's RNG is untouched
            torch.default_generator.manual_seed(seed)
            try:
                self.sae = sae_cls(cfg_cls(d_in=spec.d_in, d_sae=spec.d_sae, device="cpu", **sae_kw))
            except (TypeError, ValueError) as e:
                raise RQAEError(f"bad options for {spec.arch}: {e}") from None
        self.sae.to(self.device)
        bs = batch_size or 1  # corrected to the real batch at the first step (_match_batch)
        # total_training_samples only fixes the lr schedule's length (total_steps): `fit()` is never called
        cfg = SAETrainerConfig(total_training_samples=self.total_steps * bs, train_batch_size_samples=bs, lr=spec.lr,
                               device=self.device, logger=LoggingConfig(log_to_wandb=False), **trainer_kw)
        self.trainer = SAETrainer(cfg, self.sae, data_provider=iter(()))
        self._inference = None  # cached inference SAE, dropped whenever the weights change
        self.source = None  # the store's SAESource (`record_source`); `save` then writes a raw-activation SAE
        self.ranks, self._averager = SINGLE, None  # `data_parallel` sets them

    # ------------------------------------------------------------------ training

    def _estimate_normalization(self, sample: torch.Tensor) -> None:
        """sae-lens's estimates (as `fit()` makes them before its first step), on `sample`."""
        scaler, how = self.trainer.activation_scaler, self.sae.cfg.normalize_activations
        if how == "expected_average_only_in" and scaler.scaling_factor is None:
            # ActivationScaler.estimate_scaling_factor's sqrt(d_in) / mean norm, minus its progress bar
            scaler.scaling_factor = self.spec.d_in**0.5 / float(sample.norm(dim=-1).double().mean())
        elif how == "covariance_whitening" and scaler.whitening is None:
            scaler.estimate_whitening(self.spec.d_in, iter([sample]), n_batches_for_norm_estimate=1)

    def init_from_data(self, sample: torch.Tensor) -> None:
        sample = sample.to(self.device, torch.float32)
        self._estimate_normalization(sample)
        if self.spec.mean_init:
            # sae-lens 6 has no b_dec init option (no geometric median any more); the data mean
            # in the space b_dec lives in (after the scaler and any per-token layer_norm) is usual
            with torch.no_grad():
                sae_in = self.sae.run_time_activation_norm_fn_in(self.trainer.activation_scaler(sample))
                self.sae.run_time_activation_norm_fn_out(sae_in)  # drops the per-token stats fn_in kept
                self.sae.b_dec.copy_(sae_in.mean(0))
        if self.name == "jumprelu" and "jumprelu_init_threshold" not in self.spec.options:
            # threshold at the pre-activations' (1 - k/d_sae) quantile, so L0 starts at k rather
            # than ~d_sae/2 (sae-lens's 0.01): on the Gemma-3 store L0 then stays near k and the
            # FVU after 150 steps is 0.50 instead of 0.55 (at L0 84)
            with torch.no_grad():
                pre = self.sae.encode_with_hidden_pre(self.trainer.activation_scaler(sample))[1].flatten()
                rank = max(1, round((1 - self.spec.k / self.spec.d_sae) * len(pre)))
                self.sae.threshold.fill_(max(0.0, float(pre.kthvalue(rank).values)))
        self._inference = None

    def _match_batch(self, n: int) -> None:
        # SAETrainer counts n_frac_active_samples in cfg.train_batch_size_samples per step; keep
        # it the real batch size (the lr schedule was already built for total_steps)
        cfg = self.trainer.cfg
        if cfg.train_batch_size_samples != n:
            cfg.train_batch_size_samples, cfg.total_training_samples = n, self.total_steps * n

    def data_parallel(self, ranks: Ranks) -> None:
        """Train as one of `ranks`: gradients averaged over the ranks inside sae-lens's backward
        (before its gradient clipping and Adam step), and its per-step dead-latent bookkeeping
        made the global batch's (`_share_sparsity_stats`)."""
        self.ranks = ranks
        self._averager = average_gradients(self.sae, ranks)

    def train_step(self, x: torch.Tensor, *, metrics: bool = True) -> dict[str, torch.Tensor]:
        t, ranks = self.trainer, self.ranks
        x = x.to(self.device)
        self._estimate_normalization(x.float())  # no-op once init_from_data (or a checkpoint) set it
        self._match_batch(x.shape[0] * ranks.world_size)  # the global batch: sae-lens counts samples with it
        t.maybe_reset_sparsity()  # the per-step sequence of SAETrainer.fit / MultiSAETrainer.fit
        freq_before = t.act_freq_scores.clone() if ranks.distributed else None
        out = t.step(x)
        if ranks.distributed:
            self._share_sparsity_stats(freq_before, x.shape[0])
        t.n_training_steps += 1
        self._inference = None
        if not metrics:
            return {"loss": out.loss.detach().float().reshape(())}
        with torch.no_grad():  # 0-d device tensors: no host sync per step (the loop reads them when it logs)
            sae_in, sae_out = out.sae_in.float(), out.sae_out.float()
            fvu = (sae_out - sae_in).pow(2).sum() / (sae_in - sae_in.mean(0)).pow(2).sum().clamp_min(1e-30)
            names = ["loss", "fvu", "l0", "dead", *out.losses]
            vals = [out.loss, fvu, out.feature_acts.bool().float().sum(-1).to_dense().mean(),
                    t.dead_neurons.sum(), *out.losses.values()]
            return {k: torch.as_tensor(v).detach().float().to(self.device).reshape(()) for k, v in zip(names, vals)}

    @torch.no_grad()
    def _share_sparsity_stats(self, freq_before: torch.Tensor, local_rows: int) -> None:
        """SAETrainer updates its dead-latent counters from this rank's slice; make them the
        global batch's on every rank (a latent fired if it fired on any rank; firing counts add),
        so the dead-latent mask that TopK's auxiliary loss reads is the single-process one."""
        t, ranks = self.trainer, self.ranks
        fired = (t.n_forward_passes_since_fired == 0).float()  # 0 only where it fired this step
        both = all_reduce_sum(torch.cat([fired, t.act_freq_scores - freq_before]), ranks)
        t.n_forward_passes_since_fired[both[: fired.numel()] > 0] = 0
        t.act_freq_scores.copy_(freq_before + both[fired.numel() :])
        t.n_training_samples += local_rows * (ranks.world_size - 1)
        broadcast_buffers(self.sae, ranks)  # BatchTopK's running threshold: rank 0's

    # ------------------------------------------------------------------ the saved model

    def _folded(self):
        """A copy of the training SAE with the input normalisation folded in, as `fit()` leaves it."""
        sae, scaler = copy.deepcopy(self.sae), self.trainer.activation_scaler
        if scaler.scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
        if scaler.whitening is not None:
            w = scaler.whitening
            sae.fold_activation_whitening(mean=w.mean, whitening_matrix=w.matrix, unwhitening_matrix=w.inverse_matrix)
        return sae

    def inference_sae(self):
        """The SAE exactly as `save` writes and `SAE.load_from_disk` reads it (BatchTopK becomes
        JumpReLU, ...), built in memory with sae-lens's save/load hooks; cached until the next step."""
        from sae_lens import SAE

        if self._inference is None:
            folded = self._folded()
            state = folded.state_dict()
            folded.process_state_dict_for_saving_inference(state)
            cfg = folded.cfg.get_inference_sae_cfg_dict()
            sae = SAE.from_dict({**cfg, "device": "meta"})  # as load_from_disk: no random init, no RNG use
            sae.cfg.device = self.device
            sae.process_state_dict_for_loading(state)
            sae.load_state_dict(state, assign=True)
            self._inference = sae.to(self.device).eval()
        return self._inference

    def eval_model(self):
        """`Trainable.eval_model`: the inference SAE (what `save` writes)."""
        return self.inference_sae()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.inference_sae()(x.to(self.device))

    @torch.no_grad()
    def health(self, x: torch.Tensor) -> dict[str, Any]:
        acts = self.inference_sae().encode(x.to(self.device))
        return {"l0": float((acts != 0).float().sum(-1).mean()), "dead": int(self.trainer.dead_neurons.sum()),
                "tokens": int(x.shape[0])}

    def record_source(self, store) -> None:
        """Say which activations this SAE reads (the `ActivationStore` it trains on): `save`
        then fills cfg.json's metadata (LM, hook, context size, corpus) and saves it under
        "<architecture>-<normalisation>", which normalises raw hook activations as the store
        did (`models/sae_format.py`), so sae-lens and `rqae eval` cannot misread it."""
        from rqae_pipeline.models.sae_format import SAESource

        self.source = SAESource.of_store(store)

    def save(self, out_dir: Path) -> None:
        """sae-lens's inference format (cfg.json + sae_weights.safetensors), as its runners write
        it; for raw activations when `record_source` said what the store's rows are."""
        self.trainer.set_final_sae_metadata()  # l0 / dead latents of the last window, into cfg.json
        if self.source is None:
            self._folded().save_inference_model(str(out_dir))
            return
        from rqae_pipeline.models.sae_format import normalised_sae

        self._inference = None  # rebuilt with the final metadata
        normalised_sae(self.inference_sae(), self.source).save_model(str(out_dir))

    def weight_bytes(self) -> int:
        return weight_bytes(self.inference_sae().state_dict().values())

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """The SAE's state dict + what `SAETrainer.save_trainer_state` writes (optimizer, lr and
        coefficient schedulers, counters, dead-latent statistics, activation scaler)."""
        t, scaler = self.trainer, self.trainer.activation_scaler
        state = {
            "sae": self.sae.state_dict(), "optimizer": t.optimizer.state_dict(),
            "lr_scheduler": t.lr_scheduler.state_dict(),
            "coefficient_schedulers": {k: s.state_dict() for k, s in t.coefficient_schedulers.items()},
            **{k: getattr(t, k) for k in ("n_training_samples", "n_training_steps", "act_freq_scores",
                                          "n_forward_passes_since_fired", "n_frac_active_samples",
                                          "started_fine_tuning")},
            "train_batch_size_samples": t.cfg.train_batch_size_samples,
            "scaling_factor": scaler.scaling_factor,
            "whitening": dataclasses.asdict(scaler.whitening) if scaler.whitening is not None else None,
        }
        # a snapshot: state dicts alias the live parameters and Adam moments, updated in place
        return copy.deepcopy(state)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        from sae_lens.training.activation_scaler import ActivationWhitening

        # copied in: Optimizer.load_state_dict would otherwise train on the caller's tensors in place
        state, t = copy.deepcopy(state), self.trainer
        self.sae.load_state_dict(state["sae"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for k, s in state["coefficient_schedulers"].items():
            t.coefficient_schedulers[k].load_state_dict(s)
        for k in ("n_training_samples", "n_training_steps", "n_frac_active_samples", "started_fine_tuning"):
            setattr(t, k, state[k])
        for k in ("act_freq_scores", "n_forward_passes_since_fired"):
            setattr(t, k, state[k].to(self.device))
        self._match_batch(state["train_batch_size_samples"])
        t.activation_scaler.scaling_factor = state["scaling_factor"]
        w = state["whitening"]
        t.activation_scaler.whitening = ActivationWhitening(**w) if w is not None else None
        self._inference = None


# --------------------------------------------------------------------------- registration


def _is_sae(model) -> bool:
    import sys

    sae_lens = sys.modules.get("sae_lens")  # an SAE object exists only once sae-lens is imported
    return sae_lens is not None and isinstance(model, sae_lens.SAE)


def _load_sae_dir(path: Path, device: str = "cpu"):
    from rqae_pipeline.models.sae_format import load_sae_dir

    return load_sae_dir(path, device)  # in the stored space, whatever space its cfg.json names


@torch.no_grad()
def reconstruct_sae(model, x: torch.Tensor, prefixes=None):
    """The reconstruction ("sae"), each latent's firing count and the summed L0."""
    import numpy as np

    acts = model.encode(x)
    fired = (acts != 0).double()
    return {"sae": model.decode(acts)}, {"latents": fired.sum(0).cpu().numpy(), "l0": np.array([float(fired.sum())])}


def _build_sae(spec: ModelSpec, *, total_steps: int, batch_size: int, device: str, seed: int) -> SAEBaseline:
    return SAEBaseline(spec, total_steps=total_steps, batch_size=batch_size, device=device, seed=seed)


# sae-lens's own default Adam rate (its runner config), kept for every SAE architecture
register(Architecture(kind="sae", is_instance=_is_sae, load=_load_sae_dir, reconstruct=reconstruct_sae,
                      encode=lambda model, x: model.encode(x), default_lr=3e-4, build=_build_sae))
