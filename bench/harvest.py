"""Harvest throughput, store size and compact-mode error, against a bare forward pass and
sae-lens's `CacheActivationsRunner` (not a test). Everything is measured in one run, on one
loaded model and the same token batches, and reported as ratios:

1. harvest tok/s / bare `model(tokens, stop_at_layer=L+1)` tok/s (inference_mode), on the
   model as `load_lm` lays it out (weights stored as the forward reads them), and the same bare
   forward on TransformerLens's own layout (the gain of that layout);
2. harvest wall time / CacheActivationsRunner wall time (its hub loader patched to return a
   second loaded instance of the same weights in TransformerLens's own layout, as its loader
   builds it; the same contexts given to it pre-tokenised);
3. bytes/token on disk of --dtype float16 and fp8 stores / sae-lens's fp32 cache (4*d),
   their storage FVU against fp32, and the FVU of the 8-bit schemes of DESIGN §3 on the
   same fp32 activations;
4. with --compiled, the same as 2 with each tool's torch.compile option.

The machine's speed drifts by more than the effects measured (a 2-core cloud VM's forward of
the same tokens varies by 20% within a minute), so the sides of each ratio are measured close
together in time. Inside each harvest, every batch's forward runs right beside a bare forward
of the same tokens on each model (the six orders in turn), timed apart and taken out of the
harvest's time: ratio 1 compares forwards ~1 s apart. sae-lens's runner is one call and runs
as a whole, next to the harvest (the order reversed every other round); its own time outside
its forward is measured inside its run, so ratio 2 is also given with its forward timed as
the paired bare forward on its layout, drift-free, beside the plain back-to-back ratio. Each
ratio is the median over `--repeats` rounds, with the min–max beside it.

    python bench/harvest.py                                      # offline Gemma-3-270M, 16,384 tokens, 10 rounds
    python bench/harvest.py --model tiny-random:0 --tokens 2048 --repeats 2  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")  # sae-lens's progress bar

import numpy as np
import torch

from rqae_pipeline import forward as forward_module
from rqae_pipeline import harvest as harvest_module
from rqae_pipeline.codec import decode_acts, encode_acts
from rqae_pipeline.corpus import iter_contexts
from rqae_pipeline.forward import hook_residuals
from rqae_pipeline.harvest import HarvestConfig, harvest, resolve_corpus
from rqae_pipeline.lm import OFFLINE_GEMMA, LoadedLM, load_lm, resolve_hook
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.summary import forward_fvu, storage_fvu


def get_contexts(cfg: HarvestConfig, lm) -> np.ndarray:
    """The (n_ctx, T) int32 contexts a harvest with `cfg` stores, from the same iterator."""
    n_ctx, out = cfg.tokens // cfg.context_length, []
    for ctx, _ in iter_contexts(resolve_corpus(cfg, lm.name), lm.tokenizer, context_length=cfg.context_length):
        out.append(ctx)
        if len(out) == n_ctx:
            return np.stack(out)
    raise SystemExit(f"the corpus holds only {len(out)} contexts; ask for fewer --tokens")


def clock() -> np.ndarray:
    """(wall, CPU) seconds; CPU time of all this process's threads is far less disturbed by
    other processes on a shared machine than wall time, so both are reported."""
    return np.array([time.perf_counter(), time.process_time()])


def sync(lm) -> None:
    if str(lm.model.cfg.device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(lm, tokens: torch.Tensor, layer: int) -> np.ndarray:
    """(wall, CPU) seconds of one bare forward to the harvested block: the harvest's call
    without what the harvest does around it."""
    t0 = clock()
    lm.model(tokens.to(lm.model.cfg.device), stop_at_layer=layer + 1)
    sync(lm)
    return clock() - t0


# Each batch's three forwards (the harvest's own, a bare one on load_lm's model, a bare one on
# the TransformerLens-layout model) run back to back, in all six orders in turn.
PAIRED = ("harvest", "bare", "bare_tl")
ORDERS = list(itertools.permutations(range(len(PAIRED))))


def run_harvest(cfg: HarvestConfig, lm, out: Path, pair: dict | None = None,
                **changes) -> tuple[dict, ActivationStore]:
    """One harvest: its wall and CPU seconds and the wall seconds inside its LM forward. With
    `pair` ({"bare": lm, "bare_tl": lm_tl}) each batch's harvest forward has a bare forward of
    the same tokens on each model right beside it, timed apart ("bare", "bare_tl") and taken
    out of the harvest's wall and CPU time: the two sides of a ratio are then measured ~1 s
    apart, so the machine's drift (its speed changes within a 10 s run here) cancels."""
    t = dict.fromkeys(("fwd", "bare", "bare_tl", "bare_cpu", "bare_tl_cpu"), 0.0)
    calls = [0]

    def timed_forward(lm_, tokens, hook, layer):
        order = ORDERS[calls[0] % len(ORDERS)] if pair else (0,)
        calls[0] += 1
        for k in order:
            if k:
                wall, cpu = bare_forward(pair[PAIRED[k]], tokens, layer)
                t[PAIRED[k]] += wall
                t[PAIRED[k] + "_cpu"] += cpu
                continue
            t0 = time.perf_counter()
            x = hook_residuals(lm_, tokens, hook, layer)
            sync(lm_)
            t["fwd"] += time.perf_counter() - t0
        return x

    # forward.py's own name too: its precision check runs the first batch's forwards (and the
    # harvest then reuses those rows) when the forward is not plain fp32
    with mock.patch.object(harvest_module, "hook_residuals", timed_forward), \
            mock.patch.object(forward_module, "hook_residuals", timed_forward):
        t0 = clock()
        harvest(dataclasses.replace(cfg, out=out, **changes), lm=lm, progress=False)
        wall, cpu = clock() - t0
    return ({"wall": wall - t["bare"] - t["bare_tl"], "cpu": cpu - t["bare_cpu"] - t["bare_tl_cpu"], **t},
            ActivationStore.open(out))


