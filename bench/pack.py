"""Packing throughput (not a test): tokens/s of `corpus.iter_contexts`, the step that turns
documents into contexts (in one process for a single-process harvest, on the dask client for
every worker of `--workers N`), three ways: pieces tokenised in groups (`corpus.TOKENISE_CHARS`)
with the fast tokenizer's own thread pool on (all cores, `TOKENIZERS_PARALLELISM=true`, the
default outside the tests), the same on one core, and one tokenizer call per piece
(TOKENISE_CHARS = 0, as packing was before the groups) on all cores. The pool is fixed when a
process first tokenises, so each run is a process of its own; the three run back to back,
every other round in the reverse order, and each ratio is the median of the per-round ratios,
with min / max. The corpus is local `.jsonl` files of the Python reference (bench/scale.py's
`write_corpus`), read through the same `datasets` stream as a harvest's.

    python bench/pack.py     # offline Gemma-3-270M tokenizer, 1M tokens, 5 rounds (~4 min)
    python bench/pack.py --model tiny-random:0 --tokens 100000 --rounds 2     # smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rqae_pipeline import corpus as corpus_module
from rqae_pipeline.corpus import iter_contexts, parse_corpus
from rqae_pipeline.lm import OFFLINE_GEMMA, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import spread, write_corpus  # noqa: E402


def packed_tokens_per_second(model: str, corpus: str, tokens: int, context_length: int, per_piece: bool) -> float:
    if per_piece:
        corpus_module.TOKENISE_CHARS = 0
    tokenizer = load_tokenizer(model)
    spec, n_ctx, got = parse_corpus(corpus), tokens // context_length, 0
    t0 = time.perf_counter()
    for got, _ in enumerate(iter_contexts(spec, tokenizer, context_length=context_length), start=1):
        if got == n_ctx:
            break
    seconds = time.perf_counter() - t0
    if got < n_ctx:
        raise SystemExit(f"the corpus holds only {got} contexts")
    return n_ctx * context_length / seconds


WAYS = {"grouped, all cores": (True, False), "grouped, one core": (False, False),
        "a call per piece, all cores": (True, True)}  # (tokenizer's thread pool, per piece)


def timed_child(args: argparse.Namespace, corpus: str, way: str) -> float:
    parallel, per_piece = WAYS[way]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if parallel else "false"}
    cmd = [sys.executable, __file__, "--child", corpus, "--model", args.model, "--tokens", str(args.tokens),
           "--context-length", str(args.context_length)] + (["--per-piece"] if per_piece else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_GEMMA, help="whose tokenizer; also tiny-random:SEED")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", metavar="CORPUS", help=argparse.SUPPRESS)
    ap.add_argument("--per-piece", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(packed_tokens_per_second(args.model, args.child, args.tokens, args.context_length, args.per_piece))
        return
    print(f"machine: {os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable); tokenizer of {args.model}; "
          f"{args.tokens:,} tokens in contexts of {args.context_length}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", load_tokenizer(args.model), args.tokens, docs_per_file=2000)
        timed_child(args, corpus, "grouped, one core")  # warm: the page cache, datasets' own caches
        runs = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]:
                runs[way].append(timed_child(args, corpus, way))
            print(f"round {r}: " + ", ".join(f"{way} {v[-1]:,.0f} tok/s" for way, v in runs.items()), flush=True)
    grouped = runs["grouped, all cores"]
    print("\n| measure | min / median / max |\n|---|---|")
    for way, values in runs.items():
        print(f"| packing, {way}, tok/s | {spread(values, '{:,.0f}')} |")
    for way in ("grouped, one core", "a call per piece, all cores"):
        print(f"| grouped, all cores / {way} (per round) | {spread([a / b for a, b in zip(grouped, runs[way])])} |")


if __name__ == "__main__":
    main()
