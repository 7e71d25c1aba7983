"""Equal-effort training: the same learning-rate search for every architecture, then several
seeds at the rate it chose, each summarised by how flat its held-out FVU ended.

Every architecture gets the same relative grid of Adam rates around its family default
(`default_lr`: the RQAE's swept 1e-2, sae-lens's 3e-4 for SAEs), the same tokens, batch
size and seed. The rate is chosen on a validation split that the final comparison never
reads: sweep runs hold out the store's last 2f of contexts and evaluate on the first half
of them; the seed runs then hold out the last f (train on the rest, validation included),
and every reported number is measured on those last f contexts. A rate whose loss turns
NaN/inf loses (FVU inf). `rqae sweep` runs it; `sweep.json` beside the runs holds the grid,
each run's validation FVU and plateau summary, the chosen rates and the seed runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rqae_pipeline import RQAEError
from rqae_pipeline.io import atomic_write_json, checked_fields, read_json
from rqae_pipeline.metrics import prefix_of, rqae_bits_per_token, sae_bits_per_token
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.run_dir import METRICS, RUN_FILE, as_recorded, store_mismatch
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, heldout_split, train

SWEEP_FILE = "sweep.json"
DIVERGED_FILE = "diverged.json"


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    store: Path
    out: Path
    models: dict[str, ModelSpec]  # run name -> spec; its lr is the centre of its grid
    tokens: int = 204_800  # training tokens of every run, sweep and seeds alike
    batch_size: int = 1024
    rates: int = 3  # first grid: this many half-decade rates centred on the family default
    extend: int = 2  # further rates tried, one at a time, while the best is at the grid's edge
    grid: tuple[float, ...] | None = None  # explicit first rates for every model instead of the ladder
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_contexts: int = 64  # final test contexts (the store's last); as many again validate the sweep
    evaluations: int = 20  # held-out evaluations per run (the plateau reads the last 20% of them)
    device: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields

    def __post_init__(self):
        if not self.models or self.rates < 1 or not self.seeds:
            raise RQAEError("a sweep needs at least one model, one learning rate and one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise RQAEError(f"seeds repeat: {self.seeds}")
        if self.heldout_contexts < 1 or self.extend < 0 or self.tokens < self.batch_size:
            raise RQAEError("need heldout contexts >= 1, extend >= 0 and tokens >= batch size")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


# --------------------------------------------------------------------------- summaries


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt n) over seeds; SE is nan for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def plateau_summary(steps: list[int], fvus: list[float], total_steps: int, tail: float = 0.2) -> dict[str, Any]:
    """Held-out FVU over the last `tail` of the run: min, max, the least-squares slope per
    1,000 steps, and the change it predicts over that window relative to its mean (a
    plateaued run changes by a few percent at most)."""
    pts = [(s, v) for s, v in zip(steps, fvus) if s >= (1 - tail) * total_steps and math.isfinite(v)]
    if len(pts) < 2:
        return {"points": len(pts)}
    xs, ys = [s for s, _ in pts], [v for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"points": len(pts), "first_step": xs[0], "min": min(ys), "max": max(ys), "slope_per_1k": slope * 1000,
            "relative_change": slope * (xs[-1] - xs[0]) / my if my else math.nan}


def heldout_series(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, held-out FVU) of a run's periodic evaluations (`metrics.jsonl`); a damaged row
    is one error line naming it (the plateau summary would be made from what is left)."""
    steps, fvus = [], []
    path = Path(run_dir) / METRICS
    for i, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line)
            if "heldout" in row:
                steps.append(int(row["step"]))
                fvus.append(float(row["heldout"]["fvu"]))
        except (ValueError, KeyError, TypeError):
            raise RQAEError(f"{path} line {i} is not a metrics row; delete {run_dir} to train the run again") from None
    return steps, fvus


def ladder_rate(j: int) -> float:
    """The j-th rate of the half-decade ladder ..., 1e-3, 3e-3, 1e-2, ... (j = 0: 1)."""
    return float(f"{(1, 3)[j % 2]}e{j // 2}")


def ladder_index(lr: float) -> int:
    """The ladder step nearest `lr` in log scale."""
    return round(2 * math.log10(lr))  # 2 log10(3e-n) = -2n + 0.95: odd steps land next to their index


