"""Harvest scaling (not a test): three ratios, each over interleaved rounds (min / median /
max of the per-round ratio, so drift from other load on a shared machine hits both sides of a
ratio alike; a target is met when the median meets it).

workers  `harvest_parallel` tok/s on a dask LocalCluster of 2 workers x 1 torch thread / 1
         worker x 1 thread, same settings and tokens. Both clusters stay up for the whole run
         and each is warmed once (the model loads on every worker, the client receives its
         tokenizer), so the timings are of the harvest alone. The first round checks the two
         stores are byte-identical (the manifest's creation time aside). Target >= 1.6.
s3       `harvest` tok/s into `s3://` on a real S3-protocol server (moto's ThreadedMotoServer,
         in this process, reached through s3fs by the AWS endpoint environment variables, as
         tests/test_object_store.py does) / into a local temporary folder, same settings and
         tokens, one loaded model. The first round checks both stores hold the same committed
         arrays, committed block and storage error. Target >= 0.8. The server shares this
         process (and its GIL) with the harvest, which a real object store would not, so the
         ratio errs low.
resume   Seconds of a `harvest(resume=True)` that adds exactly one shard to a store of K
         committed shards (K = --tokens / shard rows) and to one of 10K (same settings, same
         corpus, one loaded model), timed from the call to its return (the one-shard work is
         the same in both), each round on a fresh copy of the prepared store (copy time and
         the flush of its dirty pages excluded). The corpus is local .jsonl files written here
         (the Python reference, repeated with distinct prefixes, `--docs-per-file` documents
         a file), large enough for 10K + 1 shards and the same for both stores (the harvest
         hashes every corpus file on each start), so the resume's `datasets` stream state is
         what reaches the committed position. The first round checks the shard added at K
         equals shard K of the uninterrupted 10K store, and the one added at 10K the tokens
         of packing the corpus from its start; the time of that packing and of reading the
         10K store's rows is printed beside, for scale: what a resume that re-read would add.
         Target: 10K / K <= 1.2 (flat: nothing re-read up to the committed position).

    python bench/scale.py                        # all three: offline Gemma-3-270M, 5 rounds (resume 11)
    python bench/scale.py --only s3 --only resume --model tiny-random:0 --tokens 2048 --rounds 2 --resume-rounds 2
    python bench/scale.py --only workers --worker-tokens 8192 --rounds 3   # the earlier, shorter harvests
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.harvest import HarvestConfig, harvest
from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel
from rqae_pipeline.lm import OFFLINE_GEMMA, load_lm
from rqae_pipeline.store import ActivationStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import store_files  # noqa: E402  (the tests' byte-for-byte store comparison)

SECTIONS = ("workers", "s3", "resume")
BUCKET = "rqae-bench"
Row = tuple[str, str, str, str]  # measure, min / median / max, target, met


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def met(values: list[float], ok) -> str:
    return "yes" if ok(statistics.median(values)) else "**NO**"


def base_config(args: argparse.Namespace, out: Path | str, **changes) -> HarvestConfig:
    cfg = HarvestConfig(out=out, model=args.model, tokens=args.tokens, context_length=args.context_length,
                        batch_contexts=args.batch_size, contexts_per_shard=args.contexts_per_shard,
                        contexts_per_chunk=args.batch_size, device="cpu")
    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------- workers


def timed_parallel(cfg: HarvestConfig, client, workers: int, out: Path) -> float:
    """tok/s of one dask harvest into a fresh `out`."""
    t0 = time.perf_counter()
    result = harvest_parallel(dataclasses.replace(cfg, out=out), DaskConfig(workers=workers, threads_per_worker=1),
                              client=client, progress=False)
    return result.new_tokens / (time.perf_counter() - t0)


def bench_workers(args: argparse.Namespace, root: Path) -> list[Row]:
    from dask.distributed import Client

    from rqae_pipeline.tasks import local_cluster

    cfg = base_config(args, root / "unused", tokens=args.worker_tokens)
    clusters = {n: local_cluster(n) for n in (1, 2)}
    clients = {n: Client(cluster) for n, cluster in clusters.items()}
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for n, client in clients.items():  # warm-up: every worker loads the model
            client.wait_for_workers(n)
            warm_tokens = args.context_length * n * args.contexts_per_shard
            timed_parallel(dataclasses.replace(cfg, tokens=warm_tokens), client, n, root / f"warm-{n}")
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                rates[n].append(timed_parallel(cfg, clients[n], n, root / f"w{r}-{n}"))
            if r == 0 and store_files(root / "w0-1") != store_files(root / "w0-2"):
                raise SystemExit("the 1- and 2-worker stores differ")
            for n in (1, 2):
                shutil.rmtree(root / f"w{r}-{n}")
            print(f"workers round {r}: 1 worker {rates[1][-1]:,.0f} tok/s, 2 workers {rates[2][-1]:,.0f} tok/s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for n in clients:
            clients[n].close()
            clusters[n].close()
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    return [(f"harvest, 1 dask worker x 1 thread, {args.worker_tokens:,} tokens",
             f"{spread(rates[1], '{:,.0f}')} tok/s", "", ""),
            ("same, 2 dask workers x 1 thread", f"{spread(rates[2], '{:,.0f}')} tok/s", "", ""),
            ("2 workers / 1 worker tok/s", f"**{spread(ratios)}**", ">= 1.6", met(ratios, lambda m: m >= 1.6)),
            ("1- and 2-worker stores byte-identical (round 0)", "yes", "yes", "yes")]


# --------------------------------------------------------------------------- s3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_bucket(bucket: str) -> Iterator:
    """A moto S3 server on a free port with one bucket; the environment points botocore (s3fs,
    so zarr's FsspecStore) at it with dummy credentials. Yields the s3fs file system."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        yield fs
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def timed_harvest(cfg: HarvestConfig, lm) -> float:
    """tok/s of one single-process harvest (the model already loaded)."""
    t0 = time.perf_counter()
    result = harvest(cfg, lm=lm, progress=False)
    return result.new_tokens / (time.perf_counter() - t0)


def same_committed(a: str | Path, b: str | Path) -> bool:
    """Whether two stores hold the same committed arrays, committed block and storage error."""
    x, y = ActivationStore.open(a), ActivationStore.open(b)
    if x.manifest["committed"] != y.manifest["committed"] or x.n_tokens == 0:
        return False
    if x.manifest.get("storage_error") != y.manifest.get("storage_error"):
        return False
    xa, ya = x.read_encoded(0, x.n_tokens), y.read_encoded(0, y.n_tokens)
    return xa.keys() == ya.keys() and all(np.array_equal(xa[k], ya[k]) for k in xa)


def bench_s3(args: argparse.Namespace, root: Path, lm) -> list[Row]:
    rates: dict[str, list[float]] = {"s3": [], "local": []}
    with moto_bucket(BUCKET) as fs:
        outs = lambda r: {"s3": f"s3://{BUCKET}/r{r}.zarr", "local": root / f"local-{r}.zarr"}  # noqa: E731
        warm = base_config(args, root / "unset", tokens=args.context_length * args.contexts_per_shard)
        for out in outs("warm").values():  # first-call costs: s3fs/botocore session, zarr codecs
            timed_harvest(dataclasses.replace(warm, out=out), lm)
        for r in range(args.rounds):
            for where in ("s3", "local") if r % 2 == 0 else ("local", "s3"):
                rates[where].append(timed_harvest(base_config(args, outs(r)[where]), lm))
            if r == 0 and not same_committed(outs(0)["s3"], outs(0)["local"]):
                raise SystemExit("the bucket's store and the local store differ")
            fs.rm(f"{BUCKET}/r{r}.zarr", recursive=True)  # moto keeps objects in memory
            shutil.rmtree(outs(r)["local"])
            print(f"s3 round {r}: local {rates['local'][-1]:,.0f} tok/s, s3 {rates['s3'][-1]:,.0f} tok/s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = [s / loc for s, loc in zip(rates["s3"], rates["local"], strict=True)]
    return [(f"harvest into a local folder, {args.tokens:,} tokens", f"{spread(rates['local'], '{:,.0f}')} tok/s",
             "", ""),
            ("same into s3:// (moto server in this process)", f"{spread(rates['s3'], '{:,.0f}')} tok/s", "", ""),
            ("s3 / local tok/s", f"**{spread(ratios)}**", ">= 0.8", met(ratios, lambda m: m >= 0.8)),
            ("bucket and local stores hold the same committed arrays (round 0)", "yes", "yes", "yes")]


# --------------------------------------------------------------------------- resume


def write_corpus(folder: Path, tokenizer, tokens_needed: int, docs_per_file: int) -> str:
    """`.jsonl` files of the Python reference repeated with distinct prefixes until they hold
    ~1.2x `tokens_needed` tokens (counted by `tokenizer`); returns their glob."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    sizes = {k: len(tokenizer(topics[k], add_special_tokens=False, verbose=False)["input_ids"]) for k in topics}
    docs, total, copy = [], 0, 0
    while total < 1.2 * tokens_needed:
        for key in sorted(topics):
            docs.append(json.dumps({"text": f"Copy {copy} of the Python reference, {key}:\n\n{topics[key]}"}))
            total += sizes[key] + 1  # its EOS (the prefix's tokens are slack)
            if total >= 1.2 * tokens_needed:
                break
        copy += 1
    folder.mkdir(parents=True)
    per_file = docs_per_file or len(docs)
    for i in range(0, len(docs), per_file):
        (folder / f"part-{i // per_file:06d}.jsonl").write_text("\n".join(docs[i : i + per_file]) + "\n")
    return str(folder / "*.jsonl")


def prepare_stores(cfg: HarvestConfig, lm, root: Path, shard_rows: int, k: int) -> dict[int, Path]:
    """Stores of k and 10k committed shards, each harvested in one run (so shard k of the 10k
    store is an uninterrupted harvest's, to check the 1x resume against)."""
    stores = {1: root / "prepared-1x.zarr", 10: root / "prepared-10x.zarr"}
    t0 = time.perf_counter()
    for factor, path in stores.items():
        harvest(dataclasses.replace(cfg, out=path, tokens=factor * k * shard_rows), lm=lm, progress=False)
        committed = ActivationStore.open(path).manifest["committed"]
        if committed["tokens"] != factor * k * shard_rows:
            raise SystemExit(f"{path}: {committed['tokens']:,} tokens committed, not {factor * k * shard_rows:,} "
                             f"(the corpus ran out?)")
        if len(committed["corpus_state"]) < 3 or committed["corpus_state"][2] is None:
            raise SystemExit(f"{path}: no stream state recorded; a resume would re-read the corpus")
    print(f"resume: prepared {k} and {10 * k} shards of {shard_rows:,} rows in {time.perf_counter() - t0:.1f} s "
          f"(untimed)", flush=True)
    return stores


def timed_resume(cfg: HarvestConfig, lm, prepared: Path, work: Path, shard_rows: int) -> float:
    """Seconds of a resume of a fresh copy of `prepared` that adds exactly one shard."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(prepared, work)
    os.sync()  # the copy's dirty pages (10x as many for the 10x store) are not flushed during the timing
    committed = ActivationStore.open(work).n_tokens
    t0 = time.perf_counter()
    result = harvest(dataclasses.replace(cfg, out=work, tokens=committed + shard_rows, resume=True), lm=lm,
                     progress=False)
    seconds = time.perf_counter() - t0
    if result.new_tokens != shard_rows:
        raise SystemExit(f"the resume of {prepared} added {result.new_tokens:,} rows, not {shard_rows:,}")
    return seconds


def same_rows(a: Path, b: Path, start: int, rows: int) -> bool:
    x, y = (ActivationStore.open(path).read_encoded(start, start + rows) for path in (a, b))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def packed_from_start(cfg: HarvestConfig, lm, n_contexts: int) -> tuple[float, np.ndarray]:
    """Seconds to pack the corpus's first `n_contexts` contexts from its start (what a resume
    that re-read the corpus would spend), and the next shard's contexts' tokens."""
    from rqae_pipeline.corpus import iter_contexts
    from rqae_pipeline.harvest import resolve_corpus

    packer = iter(iter_contexts(resolve_corpus(cfg, lm.name), lm.tokenizer, context_length=cfg.context_length))
    t0 = time.perf_counter()
    for _ in range(n_contexts):
        next(packer)
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate([next(packer)[0] for _ in range(cfg.contexts_per_shard)])


def check_resumed(cfg: HarvestConfig, lm, root: Path, stores: dict[int, Path], k: int) -> tuple[float, float]:
    """The shard each round-0 resume added must be the uninterrupted harvest's: at 1x, shard k
    of the 10x store; at 10x, the tokens of packing the corpus from its start. Returns, for
    scale, the seconds to pack the corpus up to the 10x store's position and to read its rows."""
    shard_rows = cfg.context_length * cfg.contexts_per_shard
    if not same_rows(root / "resume-1x.zarr", stores[10], k * shard_rows, shard_rows):
        raise SystemExit(f"the shard resumed after {k} shards differs from the uninterrupted harvest's")
    pack_s, want = packed_from_start(cfg, lm, 10 * k * cfg.contexts_per_shard)
    got = ActivationStore.open(root / "resume-10x.zarr").column("tokens", slice(10 * k * shard_rows, None))
    if not np.array_equal(got, want):
        raise SystemExit(f"the shard resumed after {10 * k} shards holds other tokens than the corpus has there")
    t0 = time.perf_counter()
    ActivationStore.open(stores[10]).read_encoded(0, 10 * k * shard_rows)
    return pack_s, time.perf_counter() - t0


def bench_resume(args: argparse.Namespace, root: Path, lm) -> list[Row]:
    shard_rows = args.context_length * args.contexts_per_shard
    k = max(1, args.tokens // shard_rows)
    corpus = write_corpus(root / "corpus", lm.tokenizer, (10 * k + 2) * shard_rows, args.docs_per_file)
    n_files = len(list((root / "corpus").iterdir()))
    cfg = base_config(args, root / "unset", dataset=corpus)
    stores = prepare_stores(cfg, lm, root, shard_rows, k)
    timed_resume(cfg, lm, stores[1], root / "warm.zarr", shard_rows)  # first-call costs of the resume path
    seconds: dict[int, list[float]] = {1: [], 10: []}
    for r in range(args.resume_rounds):
        for factor in (1, 10) if r % 2 == 0 else (10, 1):
            seconds[factor].append(timed_resume(cfg, lm, stores[factor], root / f"resume-{factor}x.zarr", shard_rows))
        if r == 0:
            pack_s, read_s = check_resumed(cfg, lm, root, stores, k)
        print(f"resume round {r}: after {k} shards {seconds[1][-1]:.3f} s, after {10 * k} shards "
              f"{seconds[10][-1]:.3f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = [b / a for a, b in zip(seconds[1], seconds[10], strict=True)]
    return [(f"resume adding one shard ({shard_rows:,} rows) after {k} shards ({k * shard_rows:,} tokens); corpus "
             f"{n_files} .jsonl file(s)", f"{spread(seconds[1], '{:.3f}')} s", "", ""),
            (f"same after {10 * k} shards ({10 * k * shard_rows:,} tokens)", f"{spread(seconds[10], '{:.3f}')} s",
             "", ""),
            ("resume at 10x / at 1x committed", f"**{spread(ratios)}**", "<= 1.2", met(ratios, lambda m: m <= 1.2)),
            ("for scale (round 0): packing the corpus up to the 10x store's position / reading its "
             f"{10 * k * shard_rows:,} committed rows", f"{pack_s:.3f} s / {read_s:.3f} s", "", ""),
            ("the shards added at 1x and 10x are the uninterrupted harvest's (round 0)", "yes", "yes", "yes")]


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run this section (repeatable); default all")
    ap.add_argument("--model", default=OFFLINE_GEMMA)
    ap.add_argument("--tokens", type=int, default=8192,
                    help="tokens per harvest (s3); committed tokens of the 1x store (resume)")
    ap.add_argument("--worker-tokens", type=int, default=32768,
                    help="tokens per harvest of the workers section (45-100 s for 1 worker on 2 cores: a "
                         "harvest's fixed start and finish weigh on a short one)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the workers and s3 sections")
    ap.add_argument("--resume-rounds", type=int, default=11,
                    help="rounds of the resume section: single calls of a few seconds, whose ratio spreads "
                         "by +-30%% on a busy 2-core machine, so more of them")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--contexts-per-shard", type=int, default=8)
    ap.add_argument("--docs-per-file", type=int, default=4,
                    help="documents per corpus file of the resume section (0: one file)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process harvests (s3, resume)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    sections = args.only or list(SECTIONS)
    torch.set_num_threads(args.threads)
    header = (f"machine: {os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable), torch "
              f"{torch.__version__} with {torch.get_num_threads()} thread(s) in this process (dask workers: 1 each), "
              f"load average {os.getloadavg()[0]:.2f} at start; {args.model}, {args.context_length}-token contexts, "
              f"batch {args.batch_size}, {args.contexts_per_shard} contexts per shard, {args.rounds} interleaved "
              f"rounds (resume: {args.resume_rounds}); a target is met when the median is")
    print(header, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rqae-scale-") as tmp:
        root = Path(tmp)
        if "workers" in sections:
            (root / "workers").mkdir()
            rows += bench_workers(args, root / "workers")
        if "s3" in sections or "resume" in sections:
            lm = load_lm(args.model, device="cpu")
            for name, bench in (("s3", bench_s3), ("resume", bench_resume)):
                if name in sections:
                    (root / name).mkdir()
                    rows += bench(args, root / name, lm)
    print("\n| measure | min / median / max | target | met |\n|---|---|---|---|")
    print("\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows))


if __name__ == "__main__":
    main()
