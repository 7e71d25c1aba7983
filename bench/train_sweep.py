"""Small sweep of RQAE training choices on a real store (not a test).

Trains each variant for the same number of steps on the same batches and prints the
held-out FVU of the full model and of its 1/4/16-layer prefixes, so the defaults in
`rqae train` (optimiser, learning rate, batch size, data-mean bias init, prefix-averaged
loss) rest on measurements. Usage:

    python bench/train_sweep.py --store cache/demo.zarr --n-q 32 --steps 150
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, train

VARIANTS = {
    "default (tied init, prefix loss, Adam 1e-2)": {},
    "lr 3e-3": {"lr": 3e-3},
    "lr 1e-3": {"lr": 1e-3},
    "lr 3e-2": {"lr": 3e-2},
    "full-only loss": {"prefix_loss": False},
    "no data-mean bias init": {"mean_init": False},
    "reference init (nn.Linear default)": {"options": {"init": "reference"}},
    "reference init, full-only loss, lr 1e-3": {"options": {"init": "reference"}, "prefix_loss": False, "lr": 1e-3},
    "batch 256 (same tokens)": {"batch_size": 256},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--n-q", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="variant names to run (substring match)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    d = ActivationStore.open(args.store).d
    rows = []
    print(f"store {args.store}: n_q={args.n_q}, {args.steps} steps of {args.batch_size} tokens (same tokens for all)")
    print("| variant | held-out FVU | 1 layer | 4 layers | 16 layers | seconds |\n|---|---|---|---|---|---|")
    for name, change in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        change = dict(change)
        batch = change.pop("batch_size", args.batch_size)
        spec = replace(ModelSpec(arch="rqae", d_in=d, n_q=args.n_q), **change)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(store=args.store, out=Path(tmp) / "run", model=spec, batch_size=batch,
                              tokens=args.batch_size * args.steps, eval_every=10**9, checkpoint_every=10**9,
                              log_every=50)
            t0 = time.perf_counter()
            h = train(cfg, progress=False).heldout
            secs = time.perf_counter() - t0
        p = h["fvu_by_prefix"]
        rows.append({"variant": name, "fvu": h["fvu"], "fvu_1": p["1"], "fvu_4": p["4"], "fvu_16": p.get("16"),
                     "seconds": secs})
        fvu_16 = p.get("16", float("nan"))
        print(f"| {name} | {h['fvu']:.3f} | {p['1']:.3f} | {p['4']:.3f} | {fvu_16:.3f} | {secs:.0f} |", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
