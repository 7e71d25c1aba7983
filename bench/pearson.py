"""Pearson feature matching (blog Fig 5a) on a store: train an RQAE and a TopK SAE on it (or
take given model directories), then correlate on the RQAE's held-out rows, with query (a)
as built now and, for comparison, as built before (the stored-space encoder column used as
is, scaled to the rows' RMS). Prints mean / std / quartiles over features per prefix,
with all features and with the 5 worst at the middle prefix dropped (the reference plot).

    python bench/pearson.py --store cache/demo/store.zarr --out /tmp/pearson-runs [--seeds 0,1]

A small store cannot meet the reference's pool (>= 300 firing tokens, contexts from those of
the top/middle/bottom 100 tokens, on 4.7M tokens): --heldout, --min-firing and
--tokens-per-group size it (defaults: a quarter held out, 60 and 20, the same 3:1 ratio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rqae_pipeline.pearson as pearson
from rqae_pipeline.evaluate import EvalConfig, eval_rows, load_model, model_space
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, train

PREFIXES = (1, 4, 16, 64)
NEW_QUERY = pearson.encoder_query


def trained(store: Path, out: Path, seed: int, steps: int, batch: int, heldout: float) -> tuple[Path, Path]:
    d = ActivationStore.open(store).d
    runs = {}
    for name, spec in {"rqae": ModelSpec(arch="rqae", d_in=d, n_q=64),
                       "topk-sae": ModelSpec(arch="topk-sae", d_in=d, d_sae=2048, k=32)}.items():
        runs[name] = out / f"{name}-seed{seed}"
        if not (runs[name] / "train.json").exists():
            train(TrainConfig(store=store, out=runs[name], model=spec, batch_size=batch, tokens=steps * batch,
                              seed=seed, heldout_fraction=heldout), progress=False)
    return runs["rqae"], runs["topk-sae"]


def old_query(sae, f, store, sae_space):
    """Query (a) before this change: a stored-space column used as is, at the rows' RMS."""
    v = sae.W_enc[:, f].detach().float()
    if sae_space == "raw":
        return pearson.normalise_like_store(v[None], store)[0]
    rms = float(store.read(0, 4096).acts.pow(2).mean(-1).sqrt().mean())
    return v / v.pow(2).mean().sqrt() * rms


def lines(label: str, summary: dict) -> list[str]:
    out = []
    for name in ("a", "b"):
        cells = [f"{m}: {s['mean']:.2f} ± {s['std']:.2f} [{s['q25']:.2f}, {s['q75']:.2f}]"
                 for m, s in ((m, summary[name][str(m)]) for m in PREFIXES)]
        out.append(f"{label} ({name}) n={summary[name]['64']['n']}  " + "  ".join(cells))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--heldout", type=float, default=0.25)
    p.add_argument("--min-firing", type=int, default=60)
    p.add_argument("--tokens-per-group", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = ActivationStore.open(args.store)
    for seed in (int(s) for s in args.seeds.split(",")):
        rqae_dir, sae_dir = trained(args.store, args.out, seed, args.steps, args.batch, args.heldout)
        base = EvalConfig(store=args.store, model=rqae_dir)
        rows, space = eval_rows(base, store), model_space(EvalConfig(store=args.store, model=sae_dir))
        rqae, sae = load_model(rqae_dir, "cpu"), load_model(sae_dir, "cpu")
        for label, query in (("now", NEW_QUERY), ("before", old_query)):
            pearson.encoder_query = query
            out = pearson.pearson_matching(rqae, sae, store, pearson.PearsonConfig(
                min_firing=args.min_firing, tokens_per_group=args.tokens_per_group), sae_space=space,
                                           prefixes=PREFIXES, rows=rows, exclude=base.exclude)
            print(f"seed {seed}, SAE space {space}, rows {rows[0]}..{rows[1]}, {len(out['features'])} features")
            print("\n".join(lines(f"  {label} all", out["summary"])))
            print("\n".join(lines(f"  {label} -5 worst", out["summary_drop_worst"])))
        pearson.encoder_query = NEW_QUERY


if __name__ == "__main__":
    main()
