"""Has training plateaued? One long run per model at its chosen rate (not a test).

`bench/quality.py` compares models at one token budget; this asks whether that budget is
long enough. Each model trains once, at a fixed learning rate (no schedule, as in the
sweep), for `--tokens`, evaluated on the store's last `--heldout-contexts` contexts (the
quality table's test rows) `--evaluations` times. It prints the held-out FVU after each
doubling of the tokens seen (1/32 ... 1 of the run) and the change per doubling: a model
has plateaued at a budget when one more doubling changes its FVU by a few percent at most.

One long run stands in for the shorter runs it passes through: with a constant rate the
first t steps of a long run are a run of t steps, except that the TopK SAE's dead-latent
window is scaled to the run's length (1/20 of it, sweep.py), so a shorter run switches its
auxiliary loss on sooner.

    python bench/plateau.py --store cache/quality/store.zarr            # rqae-64 at 1e-2, topk at 3e-3
    python bench/plateau.py --store S --tokens 819200 --models rqae:1e-2,topk:3e-3
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.sweep import SweepConfig, heldout_series, plateau_summary, splits, train_run


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("cache/plateau"))
    ap.add_argument("--models", default="rqae:1e-2,topk:3e-3", help="arch:rate pairs (the sweep's chosen rates)")
    ap.add_argument("--n-q", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1_638_400, help="training tokens of each run")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--evaluations", type=int, default=64)
    ap.add_argument("--heldout-contexts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    return ap.parse_args()


def spec_for(arch: str, lr: float, args: argparse.Namespace, d: int) -> tuple[str, ModelSpec]:
    if arch == "rqae":
        return f"rqae-{args.n_q}", ModelSpec(arch="rqae", d_in=d, n_q=args.n_q, lr=lr)
    return f"{arch}-sae", ModelSpec(arch=f"{arch}-sae", d_in=d, d_sae=args.d_sae, k=args.k, lr=lr)


def at_doublings(steps: list[int], fvus: list[float], total: int) -> list[tuple[int, float]]:
    """(step, FVU) at the evaluation nearest each of total/32, total/16, ..., total."""
    out = []
    for j in range(5, -1, -1):
        target = total / 2**j
        near = min(range(len(steps)), key=lambda i: abs(steps[i] - target))
        if not out or steps[near] != out[-1][0]:
            out.append((steps[near], fvus[near]))
    return out


def main() -> None:
    args = parse_args()
    store = ActivationStore.open(args.store)
    _, test = splits(store, args.heldout_contexts)
    results = {}
    for pair in args.models.split(","):
        arch, lr = pair.split(":")
        name, spec = spec_for(arch, float(lr), args, store.d)
        cfg = SweepConfig(store=args.store, out=args.out, models={name: spec}, tokens=args.tokens,
                          batch_size=args.batch_size, seeds=(args.seed,), heldout_contexts=args.heldout_contexts,
                          evaluations=args.evaluations, device=args.device, progress=False)
        t0 = time.perf_counter()
        record = train_run(cfg, spec, seed=args.seed, out=args.out / name / f"lr-{float(lr):g}", split=test)
        steps, fvus = heldout_series(Path(record["run"]))
        points = at_doublings(steps, fvus, cfg.steps)
        results[name] = {"lr": float(lr), "points": points, "plateau": plateau_summary(steps, fvus, cfg.steps),
                         "minutes": (time.perf_counter() - t0) / 60}
        print_model(name, results[name], cfg)
    (args.out / "plateau.json").write_text(json.dumps(results, indent=1))


def print_model(name: str, r: dict, cfg: SweepConfig) -> None:
    print(f"\n{name} at lr {r['lr']:g}: {cfg.steps} steps x {cfg.batch_size} tokens ({r['minutes']:.1f} min)")
    print(f"  {'step':>6s} {'tokens':>10s} {'held-out FVU':>13s} {'change since the half':>22s}")
    prev = None
    for step, fvu in r["points"]:
        change = f"{fvu / prev - 1:+.1%}" if prev and math.isfinite(prev) else ""
        print(f"  {step:6d} {step * cfg.batch_size:10,d} {fvu:13.4f} {change:>22s}")
        prev = fvu
    p = r["plateau"]
    if "relative_change" in p:
        print(f"  last 20% of steps: FVU {p['min']:.4f}-{p['max']:.4f}, change {p['relative_change']:+.1%}")


if __name__ == "__main__":
    main()