def run_saelens(lm, contexts: np.ndarray, hook: str, batch: int, out: Path, compile_llm: bool = False) -> dict:
    """Wall and CPU seconds of CacheActivationsRunner (construction + run) over exactly
    `contexts`, and the wall seconds inside its model's forward (`run_with_cache`);
    `compile_llm` is sae-lens's own torch.compile option."""
    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    n, d = contexts.size, lm.d_model
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local/pretokenised-contexts",  # names only; the rows come from override_dataset
        model_name=lm.name, model_batch_size=batch, hook_name=hook, d_in=d, training_tokens=n,
        context_size=contexts.shape[1], new_cached_activations_path=str(out), dtype="float32",
        device=str(lm.model.cfg.device), prepend_bos=False,  # our contexts already start with BOS
        buffer_size_gb=(n + 0.5) * d * 4 / 1e9,  # one buffer of exactly these tokens, not 2 GB
        compile_llm=compile_llm,
    )
    assert cfg.n_buffers == 1 and cfg.n_tokens_in_buffer == n, (cfg.n_buffers, cfg.n_tokens_in_buffer, n)
    data = datasets.Dataset.from_dict({"input_ids": contexts.astype(np.int64).tolist()})
    in_forward, run_with_cache = [0.0], lm.model.run_with_cache

    def timed_run_with_cache(*args, **kw):
        t = time.perf_counter()
        out = run_with_cache(*args, **kw)
        sync(lm)
        in_forward[0] += time.perf_counter() - t
        return out

    # The runner loads its model by hub name (impossible offline): hand it the loaded one.
    with mock.patch.object(car, "load_model", lambda **_: lm.model), \
            mock.patch.object(lm.model, "run_with_cache", timed_run_with_cache), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer samples than training tokens" etc.: rows, not tokens
        t0 = clock()
        CacheActivationsRunner(cfg, override_dataset=data).run()
        sync(lm)
        wall, cpu = clock() - t0
    return {"wall": wall, "cpu": cpu, "fwd": in_forward[0]}


