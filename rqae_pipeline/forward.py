"""The process that runs a harvest's LM forward: its model (loaded once per dask worker),
the precision it runs in, and the error that precision adds against a float32 forward.

Precision: `--model-dtype auto` runs bfloat16 on a CUDA GPU with native bf16 and float32
elsewhere (lm.auto_model_dtype); a float32 forward on a GPU with TF32 (compute capability 8.0
on) runs its matmuls in TF32. The switch is set around the single-process harvest and in each
dask worker, the processes that run the forward.

Forward error (manifest `forward_error`): when the forward is not plain float32, the first
FORWARD_ERROR_CONTEXTS contexts of a new store go once through the harvest's model and through
a float32 copy of it (TF32 off), both normalised as the store normalises its rows, and the
float64 sums of the difference are recorded as `storage_error`'s are (sse, sumsq, sum, n), so
summary.py forms an FVU the same way. A plain float32 forward is the reference itself: its
entry names the precision and holds no sums. A resume keeps the entry (nothing is measured
again) and refuses a forward of another precision: one store never mixes them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.lm import DTYPES, LoadedLM, cuda_ampere_or_newer, load_lm
from rqae_pipeline.shard_writer import batch_error
from rqae_pipeline.store import ActivationStore

FORWARD_ERROR_CONTEXTS = 8  # contexts measured: the store's first 8 (fewer when it holds fewer)


def precision_of(lm: LoadedLM) -> dict:
    """The forward's precision as the manifest records it: {"model_dtype", "tf32"}."""
    p = next(lm.model.parameters())
    dtype = next(name for name, t in DTYPES.items() if t == p.dtype)
    return {"model_dtype": dtype, "tf32": dtype == "float32" and cuda_ampere_or_newer(p.device)}


def is_reference(precision: dict) -> bool:
    return precision["model_dtype"] == "float32" and not precision["tf32"]


def set_cuda_tf32(on: bool) -> None:
    """TF32 for CUDA float32 matmuls and cuDNN convolutions (no effect on a CPU forward)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 refuses a mix of this and the legacy allow_tf32 flags
        matmul.fp32_precision = cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = cudnn.allow_tf32 = on


@contextlib.contextmanager
def cuda_tf32(on: bool):
    """`set_cuda_tf32(on)` while inside; the process's own setting after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = hasattr(matmul, "fp32_precision")
    before = (matmul.fp32_precision, cudnn.conv.fp32_precision) if new_api else (matmul.allow_tf32, cudnn.allow_tf32)
    set_cuda_tf32(on)
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision, cudnn.conv.fp32_precision = before
        else:
            matmul.allow_tf32, cudnn.allow_tf32 = before


def hook_residuals(lm: LoadedLM, tokens: torch.Tensor, hook: str, layer: int) -> torch.Tensor:
    """Raw residuals (B, T, d) at `hook` of block `layer`; the forward stops after that block."""
    _, cache = lm.model.run_with_cache(tokens.to(lm.model.cfg.device), names_filter=[hook], stop_at_layer=layer + 1)
    return cache[hook]


def check_forward_precision(store: ActivationStore, precision: dict) -> None:
    """Refuse to continue `store` with a forward of another precision than its rows have."""
    m = store.manifest
    recorded = m.get("forward_error")
    if recorded is None:
        if not m["committed"]["tokens"]:
            return  # nothing harvested yet
        # a store from before `forward_error`: its load record names the dtype, and TF32 was never on
        recorded = {"model_dtype": m["provenance"]["model_load"].get("dtype", "float32"), "tf32": False}
    was, now = _describe(recorded), _describe(precision)
    if was != now:
        raise RQAEError(f"store {store.path} was harvested with a {was} forward, not {now}; one store does not "
                        f"mix forward precisions: pass --model-dtype {recorded['model_dtype']} on a device like "
                        f"its own, or use a new --out")


def _describe(precision: dict) -> str:
    return f"{precision['model_dtype']} (TF32 {'on' if precision['tf32'] else 'off'})"


