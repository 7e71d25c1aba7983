"""Harvest throughput, store size and compact-mode error, and a comparison with sae-lens's
`CacheActivationsRunner` (not a test). Everything is measured in one run, on one loaded
model and the same token batches, and reported as ratios.

    python bench/harvest.py                       # offline Gemma-3-270M, 8,192 tokens
    python bench/harvest.py --model tiny-random:0 --tokens 4096   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline.corpus import iter_contexts
from rqae_pipeline.harvest import HarvestConfig, harvest, resolve_corpus
from rqae_pipeline.lm import OFFLINE_GEMMA, load_lm, resolve_hook
from rqae_pipeline.store import ActivationStore, decode_acts, encode_acts
from rqae_pipeline.summary import storage_fvu


def contexts_for(cfg: HarvestConfig, lm) -> np.ndarray:
    n_ctx = -(-cfg.tokens // cfg.context_length)
    out = []
    for ctx, _ in iter_contexts(resolve_corpus(cfg, lm.name), lm.tokenizer, context_length=cfg.context_length):
        out.append(ctx)
        if len(out) == n_ctx:
            break
    return np.stack(out)


@torch.inference_mode()
def bare_forward(lm, contexts: np.ndarray, layer: int, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(contexts), batch):
        lm.model(torch.from_numpy(contexts[i : i + batch].astype(np.int64)), stop_at_layer=layer + 1)
    return time.perf_counter() - t0


def timed_harvest(cfg: HarvestConfig, lm, tmp: Path, tag: str) -> tuple[float, Path]:
    out = tmp / f"{tag}.zarr"
    t0 = time.perf_counter()
    harvest(HarvestConfig(**{**cfg.__dict__, "out": out}), lm=lm, progress=False)
    return time.perf_counter() - t0, out


def compact_schemes(x: torch.Tensor) -> dict[str, float]:
    """FVU against fp32 of the 8-bit schemes considered for --dtype fp8 (DESIGN §3)."""
    total = float((x.double() - x.double().mean(0)).pow(2).sum())

    def fvu(y):
        return float((x.double() - y.double()).pow(2).sum()) / total

    plain = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    absmax = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    int8 = (x / absmax).round().clamp(-127, 127) * absmax
    mean = x.mean(0).numpy()
    y = x - x.mean(0)
    y_scale = y.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    int8_centred = (y / y_scale).round().clamp(-127, 127) * y_scale + x.mean(0)
    cols = encode_acts(x, "fp8", mean)
    ours = decode_acts(cols["acts"], "fp8", cols["row_scale"], mean)
    return {"plain e4m3": fvu(plain), "per-row absmax int8": fvu(int8),
            "mean-subtracted, per-row absmax int8": fvu(int8_centred),
            "mean-subtracted, per-row-scaled e4m3 (stored)": fvu(ours)}


def sae_lens_runner(lm, contexts: np.ndarray, hook: str, batch: int, tmp: Path) -> float:
    """Time sae-lens's CacheActivationsRunner on the same model and tokens: its hub loader
    is patched to return our loaded model, and the contexts are given pre-tokenised."""
    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens import CacheActivationsRunnerConfig

    n_tokens = contexts.size
    d = lm.d_model
    cfg = CacheActivationsRunnerConfig(
        dataset_path="pretokenised-contexts", model_name=lm.name, model_batch_size=batch, hook_name=hook, d_in=d,
        training_tokens=n_tokens, context_size=contexts.shape[1], new_cached_activations_path=str(tmp / "saelens"),
        shuffle=False, dtype="float32", device=str(lm.model.cfg.device), prepend_bos=False, streaming=False,
        buffer_size_gb=n_tokens * d * 4 / 1e9,  # one buffer of exactly these tokens, not the 2 GB default
    )
    dataset = datasets.Dataset.from_dict({"input_ids": contexts.astype(np.int64).tolist()})
    original = car.load_model
    car.load_model = lambda **_: lm.model  # the runner insists on a hub name; hand it our model
    try:
        t0 = time.perf_counter()
        car.CacheActivationsRunner(cfg, override_dataset=dataset).run()
        return time.perf_counter() - t0
    finally:
        car.load_model = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_GEMMA)
    ap.add_argument("--layer", default="auto")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_lm(args.model, device="cpu")
    hook = resolve_hook(lm, lm.n_layers // 2 if args.layer == "auto" else args.layer)
    n_ctx = -(-args.tokens // args.context_length)
    per_shard = max(args.batch_size, (n_ctx // 4) // args.batch_size * args.batch_size)
    cfg = HarvestConfig(out=Path("unused"), model=lm.name, hook=hook.name, tokens=n_ctx * args.context_length,
                        context_length=args.context_length, batch_contexts=args.batch_size,
                        contexts_per_shard=per_shard, contexts_per_chunk=args.batch_size)
    contexts = contexts_for(cfg, lm)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {lm.model.cfg.device}; model {lm.name}, {hook.name}, d={lm.d_model}; "
          f"{contexts.size:,} tokens in {len(contexts)} contexts of {args.context_length}, batch {args.batch_size}")
    bare_forward(lm, contexts[: args.batch_size], hook.layer, args.batch_size)  # warm-up
    bare, harv = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):  # interleaved, so machine drift hits both alike
            bare.append(bare_forward(lm, contexts, hook.layer, args.batch_size))
            harv.append(timed_harvest(cfg, lm, tmp, f"fp16-{r}")[0])
        t_saelens = sae_lens_runner(lm, contexts, hook.name, args.batch_size, tmp)
        t_ours = statistics.median(harv)
        _, fp32 = timed_harvest(HarvestConfig(**{**cfg.__dict__, "dtype": "float32"}), lm, tmp, "fp32")
        _, fp8 = timed_harvest(HarvestConfig(**{**cfg.__dict__, "dtype": "fp8"}), lm, tmp, "fp8")
        s16, s8, s32 = (ActivationStore.open(p) for p in (tmp / "fp16-0.zarr", fp8, fp32))
        fp32_cache = 4 * lm.d_model
        x = s32.read().acts
        schemes = compact_schemes(x)
        rows = [
            ("harvest tok/s / bare forward-to-layer tok/s (median of %d)" % args.repeats,
             f"**{statistics.median(bare) / t_ours:.3f}** (harvest {contexts.size / t_ours:,.0f}, "
             f"bare {contexts.size / statistics.median(bare):,.0f} tok/s)", ">= 0.97"),
            ("harvest time / sae-lens CacheActivationsRunner time", f"**{t_ours / t_saelens:.3f}** "
             f"(harvest {t_ours:.1f} s, sae-lens {t_saelens:.1f} s)", "< 1"),
            ("fp16 store bytes/token / fp32 cache (4·d)", f"**{s16.nbytes_on_disk() / s16.n_tokens / fp32_cache:.3f}**",
             "<= 0.46"),
            ("fp16 storage FVU vs fp32", f"{storage_fvu(s16.manifest):.2e}", ""),
            ("fp8 (compact) store bytes/token / fp32 cache", f"**{s8.nbytes_on_disk() / s8.n_tokens / fp32_cache:.3f}**",
             "<= 0.26"),
            ("fp8 (compact) storage FVU vs fp32", f"**{storage_fvu(s8.manifest):.2e}**", "<= 2e-3"),
        ]
        rows += [(f"8-bit scheme: {k}, FVU vs fp32", f"{v:.2e}", "") for k, v in schemes.items()]
    print("\n| measure | value | target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")


if __name__ == "__main__":
    main()