def fvu(x: torch.Tensor, y: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - y.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


def compact_schemes(x: torch.Tensor, mean: np.ndarray) -> dict[str, float]:
    """FVU against fp32 of the 8-bit codes considered for --dtype fp8 (DESIGN §3)."""
    absmax = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    m = torch.from_numpy(mean)
    c_scale = (x - m).abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    cols = encode_acts(x, "fp8", mean)
    return {
        "plain e4m3 (no mean, no row scale)": fvu(x, x.clamp(-448, 448).to(torch.float8_e4m3fn).float()),
        "per-row absmax int8": fvu(x, (x / absmax).round().clamp(-127, 127) * absmax),
        "mean-subtracted, per-row absmax int8": fvu(x, ((x - m) / c_scale).round().clamp(-127, 127) * c_scale + m),
        "mean-subtracted, per-row-scaled e4m3 (the store's codec)":
            fvu(x, decode_acts(cols["acts"], "fp8", cols["row_scale"], mean)),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_GEMMA, help="also tiny-random:SEED for a smoke run")
    ap.add_argument("--layer", default="auto", help="layer number; auto = n_layers // 2")
    ap.add_argument("--tokens", type=int, default=16384,
                    help="rounded up to whole batches of contexts; default: one shard of the harvest's default size")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    ap.add_argument("--repeats", type=int, default=10,
                    help="rounds of harvest and sae-lens (even: each runs first in half of them)")
    ap.add_argument("--compiled", action="store_true",
                    help="also time harvest --compile against sae-lens's compile_llm=True in each round")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out-md", type=Path, help="also write the table here")
    return ap.parse_args()


def bench_config(args: argparse.Namespace, lm) -> tuple[object, HarvestConfig]:
    """(hook, the harvest config every run uses): whole batches, and the shard and chunk
    sizes a harvest has by default, so per-shard costs weigh what they weigh in a user's run."""
    hook = resolve_hook(lm, lm.n_layers // 2 if args.layer == "auto" else args.layer)
    B, T = args.batch_size, args.context_length
    n_ctx = math.ceil(args.tokens / (B * T)) * B
    return hook, HarvestConfig(out=Path("unset"), model=lm.name, hook=hook.name, tokens=n_ctx * T, context_length=T,
                               batch_contexts=B)


def header_lines(args: argparse.Namespace, lm, hook, cfg: HarvestConfig, contexts: np.ndarray,
                 load_s: float) -> list[str]:
    load = os.getloadavg()[0]
    return [
        f"machine: {os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, device {lm.model.cfg.device}"
        + (f" ({torch.cuda.get_device_name()})" if str(lm.model.cfg.device).startswith("cuda") else "")
        + f", load average {load:.2f} at start",
        f"model: {lm.name} (loaded in {load_s:.1f} s, excluded), {hook.name}, d={lm.d_model}, "
        f"{str(lm.model.cfg.dtype).removeprefix('torch.')} forward; harvest and bare forward on load_lm's instance, "
        "sae-lens on a second instance in TransformerLens's own layout",
        f"tokens: {contexts.size:,} ({len(contexts)} contexts of {cfg.context_length} from {cfg.dataset} -> "
        f"{resolve_corpus(cfg, lm.name).name}), batch {cfg.batch_contexts} contexts, {cfg.contexts_per_shard} "
        f"contexts per shard, {args.repeats} rounds",
    ]


def tl_layout(args: argparse.Namespace) -> LoadedLM:
    """A second instance of the model with every weight in TransformerLens's own (contiguous)
    layout, the model sae-lens's runner would load for itself."""
    lm = load_lm(args.model, device=args.device)
    for param in lm.model.parameters():
        param.data = param.data.contiguous()
    return lm


def timed_rounds(args: argparse.Namespace, lm, lm_tl, hook, cfg: HarvestConfig, contexts: np.ndarray,
                 tmp: Path) -> dict:
    """A warm-up through each path (first-call allocations, lazy imports), then `--repeats`
    rounds of harvest (each batch paired with bare forwards) and sae-lens, and one fp32 and
    one fp8 harvest."""
    B, T = cfg.batch_contexts, cfg.context_length
    pair = {"bare": lm, "bare_tl": lm_tl}
    warm = dataclasses.replace(cfg, tokens=B * T, contexts_per_shard=math.lcm(B, 8))
    warm_s = run_harvest(warm, lm, tmp / "warm.zarr", pair)[0]["wall"]
    run_saelens(lm_tl, contexts[:B], hook.name, B, tmp / "warm-saelens")
    paths = {  # the two sides of the time ratio against sae-lens are neighbours here
        "harv": lambda r: run_harvest(cfg, lm, tmp / f"fp16-{r}.zarr", pair)[0],
        "sael": lambda r: run_saelens(lm_tl, contexts, hook.name, B, tmp / f"saelens-{r}"),
    }
    compiled = {}
    if args.compiled:
        compiled["compile_s"] = run_harvest(dataclasses.replace(warm, compile=True), lm,
                                            tmp / "warm-compiled.zarr")[0]["wall"] - warm_s
        run_saelens(lm_tl, contexts[:B], hook.name, B, tmp / "warm-saelens-compiled", True)
        paths["sael_c"] = lambda r: run_saelens(lm_tl, contexts, hook.name, B, tmp / f"saelens-compiled-{r}", True)
        paths["harv_c"] = lambda r: run_harvest(cfg, lm, tmp / f"compiled-{r}.zarr", compile=True)[0]
    runs, names = {k: [] for k in paths}, list(paths)
    for r in range(args.repeats):
        # every other round in the other order (A B B A ...): neither side is always the one
        # that runs first, or after the other's writes
        for k in names if r % 2 == 0 else names[::-1]:
            runs[k].append(paths[k](r))
        h = runs["harv"][-1]
        print(f"round {r}: harvest {h['wall']:.2f} s (forward {h['fwd']:.2f}), paired bare {h['bare']:.2f} / "
              f"{h['bare_tl']:.2f} (TL layout), sae-lens {runs['sael'][-1]['wall']:.2f} s; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    t32, s32 = run_harvest(cfg, lm, tmp / "fp32.zarr", pair, dtype="float32")
    t8, s8 = run_harvest(cfg, lm, tmp / "fp8.zarr", pair, dtype="fp8")
    if args.compiled:
        compiled["s_c"] = ActivationStore.open(tmp / "compiled-0.zarr")
    return {**runs, **compiled, "t32": t32, "t8": t8, "s32": s32, "s8": s8,
            "s16": ActivationStore.open(tmp / "fp16-0.zarr")}


def store_checks(lm, hook, contexts: np.ndarray, runs: dict, tmp: Path) -> dict:
    """Same tokens everywhere, the same activations as sae-lens computed, and the sizes and
    storage errors of the three store dtypes."""
    import datasets

    n, s16, s32, s8 = contexts.size, runs["s16"], runs["s32"], runs["s8"]
    cache = datasets.load_from_disk(str(tmp / "saelens-0")).with_format("numpy")
    for s in (s16, s32, s8):
        assert s.n_tokens == n and np.array_equal(s.read_encoded(0, n)["tokens"], contexts.reshape(-1))
    assert np.array_equal(cache["token_ids"], contexts), "sae-lens cached other tokens"
    theirs = torch.from_numpy(np.asarray(cache[hook.name], dtype=np.float32).reshape(n, -1))
    ours = s32.raw(s32.read())
    fp32_cache = 4 * lm.d_model
    b16, b8 = (s.nbytes_on_disk() / n / fp32_cache for s in (s16, s8))
    return {"raw_err": float((ours - theirs).norm() / theirs.norm()),
            "saelens_bytes": sum(f.stat().st_size for f in (tmp / "saelens-0").rglob("*") if f.is_file()),
            "schemes": compact_schemes(s32.read().acts, s8.codec_mean()),
            "fp32_cache": fp32_cache, "b16": b16, "b8": b8,
            "f16": storage_fvu(s16.manifest), "f8": storage_fvu(s8.manifest)}


def ok(met: bool) -> str:
    return "yes" if met else "**NO**"


def spread(per: list[float]) -> tuple[float, str]:
    """The median of per-round values, and the text 'min–max; per round ...'."""
    return float(np.median(per)), f"{min(per):.3f}–{max(per):.3f}; per round " + ", ".join(f"{x:.3f}" for x in per)


def time_rows(args: argparse.Namespace, n: int, runs: dict) -> list[tuple[str, str, str, str]]:
    harv, sael = runs["harv"], runs["sael"]
    rb, rb_each = spread([h["bare"] / h["wall"] for h in harv])
    # sae-lens's time had its forward run at the paired bare forward's speed (same layout):
    # that forward's share of its own run, measured inside it, carries over; drift cancels.
    rs, rs_each = spread([h["wall"] / (h["bare_tl"] * s["wall"] / s["fwd"]) for h, s in zip(harv, sael)])
    rsep, rsep_each = spread([h["wall"] / s["wall"] for h, s in zip(harv, sael)])
    med = {k: float(np.median([h[k] for h in harv])) for k in ("wall", "bare", "bare_tl", "cpu", "bare_cpu")}
    sael_wall, sael_cpu = (float(np.median([s[k] for s in sael])) for k in ("wall", "cpu"))
    per = lambda f, rows=harv: spread([f(x) for x in rows])  # noqa: E731
    (rl, rl_each), (out_share, out_each), (fr, fr_each) = (
        per(lambda h: h["bare_tl"] / h["bare"]), per(lambda h: 1 - h["fwd"] / h["wall"]),
        per(lambda h: h["fwd"] / h["bare"]))
    (so, so_each), (sf, sf_each) = (per(lambda s: 1 - s["fwd"] / s["wall"], sael),
                                   spread([s["fwd"] / h["bare_tl"] for h, s in zip(harv, sael)]))
    return [
        (f"harvest tok/s / bare forward-to-layer tok/s, same model, each batch's forwards back to back "
         f"(median of {args.repeats} rounds)",
         f"**{rb:.3f}** ({rb_each}; medians {n / med['wall']:,.0f} vs {n / med['bare']:,.0f} tok/s)", ">= 0.97",
         ok(rb >= 0.97)),
        (f"harvest time / sae-lens CacheActivationsRunner time, sae-lens's forward timed as the paired bare "
         f"forward on its layout (median of {args.repeats} rounds)", f"**{rs:.3f}** ({rs_each})", "<= 0.95",
         ok(rs <= 0.95)),
        ("harvest time / sae-lens time, the two runs back to back (drift does not cancel)",
         f"{rsep:.3f} ({rsep_each}; medians {med['wall']:.2f} s vs {sael_wall:.2f} s)", "<= 0.95", ok(rsep <= 0.95)),
        ("bare forward time on TransformerLens's own weight layout / on load_lm's layout (paired)",
         f"{rl:.3f} ({rl_each})", "", ""),
        ("harvest's wall time outside the LM forward / its whole wall time (within each run; hooks and the "
         "residual's capture count as forward)", f"{out_share:.3f} ({out_each})", "", ""),
        ("LM forward time inside the harvest / the paired bare forward time", f"{fr:.3f} ({fr_each})", "", ""),
        ("sae-lens's time outside its model's forward / its whole time (within each run)", f"{so:.3f} ({so_each})",
         "", ""),
        ("sae-lens's forward time / the paired bare forward on the same layout (separate runs; check)",
         f"{sf:.3f} ({sf_each})", "", ""),
        ("the first and third ratios in process CPU time (medians; check)",
         f"{med['bare_cpu'] / med['cpu']:.3f} / {med['cpu'] / sael_cpu:.3f}", "", ""),
        ("--dtype float32 / fp8 harvest tok/s / bare forward tok/s, paired as above (one run each)",
         f"{runs['t32']['bare'] / runs['t32']['wall']:.3f} / {runs['t8']['bare'] / runs['t8']['wall']:.3f}", "", ""),
    ]


def store_rows(n: int, m: dict) -> list[tuple[str, str, str, str]]:
    b16, b8, f16, f8, fp32_cache, raw_err = (m[k] for k in ("b16", "b8", "f16", "f8", "fp32_cache", "raw_err"))
    rows = [
        ("fp16 store bytes/token / fp32 cache (4·d)", f"**{b16:.3f}** ({b16 * fp32_cache:,.0f} B/token)",
         "<= 0.46", ok(b16 <= 0.46)),
        ("fp16 storage FVU vs fp32", f"{f16:.2e}", "<= 2e-3", ok(f16 <= 2e-3)),
        ("fp8 (compact) store bytes/token / fp32 cache (4·d)", f"**{b8:.3f}** ({b8 * fp32_cache:,.0f} B/token)",
         "<= 0.26", ok(b8 <= 0.26)),
        ("fp8 (compact) storage FVU vs fp32", f"**{f8:.2e}**", "<= 2e-3", ok(f8 <= 2e-3)),
    ]
    rows += [(f"8-bit scheme on the fp32 store: {k}, FVU", f"{v:.2e}", "", "") for k, v in m["schemes"].items()]
    return rows + [
        ("sae-lens cache on disk, bytes/token / 4·d (check)", f"{m['saelens_bytes'] / n / fp32_cache:.3f}", "", ""),
        ("raw rebuilt from our fp32 store vs sae-lens's activations, relative error (check)", f"{raw_err:.1e}",
         "<= 1e-5", ok(raw_err <= 1e-5)),
    ]


def compile_rows(args: argparse.Namespace, runs: dict) -> list[tuple[str, str, str, str]]:
    """harvest --compile against sae-lens with and without its own compile option (compile_llm
    wraps the model in torch.compile, but the runner calls `run_with_cache`, which runs the
    wrapped module eagerly: the check row shows whether that option changes its time)."""
    if not args.compiled:
        return []
    ratio = lambda a, b, ka="wall", kb="wall": spread([x[ka] / y[kb] for x, y in zip(runs[a], runs[b])])  # noqa: E731
    (cs, cs_each), (cd, cd_each) = ratio("harv_c", "sael_c"), ratio("harv_c", "sael")
    (sc, sc_each), (hb, hb_each) = ratio("sael_c", "sael"), ratio("harv", "harv_c", "bare")
    return [
        (f"harvest --compile time / sae-lens time with its compile_llm=True (median of {args.repeats} rounds)",
         f"**{cs:.3f}** ({cs_each})", "<= 0.95", ok(cs <= 0.95)),
        ("harvest --compile time / sae-lens time, its defaults", f"{cd:.3f} ({cd_each})", "", ""),
        ("harvest --compile tok/s / paired bare eager forward tok/s of the same round", f"{hb:.3f} ({hb_each})",
         "", ""),
        ("sae-lens compile_llm=True time / its default time (check)", f"{sc:.3f} ({sc_each})", "", ""),
        ("one-off compile: first compiled harvest batch minus first eager one", f"{runs['compile_s']:.1f} s", "", ""),
        ("forward FVU of the --compile store against an eager float32 forward",
         f"{forward_fvu(runs['s_c'].manifest):.1e}", "", ""),
    ]


def main() -> None:
    args = parse_args()
    import sae_lens  # noqa: F401  (imported before any timing)

    t0 = time.perf_counter()
    lm = load_lm(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    lm_tl = tl_layout(args)
    hook, cfg = bench_config(args, lm)
    contexts = get_contexts(cfg, lm)
    header = header_lines(args, lm, hook, cfg, contexts, load_s)
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-harvest-") as tmp:
        runs = timed_rounds(args, lm, lm_tl, hook, cfg, contexts, Path(tmp))
        measured = store_checks(lm, hook, contexts, runs, Path(tmp))
    table = ["| measure | value | target | met |", "|---|---|---|---|"]
    rows = time_rows(args, contexts.size, runs) + store_rows(contexts.size, measured) + compile_rows(args, runs)
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n" + "\n".join(table))
    if args.out_md:
        args.out_md.write_text("\n".join([f"- {h}" for h in header] + [""] + table) + "\n")
        print(f"\nwrote {args.out_md}")


if __name__ == "__main__":
    main()