def best_rate(rows: list[dict]) -> dict:
    """The sweep row with the lowest validation FVU (a diverged or NaN run never wins)."""
    finite = [r for r in rows if math.isfinite(r["fvu"])]
    if not finite:
        raise RQAEError(f"every learning rate diverged ({', '.join(str(r['lr']) for r in rows)}); "
                        f"try lower rates (--grid)")
    best = min(finite, key=lambda r: r["fvu"])
    lrs = sorted(r["lr"] for r in rows)
    return {**best, "at_edge": best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 1}


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Split:
    """Held-out fraction and evaluation rows of a run: the sweep's validation or the final test."""

    fraction: float
    eval_rows: int


def splits(store: ActivationStore, test_contexts: int) -> tuple[Split, Split]:
    """(validation, test). Test: the store's last `test_contexts` contexts. Validation: the
    as many before them; sweep runs hold out both and evaluate on the validation rows only
    (train.heldout_rows reads `eval_tokens` rows from the first held-out one)."""
    n = store.n_contexts
    if 2 * test_contexts >= n:
        raise RQAEError(f"store {store.path} has {n} contexts: too few for {test_contexts} test and "
                        f"{test_contexts} validation contexts plus training ones; harvest more or lower the count")
    test, both = heldout_split(store, test_contexts / n), heldout_split(store, 2 * test_contexts / n)
    if (test["contexts"], both["contexts"]) != (test_contexts, 2 * test_contexts):
        raise AssertionError("held-out context counts do not round to the requested ones")
    val = Split(2 * test_contexts / n, test["first_row"] - both["first_row"])
    return val, Split(test_contexts / n, test["rows"])


def _done(out: Path) -> dict | None:
    """A finished run's train.json; None while the run is absent or unfinished."""
    path, fix = out / RUN_FILE, f"; delete {out} to train the run again"
    info = read_json(path, fix=fix) if path.exists() else {}
    if info.get("status") != "done":
        return None
    return checked_fields(info, path, {"config": dict, "heldout_metrics.fvu": (int, float)}, fix=fix)


