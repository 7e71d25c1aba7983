"""`rqae verify`: read every committed row of every array once and report all damage.

Checks, shard by shard: every shard file the committed rows need exists and reads (the
chunk and shard-index checksums match), each array's shape and dtype, the manifest's
counts (tokens = contexts x rows per context, no array shorter than the commit), that
acts, scale (and fp8's row_scale) are finite, that `seq`/`pos` are each row's context and
position, that flags use only defined bits and that a token id's special-token bits are
the same wherever it occurs; plus the (d,) arrays (gain, fp8's mean). Unlike a training
read, which stops at the first bad shard, it lists every one.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.codec import decode_acts
from rqae_pipeline.integrity import (
    describe,
    drain_zarr_tasks,
    has_chunk_checksums,
    shard_key,
    shard_rows,
    shard_sizes,
    unusable_of,
)
from rqae_pipeline.store import ROW_ARRAYS, ActivationStore, Flags
from rqae_pipeline.store_format import layout_problem
from rqae_pipeline.urls import is_file

EXIT_DAMAGED = 1  # `rqae verify` exit status when any problem is found (2: not a store / usage)
DEFINED_FLAGS = int(Flags.ANY_SPECIAL | Flags.OUTLIER)


@dataclass
class VerifyReport:
    path: str
    tokens: int
    contexts: int
    shards: int  # shards per row array that the committed rows cover
    arrays: int
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    unchecksummed: list[str] = field(default_factory=list)  # arrays written before chunks had a crc32c

    @property
    def ok(self) -> bool:
        return not self.problems


def _row_arrays(store: ActivationStore) -> tuple[str, ...]:
    return ROW_ARRAYS + (("row_scale",) if store.spec.dtype == "fp8" else ())


# Shards whose reads are in flight while one is checked. On an object store every read waits a
# round trip or more: a shard's arrays are read together, and the next shard's meanwhile.
READ_AHEAD = 2


def verify_store(store: ActivationStore, *, progress: bool = False) -> VerifyReport:
    from tqdm import tqdm

    n, names = store.n_tokens, _row_arrays(store)
    per = store.spec.shard_rows
    report = VerifyReport(path=str(store.path), tokens=n, contexts=store.n_contexts, shards=-(-n // per),
                          arrays=len(names))
    arrays = {name: arr for name in names if (arr := _checked_array(store, name, report)) is not None}
    report.unchecksummed = [name for name, arr in arrays.items() if not has_chunk_checksums(arr)]
    # every shard file's size at once (one listing per array on an object store), not one stat per read
    sizes = {name: shard_sizes(store.path, arr, name, range(report.shards)) for name, arr in arrays.items()}
    unusable = {key: what for name, arr in arrays.items() for key, what in unusable_of(arr, name, sizes[name]).items()}
    special_bits: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(max_workers=READ_AHEAD * max(1, len(arrays))) as pool:
        def submit(i: int) -> dict[str, Future]:
            return {name: pool.submit(_read_shard, store, arr, name, i, sizes[name], unusable)
                    for name, arr in arrays.items()}

        pending = deque(submit(i) for i in range(min(READ_AHEAD, report.shards)))
        for i in tqdm(range(report.shards), desc="verify", unit="shard", disable=not progress):
            reads = pending.popleft()
            if i + READ_AHEAD < report.shards:
                pending.append(submit(i + READ_AHEAD))
            cols = {}
            for name, read in reads.items():  # problems in shard and array order, whatever finished first
                data, problem, nbytes = read.result()
                report.bytes_read += nbytes
                if problem is None:
                    cols[name] = data
                else:
                    report.problems.append(problem)
            _check_rows(store, i * per, cols, report, special_bits)
    report.problems += _check_special_bits(special_bits)
    report.problems += _check_vectors(store, report)
    return report


def _checked_array(store: ActivationStore, name: str, report: VerifyReport):
    """One row array, opened once, with its shape and dtype checked; None when it cannot be read
    row-aligned at all."""
    try:
        arr = store.group[name] if name in store.group else None
    except Exception as e:  # noqa: BLE001  its zarr.json cut short or edited: zarr raises several types
        report.problems.append(f"{name}: array metadata cannot be read ({type(e).__name__})")
        return None
    if arr is None:
        report.problems.append(f"{name}: array missing")
        return None
    problem = layout_problem(store.spec, name, arr)  # a float16 array read as float32 rows is another store
    if problem:
        report.problems.append(problem)
        return None
    if arr.shape[0] < store.n_tokens:
        report.problems.append(f"{name}: {arr.shape[0]:,} rows but the manifest commits {store.n_tokens:,}")
        return None
    if shard_rows(arr) != store.spec.shard_rows:
        report.problems.append(f"{name}: shards of {shard_rows(arr)} rows, the manifest says {store.spec.shard_rows}")
        return None
    return arr


def _read_shard(store: ActivationStore, arr, name: str, i: int, sizes: dict[str, int | None],
                unusable: dict[str, str]) -> tuple[np.ndarray | None, str | None, int]:
    """Shard `i` of one array: (its rows, None, bytes read), or (None, the problem, 0)."""
    per, key = store.spec.shard_rows, shard_key(arr, name, i)
    a, b = i * per, min((i + 1) * per, store.n_tokens)
    if key in unusable:  # zarr would read it as zeros
        return None, f"{key}: shard file {unusable[key]} (rows {a:,}-{b - 1:,})", 0
    try:
        return arr[a:b], None, sizes[key] or 0
    except Exception as e:  # noqa: BLE001  zarr and its codecs raise many types for damaged bytes
        drain_zarr_tasks()
        return None, f"{key}: {describe(e)} (rows {a:,}-{b - 1:,})", 0


def _check_rows(store: ActivationStore, start: int, cols: dict[str, np.ndarray], report: VerifyReport,
                special_bits: set[tuple[int, int]]) -> None:
    """Content checks of one shard's rows (arrays that failed to read are skipped)."""
    bad = report.problems.append
    spec = store.spec
    mean = _codec_mean_or_none(store)  # fp8 rows cannot be decoded without it (`_check_vectors` names why)
    if "acts" in cols and (spec.dtype != "fp8" or ("row_scale" in cols and mean is not None)):
        acts = decode_acts(cols["acts"], spec.dtype, cols.get("row_scale"), mean)
        _report_nonfinite("acts", start, ~np.isfinite(acts.numpy()).all(axis=1), bad)
    for name in ("scale", "row_scale"):
        if name in cols:
            _report_nonfinite(name, start, ~np.isfinite(cols[name]), bad)
    rows = np.arange(start, start + len(next(iter(cols.values())))) if cols else np.empty(0, np.int64)
    expected = {"seq": rows // spec.rows_per_context,
                "pos": rows % spec.rows_per_context + (1 if spec.skip_bos else 0)}
    for name, want in expected.items():
        if name in cols and not np.array_equal(cols[name], want):
            first = start + int(np.flatnonzero(cols[name] != want)[0])
            bad(f"{name}: row {first:,} holds {int(cols[name][first - start])}, expected {int(want[first - start])}")
    if "flags" in cols:
        undefined = (cols["flags"].astype(np.int64) & ~DEFINED_FLAGS) != 0
        if undefined.any():
            bad(f"flags: {int(undefined.sum())} row(s) from row {start + int(np.flatnonzero(undefined)[0]):,} "
                f"set undefined bits")
        if "tokens" in cols:
            special = cols["flags"] & int(Flags.ANY_SPECIAL)
            pairs = np.unique(np.stack([cols["tokens"].astype(np.int64), special]), axis=1)
            special_bits.update(map(tuple, pairs.T.tolist()))


