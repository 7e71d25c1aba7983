"""`rqae inspect`: what a store holds, what it costs on disk, and whether its numbers look sane."""

from __future__ import annotations

import numpy as np

from rqae_pipeline.store import ActivationStore, Flags


def storage_fvu(manifest: dict) -> float | None:
    """FVU of the stored acts against the fp32 activations they were encoded from (exact:
    float64 sums accumulated over every row at harvest time)."""
    return _fvu(manifest.get("storage_error"))


def forward_fvu(manifest: dict) -> float | None:
    """FVU of the harvest's forward (bf16/fp16 weights or TF32 matmuls) against a float32
    forward of the store's first contexts, both normalised as the rows are; None for a plain
    float32 forward (the reference itself) or a store from before it was recorded."""
    return _fvu(manifest.get("forward_error"))


def _fvu(e: dict | None) -> float | None:
    # float64 sums (sse, sumsq, sum, n): sse over the reference's total variance
    if not e or not e.get("n") or e.get("sum") is None:
        return None
    total = e["sumsq"] - float(np.sum(np.square(e["sum"]))) / e["n"]
    return e["sse"] / total if total > 0 else None


def _without_sums(e: dict | None) -> dict | None:
    return None if e is None else {k: v for k, v in e.items() if k not in ("sse", "sumsq", "sum", "n")}


def summarise(store: ActivationStore, *, sample_rows: int = 65536, seed: int = 0) -> dict:
    spec, n = store.spec, store.n_tokens
    out = {
        "path": str(store.path),
        "model": spec.model,
        "hook": spec.hook,
        "d_model": spec.d_model,
        "dtype": spec.dtype,
        "normalisation": spec.normalisation,
        "corpus": spec.corpus["name"],
        "context_length": spec.context_length,
        "skip_bos": spec.skip_bos,
        "tokens": n,
        "contexts": store.n_contexts,
        "complete": store.manifest["committed"]["complete"],
        "corpus_exhausted": store.manifest.get("corpus_exhausted"),
        "shards": -(-n // spec.shard_rows),
        "bytes_on_disk": store.nbytes_on_disk(),
        "writer": store.writer(),
        "created": store.manifest.get("created"),
        "storage_fvu_vs_fp32": storage_fvu(store.manifest),
        "forward": _without_sums(store.manifest.get("forward_error")),
        "forward_fvu_vs_fp32": forward_fvu(store.manifest),
    }
    out["bytes_per_token"] = out["bytes_on_disk"] / n if n else None
    out["ratio_to_fp32_cache"] = out["bytes_per_token"] / (4 * spec.d_model) if n else None
    if n:
        out["sample"] = _norm_summary(store, sample_rows, seed)
    return out


def _norm_summary(store: ActivationStore, sample_rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = store.n_tokens
    idx = np.sort(rng.choice(n, size=min(n, sample_rows), replace=False))
    rows = store.read_rows(idx)
    norms = rows.acts.norm(dim=1).numpy()
    raw_norms = store.raw(rows).norm(dim=1).numpy()
    flags = rows.flags

    def stats(v):
        return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())}

    return {
        "rows": int(len(idx)),
        "acts_norm": stats(norms),
        "raw_norm": stats(raw_norms),
        "finite": bool(np.isfinite(norms).all()),
        "flag_fraction": {f.name.lower(): float(((flags & int(f)) != 0).mean())
                          for f in (Flags.BOS, Flags.EOS, Flags.PAD, Flags.SPECIAL, Flags.OUTLIER)},
    }


def format_summary(s: dict) -> str:
    lines = [
        f"store        {s['path']}",
        f"model        {s['model']}  hook {s['hook']}  d_model {s['d_model']}",
        f"corpus       {s['corpus']}  context {s['context_length']}{'  (BOS not stored)' if s['skip_bos'] else ''}",
        f"storage      {s['dtype']}  normalisation {s['normalisation']}",
        f"committed    {s['tokens']:,} tokens in {s['contexts']:,} contexts, {s['shards']} shard(s)"
        f"{'' if s['complete'] else '  (incomplete: continue with --resume)'}",
    ]
    if s.get("corpus_exhausted"):
        lines.append(f"corpus       ran out before the {s['corpus_exhausted']['requested_tokens']:,} tokens asked for")
    if s["bytes_per_token"]:
        lines.append(f"on disk      {s['bytes_on_disk'] / 1e6:,.2f} MB  = {s['bytes_per_token']:.1f} B/token"
                     f"  = {s['ratio_to_fp32_cache']:.3f} x an fp32 cache (4*d B/token)")
    if s["storage_fvu_vs_fp32"] is not None:
        lines.append(f"storage FVU  {s['storage_fvu_vs_fp32']:.3e} against the fp32 activations")
    if s.get("forward"):
        f = s["forward"]
        precision = f"{f['model_dtype']} forward, TF32 {'on' if f['tf32'] else 'off'}"
        lines.append(f"forward FVU  {s['forward_fvu_vs_fp32']:.3e} against a float32 forward ({precision}; first "
                     f"{f['contexts']} contexts)" if s["forward_fvu_vs_fp32"] is not None
                     else f"forward      {precision} (the float32 reference: no forward error)")
    if s["writer"]:
        w = s["writer"]
        lines.append(f"writer       pid {w.get('pid')} on {w.get('host')} ({'running' if w['live'] else 'stale lock'})")
    if "sample" in s:
        m = s["sample"]
        a, r = m["acts_norm"], m["raw_norm"]
        lines += [
            f"sample       {m['rows']:,} random rows, all finite: {m['finite']}",
            f"  |acts|     min {a['min']:.3g}  median {a['median']:.3g}  max {a['max']:.3g}",
            f"  |raw|      min {r['min']:.3g}  median {r['median']:.3g}  max {r['max']:.3g}",
            "  flagged    " + "  ".join(f"{k} {v:.2%}" for k, v in m["flag_fraction"].items()),
        ]
    return "\n".join(lines)
