"""`rqae inspect`: what a store holds, what it costs on disk, and whether its numbers look sane."""

from __future__ import annotations

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.store import UNFINISHED_WRITE, ActivationStore, Flags
from rqae_pipeline.store_format import recorded_precision, row_arrays
from rqae_pipeline.urls import sizes_of_all


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
        **_bytes(store),
        "writer": store.writer(),
        "created": store.manifest.get("created"),
        "storage_fvu_vs_fp32": storage_fvu(store.manifest),
        "forward": _without_sums(store.manifest.get("forward_error")),
        "forward_fvu_vs_fp32": forward_fvu(store.manifest),
    }
    out["rows_per_shard"] = spec.shard_rows
    out["harvest_command"] = harvest_command(store)
    out["bytes_per_token"] = out["bytes_on_disk"] / n if n else None  # the committed rows' bytes only
    out["ratio_to_fp32_cache"] = out["bytes_per_token"] / (4 * spec.d_model) if n else None
    if n:
        try:
            out["sample"] = _norm_summary(store, sample_rows, seed)
        except RQAEError as e:  # a damaged store: the rest (its settings, to rebuild a shard) still shows
            out["sample_error"] = str(e)
    return out


def harvest_command(store: ActivationStore) -> str:
    """The `rqae harvest` options that make this store's rows again (the corpus is read from
    its start, so a scratch harvest with `--tokens` up to shard i ends with shard i's rows):
    what README's repair of a damaged shard needs. Run it on a device of the same kind."""
    spec, corpus = store.spec, store.spec.corpus
    precision = recorded_precision(store.manifest)
    parts = [f"--model {spec.model}", f"--hook {spec.hook}", f"--dataset {_quoted(corpus['name'])}"]
    if corpus.get("config"):
        parts.append(f"--dataset-config {corpus['config']}")
    if corpus.get("revision"):
        parts.append(f"--dataset-revision {corpus['revision']}")
    if corpus["kind"] == "hub":
        parts.append(f"--split {corpus.get('split', 'train')}")
    if corpus.get("text_field", "text") != "text":
        parts.append(f"--text-field {corpus['text_field']}")
    parts += [f"--context-length {spec.context_length}", f"--batch-size {spec.batch_contexts}",
              f"--contexts-per-shard {spec.contexts_per_shard}", f"--contexts-per-chunk {spec.contexts_per_chunk}",
              f"--dtype {spec.dtype}", f"--normalisation {spec.normalisation}",
              "--skip-bos" if spec.skip_bos else "--no-skip-bos", f"--model-dtype {precision['model_dtype']}"]
    if precision.get("compiled"):
        parts.append("--compile")
    return "rqae harvest " + " ".join(parts)


def _quoted(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _bytes(store: ActivationStore) -> dict[str, int]:
    """{"bytes_on_disk": the committed rows' shards (a partial last shard whole) and the
    metadata and per-store arrays; "bytes_uncommitted": everything else there (shards past
    the commit, a killed writer's leftovers, the lock)}."""
    rows, n_shards = set(row_arrays(store.spec)), -(-store.n_tokens // store.spec.shard_rows)
    committed = other = 0
    for key, size in sizes_of_all(store.path).items():
        parts = key.split("/")
        in_row_array = parts[0] in rows and len(parts) > 2 and parts[1] == "c"
        written_whole = not parts[-1].startswith(".") and not UNFINISHED_WRITE.search(parts[-1])
        if (int(parts[2]) < n_shards) if in_row_array and parts[2].isdigit() else written_whole:
            committed += size
        else:
            other += size
    return {"bytes_on_disk": committed, "bytes_uncommitted": other}


def _norm_summary(store: ActivationStore, sample_rows: int, seed: int) -> dict:
    """Norms over about `sample_rows` rows: whole chunks drawn at random (scattered rows
    would each decompress a chunk of their own: ~65k chunks, hundreds of GB, on a 1B-token
    store), concatenated in row order."""
    rng = np.random.default_rng(seed)
    n, per = store.n_tokens, store.spec.chunk_rows
    n_chunks = -(-n // per)
    chosen = np.sort(rng.choice(n_chunks, size=min(n_chunks, -(-sample_rows // per)), replace=False))
    idx = np.concatenate([np.arange(c * per, min(n, (c + 1) * per)) for c in chosen])
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
        # a non-finite scale makes the raw rows non-finite although the stored ones are not
        "finite": bool(np.isfinite(norms).all() and np.isfinite(raw_norms).all()),
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
    lines.append(f"settings     {s['harvest_command']}  ({s['rows_per_shard']:,} rows per shard)")
    if s.get("corpus_exhausted"):
        lines.append(f"corpus       ran out before the {s['corpus_exhausted']['requested_tokens']:,} tokens asked for")
    if s["bytes_per_token"]:
        lines.append(f"on disk      {s['bytes_on_disk'] / 1e6:,.2f} MB  = {s['bytes_per_token']:.1f} B/token"
                     f"  = {s['ratio_to_fp32_cache']:.3f} x an fp32 cache (4*d B/token)")
    if s.get("bytes_uncommitted"):
        lines.append(f"uncommitted  {s['bytes_uncommitted'] / 1e6:,.2f} MB more (shards past the commit, a writer's "
                     f"unfinished files, the lock; not counted above)")
    if s["storage_fvu_vs_fp32"] is not None:
        lines.append(f"storage FVU  {s['storage_fvu_vs_fp32']:.3e} against the fp32 activations")
    if s.get("forward"):
        f = s["forward"]
        precision = (f"{f['model_dtype']} forward, TF32 {'on' if f['tf32'] else 'off'}"
                     + (", torch.compile" if f.get("compiled") else ""))
        lines.append(f"forward FVU  {s['forward_fvu_vs_fp32']:.3e} against a float32 forward ({precision}; first "
                     f"{f['contexts']} contexts)" if s["forward_fvu_vs_fp32"] is not None
                     else f"forward      {precision} (the float32 reference: no forward error)")
    if s["writer"]:
        w = s["writer"]
        lines.append(f"writer       pid {w.get('pid')} on {w.get('host')} ({'running' if w['live'] else 'stale lock'})")
    if s.get("sample_error"):
        lines.append(f"sample       unreadable: {s['sample_error']}")
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
