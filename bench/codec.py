"""What the store's codec costs per token, for sizing a large harvest (not a test).

Reads real activation rows from a store, then times, in CPU seconds of this process (one
thread: numcodecs' Blosc is told to use one), the chunk codec the harvest writes with
(`codec.compressors`: Blosc zstd-5 byte shuffle, then crc32c) on whole 1,024-row chunks:
encode (what a harvest worker pays per token) and decode (what a reader pays), for the
store dtypes float16 and fp8 (the compact codes, `codec.encode_acts`). Reports bytes per
row before and after compression and CPU microseconds per row and per raw MB, min / median
/ max over `--rounds`. docs/scale.md scales these to Gemma-2-2B's d = 2304.

    python bench/codec.py --store cache/quality/store.zarr
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.codec import compressors, encode_acts
from rqae_pipeline.store import ActivationStore

CHUNK_ROWS = 1024


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=32_768)
    ap.add_argument("--rounds", type=int, default=5)
    return ap.parse_args()


def time_codec(acts: np.ndarray) -> tuple[float, float, int]:
    """(encode CPU s, decode CPU s, stored bytes) of `acts` written to and read back from an
    in-memory zarr array with the store's chunking and codecs."""
    import zarr
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    arr = zarr.create_array(store=mem, shape=acts.shape, dtype=acts.dtype, chunks=(CHUNK_ROWS, acts.shape[1]),
                            compressors=compressors("float16"), zarr_format=3)
    t0 = time.process_time()
    arr[:] = acts
    t1 = time.process_time()
    back = arr[:]
    t2 = time.process_time()
    if not np.array_equal(back, acts):
        raise SystemExit("codec round trip changed the data")
    stored = sum(len(v) for k, v in mem._store_dict.items() if not k.endswith("zarr.json"))
    return t1 - t0, t2 - t1, stored


def main() -> None:
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    args = parse_args()
    store = ActivationStore.open(args.store)
    rows = min(args.rows, store.n_tokens) // CHUNK_ROWS * CHUNK_ROWS
    x, _ = store.read_acts(0, rows)
    print(f"{store.spec.model} {store.spec.hook}: {rows:,} real rows, d = {store.d}; CPU time, 1 thread")
    for dtype in ("float16", "fp8"):
        acts = encode_acts(torch.as_tensor(x), dtype, x.mean(0).numpy() if dtype == "fp8" else None)["acts"]
        raw = acts.nbytes / rows
        runs = np.array([time_codec(acts) for _ in range(args.rounds)])
        enc, dec, size = (np.percentile(runs[:, i], [0, 50, 100]) for i in range(3))
        print(f"  {dtype:8s} acts {raw:7.0f} B/row raw -> {size[1] / rows:7.1f} compressed "
              f"({size[1] / acts.nbytes:.3f}); encode {_us(enc, rows)} us/row, decode {_us(dec, rows)} us/row; "
              f"encode {enc[1] / (acts.nbytes / 1e6) * 1e3:.2f} ms per raw MB (median)")


def _us(t: np.ndarray, rows: int) -> str:
    return "/".join(f"{v / rows * 1e6:.2f}" for v in t)


if __name__ == "__main__":
    main()
