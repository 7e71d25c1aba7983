"""`rqae eval` and `compare-gemmascope`: a trained model's quality on a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rqae_pipeline.cli_common import echo_err, fail, parse_ints, store_location

CE_PREFIXES_HELP = "RQAE prefixes spliced into the LM for CE-delta, comma-separated (default 1,4,16,n_q)."


def _ce_prefixes(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else parse_ints(text, "--ce-prefixes", "prefix lengths such as 1,4,16")


def eval_command(
    store: Annotated[str, typer.Option(help="Activation store.")],
    model: Annotated[Path, typer.Option(help="A model directory written by `rqae train` (or any sae-lens SAE dir).")],
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    rows: Annotated[str, typer.Option(help="heldout (the run's held-out contexts) or all.")] = "heldout",
    workers: Annotated[int, typer.Option(help="dask LocalCluster workers (0: this process).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="An existing dask scheduler, e.g. tcp://host:8786.")] = None,
    batch_size: int = 4096,
    ce_contexts: Annotated[int, typer.Option(help="Held-out contexts for CE-delta and KL (loads the LM); "
                                             "0 skips them.")] = 0,
    space: Annotated[str, typer.Option(help="auto, raw or normalised: what the model reads. auto: models "
                                       "trained here read normalised acts, other sae-lens dirs raw.")] = "auto",
    ce_prefixes: Annotated[str | None, typer.Option(help=CE_PREFIXES_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
) -> None:
    """Reconstruction metrics (MSE and FVU in the stored and the raw space, CE-delta and KL with bootstrap
    standard errors, L0, dead latents, code usage) of a model on a store."""
    store = store_location(store)
    from rqae_pipeline.evaluate import EvalConfig, evaluate
    from rqae_pipeline.report.evaluation import check_evaluation_out, evaluation_lines, write_evaluation

    if out is not None:
        check_evaluation_out(out)  # before the evaluation, not after it

    result = evaluate(EvalConfig(store=store, model=model, rows=rows, workers=workers, scheduler=scheduler,
                                 batch_size=batch_size, ce_contexts=ce_contexts, space=space,
                                 ce_prefixes=_ce_prefixes(ce_prefixes), device=device))
    if out is not None:
        write_evaluation(result, out, model.name)
    typer.echo("\n".join(evaluation_lines(result, model)))


def compare_gemmascope(
    store: Annotated[str, typer.Option(help="Activation store (the RQAE's held-out rows are used).")],
    rqae: Annotated[Path, typer.Option(help="RQAE model directory written by `rqae train`.")],
    out: Annotated[Path, typer.Option(help="Report directory: report.json, report.html and PNG plots.")],
    release: Annotated[str | None, typer.Option(help="sae-lens release, e.g. gemma-scope-2b-pt-res-canonical.")] = None,
    sae_id: Annotated[str | None, typer.Option(help="SAE id in the release, e.g. "
                                               "layer_12/width_16k/canonical.")] = None,
    sae_path: Annotated[Path | None, typer.Option(help="Any sae-lens SAE directory instead of a release.")] = None,
    workers: Annotated[int, typer.Option(help="dask LocalCluster workers (0: this process).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="An existing dask scheduler, e.g. tcp://host:8786.")] = None,
    ce_contexts: Annotated[int, typer.Option(help="Held-out contexts for CE-delta and KL with bootstrap standard "
                                             "errors (loads the LM); 0 skips them.")] = 64,
    ce_prefixes: Annotated[str | None, typer.Option(help=CE_PREFIXES_HELP)] = None,
    features: Annotated[int, typer.Option(help="SAE features sampled for Pearson matching.")] = 32,
    pearson_tokens: Annotated[int, typer.Option(help="Held-out rows scanned for Pearson matching.")] = 200_000,
    match_layers: Annotated[int | None, typer.Option(help="RQAE layers whose codebooks enter decoder "
                                                    "matching (default: all).")] = None,
    device: str = "cpu",
) -> None:
    """Compare an RQAE with a Gemma Scope (or any sae-lens) SAE: metrics, CE-delta, Pearson and decoder matching."""
    store = store_location(store)
    from rqae_pipeline.compare import CompareConfig, run_comparison
    from rqae_pipeline.evaluate import PretrainedSAE
    from rqae_pipeline.pearson import PearsonConfig
    from rqae_pipeline.report.comparison import summary_lines

    if (sae_path is None) == (release is None and sae_id is None):
        fail("give either --release and --sae-id (a sae-lens pretrained SAE) or --sae-path (a sae-lens directory)")
    if sae_path is None and (release is None or sae_id is None):
        fail("--release and --sae-id go together")
    sae = sae_path if sae_path is not None else PretrainedSAE(release, sae_id)
    cfg = CompareConfig(store=store, rqae=rqae, sae=sae, out=out, workers=workers, scheduler=scheduler,
                        ce_contexts=ce_contexts, ce_prefixes=_ce_prefixes(ce_prefixes), device=device,
                        match_layers=match_layers,
                        pearson=PearsonConfig(n_features=features, max_tokens=pearson_tokens))
    report = run_comparison(cfg, echo=echo_err)
    typer.echo("\n".join(summary_lines(report)))
    typer.echo(f"report: {out / 'report.html'}")
