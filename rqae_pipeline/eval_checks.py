"""What a model and a store must agree on before a number is computed from them.

`evaluate` and `compare` measure a model on a store's rows. A model trained on another LM,
hook or normalisation, an SAE whose input transform sae-lens does not apply at inference,
or held-out rows the model was trained on all give numbers that look fine and mean
nothing; each is refused here with one line that says which fact differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rqae_pipeline import RQAEError
from rqae_pipeline.io import read_json
from rqae_pipeline.models.registry import kind_of
from rqae_pipeline.run_dir import check_trained_on, lm_key  # noqa: F401  (lm_key: re-exported)
from rqae_pipeline.store import ActivationStore

ModelSpace = Literal["auto", "raw", "normalised"]
# sae-lens input transforms its inference SAE does not apply itself: a scale kept beside the
# weights (folded in by `from_pretrained` only when the release publishes it) and a whitening
# that training folds in before saving
UNAPPLIED_NORMALISATIONS = ("expected_average_only_in", "covariance_whitening")


@dataclass(frozen=True)
class PretrainedSAE:
    """An SAE of sae-lens's pretrained directory (e.g. Gemma Scope), loaded with
    `SAE.from_pretrained(release, sae_id)`; it reads raw residuals."""

    release: str
    sae_id: str

    def __str__(self) -> str:
        return f"{self.release}/{self.sae_id}"


def space_of(ref: Path | PretrainedSAE, space: ModelSpace = "auto") -> str:
    """The space a model reads: "normalised" (the store's rows) or "raw" (residuals)."""
    if space != "auto":
        return space
    if isinstance(ref, PretrainedSAE):
        return "raw"
    if (Path(ref) / "cfg.json").exists():  # a sae-lens SAE saved here says what it reads
        from rqae_pipeline.models.sae_format import recorded_normalisation

        if recorded_normalisation(ref):
            return "normalised"
    # directories saved before that: trained here (train.json beside it) or a raw-residual SAE
    return "normalised" if (Path(ref) / "train.json").exists() else "raw"


def train_json(ref: Path | PretrainedSAE) -> Path | None:
    """The train.json of a model trained here; None for any other model."""
    run = None if isinstance(ref, PretrainedSAE) else Path(ref) / "train.json"
    return run if run is not None and run.exists() else None


def heldout_start(ref: Path | PretrainedSAE, store: ActivationStore) -> int:
    """The first of the store's rows a model trained here never trained on (its held-out
    split); RQAEError for a model not trained here or trained on another store."""
    run = train_json(ref)
    if run is None:
        raise RQAEError(f"{ref} has no train.json with a held-out split (not trained here); use --rows all")
    info = read_json(run, {"heldout.first_row": int}, fix="; use --rows all to evaluate every row")
    if info.get("store_spec") != store.manifest["spec"]:
        raise RQAEError(f"{ref} was trained on another store (model/hook/corpus/settings differ)")
    return int(info["heldout"]["first_row"])


def check_compatible(model, store: ActivationStore, ref: Path | PretrainedSAE, space: ModelSpace = "auto") -> None:
    """Width, LM, hook and normalisation of a loaded model (`ref`) must match the store's."""
    d_in = model.cfg.d_in
    if d_in != store.d:
        raise RQAEError(f"model {ref} has d_in {d_in}, the store has d_model {store.d}")
    check_trained_on(None if isinstance(ref, PretrainedSAE) else ref, store,
                     fix="; restore it (it names the store the model was trained on), or remove it and use --rows all")
    if train_json(ref) is not None and space_of(ref, space) == "raw":
        # every model trained here read the store's rows: fed raw residuals it gives numbers
        # of a model it never was
        raise RQAEError(f"{ref} was trained here on the store's {store.spec.normalisation} rows; drop --space raw")
    if kind_of(model) == "sae":
        _check_sae(model, store, ref, space)


def _check_sae(sae, store: ActivationStore, ref: Path | PretrainedSAE, space: ModelSpace) -> None:
    recorded = None  # the store normalisation a saved SAE's cfg.json names
    if not isinstance(ref, PretrainedSAE):
        from rqae_pipeline.models.sae_format import recorded_normalisation

        recorded = recorded_normalisation(ref)
    if recorded and space_of(ref, space) == "raw":
        raise RQAEError(f"SAE {ref} reads the store's {recorded} rows (its cfg.json says so); drop --space raw")
    if recorded and recorded != store.spec.normalisation:
        raise RQAEError(f"SAE {ref} was trained on {recorded} rows, the store's are {store.spec.normalisation}")
    cfg = sae.cfg
    if getattr(cfg, "normalize_activations", "none") in UNAPPLIED_NORMALISATIONS:
        raise RQAEError(f"SAE {ref} expects its input transformed ({cfg.normalize_activations}), which sae-lens "
                        f"does not apply at inference; fold it into the weights and save the SAE again")
    metadata = getattr(cfg, "metadata", None)
    if getattr(metadata, "hook_head_index", None) is not None:
        raise RQAEError(f"SAE {ref} reads one attention head (hook_head_index {metadata.hook_head_index}); "
                        f"the store holds whole residual vectors")
    hook, sae_lm = getattr(metadata, "hook_name", None), getattr(metadata, "model_name", None)
    # what its metadata names is checked in any space; it must name both where the space
    # comes from the metadata itself (a raw-residual SAE, or one saved here with its normalisation)
    required = space_of(ref, space) == "raw" or recorded
    for field, value in (("hook_name", hook), ("model_name", sae_lm)):
        if required and not value:  # it would be scored on whatever the store holds
            raise RQAEError(f"SAE {ref} names no {field.split('_')[0]} (metadata.{field} in its cfg.json): which "
                            f"activations it reads is unknown; add the {field.split('_')[0]} it was trained on")
    if hook and hook != store.spec.hook:
        raise RQAEError(f"SAE {ref} reads {hook}, the store holds {store.spec.hook}")
    if sae_lm and lm_key(sae_lm) != lm_key(store.spec.model):
        raise RQAEError(f"SAE {ref} was trained on {sae_lm}, the store holds {store.spec.model}")