@torch.inference_mode()
def measure_forward_error(lm: LoadedLM, store: ActivationStore, tokens_np: np.ndarray) -> dict:
    """The manifest's `forward_error` for `lm` on contexts `tokens_np` (B, T): the precision,
    and for any but plain float32 the float64 error sums against a float32, TF32-off forward."""
    precision, spec = precision_of(lm), store.spec
    if is_reference(precision):
        return precision
    tokens = torch.from_numpy(tokens_np)
    with cuda_tf32(precision["tf32"]):
        x = hook_residuals(lm, tokens, spec.hook, spec.layer)
    if not torch.isfinite(x).all():
        raise RQAEError(f"non-finite activations (NaN/inf) at {spec.hook} in a {precision['model_dtype']} forward "
                        f"of the first contexts; use --model-dtype float32")
    device = x.device
    reference = lm if precision["model_dtype"] == "float32" else load_lm(lm.name, device=str(device), dtype="float32")
    with cuda_tf32(False):
        x_ref = hook_residuals(reference, tokens, spec.hook, spec.layer)
    del reference  # a float32 copy of the model: freed before the harvest's shards need the memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    eps, kept = float(lm.model.cfg.eps), slice(1, None) if spec.skip_bos else slice(None)

    def rows(raw: torch.Tensor) -> torch.Tensor:  # the rows the store keeps, normalised as it does
        return store.to_normalised(raw, eps)[0][:, kept].reshape(-1, spec.d_model).cpu()

    err = batch_error(rows(x_ref), rows(x))
    return {**precision, "reference": "float32", "contexts": len(tokens_np), "sse": err.sse, "sumsq": err.sumsq,
            "sum": err.sum.tolist(), "n": err.n}


Contexts = Iterator[tuple[np.ndarray, object]]


def record_forward_error(store: ActivationStore, source: Contexts, tokens: int,
                         measure: Callable[[np.ndarray], dict]) -> Contexts:
    """Commit `measure(first contexts)` as the manifest's `forward_error` unless the store has
    one; returns `source` with the contexts it took put back in front. `tokens`: the run's target.
    A store from before `forward_error` gets it from the contexts its resume starts at."""
    want = min(FORWARD_ERROR_CONTEXTS, -(-tokens // store.spec.rows_per_context) - store.n_contexts)
    if "forward_error" in store.manifest or want <= 0:
        return source
    first = list(itertools.islice(source, want))
    if not first:
        return source
    entry = measure(np.stack([ctx for ctx, _ in first]))
    c = store.manifest["committed"]
    store.commit(tokens=c["tokens"], contexts=c["contexts"], corpus_state=c["corpus_state"],
                 complete=c["complete"], extra={"forward_error": entry})
    return itertools.chain(first, source)


# --------------------------------------------------------------------------- dask workers


@dataclass(frozen=True)
class WorkerModel:
    """Which model a dask worker runs, how, and where."""

    model: str
    dtype: str
    device: str | None
    spread_gpus: bool  # a LocalCluster's worker i takes cuda:(i mod G)
    torch_threads: int | None


_MODELS: dict[tuple, LoadedLM] = {}  # per worker process: the model, loaded once and kept


def worker_device(requested: str | None, worker_index: int | None, gpus: int) -> str | None:
    """Worker i of a LocalCluster on a machine with `gpus` GPUs runs on cuda:(i mod gpus),
    unless a device other than plain cuda was asked for."""
    if gpus < 1 or worker_index is None or requested not in (None, "cuda"):
        return requested
    return f"cuda:{worker_index % gpus}"


def _worker_index() -> int | None:
    from distributed import get_worker

    try:
        name = get_worker().name  # a LocalCluster names its workers 0..N-1, and a restarted one keeps its name
    except ValueError:  # not in a worker
        return None
    return name if isinstance(name, int) else None


def worker_lm(job: WorkerModel) -> LoadedLM:
    """The worker's model, with the process's TF32 switch set for it (a worker runs one model)."""
    if job.torch_threads:
        # dask's nanny starts workers with OMP_NUM_THREADS=1; give them their share instead
        torch.set_num_threads(job.torch_threads)
    device = job.device
    if job.spread_gpus and torch.cuda.is_available():
        device = worker_device(device, _worker_index(), torch.cuda.device_count())
    key = (job.model, device, job.dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker: another run's model makes way
        _MODELS[key] = load_lm(job.model, device=device, dtype=job.dtype)
    set_cuda_tf32(precision_of(_MODELS[key])["tf32"])
    return _MODELS[key]