def _codec_mean_or_none(store: ActivationStore) -> np.ndarray | None:
    try:
        return store.codec_mean()
    except RQAEError:  # missing or damaged: reported with the (d,) arrays
        return None


def _report_nonfinite(name: str, start: int, mask: np.ndarray, bad) -> None:
    if mask.any():
        bad(f"{name}: {int(mask.sum())} non-finite row(s), the first at row {start + int(np.flatnonzero(mask)[0]):,}")


def _check_special_bits(pairs: set[tuple[int, int]]) -> list[str]:
    """Special-token flags come from the token id, so one id must always carry the same bits."""
    seen: dict[int, int] = {}
    clashes = sorted({tok for tok, bits in pairs if seen.setdefault(tok, bits) != bits})
    if clashes:
        return [f"flags: token id(s) {clashes[:5]} carry different special-token bits in different rows"]
    return []


def _check_vectors(store: ActivationStore, report: VerifyReport) -> list[str]:
    """The (d,) arrays: gain in final-norm stores, the codec mean in fp8 stores."""
    names = ["gain"] if store.spec.normalisation == "final-norm" else []
    names += ["mean"] if store.spec.dtype == "fp8" else []
    problems = []
    for name in names:
        if name not in store.group:
            problems.append(f"{name}: array missing")
            continue
        arr = store.group[name]
        if problem := layout_problem(store.spec, name, arr):
            problems.append(problem)
            continue
        key = shard_key(arr, name, 0)
        if not is_file(store.path, key):
            problems.append(f"{key}: chunk file missing")
            continue
        try:
            data = arr[:]
        except Exception as e:  # noqa: BLE001  as in _read_shard
            drain_zarr_tasks()
            problems.append(f"{key}: {describe(e)}")
            continue
        if data.shape != (store.d,) or not np.isfinite(data).all():
            problems.append(f"{name}: expected {store.d} finite values, got shape {data.shape}")
    return problems


def format_report(r: VerifyReport) -> str:
    lines = [
        f"store     {r.path}",
        (f"checked   {r.tokens:,} committed rows ({r.contexts:,} contexts) in {r.shards} shard(s) x {r.arrays} "
         f"arrays, {r.bytes_read / 1e6:,.2f} MB read"),
    ]
    if r.unchecksummed:
        lines.append(f"note      {', '.join(r.unchecksummed)} written without chunk checksums (an older store): "
                     f"damage inside a chunk is found only where it breaks decompression or a check above")
    if r.ok:
        return "\n".join([*lines, "result    ok: no damage found"])
    lines.append(f"result    DAMAGED: {len(r.problems)} problem(s)")
    lines += [f"  {p}" for p in r.problems]
    lines.append("repair    see 'Damaged stores' in README.md: rebuild the named shards from a scratch "
                 "harvest, or re-harvest the store")
    return "\n".join(lines)
