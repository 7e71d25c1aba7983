"""The offline demo: harvest real Gemma-3-270M activations, train an RQAE and two SAEs on
them, compare held-out reconstruction and weight size, write the RQAE-vs-SAE report of
`rqae compare-gemmascope`, then encode the store into codes, build a feature dictionary and
write the dashboard. Each step is an ordinary stage call, so the demo is also a worked
example of the Python API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rqae_pipeline.codes import ensure_codes
from rqae_pipeline.compare import CompareConfig, run_comparison
from rqae_pipeline.dashboard import DashboardConfig, build_dashboard
from rqae_pipeline.features import DictionaryConfig, build_feature_dictionary
from rqae_pipeline.harvest import HarvestConfig, harvest
from rqae_pipeline.lm import OFFLINE_GEMMA
from rqae_pipeline.models.base import ModelSpec, default_lr
from rqae_pipeline.report.comparison import summary_lines
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.summary import format_summary, summarise
from rqae_pipeline.train import TrainConfig, train


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("cache/demo")
    tokens: int = 49_152
    n_q: int = 64
    d_sae: int = 2048
    k: int = 32
    steps: int = 200
    batch_size: int = 512
    ce_contexts: int = 8
    device: str | None = None


def demo_models(cfg: DemoConfig, d_in: int) -> dict[str, ModelSpec]:
    def spec(arch, **kw):
        return ModelSpec(arch=arch, d_in=d_in, lr=default_lr(arch), **kw)

    return {
        f"rqae-{cfg.n_q}": spec("rqae", n_q=cfg.n_q),
        "topk-sae": spec("topk-sae", d_sae=cfg.d_sae, k=cfg.k),
        "matryoshka_batchtopk-sae": spec("matryoshka_batchtopk-sae", d_sae=cfg.d_sae, k=cfg.k),
    }


def run_demo(cfg: DemoConfig, echo=print) -> list[dict]:
    store_path = cfg.out / "store.zarr"
    resume = (store_path / "zarr.json").exists()
    echo(f"1/5 harvest {cfg.tokens:,} tokens of {OFFLINE_GEMMA} into {store_path}")
    harvest(HarvestConfig(out=store_path, model=OFFLINE_GEMMA, tokens=cfg.tokens, device=cfg.device, resume=resume))
    store = ActivationStore.open(store_path)
    echo(format_summary(summarise(store)))
    rows = []
    models = demo_models(cfg, store.d)
    for i, (name, spec) in enumerate(models.items(), start=1):
        echo(f"2/5 train {name} ({i}/{len(models)})")
        out = cfg.out / name
        done = (out / "train.json").exists() and json.loads((out / "train.json").read_text()).get("status") == "done"
        if not done:
            train(TrainConfig(store=store_path, out=out, model=spec, batch_size=cfg.batch_size,
                              tokens=cfg.batch_size * cfg.steps, device=cfg.device, resume=out.exists()))
        run = json.loads((out / "train.json").read_text())
        h = run["heldout_metrics"]
        rows.append({"model": name, "fvu": h["fvu"], "mse": h["mse"], "weight_bytes": run["weight_bytes"],
                     "prefix": h.get("fvu_by_prefix")})
    echo("3/5 held-out reconstruction on the same store")
    echo(format_table(rows))
    (cfg.out / "demo_results.json").write_text(json.dumps(rows, indent=1))
    report_dir = cfg.out / "compare"
    echo(f"4/5 compare rqae-{cfg.n_q} with topk-sae (CE-delta on {cfg.ce_contexts} held-out contexts, "
         f"Pearson and decoder matching) into {report_dir}")
    report = run_comparison(CompareConfig(store=store_path, rqae=cfg.out / f"rqae-{cfg.n_q}",
                                          sae=cfg.out / "topk-sae", out=report_dir, ce_contexts=cfg.ce_contexts,
                                          prefixes=(1, 4, 16, cfg.n_q), device=cfg.device or "cpu"),
                            echo=echo)
    echo("\n".join(summary_lines(report)))
    echo(f"report: {report_dir / 'report.html'}")
    run_features(cfg, store, echo)
    return rows


def run_features(cfg: DemoConfig, store: ActivationStore, echo=print) -> None:
    """Step 5: the interpretability tools on the RQAE (`rqae encode`, `rqae feature-dictionary`,
    `rqae dashboard`). `rqae search`, `rqae features` and `rqae steer` then work on the same
    codes store and dictionary (docs/features.md, docs/steering.md)."""
    model = cfg.out / f"rqae-{cfg.n_q}"
    features = cfg.out / "features.json"
    echo(f"5/5 encode the store with rqae-{cfg.n_q}, build a feature dictionary ({features}) and the dashboard")
    codes = ensure_codes(store, model)
    if not features.exists():
        build_feature_dictionary(DictionaryConfig(store=store.path, model=model, out=features, codes=codes.path))
    index = build_dashboard(DashboardConfig(store=store.path, model=model, out=cfg.out / "dashboard", features=features,
                                            codes=codes.path, texts=("Python has a dictionary type",),
                                            token_indices=(-2,)),
                            echo=echo)
    echo(f"dashboard: {index}")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':28s} {'held-out FVU':>12s} {'MSE':>10s} {'weights':>10s}"]
    for r in rows:
        lines.append(f"{r['model']:28s} {r['fvu']:12.4f} {r['mse']:10.4g} {r['weight_bytes'] / 1e6:8.2f} MB")
        if r.get("prefix"):
            lines.append("  RQAE prefixes: " + "  ".join(f"{m}:{v:.3f}" for m, v in r["prefix"].items()))
    return "\n".join(lines)
