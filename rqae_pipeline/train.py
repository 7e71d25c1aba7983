"""One training loop for every architecture, reading shuffled batches from an activation store.

The loop owns data, progress, metrics, checkpoints and resume; the architecture owns its
step (`models/base.py`). The language model is never loaded. Data order is a pure
function of the seed, and every checkpoint records where in it training stands (pass,
buffer, row; `reader.py`), so a resumed run starts reading there, touching one shuffle
buffer however far it got, and ends with the same weights as an uninterrupted one.

Each global batch is drawn in equal parts from `streams` shuffled streams (default: one per
process). Under torchrun every rank reads only its own streams and trains on their slice of
each global batch (the global batches are those of one process reading as many streams), with
gradients averaged over the ranks (`distributed.py`); rank 0 alone writes the run directory.

Held-out data is split by context: the last `heldout_fraction` of the store's contexts,
recorded in `train.json`, never reach the optimiser.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rqae_pipeline import RQAEError, __version__, distributed
from rqae_pipeline.distributed import SINGLE, Ranks, mean_over_ranks
from rqae_pipeline.lock import take_write_lock
from rqae_pipeline.metrics import Stats, prefix_label, prefix_of
from rqae_pipeline.models.base import ModelSpec, Trainable
from rqae_pipeline.models.registry import build_trainable, reconstruct
from rqae_pipeline.models.sae import SAEBaseline
from rqae_pipeline.reader import (
    DataPosition,
    check_start,
    check_streams,
    endless_batches,
    position_of_batch,
    start_of_pass,
)
from rqae_pipeline.run_dir import (
    CHECKPOINT,
    METRICS,
    RUN_FILE,
    first_line,
    keep_metrics_up_to,
    prepare_out,
    recorded_streams,
    save_checkpoint,
    starts_record,
    store_record,
    write_run_file,
)
from rqae_pipeline.store import ActivationStore, Flags


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    store: Path
    out: Path
    model: ModelSpec
    batch_size: int = 1024
    tokens: int = 1_000_000  # training tokens (steps = tokens // batch_size)
    seed: int = 0
    heldout_fraction: float = 0.05
    eval_tokens: int = 16384  # held-out rows used for periodic and final evaluation
    exclude: int = int(Flags.BOS | Flags.OUTLIER)  # rows never trained or evaluated on
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 50
    device: str | None = None
    resume: bool = False
    streams: int | None = None  # shuffled streams each global batch is read from (reader.py); None: one per process

    def __post_init__(self):
        if self.batch_size < 1 or self.tokens < self.batch_size:
            raise ValueError("need batch_size >= 1 and tokens >= batch_size")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in (0, 1)")
        if self.streams is not None and self.streams < 1:
            raise ValueError("streams must be at least 1")

    @property
    def stream_count(self) -> int:
        """`streams` as read: `train` settles None (one per process, or the resumed run's);
        a config read outside it (tests, benches) is one process."""
        return self.streams or 1

    @property
    def total_steps(self) -> int:
        return self.tokens // self.batch_size

    def identity(self) -> dict:
        """Fields a resumed run must share with the run it continues."""
        d = asdict(self)
        for volatile in ("out", "resume", "device", "log_every", "eval_every", "checkpoint_every", "store"):
            d.pop(volatile)
        model = d.pop("model")
        d.update({f"model.{k}": v for k, v in model.items()})  # flat, so errors name the field
        return json.loads(json.dumps(d, default=str))


@dataclass
class TrainResult:
    out: Path
    steps: int
    heldout: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------- data


def open_training_store(path: Path) -> ActivationStore:
    store = ActivationStore.open(path)
    if store.is_being_written():
        raise RQAEError(f"store {path} is still being written (harvest running); wait for it to finish")
    if store.n_tokens == 0:
        raise RQAEError(f"store {path} is empty")
    store.check_shards()
    return store


def heldout_split(store: ActivationStore, fraction: float) -> dict[str, int]:
    """Last `fraction` of contexts (at least one) held out; rows are whole contexts."""
    n_ctx, R = store.n_contexts, store.spec.rows_per_context
    held = max(1, round(n_ctx * fraction))
    if held >= n_ctx:
        raise RQAEError(f"store has {n_ctx} context(s): too few to hold out {fraction:.0%} and still train")
    first = n_ctx - held
    return {"first_context": first, "contexts": held, "first_row": first * R, "rows": store.n_tokens - first * R}


def positioned_batches(store: ActivationStore, cfg: TrainConfig, split: dict, start: DataPosition,
                       ranks: Ranks = SINGLE):
    """Endless shuffled batches of training rows from `start` (global, or this rank's slice of
    each global batch), each with the position after it (`reader.endless_batches`); reaching
    `start` reads one buffer, wherever it is. NaN/inf rows are an error, never trained on."""
    return endless_batches(store, cfg.batch_size, seed=cfg.seed, stop=split["first_row"], exclude=cfg.exclude,
                           start=start, streams=cfg.stream_count, rank=ranks.rank, world_size=ranks.world_size)


def position_of_step(store: ActivationStore, cfg: TrainConfig, split: dict, steps: int) -> DataPosition:
    """Where `steps` batches end, from the flags alone: for checkpoints without a position."""
    return position_of_batch(store, cfg.batch_size, seed=cfg.seed, stop=split["first_row"], exclude=cfg.exclude,
                             batches=steps, streams=cfg.stream_count)


def first_position(cfg: TrainConfig) -> DataPosition:
    return DataPosition(0, start_of_pass(cfg.stream_count))


def train_batches(store: ActivationStore, cfg: TrainConfig, split: dict, skip: int = 0):
    """The global batches alone, from step `skip` on."""
    start = position_of_step(store, cfg, split, skip) if skip else first_position(cfg)
    return (batch for batch, _ in positioned_batches(store, cfg, split, start))


def heldout_rows(store: ActivationStore, cfg: TrainConfig, split: dict) -> torch.Tensor:
    start = split["first_row"]
    rows = store.read(start, min(store.n_tokens, start + max(cfg.eval_tokens, 1)))
    keep = torch.from_numpy((rows.flags & cfg.exclude) == 0)
    return rows.acts[keep]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(trainable: Trainable, x: torch.Tensor, batch: int = 4096) -> dict[str, Any]:
    """Held-out MSE and FVU with the evaluator's float64 sums (FVU against the set's own
    mean); for RQAE also the FVU of every power-of-two prefix."""
    model = trainable.eval_model()
    stats = Stats()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(trainable.device)
        stats.add(xb, reconstruct(model, xb, None)[0])
    metrics = stats.metrics(x.shape[1])
    is_rqae = trainable.spec.arch == "rqae"
    full = metrics[prefix_label(trainable.spec.n_q)] if is_rqae else next(iter(metrics.values()))
    out = {"mse": full["mse"], "fvu": full["fvu"], "tokens": len(x)}
    if is_rqae:
        by_prefix = {prefix_of(k): v["fvu"] for k, v in metrics.items()}
        out["fvu_by_prefix"] = {str(m): by_prefix[m] for m in sorted(by_prefix)}
    out["health"] = trainable.health(x[:4096])
    return out


# --------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the loop needs of a started run."""

    cfg: TrainConfig
    out: Path
    trainable: Trainable
    step: int  # steps already taken (a resumed run's checkpoint step)
    heldout: torch.Tensor | None  # held-out rows for periodic and final evaluation (rank 0's)
    batches: Any  # iterator of (this rank's slice of the global batch, position after it), from `step` on
    ranks: Ranks = distributed.SINGLE
    store: dict | None = None  # run_dir.store_record, saved with every checkpoint


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or resume) a model; under torchrun, as one rank of a data-parallel run."""
    ranks, device = distributed.start(cfg.device)
    try:
        with run_dir_lock(Path(cfg.out), ranks):
            return _train(cfg, ranks, device, progress)
    finally:
        distributed.stop(ranks)


@contextlib.contextmanager
def run_dir_lock(out: Path, ranks: Ranks):
    """The run directory's single-writer lock (`.lock`, as a store's), held by the main rank
    for the whole run: a second `rqae train` on the same --out, resumed or not, is one error
    line instead of a run whose files come from two. A directory made only to hold the lock
    is removed again if the run stops before writing into it."""
    made = not out.exists()
    lock = distributed.on_main(lambda: take_write_lock(out), ranks)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when empty


def _train(cfg: TrainConfig, ranks: Ranks, device: str, progress: bool) -> TrainResult:
    run = None
    try:
        run = _start_run(_with_streams(cfg, ranks), ranks, device)
        t0 = time.perf_counter()
        step, interrupted = _train_loop(run, progress=progress and ranks.is_main)
        run.batches.close()  # the reader's prefetch of a next buffer ends here, not at interpreter exit
        result = TrainResult(out=run.out, steps=step, interrupted=interrupted, seconds=time.perf_counter() - t0)
        if not interrupted and ranks.is_main:
            result.heldout = _finish_run(run, step)
        if not interrupted:  # no rank tears the group down while another still works in it
            distributed.barrier(ranks)
        # interrupted (Ctrl-C reaches every rank): the ranks stopped at different points of a
        # step, so a barrier would pair with a peer's unfinished all_reduce and hang; nothing is
        # written after an interrupt (the last periodic checkpoint is the one to resume from)
        return result
    finally:
        if run is not None:
            run.batches.close()


def _with_streams(cfg: TrainConfig, ranks: Ranks) -> TrainConfig:
    """`cfg` with its stream count settled: as given, else the resumed run's, else one per process."""
    distributed.check_batch(cfg.batch_size, ranks)
    streams = cfg.streams or recorded_streams(cfg.out, cfg.resume) or ranks.world_size
    check_streams(cfg.batch_size, streams, ranks.world_size)
    return replace(cfg, streams=streams)


