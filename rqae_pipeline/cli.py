"""The `rqae` command line: argument parsing, progress and exit codes over the stage functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from rqae_pipeline import RQAEError

app = typer.Typer(
    name="rqae",
    help="Harvest language-model activations into Zarr, train Residual Quantisation Autoencoders, "
    "and compare them with sparse autoencoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def harvest(
    out: Annotated[Path, typer.Option(help="Store directory to create (or continue with --resume).")] = Path(
        "cache/gemma-3-270m-offline.zarr"
    ),
    model: Annotated[str, typer.Option(help="'gemma-3-270m-offline' (packaged, no network), a TransformerLens "
                                       "name such as google/gemma-2-2b, or tiny-random[:SEED].")] = "gemma-3-270m-offline",
    layer: Annotated[str, typer.Option("--layer", "--hook", help="Layer number (its hook_resid_post) or a full "
                                       "hook name; 'auto' = the centre layer.")] = "auto",
    dataset: Annotated[str, typer.Option(help="'auto', builtin:python-docs, a hub dataset, or local "
                                         ".txt/.jsonl/.parquet files (path or glob).")] = "auto",
    dataset_config: Annotated[str | None, typer.Option(help="Hub dataset config, e.g. sample-10BT.")] = None,
    split: str = "train",
    text_field: Annotated[str, typer.Option(help="Text column of jsonl/parquet/hub rows.")] = "text",
    tokens: Annotated[int, typer.Option(help="Tokens (rows) to have in the store when done.")] = 20_000,
    context_length: int = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 8,
    contexts_per_shard: int = 128,
    contexts_per_chunk: int = 8,
    dtype: Annotated[str, typer.Option(help="float16 (lossless enough), float32, or fp8 (compact, ~0.26x fp32).")] = "float16",
    normalisation: Annotated[str, typer.Option(help="final-norm (the LM's final RMSNorm incl. gain) or rms.")] = "final-norm",
    skip_bos: Annotated[bool, typer.Option(help="Do not store the BOS position of each context.")] = False,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
    model_dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 for the forward pass.")] = "float32",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted (or shorter) store at --out.")] = False,
) -> None:
    """Stream a corpus through a language model and store normalised residual activations."""
    from rqae_pipeline.harvest import HarvestConfig
    from rqae_pipeline.harvest import harvest as run_harvest

    try:
        cfg = HarvestConfig(
            out=out, model=model, hook=layer, dataset=dataset, dataset_config=dataset_config, split=split,
            text_field=text_field, tokens=tokens, context_length=context_length, batch_contexts=batch_size,
            contexts_per_shard=contexts_per_shard, contexts_per_chunk=contexts_per_chunk, dtype=dtype,
            normalisation=normalisation, skip_bos=skip_bos, device=device, model_dtype=model_dtype, resume=resume,
        )
    except ValueError as e:
        _fail(str(e))
    try:
        result = run_harvest(cfg)
    except RQAEError as e:
        _fail(str(e))
    if result.interrupted:
        typer.echo(f"interrupted: {result.tokens:,} tokens committed in {out}; rerun with --resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    typer.echo(f"{out}: {result.tokens:,} tokens committed ({result.new_tokens:,} new, "
               f"{result.tokens_per_second:,.0f} tok/s)")


@app.command()
def inspect(
    store: Annotated[Path, typer.Argument(help="An activation store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a store's manifest, counts, bytes per token and a sanity summary of norms."""
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.summary import format_summary, summarise

    try:
        summary = summarise(ActivationStore.open(store))
    except RQAEError as e:
        _fail(str(e))
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