def train_run(cfg: SweepConfig, spec: ModelSpec, *, seed: int, out: Path, split: Split) -> dict:
    """Train one run (or read a finished one) and return its record: rate, seed, held-out
    FVU (inf when its loss turned NaN/inf) and plateau summary."""
    record = {"lr": spec.lr, "seed": seed, "run": str(out)}
    steps = cfg.steps
    tc = TrainConfig(store=cfg.store, out=out, model=spec, batch_size=cfg.batch_size, tokens=cfg.tokens,
                     seed=seed, heldout_fraction=split.fraction, eval_tokens=split.eval_rows,
                     eval_every=max(1, steps // cfg.evaluations), checkpoint_every=max(50, steps // 4),
                     log_every=max(1, min(10, steps // cfg.evaluations)), device=cfg.device,
                     resume=out.exists(), **{"streams": 1, **cfg.extra})  # one process: one stream
    tc_identity = json.loads(json.dumps(tc.identity()))
    if (out / DIVERGED_FILE).exists():  # reused only for the settings it diverged with
        diverged = read_json(out / DIVERGED_FILE, {"diverged": str, "config": dict},
                             fix=f"; delete {out} to train the run again")
        if diverged["config"] != tc_identity:
            raise RQAEError(f"{out} holds a run that diverged with other settings (tokens, batch, seed or model); "
                            f"choose another --out")
        return {**record, "diverged": diverged["diverged"], "fvu": math.inf}
    if _done(out) is None:
        try:
            result = train(tc, progress=cfg.progress)
        except RQAEError as e:
            if not str(e).startswith("loss became"):  # train's divergence message; anything else is fatal
                raise
            atomic_write_json(out / DIVERGED_FILE, {"diverged": str(e), "config": tc_identity})
            return {**record, "diverged": str(e), "fvu": math.inf}
        if result.interrupted:
            raise KeyboardInterrupt
    info = _done(out)
    if as_recorded(info["config"]) != tc_identity:
        raise RQAEError(f"{out} holds a finished run with other settings (tokens, batch, seed or model); "
                        f"choose another --out")
    if store_mismatch(info, ActivationStore.open(cfg.store)):
        raise RQAEError(f"{out} holds a finished run on another store than {cfg.store} (or on this one before "
                        f"it changed); choose another --out")
    steps, fvus = heldout_series(out)
    return {**record, "fvu": info["heldout_metrics"]["fvu"], "plateau": plateau_summary(steps, fvus, cfg.steps)}


def search_rate(cfg: SweepConfig, name: str, spec: ModelSpec, val: Split, echo=print) -> tuple[list[dict], dict]:
    """Train the first grid (`cfg.rates` ladder rates centred on the spec's rate, or
    `cfg.grid`; seed: the first), then the next ladder rate beyond the edge while the best
    is at an edge, at most `extend` times; (rows by rate, best)."""
    centre = ladder_index(spec.lr)
    first = cfg.grid or [ladder_rate(j) for j in range(centre - (cfg.rates - 1) // 2, centre + cfg.rates // 2 + 1)]
    tried: dict[float, dict] = {}

    def run(lr: float) -> None:
        tried[lr] = train_run(cfg, replace(spec, lr=lr), seed=cfg.seeds[0], split=val,
                              out=cfg.out / "sweep" / name / f"lr-{lr:g}")
        echo(f"  {name} lr {lr:g}: validation FVU {tried[lr]['fvu']:.4f}")

    for lr in first:
        run(lr)
    for _ in range(cfg.extend):
        best = min(tried, key=lambda lr: tried[lr]["fvu"])
        if not math.isfinite(tried[best]["fvu"]) or min(tried) < best < max(tried):
            break
        run(ladder_rate(ladder_index(best) + (-1 if best == min(tried) else 1)))
    rows = [tried[lr] for lr in sorted(tried)]
    return rows, best_rate(rows)


def run_sweep(cfg: SweepConfig, echo=print) -> dict:
    """Sweep every model's rate, train every seed at the chosen one, write `sweep.json`."""
    store = ActivationStore.open(cfg.store)
    val, test = splits(store, cfg.heldout_contexts)
    result: dict[str, Any] = {"config": jsonable(asdict(cfg)), "validation": asdict(val), "test": asdict(test),
                              "models": {}}
    for name, spec in cfg.models.items():
        echo(f"sweep {name}: {cfg.steps} steps x {cfg.batch_size} tokens per run, validation on "
             f"{val.eval_rows:,} rows, test on the last {cfg.heldout_contexts} contexts")
        rows, best = search_rate(cfg, name, spec, val, echo)
        seeds = [train_run(cfg, replace(spec, lr=best["lr"]), seed=s, out=cfg.out / name / f"seed-{s}", split=test)
                 for s in cfg.seeds]
        result["models"][name] = {"arch": spec.arch, "default_lr": spec.lr, "sweep": rows, "chosen_lr": best["lr"],
                                  "chosen_at_edge": best["at_edge"], "seeds": seeds}
        _write(cfg.out / SWEEP_FILE, result)
    return result


def jsonable(value):
    """Non-finite floats as null (JSON has none), paths as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value) if isinstance(value, Path) else value


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, jsonable(result))


# --------------------------------------------------------------------------- the quality table

def evaluate_seeds(cfg: SweepConfig, sweep: dict, *, ce_contexts: int, prefixes: tuple[int, ...] = (),
                   ce_seeds: int | None = None, echo=print) -> dict[str, list[dict]]:
    """`evaluate` every seed run on its test rows (CE/KL over `ce_contexts` of them); one
    flat row per (model, seed), and per extra RQAE prefix in `prefixes`. CE needs the LM
    (minutes per run on a CPU): `ce_seeds` limits it to the first seeds (None: all)."""
    from rqae_pipeline.evaluate import EvalConfig, evaluate

    out: dict[str, list[dict]] = {}
    for name, entry in sweep["models"].items():
        for i, run in enumerate(entry["seeds"]):
            ce = ce_contexts if ce_seeds is None or i < ce_seeds else 0
            ce_note = f" (CE on {ce} test contexts)" if ce else ""
            echo(f"evaluate {name} seed {run['seed']}{ce_note}")
            ecfg = EvalConfig(store=cfg.store, model=Path(run["run"]), ce_contexts=ce,
                              device=cfg.device or "cpu")
            if entry["arch"] == "rqae":
                n_q = cfg.models[name].n_q
                ecfg = replace(ecfg, prefixes=tuple(sorted({*prefixes, n_q})))
            result = evaluate(ecfg, progress=False)
            for label, row in quality_rows(name, result, cfg.models[name]).items():
                out.setdefault(label, []).append({**row, "seed": run["seed"], "lr": entry["chosen_lr"],
                                                  "lr_at_edge": entry["chosen_at_edge"],
                                                  "plateau": run.get("plateau", {})})
    return out


def quality_rows(name: str, result: dict, spec: ModelSpec) -> dict[str, dict]:
    """{row name: flat metrics} of one `evaluate` result: FVU/MSE in both spaces (stored-space
    only where evaluate measures one), CE-delta/KL (with bootstrap SE where evaluate gives
    it), L0, dead latents, bits per token (`metrics`' formulas, as the comparison's budget
    table)."""
    rows = {}
    ce = result.get("ce", {})
    for label, m in result["metrics"].items():
        row = {"fvu": m.get("fvu_normalised", m["fvu"]), "fvu_raw": m.get("fvu_raw", math.nan),
               "mse": m.get("mse_normalised", m["mse"])}
        c = ce.get(label, {})
        row.update({k: c.get(k, math.nan) for k in ("ce_delta", "ce_delta_se", "kl")})
        if label.startswith("rqae@"):
            layers = prefix_of(label)
            row.update(l0=math.nan, dead=math.nan, bits=rqae_bits_per_token(layers))
            rows[name if layers == spec.n_q else f"{name} @{layers}"] = row
        else:
            l0, width = result.get("l0", math.nan), result.get("latents", spec.d_sae)
            row.update(l0=l0, dead=result.get("dead_latents", math.nan),
                       bits=sae_bits_per_token(l0, width))
            rows[name] = row
    return rows


TABLE_COLUMNS = (("fvu", "FVU stored", 4), ("fvu_raw", "FVU raw", 4), ("ce_delta", "CE-delta", 3),
                 ("kl", "KL", 3), ("l0", "L0", 1), ("dead", "dead", 1), ("bits", "bits/tok", 0))


def aggregate(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Mean ± SE over the seeds that measured it of every table column (CE only for the
    first `ce_seeds`), the CE bootstrap SE averaged over runs, and the plateau's relative
    change over the last 20% of steps."""
    def over_seeds(values: list[float]) -> tuple[float, float]:
        return mean_se([v for v in values if math.isfinite(v)])

    out = {key: over_seeds([r[key] for r in rows]) for key, _, _ in TABLE_COLUMNS}
    out["ce_delta_se"] = over_seeds([r["ce_delta_se"] for r in rows])
    out["plateau"] = over_seeds([r["plateau"].get("relative_change", math.nan) for r in rows])
    return out


def format_quality_table(evaluated: dict[str, list[dict]]) -> str:
    """Mean ± SE over seeds, one line per model (and RQAE prefix)."""
    head = f"{'model':24s} {'lr':>7s} {'seeds':>5s}" + "".join(f" {title:>17s}" for _, title, _ in TABLE_COLUMNS)
    lines = [head + f" {'plateau':>15s}"]
    for name, rows in evaluated.items():
        agg = aggregate(rows)
        cells = "".join(f" {_pm(*agg[key], digits):>17s}" for key, _, digits in TABLE_COLUMNS)
        lr = f"{rows[0]['lr']:.0e}" + ("*" if rows[0].get("lr_at_edge") else "")
        lines.append(f"{name:24s} {lr:>7s} {len(rows):5d}{cells} {_pm(*agg['plateau'], 3):>15s}")
    lines.append("mean ± standard error over seeds (no ± : one seed measured it); CE-delta/KL in nats per token; "
                 "plateau: held-out FVU change "
                 "over the last 20% of steps relative to its mean (least-squares slope)")
    if any(rows[0].get("lr_at_edge") for rows in evaluated.values()):
        lines.append("* the chosen rate is at the edge of the rates tried: a rate beyond it might do better "
                     "(raise the sweep's extend)")
    ce_se = [aggregate(rows)["ce_delta_se"][0] for rows in evaluated.values()]
    if any(math.isfinite(v) for v in ce_se):
        lines.append("CE-delta bootstrap SE within one run (over contexts): "
                     + ", ".join(f"{n} {v:.3f}" for n, v in zip(evaluated, ce_se)))
    return "\n".join(lines)


def _pm(mean: float, se: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")