@dataclass
class _Data:
    """A run's data, read before the run directory is touched."""

    store: ActivationStore
    split: dict
    ckpt: dict | None
    heldout: torch.Tensor | None
    first_batch: torch.Tensor | None


def _read_data(cfg: TrainConfig, ranks: Ranks) -> _Data:
    """Open the store and check the run directory (read-only, on every rank); read the
    held-out rows and the first batch before the run directory exists, so a damaged store
    (an error naming the shard) leaves no half-made run behind."""
    store = open_training_store(cfg.store)
    if cfg.model.d_in != store.d:
        raise RQAEError(f"model d_in {cfg.model.d_in} does not match the store's d_model {store.d}")
    ckpt = prepare_out(cfg.out, resume=cfg.resume, identity=cfg.identity(), store=store)
    if ckpt is not None and not (type(ckpt["step"]) is int and 0 <= ckpt["step"] <= cfg.total_steps):
        raise RQAEError(f"{Path(cfg.out) / CHECKPOINT} records step {ckpt['step']!r}, not one of this run's "
                        f"0..{cfg.total_steps}; delete it to train from scratch, or choose another --out")
    split = heldout_split(store, cfg.heldout_fraction)
    heldout = heldout_rows(store, cfg, split) if ranks.is_main else None
    fresh = ckpt is None or ckpt["step"] == 0
    first_batch = next(positioned_batches(store, cfg, split, first_position(cfg)))[0] if fresh else None
    return _Data(store=store, split=split, ckpt=ckpt, heldout=heldout, first_batch=first_batch)


