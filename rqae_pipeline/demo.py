"""The offline demo: harvest real Gemma-3-270M activations, train an RQAE and a TopK SAE on
them with equal effort (the same learning-rate search, then three seeds at the chosen
rate: `sweep.py`), print their held-out quality as mean ± SE over seeds, write the
RQAE-vs-SAE report of `rqae compare-gemmascope` for seed 0, then encode the store into
codes, build a feature dictionary and write the dashboard. Each step is an ordinary stage
call, so the demo is also a worked example of the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rqae_pipeline import RQAEError
from rqae_pipeline.codes import ensure_codes
from rqae_pipeline.compare import CompareConfig, run_comparison
from rqae_pipeline.dashboard import DashboardConfig, build_dashboard
from rqae_pipeline.features import DictionaryConfig, build_feature_dictionary
from rqae_pipeline.harvest import HarvestConfig, harvest
from rqae_pipeline.io import atomic_write_json
from rqae_pipeline.lm import OFFLINE_GEMMA
from rqae_pipeline.models.base import ModelSpec, default_lr
from rqae_pipeline.report.comparison import summary_lines
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.summary import format_summary, summarise
from rqae_pipeline.sweep import SweepConfig, evaluate_seeds, format_quality_table, jsonable, run_sweep


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("cache/demo")
    tokens: int = 65_536  # 512 contexts: 64 test, 64 validation, 384 to train on
    n_q: int = 64
    d_sae: int = 2048
    k: int = 32
    steps: int = 50  # per run, sweep and seeds alike (bench/quality.py defaults to 200)
    batch_size: int = 1024
    seeds: int = 3
    rates: int = 3  # learning rates around each family's default, + 1 past an edge best
    heldout_contexts: int = 64  # test contexts (CE on all of them); as many again validate the sweep
    ce_prefixes: tuple[int, ...] = (1, 16)  # RQAE prefixes spliced into the LM besides all n_q layers
    device: str | None = None

    def __post_init__(self):  # refused before the harvest, not after it
        if self.steps < 1 or self.seeds < 1 or self.tokens < 1:
            raise RQAEError(f"the demo needs --steps, --seeds and --tokens >= 1; got {self.steps}, "
                            f"{self.seeds} and {self.tokens}")


def demo_models(cfg: DemoConfig, d_in: int) -> dict[str, ModelSpec]:
    """The RQAE and the TopK SAE, each at its family's default rate (the sweep's centre)."""
    return {f"rqae-{cfg.n_q}": ModelSpec(arch="rqae", d_in=d_in, n_q=cfg.n_q, lr=default_lr("rqae")),
            "topk-sae": ModelSpec(arch="topk-sae", d_in=d_in, d_sae=cfg.d_sae, k=cfg.k)}


def run_demo(cfg: DemoConfig, echo=print) -> dict[str, list[dict]]:
    store_path = cfg.out / "store.zarr"
    resume = (store_path / "zarr.json").exists()
    echo(f"1/5 harvest {cfg.tokens:,} tokens of {OFFLINE_GEMMA} into {store_path}")
    harvest(HarvestConfig(out=store_path, model=OFFLINE_GEMMA, tokens=cfg.tokens, device=cfg.device, resume=resume))
    store = ActivationStore.open(store_path)
    echo(format_summary(summarise(store)))
    sweep_cfg = SweepConfig(store=store_path, out=cfg.out / "runs", models=demo_models(cfg, store.d),
                            tokens=cfg.steps * cfg.batch_size, batch_size=cfg.batch_size, rates=cfg.rates, extend=1,
                            seeds=tuple(range(cfg.seeds)), heldout_contexts=cfg.heldout_contexts, device=cfg.device,
                            progress=False)
    echo(f"2/5 the same learning-rate search for each model, then {cfg.seeds} seeds at the chosen rate "
         f"({cfg.steps} steps x {cfg.batch_size} tokens per run)")
    sweep = run_sweep(sweep_cfg, echo=echo)
    for name in sweep["models"]:
        link_first_seed(cfg.out / name, sweep_cfg.out / name / "seed-0")
    echo(f"3/5 every seed run on the store's last {cfg.heldout_contexts} contexts")
    # CE-delta needs the LM (minutes per run on 2 cores): step 4 measures it, with its
    # bootstrap SE, for seed 0 of each; `bench/quality.py --ce-seeds N` for N seeds
    evaluated = evaluate_seeds(sweep_cfg, sweep, ce_contexts=0, prefixes=(16,), echo=echo)
    echo(format_quality_table(evaluated))
    atomic_write_json(cfg.out / "demo_results.json", jsonable(evaluated))
    report_dir = cfg.out / "compare"
    echo(f"4/5 compare rqae-{cfg.n_q} with topk-sae (seed 0 of each: CE-delta, Pearson and decoder matching) "
         f"into {report_dir}")
    report = run_comparison(CompareConfig(store=store_path, rqae=cfg.out / f"rqae-{cfg.n_q}",
                                          sae=cfg.out / "topk-sae", out=report_dir, ce_contexts=cfg.heldout_contexts,
                                          prefixes=(1, 4, 16, cfg.n_q), ce_prefixes=(*cfg.ce_prefixes, cfg.n_q),
                                          device=cfg.device or "cpu"),
                            echo=echo)
    echo("\n".join(summary_lines(report)))
    echo(f"report: {report_dir / 'report.html'}")
    run_features(cfg, store, echo)
    return evaluated


def link_first_seed(link: Path, target: Path) -> None:
    """`cache/demo/<model>` -> its seed-0 run, so `rqae search/steer/...` take the same path as before."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise RQAEError(f"{link} is a model directory from an older demo; move it away or use another --out")
    link.symlink_to(target.relative_to(link.parent), target_is_directory=True)


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
