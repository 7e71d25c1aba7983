"""Training and encoding throughput of RQAE, and reader memory as the store grows (not a test).

Measured in one run, interleaved over several rounds (min / median / max of the per-round
ratios), on `--threads` torch threads (default 1):
1. training step (loss, backward, Adam) of the closed-form step / the layer loop, per
   token, at n_q=1024 on Gemma-2-2B's d=2304 (random activations: speed does not depend
   on the values). The loop keeps every layer's (B, d) tensors for backward (~77 GB at
   B=4096), so it runs at a smaller batch and the ratio is per token;
2. peak memory of one step above the model and batch (VmHWM of a fresh subprocess): the
   closed form at its batch, the loop at two small batches extrapolated linearly to it;
3. encoding tok/s: blocked encoder with the symmetric nearest-code search / with the
   544-code argmax (the encoder before) / the naive loop, with the fraction of rows whose
   codes agree, and the share of the 544-code encoder's time spent in its argmax; at
   batch 4096, the batch `rqae encode` uses (at 512 the per-layer op overhead, equal for
   both searches, dominated and the ratio was ~1.9x);
4. peak RSS of a training run on a store and on one 10x larger (same steps): the reader
   keeps one shuffle buffer, so the ratio should stay ~1;
5. data-parallel training: `rqae train` tok/s with 2 gloo ranks x 1 thread (torchrun) over
   1 process x 1 thread, RQAE n_q=64 on a synthetic d=640 store: the same global batch and
   steps, tokens over time of the logged intervals but the first (start-up) and the last
   (final evaluation), so the intervals in which a shuffle buffer is read count in full
   (the median interval would skip them); the order of the two runs alternates by round;
6. resume seek: time from opening the data at a checkpoint's recorded position to the first
   new batch, at 10x the trained tokens over 1x (one shuffle buffer either way: ~1);
7. on an accelerator (`--device`, default cuda when one is present, else the section is left
   out): closed-form step and encoder tok/s at n_q=1024, d=2304 in wall time with the device
   synchronised around each call, peak device memory of a step, and the fraction of rows
   whose codes equal the CPU's.

    python bench/train.py                 # full sizes (~15 min on a busy 2-core machine)
    python bench/train.py --quick         # smaller, for a smoke run (a few minutes)
    python bench/train.py --only parallel # sections 5 and 6 alone
    python bench/train.py --only parallel --quick --rounds 1   # a smoke run of them
    python bench/train.py --only device   # section 7 alone (a few minutes of GPU time)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.models.rqae import RQAE, RQAEConfig


def seconds(fn) -> float:
    """CPU time on one thread (steadier than wall time on a shared machine; equal on an idle
    one), wall time on several."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    fn()
    return clock() - t0


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def model_and_batch(d: int, n_q: int, batch: int) -> tuple[RQAE, torch.Tensor]:
    torch.manual_seed(0)
    model = RQAE(RQAEConfig(d_in=d, n_q=n_q))
    x = torch.randn(batch, d) * 3 + 0.5
    model.init_from_data(x)
    return model, x


def train_step(model: RQAE, opt: torch.optim.Optimizer, x: torch.Tensor, method: str) -> None:
    loss_fn = model.training_loss if method == "closed_form" else model.training_loss_loop
    loss, _, _ = loss_fn(x)
    opt.zero_grad()
    loss.backward()
    opt.step()


def training_rounds(d: int, n_q: int, cf_batch: int, loop_batch: int, rounds: int) -> dict:
    model, x = model_and_batch(d, n_q, cf_batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt, x[:loop_batch], "loop")  # warm-up of both paths
    train_step(model, opt, x[:loop_batch], "closed_form")
    cf, loop = [], []
    for _ in range(rounds):
        cf.append(cf_batch / seconds(lambda: train_step(model, opt, x, "closed_form")))
        loop.append(loop_batch / seconds(lambda: train_step(model, opt, x[:loop_batch], "loop")))
    return {"cf_tok_s": cf, "loop_tok_s": loop, "ratio": [a / b for a, b in zip(cf, loop)]}


def step_memory_mib(method: str, d: int, n_q: int, batch: int, threads: int) -> float:
    """Peak RSS of one training step above the RSS before it, in a fresh process."""
    code = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from train import model_and_batch, train_step
torch.set_num_threads({threads})
model, x = model_and_batch({d}, {n_q}, {batch})
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for p in model.parameters():  # Adam's state and the gradients exist before the measurement
    p.grad = torch.zeros_like(p)
