"""Training and encoding throughput of RQAE, and reader memory as the store grows (not a test).

Measured in one run, as ratios where a ratio is the claim:
1. RQAE training tokens/s and encoding tokens/s at n_q=1024 on Gemma-2-2B's d=2304
   (random activations: speed does not depend on the values);
2. fast encoder (precomputed-projection recurrence) / naive loop, same weights and batch,
   with the fraction of rows whose codes agree exactly;
3. peak RSS of a training run on a store and on one 10x larger (same steps): the reader
   keeps one shuffle buffer, so the ratio should stay ~1.

    python bench/train.py                 # full sizes (several minutes on 2 CPU cores)
    python bench/train.py --quick         # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.models.rqae import RQAE, RQAEConfig


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def encoding(d: int, n_q: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = RQAE(RQAEConfig(d_in=d, n_q=n_q))
    x = torch.randn(batch, d) * 3
    model.encode(x[:8])  # builds and caches the 4x4 cross terms, as evaluation does once
    t_fast = timed(lambda: model.encode(x), repeats)
    t_naive = timed(lambda: model.encode_naive(x), repeats)
    same = float((model.encode(x) == model.encode_naive(x)).all(1).float().mean())
    t0 = time.perf_counter()
    model._cross_cache = None
    model._cross_terms()
    precompute = time.perf_counter() - t0
    return {"fast_tok_s": batch / t_fast, "naive_tok_s": batch / t_naive, "speedup": t_naive / t_fast,
            "rows_identical": same, "precompute_s": precompute}


def training(d: int, n_q: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = RQAE(RQAEConfig(d_in=d, n_q=n_q))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(batch, d)
    model.init_from_data(x)

    def step():
        loss, _, _ = model.training_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    return {"train_tok_s": batch / timed(step, steps)}


def make_store(path: Path, n_rows: int, d: int) -> None:
    """A store of random rows written through the real store API (no LM needed)."""
    from rqae_pipeline.store import ActivationStore, StoreSpec

    spec = StoreSpec(model="random", hook="blocks.0.hook_resid_post", layer=0, d_model=d, corpus={"name": "random"},
                     tokenizer="none", context_length=128, skip_bos=False, normalisation="rms", dtype="float16",
                     contexts_per_shard=128, contexts_per_chunk=8, batch_contexts=8, outlier_factor=10.0)
    store = ActivationStore.create(path, spec, torch.ones(d), {})
    rng = np.random.default_rng(0)
    shard = spec.shard_rows
    for start in range(0, n_rows, shard):
        n = min(shard, n_rows - start)
        rows = np.arange(start, start + n)
        store.write_rows(start, {"acts": rng.standard_normal((n, d), dtype=np.float32).astype(np.float16),
                                 "scale": np.ones(n, np.float32), "tokens": np.zeros(n, np.int32),
                                 "seq": rows // 128, "pos": (rows % 128).astype(np.int16),
                                 "flags": np.zeros(n, np.uint8)})
        store.commit(tokens=start + n, contexts=(start + n) // 128, corpus_state=(0, 0), complete=True)


def peak_rss_of_training(store: Path, out: Path, steps: int) -> float:
    code = f"""
from pathlib import Path
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, train
d = ActivationStore.open({str(store)!r}).d
train(TrainConfig(store=Path({str(store)!r}), out=Path({str(out)!r}), model=ModelSpec(arch="rqae", d_in=d, n_q=8),
                  batch_size=1024, tokens=1024 * {steps}, eval_every=10**9, checkpoint_every=10**9), progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024  # MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    d, n_q, batch = (2304, 1024, 512) if not args.quick else (512, 128, 256)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"RQAE d={d}, n_q={n_q}, random activations")
    enc = encoding(d, n_q, batch, repeats=2)
    train_batch = 256 if not args.quick else 128
    tr = training(d, n_q, train_batch, steps=2)
    # Start above ~3 shuffle buffers (128 MB of fp32 rows each) so both runs are past warm-up.
    base_rows = 163_840 if not args.quick else 16_384
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small.zarr", Path(tmp) / "big.zarr"
        make_store(small, base_rows, 640)
        make_store(big, base_rows * 10, 640)
        rss_small = peak_rss_of_training(small, Path(tmp) / "r1", steps=30)
        rss_big = peak_rss_of_training(big, Path(tmp) / "r2", steps=30)
    print()
    print("| measure | value |\n|---|---|")
    print(f"| RQAE training (prefix loss), batch {train_batch} | {tr['train_tok_s']:,.0f} tok/s |")
    print(f"| RQAE encoding, fast (batch {batch}) | {enc['fast_tok_s']:,.0f} tok/s |")
    print(f"| RQAE encoding, naive loop | {enc['naive_tok_s']:,.0f} tok/s |")
    print(f"| fast / naive encoder | **{enc['speedup']:.2f}x** "
          f"(rows with identical codes: {enc['rows_identical']:.4f}) |")
    print(f"| cross-term precompute (once per weights) | {enc['precompute_s']:.2f} s |")
    print(f"| peak RSS training on {base_rows:,} rows (d=640) | {rss_small:,.0f} MiB |")
    print(f"| peak RSS training on {10 * base_rows:,} rows (10x) | {rss_big:,.0f} MiB |")
    print(f"| peak RSS ratio 10x store / 1x store | **{rss_big / rss_small:.2f}** |")


if __name__ == "__main__":
    main()
