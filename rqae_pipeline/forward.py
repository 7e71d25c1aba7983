"""The process that runs a harvest's LM forward: its model (loaded once per dask worker),
the precision it runs in, and the error that precision adds against a float32 forward.

Precision: `--model-dtype auto` runs bfloat16 on a CUDA GPU with native bf16 and float32
elsewhere (lm.auto_model_dtype); a float32 forward on a GPU with TF32 (compute capability 8.0
on) runs its matmuls in TF32. The switch is set around the single-process harvest and in each
dask worker, the processes that run the forward. `--compile` runs the forward through
torch.compile (fused kernels after a one-off compile; how much faster depends on the machine,
docs/benchmarks.md); its rows round differently from the eager forward's, so it counts as a precision.

Forward error (manifest `forward_error`): when the forward is not plain eager float32, a new
store's first batch (its first FORWARD_ERROR_CONTEXTS contexts when a batch holds fewer) goes
through the harvest's model and through an eager float32 copy of it (TF32 off), both normalised
as the store normalises its rows, and the float64 sums of the difference are recorded as
`storage_error`'s are (sse, sumsq, sum, n), so summary.py forms an FVU the same way. The
harvest's rows of that batch are the ones measured, not a second forward of it. A plain
float32 forward is the reference itself: its entry names the precision and holds no sums.
A resume keeps the entry (nothing is measured again) and refuses a forward of another
precision: one store never mixes them.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.lm import DTYPES, LoadedLM, cuda_ampere_or_newer, load_lm
from rqae_pipeline.shard_writer import batch_error
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.store_format import recorded_precision

FORWARD_ERROR_CONTEXTS = 8  # contexts measured at least (the first batch if larger; fewer if the store holds fewer)


def precision_of(lm: LoadedLM) -> dict:
    """The forward's precision as the manifest records it: {"model_dtype", "tf32"}, and
    "compiled": true for a torch.compile forward (its fused kernels round differently)."""
    p = next(lm.model.parameters())
    dtype = next(name for name, t in DTYPES.items() if t == p.dtype)
    precision = {"model_dtype": dtype, "tf32": dtype == "float32" and cuda_ampere_or_newer(p.device)}
    return {**precision, "compiled": True} if lm.compiled_batch else precision


def is_reference(precision: dict) -> bool:
    return precision["model_dtype"] == "float32" and not precision["tf32"] and not precision.get("compiled")


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


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (call, tokens, residuals)


def hook_residuals(lm: LoadedLM, tokens: torch.Tensor, hook: str, layer: int) -> torch.Tensor:
    """Raw residuals (B, T, d) at `hook` of block `layer`; the forward stops after that block.
    The first call after `measure_forward_error` on the very contexts it measured (a new
    store's first batch) gets the rows that measurement computed, not a second forward."""
    tokens = tokens.to(lm.model.cfg.device)
    kept = _MEASURED.pop(lm.model, None)
    if kept is not None and kept[0] == (hook, layer, lm.compiled_batch) and torch.equal(kept[1], tokens):
        return kept[2]
    stop = residual_stop(hook, layer)
    if lm.compiled_batch:
        return _compiled_residuals(lm, tokens, stop)
    if stop is not None:  # the forward's own output: no hook to add and remove for it
        return lm.model(tokens, stop_at_layer=stop)
    _, cache = lm.model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
    return cache[hook]


def residual_stop(hook: str, layer: int) -> int | None:
    """The `stop_at_layer` at which the forward's own output is `hook`'s value (the residual
    stream after block `layer`, or before it); None for a hook inside a block. Such hooks are
    read by calling the forward, not through `run_with_cache`: no hook is added and removed per
    batch, and the torch.compile wrapper hands `run_with_cache` to the unwrapped module, which
    runs eagerly (why sae-lens's `compile_llm` leaves its runner's forward as it was)."""
    return {f"blocks.{layer}.hook_resid_post": layer + 1, f"blocks.{layer}.hook_resid_pre": layer}.get(hook)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its torch.compile wrapper


def _compiled_residuals(lm: LoadedLM, tokens: torch.Tensor, stop: int) -> torch.Tensor:
    """The forward to `stop` through torch.compile, in batches of exactly `lm.compiled_batch`
    contexts (a short one padded with copies of its last context): one static shape is one
    graph, compiled once. A short final batch or the forward-error sample would each compile
    another (seconds to minutes), and past torch's recompile limit dynamo runs the forward
    eagerly, another precision than the store records."""
    if lm.model not in _COMPILED:
        _COMPILED[lm.model] = torch.compile(lm.model, dynamic=False)
    forward, size, out = _COMPILED[lm.model], lm.compiled_batch, []
    # no_grad, not inference mode: dynamo's guards can fail on weights seen inside inference
    # mode ("Guard failed on the same frame it was created", torch 2.13)
    with torch.inference_mode(False), torch.no_grad():
        for i in range(0, len(tokens), size):
            chunk = tokens[i : i + size]
            padded = torch.cat([chunk, chunk[-1:].expand(size - len(chunk), -1)]) if len(chunk) < size else chunk
            out.append(forward(padded, stop_at_layer=stop)[: len(chunk)])
    return torch.cat(out) if len(out) > 1 else out[0]


def check_forward_precision(store: ActivationStore, precision: dict) -> None:
    """Refuse to continue `store` with a forward of another precision than its rows have."""
    if "forward_error" not in store.manifest and not store.manifest["committed"]["tokens"]:
        return  # nothing harvested yet
    recorded = recorded_precision(store.manifest)
    was, now = _describe(recorded), _describe(precision)
    if was != now:
        compile_flag = "--compile" if recorded.get("compiled") else "no --compile"
        raise RQAEError(f"store {store.path} was harvested with a {was} forward, not {now}; one store does not "
                        f"mix forward precisions: pass --model-dtype {recorded['model_dtype']} and {compile_flag} on "
                        f"a device like its own, or use a new --out")


def _describe(precision: dict) -> str:
    compiled = ", torch.compile" if precision.get("compiled") else ""
    return f"{precision['model_dtype']} (TF32 {'on' if precision['tf32'] else 'off'}{compiled})"


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
    reference = (replace(lm, compiled_batch=0) if precision["model_dtype"] == "float32"
                 else load_lm(lm.name, device=str(device), dtype="float32"))
    with cuda_tf32(False):
        x_ref = hook_residuals(reference, tokens, spec.hook, spec.layer)
    del reference  # a float32 copy of the model: freed before the harvest's shards need the memory
    # the harvest's first batch is these contexts: hook_residuals hands it these rows
    _MEASURED[lm.model] = ((spec.hook, spec.layer, lm.compiled_batch), tokens.to(device), x)
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
    spec = store.spec
    first_batch = min(spec.batch_contexts, spec.contexts_per_shard - store.n_contexts % spec.contexts_per_shard)
    want = min(max(FORWARD_ERROR_CONTEXTS, first_batch), -(-tokens // spec.rows_per_context) - store.n_contexts)
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
    compiled_batch: int = 0  # LoadedLM.compiled_batch


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
    return replace(_MODELS[key], compiled_batch=job.compiled_batch)