opt.step()
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS")
train_step(model, opt, x, {method!r})
print((status("VmHWM") - before) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def memory(d: int, n_q: int, cf_batch: int, loop_batches: tuple[int, int], threads: int) -> dict:
    cf = step_memory_mib("closed_form", d, n_q, cf_batch, threads)
    small, big = (step_memory_mib("loop", d, n_q, b, threads) for b in loop_batches)
    per_row = (big - small) / (loop_batches[1] - loop_batches[0])
    loop_at_cf_batch = big + per_row * (cf_batch - loop_batches[1])
    return {"cf_mib": cf, "loop_mib": (small, big), "loop_extrapolated_mib": loop_at_cf_batch,
            "ratio": cf / loop_at_cf_batch}


def encoding_rounds(d: int, n_q: int, batch: int, rounds: int) -> dict:
    model, x = model_and_batch(d, n_q, batch)
    model.encode(x[:8])  # builds and caches the 4x4 cross terms, as evaluation does once
    xs = x / model.input_scale
    p = torch.randn(batch, 4)
    paths = {"symmetric": lambda: model.encode(x),
             "brute": lambda: model.encode_with_projections(xs, block=64, nearest=model._nearest_brute_force),
             "brute_block16": lambda: model.encode_with_projections(xs, nearest=model._nearest_brute_force),
             "naive": lambda: model.encode_naive(x),
             "argmax_only": lambda: [model._nearest_brute_force(p) for _ in range(n_q)]}
    tok_s = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            fn()  # untimed: a path's first call pays for the heap the path before it left (after
            # argmax_only's 1,024 (B, 544) score matrices, ~15% of the next encode), not its own work
            tok_s[name].append(batch / seconds(fn))
    symmetric = model.encode(x).long()
    brute = model.encode_with_projections(xs, block=64, nearest=model._nearest_brute_force)[0]
    return {**tok_s, "sym_over_brute": [a / b for a, b in zip(tok_s["symmetric"], tok_s["brute"])],
            "sym_over_brute16": [a / b for a, b in zip(tok_s["symmetric"], tok_s["brute_block16"])],
            "brute_over_naive": [a / b for a, b in zip(tok_s["brute"], tok_s["naive"])],
            "rows_identical": float((symmetric == brute).all(1).float().mean()),
            "argmax_share": statistics.median(b / a for a, b in zip(tok_s["argmax_only"], tok_s["brute"]))}


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


def tok_per_s_of_run(store: Path, out: Path, nproc: int, steps: int, n_q: int, batch: int) -> float:
    """Tokens over seconds of the logged intervals of an `rqae train` run, the first (start-up)
    and the last (final evaluation) left out."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "rqae_pipeline.cli", "train", "--store", str(store), "--out", str(out),
           "--n-q", str(n_q), "--batch-size", str(batch), "--tokens", str(batch * steps),
           "--checkpoint-every", "1000000", "--eval-every", "1000000", "--device", "cpu", "--nproc", str(nproc)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    intervals = [(r["tokens"] - prev["tokens"], r["tok_per_s"]) for prev, r in zip(rows, rows[1:-1])]
    return sum(tokens for tokens, _ in intervals) / sum(tokens / tok_s for tokens, tok_s in intervals)


def parallel_rounds(store: Path, tmp: Path, steps: int, rounds: int, batch: int) -> dict:
    one, two = [], []
    for r in range(rounds):  # interleaved, in alternating order: a load change hits both
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
            run = tok_per_s_of_run(store, tmp / f"p{nproc}-{r}", nproc, steps, 64, batch)
            (one if nproc == 1 else two).append(run)
    return {"one": one, "two": two, "ratio": [b / a for a, b in zip(one, two)]}


def seek_setup(store: Path, steps: int) -> tuple:
    """(store, config, held-out split, the position after `steps` batches): what a resumed run
    has before it reads (the checkpoint records the position; counted from the flags here)."""
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.train import TrainConfig, heldout_split, position_of_step

    st = ActivationStore.open(store)
    cfg = TrainConfig(store=store, out=store, model=ModelSpec(arch="rqae", d_in=st.d, n_q=8), batch_size=1024,
                      tokens=1024 * (steps + 1))
    split = heldout_split(st, cfg.heldout_fraction)
    return st, cfg, split, position_of_step(st, cfg, split, steps)


def seek_seconds(setup: tuple) -> float:
    """Seconds from opening the data at a recorded position to the first new batch."""
    from rqae_pipeline.train import positioned_batches

    t0 = time.perf_counter()
    next(positioned_batches(*setup))
    return time.perf_counter() - t0


def seek_rounds(store: Path, steps: int, rounds: int) -> dict:
    """Both positions are found before any seek is timed, and the two seeks alternate in
    order, so each timed read follows the same work (finding the position at 10x reads 10x
    the flags, which once ran right before its timed read)."""
    setups = {1: seek_setup(store, steps), 10: seek_setup(store, 10 * steps)}
    at = {1: [], 10: []}
    for r in range(rounds):
        for k in ((1, 10) if r % 2 == 0 else (10, 1)):
            at[k].append(seek_seconds(setups[k]))
    return {"at1": at[1], "at10": at[10], "ratio": [b / a for a, b in zip(at[1], at[10])]}


def parallel_and_seek(quick: bool, rounds: int) -> None:
    # --quick: at batch 4096 (half the steps) 30 steps log 3 times, leaving one timed interval
    steps, seek_steps = (60, 20) if quick else (120, 40)
    batches = {1024: steps, 4096: steps // 2}  # batch: steps (the larger batch: more tokens per step)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.zarr"
        make_store(store, max(1024 * steps * 2, int(1024 * seek_steps * 10 * 1.2)), 640)
        par = {b: parallel_rounds(store, Path(tmp) / str(b), n, rounds, b) for b, n in batches.items()}
        seek = seek_rounds(store, seek_steps, 3 * rounds)  # ~0.3 s a round: cheap, and noisy
    tok = "{:,.0f}"
    print("| measure (min / median / max over rounds) | value |\n|---|---|")
    for b, p in par.items():
        print(f"| RQAE n_q=64 d=640 training, batch {b}, 1 process x 1 thread | {spread(p['one'], tok)} tok/s |")
        print(f"| same, 2 gloo ranks x 1 thread (torchrun) | {spread(p['two'], tok)} tok/s |")
        print(f"| 2 ranks / 1 process, batch {b} | **{spread(p['ratio'])}x** |")
    print(f"| resume seek to the first new batch, after {seek_steps} steps | {spread(seek['at1'], '{:.3f}')} s |")
    print(f"| same, after {10 * seek_steps} steps | {spread(seek['at10'], '{:.3f}')} s |")
    print(f"| seek at 10x / at 1x trained tokens | **{spread(seek['ratio'])}** |")


def device_wall(device: str, fn) -> float:
    """Wall seconds of fn(), the device synchronised before and after (its work is queued)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def device_rounds(device: str, d: int, n_q: int, batches: tuple[int, ...], rounds: int) -> dict:
    """Section 7: closed-form step and encoder tok/s per batch on `device`, peak device memory
    of the steps, and the rows whose codes (untrained model) equal the CPU encoder's."""
    model, x = model_and_batch(d, n_q, max(batches))
    cpu_codes = model.encode(x[:512])
    model, x = model.to(device), x.to(device)
    out = {"same_codes": float((model.encode(x[:512]).cpu() == cpu_codes).all(1).float().mean())}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    on_cuda = device.startswith("cuda")
    for b in batches:
        xb = x[:b]
        train_step(model, opt, xb, "closed_form")  # warm-up: allocations, kernels
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = [b / device_wall(device, partial(train_step, model, opt, xb, "closed_form")) for _ in range(rounds)]
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else float("nan")
        model.encode(xb)  # the cross terms of the trained weights, built once as evaluation does
        encode = [b / device_wall(device, partial(model.encode, xb)) for _ in range(rounds)]
        out[b] = {"step": step, "encode": encode, "peak_mib": peak}
    return out


def print_device_rows(device: str, res: dict, cpu_step: list[float] | None) -> None:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    tok = "{:,.0f}"
    print(f"| on {name}: rows whose codes equal the CPU encoder's (untrained, 512 rows) | {res['same_codes']:.4f} |")
    for b, r in ((b, r) for b, r in res.items() if isinstance(b, int)):
        print(f"| on {name}: closed-form step, batch {b} | {spread(r['step'], tok)} tok/s |")
        print(f"| on {name}: peak memory of the steps, batch {b} | {r['peak_mib']:,.0f} MiB |")
        print(f"| on {name}: encoding, symmetric search, batch {b} | {spread(r['encode'], tok)} tok/s |")
        if cpu_step:
            print(f"| on {name}: closed-form step / the CPU step above, per token, batch {b} | "
                  f"{statistics.median(r['step']) / statistics.median(cpu_step):,.0f}x |")


def print_encoding_rows(enc: dict, enc_batch: int) -> None:
    tok = "{:,.0f}"
    print(f"| RQAE encoding, symmetric search (batch {enc_batch}) | {spread(enc['symmetric'], tok)} tok/s |")
    print(f"| RQAE encoding, 544-code argmax, blocks of 64 (the encoder before) | {spread(enc['brute'], tok)} tok/s |")
    print(f"| RQAE encoding, 544-code argmax, blocks of 16 (the search alone differs) | "
          f"{spread(enc['brute_block16'], tok)} tok/s |")
    print(f"| RQAE encoding, naive loop | {spread(enc['naive'], tok)} tok/s |")
    print(f"| symmetric / 544-code argmax encoder | **{spread(enc['sym_over_brute'])}x** "
          f"(rows with identical codes: {enc['rows_identical']:.4f}) |")
    print(f"| symmetric / 544-code argmax, both in blocks of 16 | {spread(enc['sym_over_brute16'])}x |")
    print(f"| 544-code argmax encoder / naive loop | {spread(enc['brute_over_naive'])}x |")
    print(f"| share of the 544-code encoder's time in its argmax | {enc['argmax_share']:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-store", action="store_true", help="leave out the reader-memory measurement (4)")
    ap.add_argument("--only", choices=["all", "encode", "parallel", "device"], default="all",
                    help="encode: the encoding section (3) alone; parallel: the data-parallel and resume-seek "
                         "sections (5, 6) alone; device: section 7")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="accelerator for section 7 (default: cuda when present, else no section 7)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d_dev, n_q_dev, dev_batches = (2304, 1024, (4096, 16384)) if not args.quick else (512, 128, (1024,))
    if args.only == "device":
        if not args.device:
            raise SystemExit("no accelerator: pass --device (cuda is not available)")
        print(f"device section: RQAE d={d_dev}, n_q={n_q_dev}, random activations, {args.rounds} rounds")
        print("| measure (min / median / max over rounds) | value |\n|---|---|")
        print_device_rows(args.device, device_rounds(args.device, d_dev, n_q_dev, dev_batches, args.rounds), None)
        return
    if args.only == "parallel":
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, load average "
              f"{os.getloadavg()[0]:.1f}; {args.rounds} rounds")
        parallel_and_seek(args.quick, args.rounds)
        return
    d, n_q = (2304, 1024) if not args.quick else (512, 128)
    # encoding at `rqae encode`'s batch (codes.py, EncodeConfig.batch_size)
    cf_batch, loop_batch, enc_batch = (4096, 128, 4096) if not args.quick else (1024, 128, 256)
    if args.only == "encode":
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s), load "
              f"average {os.getloadavg()[0]:.1f}; RQAE d={d}, n_q={n_q}, random activations, {args.rounds} rounds")
        print("| measure (min / median / max over rounds) | value |\n|---|---|")
        print_encoding_rows(encoding_rounds(d, n_q, enc_batch, args.rounds), enc_batch)
        return
    loop_mem_batches = (32, 64) if not args.quick else (64, 128)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}; RQAE d={d}, n_q={n_q}, random activations, {args.rounds} rounds")
    tr = training_rounds(d, n_q, cf_batch, loop_batch, args.rounds)
    mem = memory(d, n_q, cf_batch, loop_mem_batches, args.threads)
    enc = encoding_rounds(d, n_q, enc_batch, args.rounds)
    # Start above ~3 shuffle buffers (128 MB of fp32 rows each) so both runs are past warm-up.
    base_rows = 163_840 if not args.quick else 16_384
    if not args.skip_store:
        with tempfile.TemporaryDirectory() as tmp:
            small, big = Path(tmp) / "small.zarr", Path(tmp) / "big.zarr"
            make_store(small, base_rows, 640)
            make_store(big, base_rows * 10, 640)
            rss_small = peak_rss_of_training(small, Path(tmp) / "r1", steps=30)
            rss_big = peak_rss_of_training(big, Path(tmp) / "r2", steps=30)
    tok = "{:,.0f}"
    print()
    print("| measure (min / median / max over rounds) | value |\n|---|---|")
    print(f"| RQAE training (prefix loss), closed form, batch {cf_batch} | {spread(tr['cf_tok_s'], tok)} tok/s |")
    print(f"| RQAE training (prefix loss), layer loop, batch {loop_batch} | {spread(tr['loop_tok_s'], tok)} tok/s |")
    print(f"| closed form / loop, per token | **{spread(tr['ratio'])}x** |")
    print(f"| step memory above weights, closed form, batch {cf_batch} | {mem['cf_mib']:,.0f} MiB |")
    print(f"| step memory, loop, batch {loop_mem_batches[0]} / {loop_mem_batches[1]} -> {cf_batch} (linear) | "
          f"{mem['loop_mib'][0]:,.0f} / {mem['loop_mib'][1]:,.0f} -> {mem['loop_extrapolated_mib']:,.0f} MiB |")
    print(f"| step memory closed form / loop at batch {cf_batch} | **1/{1 / mem['ratio']:,.0f}** |")
    print_encoding_rows(enc, enc_batch)
    if not args.skip_store:
        print(f"| peak RSS training on {base_rows:,} rows (d=640) | {rss_small:,.0f} MiB |")
        print(f"| peak RSS training on {10 * base_rows:,} rows (10x) | {rss_big:,.0f} MiB |")
        print(f"| peak RSS ratio 10x store / 1x store | **{rss_big / rss_small:.2f}** |")
    if args.device:
        print_device_rows(args.device, device_rounds(args.device, d_dev, n_q_dev, dev_batches, args.rounds),
                          tr["cf_tok_s"])
    print()
    parallel_and_seek(args.quick, args.rounds)


if __name__ == "__main__":
    main()
