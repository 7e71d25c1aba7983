"""A training run's directory: `train.json` (the run's settings, store and status),
`checkpoint.pt` (weights, optimiser, step, identity and data position), `metrics.jsonl`;
checking a directory before a run starts or resumes, and writing each file atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import atomic_torch_save, atomic_write_json, atomic_write_text, empty_except_lock, read_json
from rqae_pipeline.reader import DataPosition

if TYPE_CHECKING:
    from rqae_pipeline.models.base import Trainable
    from rqae_pipeline.store import ActivationStore

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "train.json"
METRICS = "metrics.jsonl"
IDENTITY_BEFORE = {"streams": 1}  # identity fields added later: the value runs from before them had


def as_recorded(identity: dict) -> dict:
    """A run's recorded identity with the fields it predates filled in with their old values,
    so that a run from before a field existed compares as the run it was."""
    return {**IDENTITY_BEFORE, **identity}


def write_run_file(out: Path, run: dict) -> None:
    atomic_write_json(out / RUN_FILE, run, default=str)


def starts_record(out: Path, step: int, processes: int) -> list[dict]:
    """Each start of the run (the first, then every --resume): the step it started from and
    its process count, appended to what train.json recorded before (`processes` alone is
    the latest start's, which a resume with another --nproc would rewrite). A resume from an
    earlier checkpoint drops the starts after it, as the metrics after it are dropped."""
    path = out / RUN_FILE
    try:
        before = json.loads(path.read_text()).get("starts", []) if step and path.exists() else []
    except (OSError, ValueError, AttributeError):  # unreadable: the history starts again here
        before = []
    kept = [s for s in before if isinstance(s, dict) and isinstance(s.get("step"), int) and s["step"] < step]
    return [*kept, {"step": step, "processes": processes}]


def store_record(store: ActivationStore) -> dict:
    """What a checkpoint records of the store it trains on: its spec, which harvest it is
    (creation time) and its committed rows, on which the held-out split and the shuffle
    order depend (a store that grew since is another run's data)."""
    return {"store_spec": store.manifest["spec"], "store_created": store.manifest.get("created"),
            "store_tokens": store.n_tokens}


def store_mismatch(recorded: dict, store: ActivationStore) -> str | None:
    """The first `store_record` field in which `recorded` (a checkpoint, a train.json) differs
    from `store` now; None when none does. A field it lacks (written before it) is not compared."""
    return next((key for key, now in store_record(store).items() if key in recorded and recorded[key] != now), None)


def save_checkpoint(out: Path, trainable: Trainable, step: int, identity: dict,
                    data: DataPosition | None = None, store: dict | None = None) -> None:
    # atomic: a kill mid-save leaves the previous checkpoint. The store's record travels with
    # it, so that a resume finds the store it trained on even without train.json.
    atomic_torch_save({"step": step, "state": trainable.checkpoint_state(), "identity": identity,
                       **({"data": data.as_dict()} if data is not None else {}), **(store or {})}, out / CHECKPOINT)


def prepare_out(out: Path, *, resume: bool, identity: dict, store: ActivationStore) -> dict | None:
    """Return the checkpoint to resume from (or None); refuse to mix runs (`identity`: the
    settings a resumed run must share, `TrainConfig.identity`)."""
    out = Path(out)
    run_file = out / RUN_FILE
    if run_file.exists() or (out / CHECKPOINT).exists():
        if not resume:
            raise RQAEError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
        try:
            prior = json.loads(run_file.read_text()) if run_file.exists() else {}
        except ValueError:
            raise RQAEError(f"{run_file} is not JSON (damaged); remove it to resume from {CHECKPOINT}") from None
        ckpt = read_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else {}
        for spec in (prior.get("store_spec") if isinstance(prior, dict) else None, ckpt.get("store_spec")):
            if spec and spec != store.manifest["spec"]:
                raise RQAEError(f"{out} was trained on another store (model/hook/corpus differ); choose another --out")
        _check_same_store(out, ckpt, store)
        # without a checkpoint, train.json says which settings the run was made with
        recorded = ckpt.get("identity") or (prior.get("config") if isinstance(prior, dict) else None)
        if not isinstance(recorded, dict):
            return ckpt or None
        recorded = as_recorded(recorded)
        for key, value in identity.items():
            before = recorded.get(key)
            if before != value:
                raise RQAEError(f"cannot resume: {key} was {before!r}, now {value!r}; "
                                f"resume with the same settings or choose another --out")
        return ckpt or None
    if not empty_except_lock(out):
        raise RQAEError(f"{out} exists and is not a training run directory; choose another --out")
    return None


def _check_same_store(out: Path, ckpt: dict, store: ActivationStore) -> None:
    """A checkpoint continues only on the harvest it trained on, at the rows it had then (its
    spec is checked beside train.json's, above)."""
    differs = store_mismatch(ckpt, store)
    if differs == "store_created":
        raise RQAEError(f"cannot resume: {out} was trained on a store created {ckpt['store_created']}, but "
                        f"{store.path} was created {store.manifest.get('created')} (another harvest); "
                        f"choose another --out")
    if differs == "store_tokens":
        raise RQAEError(f"cannot resume: {out} was trained on {ckpt['store_tokens']:,} committed rows of "
                        f"{store.path}, which holds {store.n_tokens:,} now (its held-out split and shuffle "
                        f"order moved with them); train into another --out")


def read_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise RQAEError(f"{path} is damaged ({first_line(e)}); delete it to train from scratch, "
                        f"or choose another --out") from None
    if not isinstance(ckpt, dict) or not {"step", "state", "identity"} <= ckpt.keys():
        raise RQAEError(f"{path} is not a checkpoint written by rqae train; delete it or choose another --out")
    if "data" in ckpt and not _readable_position(ckpt):  # before a resume rewrites train.json and the metrics
        raise RQAEError(f"{path} records no readable data position (epoch, and buffer and row for each of its "
                        f"streams); delete it to train from scratch, or choose another --out")
    return ckpt


def _readable_position(ckpt: dict) -> bool:
    """The checkpoint's data position is one `rqae train` writes: its fields present, integers,
    one read position per stream of the run."""
    try:
        read = DataPosition.from_dict(ckpt["data"]).read
        return (len(read) if isinstance(read, tuple) else 1) == as_recorded(ckpt["identity"])["streams"]
    except (KeyError, TypeError, ValueError):
        return False


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to the checkpoint's. A last line that is not JSON is
    a row cut short by a kill mid-write, past the checkpoint: dropped."""
    if not path.exists():
        return
    lines, kept = [ln for ln in path.read_text().splitlines() if ln], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            row = None
        if not isinstance(row, dict) or type(row.get("step", 0)) is not int:
            raise RQAEError(f"{path}: line {i + 1} is not a metrics row; repair or remove the file")
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def recorded_streams(out: Path, resume: bool) -> int | None:
    """The stream count a run being resumed recorded (1 for runs from before streams)."""
    run_file = Path(out) / RUN_FILE
    if not (resume and run_file.exists()):
        return None
    try:
        return as_recorded(json.loads(run_file.read_text())["config"])["streams"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged run file: `prepare_out` says so


def check_trained_on(model_dir: Path | None, store: ActivationStore, *,
                     fix: str = "; restore it (it names the store the model was trained on), or remove it") -> None:
    """A model trained here reads rows of one LM, hook and normalisation (its train.json's
    store): on rows of any other its codes, scores and numbers mean nothing. Other corpora
    and settings of the same are fine. No train.json (a model not trained here): no check."""
    run = None if model_dir is None else Path(model_dir) / RUN_FILE
    if run is None or not run.exists():
        return
    fields = {"store_spec.model": str, "store_spec.hook": str, "store_spec.normalisation": str}
    trained = read_json(run, fields, fix=fix)["store_spec"]
    spec = store.manifest["spec"]
    for key in ("model", "hook", "normalisation"):
        same = lm_key(trained[key]) == lm_key(spec[key]) if key == "model" else trained[key] == spec[key]
        if not same:
            raise RQAEError(f"{model_dir} was trained on rows of {key} {trained[key]!r}; the store's {key} is "
                            f"{spec[key]!r}")


def lm_key(name: str) -> str:
    """One name per LM: "google/gemma-2-2b" and sae-lens's "gemma-2-2b" are the same model;
    so are the offline packaged copy and its hub name."""
    return name.lower().rsplit("/", 1)[-1].removesuffix("-offline")
