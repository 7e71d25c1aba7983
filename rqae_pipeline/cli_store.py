"""`rqae harvest`, `inspect` and `verify`: the commands that write and read an activation store."""

from __future__ import annotations

from typing import Annotated

import typer

from rqae_pipeline.cli_common import EXIT_CORPUS_EXHAUSTED, EXIT_INTERRUPTED, echo_err, fail, store_location
from rqae_pipeline.io import json_text


def harvest(
    out: Annotated[str, typer.Option(help="Store to create (or continue with --resume): a directory or an "
                                     "s3://, gs://, memory:// or file:// URL.")] = "cache/gemma-3-270m-offline.zarr",
    model: Annotated[str, typer.Option(help="'gemma-3-270m-offline' (packaged, no network), a TransformerLens "
                                       "name such as google/gemma-2-2b, or tiny-random[:SEED].")
                     ] = "gemma-3-270m-offline",
    layer: Annotated[str, typer.Option("--layer", "--hook", help="Layer number (its hook_resid_post) or a full "
                                       "hook name; 'auto' = the centre layer.")] = "auto",
    dataset: Annotated[str, typer.Option(help="'auto', builtin:python-docs, a hub dataset, or local "
                                         ".txt/.jsonl/.parquet files (path or glob).")] = "auto",
    dataset_config: Annotated[str | None, typer.Option(help="Hub dataset config, e.g. sample-10BT.")] = None,
    dataset_revision: Annotated[str | None, typer.Option(help="Hub dataset branch, tag or commit; default: the "
                                                         "default branch's commit now, recorded in the store.")
                                ] = None,
    split: str = "train",
    text_field: Annotated[str, typer.Option(help="Text column of jsonl/parquet/hub rows.")] = "text",
    tokens: Annotated[int, typer.Option(help="Tokens (rows) to have in the store when done.")] = 20_000,
    context_length: int = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 8,
    contexts_per_shard: int = 128,
    contexts_per_chunk: int = 8,
    dtype: Annotated[str, typer.Option(help="float16 (lossless enough), float32, or fp8 (compact, "
                                       "~0.26x fp32).")] = "float16",
    normalisation: Annotated[str, typer.Option(help="final-norm (the LM's final RMSNorm incl. gain) "
                                               "or rms.")] = "final-norm",
    skip_bos: Annotated[bool, typer.Option(help="Do not store the BOS position of each context.")] = False,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
    model_dtype: Annotated[str, typer.Option(help="The forward pass's dtype: auto (bfloat16 on a GPU with native "
                                             "bf16, else float32; float32 on a GPU runs TF32 matmuls where it can), "
                                             "float32, bfloat16 or float16. Its error against a float32 forward is "
                                             "recorded in the manifest (forward_error).")] = "auto",
    compile: Annotated[bool, typer.Option(help="Run the forward through torch.compile (residual stream hooks; "
                                          "a one-off compile, then faster batches; recorded in forward_error).")
                       ] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted (or shorter) store at --out.")] = False,
    workers: Annotated[int, typer.Option(help="dask LocalCluster workers, one model each, a shard per task; "
                                         "with G GPUs worker i uses cuda:(i mod G) (0: this process).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="An existing dask scheduler, e.g. tcp://host:8786 "
                                                  "(dask-cuda: one worker per GPU).")] = None,
) -> None:
    """Stream a corpus through a language model and store normalised residual activations."""
    from rqae_pipeline.harvest import HarvestConfig
    from rqae_pipeline.harvest import harvest as run_harvest

    out = store_location(out)
    cfg = HarvestConfig(
        out=out, model=model, hook=layer, dataset=dataset, dataset_config=dataset_config,
        dataset_revision=dataset_revision, split=split, text_field=text_field, tokens=tokens,
        context_length=context_length, batch_contexts=batch_size,
        contexts_per_shard=contexts_per_shard, contexts_per_chunk=contexts_per_chunk, dtype=dtype,
        normalisation=normalisation, skip_bos=skip_bos, device=device, model_dtype=model_dtype, compile=compile,
        resume=resume,
    )
    if workers or scheduler:
        from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel

        result = harvest_parallel(cfg, DaskConfig(workers=workers, scheduler=scheduler), notice=echo_err)
    else:
        result = run_harvest(cfg, notice=echo_err)
    _echo_harvest_result(result, out)


def _echo_harvest_result(result, out) -> None:
    """The committed count on stdout; an interrupted or exhausted run exits with its own status."""
    if result.interrupted:
        typer.echo(f"interrupted: {result.tokens:,} tokens committed in {out}; rerun with --resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.exhausted:
        fail(f"the corpus ran out: {out} holds {result.tokens:,} of the {result.requested_tokens:,} tokens "
             f"asked for (recorded in its manifest; `rqae inspect` shows it)", EXIT_CORPUS_EXHAUSTED)
    typer.echo(f"{out}: {result.tokens:,} tokens committed ({result.new_tokens:,} new, "
               f"{result.tokens_per_second:,.0f} tok/s)")


def inspect(
    store: Annotated[str, typer.Argument(help="An activation store: a directory or a URL (s3://, gs://, ...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a store's manifest, counts, bytes per token and a sanity summary of norms (exit 1:
    its sampled rows cannot be read; the rest, the settings to rebuild a shard with, is shown)."""
    store = store_location(store)
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.summary import format_summary, summarise

    summary = summarise(ActivationStore.open(store))
    typer.echo(json_text(summary) if as_json else format_summary(summary))
    if summary.get("sample_error"):
        raise typer.Exit(1)  # damaged, as `rqae verify` says it


def verify(
    store: Annotated[str, typer.Argument(help="An activation store: a directory or a URL (s3://, gs://, ...).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar (one step per shard).")] = True,
) -> None:
    """Read every committed row of every array once: shard files present, checksums, shapes, the
    manifest's counts, finiteness, seq/pos and flags. Lists every problem found. Exit status: 0 when
    the store is intact, 1 when any damage is found, 2 when STORE is not an activation store."""
    store = store_location(store)
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.verify import EXIT_DAMAGED, format_report, verify_store

    report = verify_store(ActivationStore.open(store), progress=progress)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(EXIT_DAMAGED)
