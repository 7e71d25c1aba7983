"""The RQAE-vs-SAE quality table from one command, with equal training effort (not a test).

On the offline Gemma-3-270M (`blocks.9.hook_resid_post`, builtin corpus): harvest a store
(or reuse one), run the same learning-rate search for every architecture
(`rqae_pipeline/sweep.py`: half-decade rates around each family's default, chosen on
validation contexts), train every seed at the chosen rate, evaluate each seed run on the
store's last contexts (FVU in both spaces, CE-delta/KL with the LM, L0, dead latents,
bits per token) and print mean ± standard error over seeds:

    python bench/quality.py                      # rqae + topk, 100 steps x 1024, CE for seed 0
    python bench/quality.py --tokens 51200 --archs rqae,topk --ste-both   # smaller, + the STE choice

Cost: the default, from a fresh --out (harvest of the 98,304-token store included), took
11.5 minutes end to end on an idle 2-core machine (the harvest 1.2 of them; then the
sweeps, the seed runs and the evaluation, with CE-delta over the 64 test contexts for the
first `--ce-seeds` (1) run of each model and its bootstrap SE over contexts). `--size plateau`
trains 8x longer per run; `--ce-contexts 0` drops the LM.

Runs, `sweep.json` and `quality.json` land in --out; a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rqae_pipeline.harvest import HarvestConfig, harvest
from rqae_pipeline.lm import OFFLINE_GEMMA
from rqae_pipeline.models.base import ModelSpec, default_lr
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.sweep import SweepConfig, evaluate_seeds, format_quality_table, run_sweep

# Training tokens per run (batch 1024). bench/plateau.py on the default store: RQAE-64 and the
# TopK SAE improve by at most a few percent per doubling of tokens from ~800 steps on.
SIZES = {"small": 102_400, "plateau": 819_200}
SAE_ARCHS = {"topk": "topk-sae", "matryoshka": "matryoshka_batchtopk-sae", "batchtopk": "batchtopk-sae"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("cache/quality"))
    ap.add_argument("--store", type=Path, help="reuse this store (default: harvest --store-tokens into --out)")
    ap.add_argument("--store-tokens", type=int, default=98_304, help="tokens to harvest (128-token contexts)")
    ap.add_argument("--archs", default="rqae,topk", help=f"rqae and any of {', '.join(SAE_ARCHS)}")
    ap.add_argument("--n-q", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="training tokens per run: small (the 20-minute default) or plateau (bench/plateau.py's "
                         "budget at which held-out FVU has stopped falling)")
    ap.add_argument("--tokens", type=int, help="training tokens per run (overrides --size)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--rates", type=int, default=3, help="first grid: rates around each family default")
    ap.add_argument("--centres", default="", help="grid centres other than the family defaults, e.g. "
                    "rqae:1e-2,topk:3e-3 (the rates a smaller budget chose)")
    ap.add_argument("--extend", type=int, default=2, help="further rates while the best is at an edge")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--heldout-contexts", type=int, default=64, help="test contexts (CE on all of them)")
    ap.add_argument("--ce-contexts", type=int, help="test contexts for CE-delta/KL (default: all; 0 skips the LM)")
    ap.add_argument("--ce-seeds", type=int, default=1, help="seeds whose runs get CE (the LM: minutes per run)")
    ap.add_argument("--ste-both", action="store_true", help="also an RQAE with ste=unnormalised")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.tokens = args.tokens or SIZES[args.size]
    return args


def models(args: argparse.Namespace, d: int) -> dict[str, ModelSpec]:
    out = {}
    centres = {a: float(r) for a, r in (pair.split(":") for pair in args.centres.split(",") if pair)}
    for arch in args.archs.split(","):
        if arch == "rqae":
            out[f"rqae-{args.n_q}"] = ModelSpec(arch="rqae", d_in=d, n_q=args.n_q,
                                                lr=centres.get("rqae", default_lr("rqae")))
            if args.ste_both:
                out[f"rqae-{args.n_q}-ste-unnorm"] = ModelSpec(arch="rqae", d_in=d, n_q=args.n_q,
                                                               options={"ste": "unnormalised"})
        else:
            out[f"{arch}-sae"] = ModelSpec(arch=SAE_ARCHS[arch], d_in=d, d_sae=args.d_sae, k=args.k,
                                           lr=centres.get(arch))
    return out


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    store_path = args.store or args.out / "store.zarr"
    if args.store is None:
        harvest(HarvestConfig(out=store_path, model=OFFLINE_GEMMA, tokens=args.store_tokens, device=args.device,
                              resume=(store_path / "zarr.json").exists()))
    store = ActivationStore.open(store_path)
    cfg = SweepConfig(store=store_path, out=args.out, models=models(args, store.d), tokens=args.tokens,
                      batch_size=args.batch_size, rates=args.rates, extend=args.extend,
                      seeds=tuple(range(args.seeds)), heldout_contexts=args.heldout_contexts, device=args.device,
                      progress=False)
    sweep = run_sweep(cfg)
    ce = args.heldout_contexts if args.ce_contexts is None else args.ce_contexts
    evaluated = evaluate_seeds(cfg, sweep, ce_contexts=ce, prefixes=(16,), ce_seeds=args.ce_seeds)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{store.spec.model} {store.spec.hook}, store {store.n_tokens:,} tokens; {cfg.steps} steps x "
          f"{cfg.batch_size} tokens per run; test: the last {args.heldout_contexts} contexts (CE on {ce}); "
          f"{minutes:.1f} min")
    for name, entry in sweep["models"].items():
        tried = ", ".join(f"{r['lr']:g}: {r['fvu']:.4f}" for r in entry["sweep"])
        print(f"  {name}: validation FVU by rate {tried} -> {entry['chosen_lr']:g}"
              + (" (at the grid's edge)" if entry["chosen_at_edge"] else ""))
    print(format_quality_table(evaluated))
    (args.out / "quality.json").write_text(json.dumps(evaluated, indent=1, default=str))


if __name__ == "__main__":
    main()
