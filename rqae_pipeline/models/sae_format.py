"""The saved SAE format: sae-lens directories that say which activations they read.

An SAE trained here reads the store's rows, not raw residuals: x_n = x / rms(x) * g in
"final-norm" mode (the LM's final RMSNorm with its gain g, eps as the LM's), x / rms(x)
in "rms" mode (DESIGN.md section 3). sae-lens 6 has no such input normalisation (its
`layer_norm` centres and divides by the std, without a gain), so a directory saved under a
plain "topk" would be read as a raw-residual SAE and splice wrong reconstructions into the
LM without any error.

Such an SAE is therefore saved under its own architecture, "<base>-<normalisation>"
(e.g. "topk-final-norm", "jumprelu-rms"), registered with sae-lens's
`register_sae_class` when this module is imported. The class is the base class with
sae-lens's own normalisation seam (`run_time_activation_norm_fn_in` / `_out`, the one its
`layer_norm` mode uses) filled in: `encode` normalises the raw hook activation exactly as
the harvest did (`lm.normalise`: same ops, same order, fp32 bit for bit) and `decode` maps
back with x_hat / g * rms(x). The weights are the stored-space weights unchanged, plus the
gain as `norm_gain`; `norm_eps` and `input_normalisation` are config fields. So

- `SAE.load_from_disk(dir)` + `HookedSAETransformer.add_sae` reconstruct correctly;
- without this module imported, sae-lens refuses the unknown architecture (KeyError)
  instead of silently misreading;
- the pipeline itself keeps working in the stored space: `load_sae_dir` returns the base
  class with the very same tensors (`stored_space_sae`), so every number is as before.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, get_sae_class, register_sae_class
from safetensors import SafetensorError

from rqae_pipeline import RQAEError
from rqae_pipeline.io import checked_fields, read_json
from rqae_pipeline.lm import NORMALISATIONS
from rqae_pipeline.lm import Normalisation as InputNormalisation

# inference architectures our training can save (BatchTopK / Matryoshka become jumprelu);
# transcoders and the temporal SAE read other hooks or contexts, so they are not wrapped
BASES = ("standard", "gated", "topk", "abstopk", "jumprelu", "matching_pursuit")
GAIN_KEY = "norm_gain"
# TransformerLens kwargs of every LM the pipeline loads (`from_pretrained_no_processing` or a
# config): `from_pretrained`'s fold_ln / centring would change the residual basis
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
# sae-lens's advice to users of such an SAE, silenced where the pipeline loads its own
_KWARGS_WARNING = r"\s*This SAE has non-empty model_from_pretrained_kwargs"
_BASE_OF: dict[str, str] = {}  # registered name -> base architecture


def architecture_name(base: str, normalisation: str) -> str:
    return f"{base}-{normalisation}"


# --------------------------------------------------------------------------- the architectures


class _NormalisedInput:
    """Mixin before a sae-lens inference SAE class: raw hook activations in, raw out."""

    cfg: Any

    def _setup_activation_normalization(self) -> None:
        # sae-lens's own modes would stack on top of ours; the saved SAEs never use one
        if self.cfg.normalize_activations != "none":
            raise ValueError(f"{self.cfg.architecture()} takes normalize_activations='none'")

    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        self.register_buffer(GAIN_KEY, torch.ones(self.cfg.d_in, dtype=self.dtype, device=self.device))

    def run_time_activation_norm_fn_in(self, x: torch.Tensor) -> torch.Tensor:
        # lm.normalise's ops in its order, so fp32 inputs give the store's rows bit for bit
        scale = (x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps).sqrt()
        self.norm_scale = scale  # (..., 1) per-token RMS, for the decode of these latents
        return x / scale * self.norm_gain

    def run_time_activation_norm_fn_out(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.__dict__.pop("norm_scale", None)  # used once, as sae-lens's layer_norm mode does
        if scale is None:
            raise RQAEError(f"{self.cfg.architecture()} decodes to raw activations with the per-token RMS of "
                            "the input it encoded: call encode first (or use stored_space_sae for stored rows)")
        return x / self.norm_gain * scale


def _register(base: str, normalisation: str) -> None:
    base_sae, base_cfg = get_sae_class(base)
    name = architecture_name(base, normalisation)

    @dataclass
    class Config(base_cfg):  # type: ignore[misc, valid-type]
        input_normalisation: str = normalisation
        norm_eps: float = 1e-6

        def __post_init__(self):
            super().__post_init__()
            if self.input_normalisation != normalisation:
                raise ValueError(f"architecture {name} reads {normalisation!r} inputs, "
                                 f"not input_normalisation={self.input_normalisation!r}")

        @classmethod
        def architecture(cls) -> str:
            return name

    sae_cls = type(f"{base_sae.__name__}{normalisation.title().replace('-', '')}", (_NormalisedInput, base_sae), {})
    Config.__name__ = Config.__qualname__ = f"{sae_cls.__name__}Config"
    register_sae_class(name, sae_cls, Config)
    _BASE_OF[name] = base


for _base in BASES:
    for _mode in NORMALISATIONS:
        if _base in SAE_CLASS_REGISTRY and architecture_name(_base, _mode) not in SAE_CLASS_REGISTRY:
            _register(_base, _mode)


# --------------------------------------------------------------------------- what a store's rows are


@dataclass(frozen=True, kw_only=True)
class SAESource:
    """The activations an SAE trained on a store reads, as its cfg.json records them."""

    model_name: str
    hook_name: str
    context_size: int
    dataset_path: str
    normalisation: InputNormalisation
    gain: torch.Tensor = field(compare=False)  # (d,) float32; ones in "rms" mode
    eps: float

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'final-norm' or 'rms'")

    @classmethod
    def of_store(cls, store) -> SAESource:
        """From an `ActivationStore`'s manifest. eps is the harvest's (`provenance.norm_eps`);
        older stores did not record it and get 1e-6, Gemma's, which moves rms(x) by a relative
        |eps - 1e-6| / (2 rms(x)^2), negligible for residual streams."""
        spec = store.spec
        gain = store.gain if spec.normalisation == "final-norm" else torch.ones(store.d)
        eps = store.manifest.get("provenance", {}).get("norm_eps", 1e-6)
        return cls(model_name=spec.model, hook_name=spec.hook, context_size=spec.context_length,
                   dataset_path=spec.corpus.get("name", ""), normalisation=spec.normalisation,
                   gain=gain.float(), eps=float(eps))

    def metadata(self) -> dict[str, Any]:
        """sae-lens `SAEMetadata` fields (those its runner fills), for `add_sae` and its evals."""
        return {"model_name": self.model_name, "hook_name": self.hook_name, "hook_head_index": None,
                "context_size": self.context_size, "prepend_bos": True,  # every context starts with BOS
                "dataset_path": self.dataset_path, "model_class_name": "HookedTransformer",
                "model_from_pretrained_kwargs": dict(NO_PROCESSING),
                "architecture_registered_by": __name__}


# --------------------------------------------------------------------------- conversions


def _rebuild(cfg: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> SAE:
    """An SAE of `cfg["architecture"]` holding `state` (as `SAE.load_from_disk` builds one)."""
    with warnings.catch_warnings():
        # the no-processing kwargs in the metadata are for users' LMs; ours are loaded so
        warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
        sae = SAE.from_dict({**cfg, "device": "meta"})
    sae.cfg.device = device
    sae.load_state_dict(state, assign=True)
    return sae.to(device)


def normalised_sae(stored: SAE, source: SAESource) -> SAE:
    """The raw-activation SAE of a stored-space one: same weights, plus the store's
    normalisation around them, under "<base>-<normalisation>"."""
    base = stored.cfg.architecture()
    if base not in BASES:
        raise RQAEError(f"cannot save a {base!r} SAE for raw activations (supported: {', '.join(BASES)})")
    cfg = stored.cfg.to_dict()
    cfg.update(architecture=architecture_name(base, source.normalisation), input_normalisation=source.normalisation,
               norm_eps=source.eps, metadata={**cfg["metadata"], **source.metadata()})
    device = str(stored.W_dec.device)
    state = {**stored.state_dict(), GAIN_KEY: source.gain.to(device, stored.W_dec.dtype)}
    return _rebuild(cfg, state, device)


def stored_space_sae(sae: SAE) -> SAE:
    """The base-class SAE with the same tensors, reading the store's rows (a plain sae-lens
    SAE is returned as it is)."""
    name = sae.cfg.architecture()
    if name not in _BASE_OF:
        return sae
    cfg = {k: v for k, v in sae.cfg.to_dict().items() if k not in ("input_normalisation", "norm_eps")}
    state = {k: v for k, v in sae.state_dict().items() if k != GAIN_KEY}
    return _rebuild({**cfg, "architecture": _BASE_OF[name]}, state, str(sae.W_dec.device))


def load_sae_dir(path: str | Path, device: str = "cpu") -> SAE:
    """A sae-lens SAE directory, as the pipeline uses it: in the stored space when it was
    saved for raw activations, as it is otherwise (e.g. a raw-residual SAE). A directory
    sae-lens cannot build an SAE from (cfg.json cut short, lacking a field or naming an unknown
    architecture; weights missing or damaged) is one error line naming it, not a traceback
    from inside sae-lens's loader."""
    cfg_path = Path(path) / "cfg.json"
    cfg = read_json(cfg_path, {"architecture": str, "d_in": int, "d_sae": int})
    name = cfg["architecture"]
    if name not in SAE_CLASS_REGISTRY:
        raise RQAEError(f"{cfg_path}: architecture {name!r} is not one sae-lens knows "
                        f"({', '.join(sorted(SAE_CLASS_REGISTRY))})")
    if "k" in {f.name for f in dataclasses.fields(SAE_CLASS_REGISTRY[name][1])}:
        checked_fields(cfg, cfg_path, {"k": int})  # without it sae-lens builds its default k: another SAE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
        try:
            sae = SAE.load_from_disk(str(path), device=device)
        except (KeyError, TypeError, ValueError, OSError, SafetensorError) as e:  # its loader's errors for bad files
            lines = str(e).strip().splitlines()
            raise RQAEError(f"sae-lens cannot load the SAE in {path} ({type(e).__name__}: "
                            f"{lines[0][:200] if lines else ''})") from None
    return stored_space_sae(sae)


def recorded_normalisation(model_dir: str | Path) -> InputNormalisation | None:
    """The store normalisation a sae-lens `cfg.json` says its SAE reads ("final-norm" or
    "rms"); None when it says nothing (a raw-residual SAE, or one saved before this format)."""
    cfg_path = Path(model_dir) / "cfg.json"
    if not cfg_path.exists():
        return None
    value = read_json(cfg_path).get("input_normalisation")
    if value is not None and value not in NORMALISATIONS:  # guessing the space would change every metric
        raise RQAEError(f"{cfg_path}: input_normalisation {value!r} is not one of {', '.join(NORMALISATIONS)}; "
                        f"every metric's space depends on it")
    return value