def _start_run(cfg: TrainConfig, ranks: Ranks, device: str) -> _Run:
    """Check or create the run directory, build (or restore) the model and record the run
    in `train.json`. Only rank 0 writes; every rank builds the same model."""
    # The model first: a bad architecture or option is the error to show, before any data is read.
    trainable = build_trainable(cfg.model, total_steps=cfg.total_steps, batch_size=cfg.batch_size, device=device,
                                seed=cfg.seed)
    data = _read_data(cfg, ranks)
    distributed.barrier(ranks)  # every rank has checked the run directory before rank 0 changes it
    out, main = Path(cfg.out), ranks.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if ranks.distributed:
        trainable.data_parallel(ranks)
    if isinstance(trainable, SAEBaseline):  # its cfg.json then says which activations it reads
        trainable.record_source(data.store)
    step, position = 0, first_position(cfg)
    if data.ckpt is not None:
        try:  # its identity matched this run's, so a mismatch here is damage, not another model
            trainable.load_checkpoint_state(data.ckpt["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RQAEError(f"{out / CHECKPOINT}: its weights or optimiser state cannot be loaded ({first_line(e)}); "
                            f"delete it to train from scratch, or choose another --out") from None
        step = data.ckpt["step"]
        position = (DataPosition.from_dict(data.ckpt["data"]) if "data" in data.ckpt
                    else position_of_step(data.store, cfg, data.split, step))
        try:  # before train.json and the metrics are rewritten
            check_start(data.store, position, seed=cfg.seed, stop=data.split["first_row"], exclude=cfg.exclude,
                        streams=cfg.stream_count)
        except RQAEError as e:
            raise RQAEError(f"{out / CHECKPOINT}: {e}; the recorded position is damaged: delete the checkpoint "
                            f"to train from scratch, or choose another --out") from None
    store = store_record(data.store)
    if main:
        keep_metrics_up_to(out / METRICS, step)
        write_run_file(out, {"config": cfg.identity(), "store": str(cfg.store), **store, "heldout": data.split,
                              "rqae_pipeline": __version__, "status": "training", "processes": ranks.world_size,
                              "starts": starts_record(out, step, ranks.world_size)})
    if step == 0:
        trainable.init_from_data(data.first_batch)  # the global batch, on every rank
    batches = positioned_batches(data.store, cfg, data.split, position, ranks)
    return _Run(cfg=cfg, out=out, trainable=trainable, step=step, heldout=data.heldout, batches=batches, ranks=ranks,
                store=store)


def _train_loop(run: _Run, *, progress: bool) -> tuple[int, bool]:
    """Step until `total_steps`, logging and checkpointing; (steps done, interrupted). The
    step's metrics stay on the device; they are computed only on log steps and read (one
    host sync, averaged over the ranks) on log and checkpoint steps, which is also where a
    non-finite loss is caught."""
    from tqdm import tqdm

    cfg, step, ranks = run.cfg, run.step, run.ranks
    bar = tqdm(total=cfg.total_steps, initial=step, unit="step", desc=f"train {cfg.model.arch}",
               disable=not progress, dynamic_ncols=True)
    throughput = _Throughput(step * cfg.batch_size)  # a resumed run counts from its checkpoint
    last_good = step
    try:
        with open(run.out / METRICS, "a") if ranks.is_main else contextlib.nullcontext() as log:
            while step < cfg.total_steps:
                batch, position = distributed.next_on_every_rank(run.batches, ranks)
                step += 1
                last = step == cfg.total_steps
                # an evaluation step logs too (it lands in its row), whatever log_every is
                logs = step % cfg.log_every == 0 or step % cfg.eval_every == 0 or last
                saves = step % cfg.checkpoint_every == 0 or last
                stats = run.trainable.train_step(batch, metrics=logs)  # a checkpoint checks only the loss
                bar.update(1)
                if not (logs or saves):
                    continue
                values = mean_over_ranks(stats, ranks)
                if not math.isfinite(values["loss"]):
                    raise RQAEError(f"loss became {values['loss']} by step {step}; stopped, the checkpoint of "
                                    f"step {last_good} is kept (try a lower --lr)")
                if logs and ranks.is_main:
                    _log_step(run, log, bar, step, values, throughput.tokens_per_second(step * cfg.batch_size))
                if saves:
                    if ranks.is_main:
                        save_checkpoint(run.out, run.trainable, step, cfg.identity(), position, run.store)
                    last_good = step
    except KeyboardInterrupt:
        # The interrupt may land inside a step (after the optimiser moved the weights, before
        # the counter did), so the last periodic checkpoint is the one to resume from.
        return last_good, True
    finally:
        bar.close()
    return step, False


class _Throughput:
    """Tokens per second since the previous call."""

    def __init__(self, tokens: int = 0):
        self.t_last, self.tok_last = time.perf_counter(), tokens

    def tokens_per_second(self, tokens: int) -> float:
        now = time.perf_counter()
        tok_s = (tokens - self.tok_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tok_last = now, tokens
        return tok_s


def _log_step(run: _Run, log, bar, step: int, stats: dict, tok_s: float) -> None:
    """One metrics.jsonl row (with a held-out evaluation every `eval_every` steps)."""
    cfg = run.cfg
    row = {"step": step, "tokens": step * cfg.batch_size, **stats, "tok_per_s": tok_s}
    if step % cfg.eval_every == 0 or step == cfg.total_steps:
        row["heldout"] = evaluate(run.trainable, run.heldout)
    log.write(json.dumps(row) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats.get('fvu', float('nan')):.3f}", tok_s=f"{tok_s:,.0f}")


def _finish_run(run: _Run, step: int) -> dict[str, Any]:
    """Final held-out evaluation, the saved model, the plots, and `train.json` marked done last:
    a run interrupted before that mark is resumed and finished, never left done without its plots."""
    from rqae_pipeline.report.plots import plot_training

    heldout = evaluate(run.trainable, run.heldout)
    run.trainable.save(run.out)
    plot_training(run.out / METRICS, run.out, heldout)
    info = json.loads((run.out / RUN_FILE).read_text())
    info.update(status="done", steps=step, heldout_metrics=heldout, weight_bytes=run.trainable.weight_bytes())
    write_run_file(run.out, info)
    return heldout


def default_spec(arch: str, d_in: int, **kw) -> ModelSpec:
    return replace(ModelSpec(arch=arch, d_in=d_in), **kw)
