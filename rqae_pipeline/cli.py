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


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command()
def train(
    store: Annotated[Path, typer.Option(help="Activation store to train on.")],
    out: Annotated[Path, typer.Option(help="Run directory (weights, config, metrics, plots, checkpoint).")],
    arch: Annotated[str, typer.Option(help="rqae, codebook, or <sae-lens architecture>-sae (e.g. topk-sae, "
                                      "matryoshka_batchtopk-sae); `rqae archs` lists them.")] = "rqae",
    n_q: Annotated[int, typer.Option("--n-q", help="RQAE quantiser layers.")] = 64,
    d_sae: Annotated[int, typer.Option(help="SAE latents / codebook size.")] = 4096,
    k: Annotated[int, typer.Option(help="Active latents (TopK-style SAEs) / active codes (codebook).")] = 32,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate; default per architecture "
                                             "(rqae 1e-2, codebook 1e-3, SAEs 3e-4).")] = None,
    batch_size: int = 1024,
    tokens: Annotated[int, typer.Option(help="Training tokens (steps = tokens / batch size).")] = 1_000_000,
    seed: int = 0,
    heldout: Annotated[float, typer.Option(help="Fraction of contexts held out (the store's last ones).")] = 0.05,
    prefix_loss: Annotated[bool, typer.Option(help="RQAE: average the MSE over every prefix.")] = True,
    mean_init: Annotated[bool, typer.Option(help="Initialise the output bias to the data mean.")] = True,
    option: Annotated[list[str], typer.Option(help="Architecture option key=value (repeatable).")] = [],  # noqa: B006
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (autocast for SAEs and the codebook; "
                                       "RQAE always trains in fp32).")] = "float32",
    checkpoint_every: int = 50,
    eval_every: int = 100,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Train an RQAE, a codebook autoencoder or a sae-lens SAE on a store, without the LM."""
    from rqae_pipeline.models.base import ModelSpec, default_lr
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.train import TrainConfig
    from rqae_pipeline.train import train as run_train

    try:
        d_in = ActivationStore.open(store).d
        spec = ModelSpec(arch=arch, d_in=d_in, n_q=n_q, d_sae=d_sae, k=k, lr=default_lr(arch) if lr is None else lr,
                         prefix_loss=prefix_loss,
                         mean_init=mean_init, options=_parse_options(option), dtype=dtype)
        cfg = TrainConfig(store=store, out=out, model=spec, batch_size=batch_size, tokens=tokens, seed=seed,
                          heldout_fraction=heldout, checkpoint_every=checkpoint_every, eval_every=eval_every,
                          device=device, resume=resume)
        result = run_train(cfg)
    except (RQAEError, ValueError) as e:
        _fail(str(e))
    if result.interrupted:
        typer.echo(f"interrupted at step {result.steps}: checkpoint saved in {out}; rerun with --resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    h = result.heldout
    line = f"{out}: {arch} held-out FVU {h['fvu']:.4f}, MSE {h['mse']:.4g} on {h['tokens']:,} tokens"
    if "fvu_by_prefix" in h:
        line += "; by prefix " + " ".join(f"{m}:{v:.3f}" for m, v in h["fvu_by_prefix"].items())
    typer.echo(line)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's store, models and results.")] = Path("cache/demo"),
    tokens: Annotated[int, typer.Option(help="Tokens to harvest.")] = 49_152,
    steps: Annotated[int, typer.Option(help="Training steps per model.")] = 200,
    device: str | None = None,
) -> None:
    """Offline demo: harvest Gemma-3-270M, train an RQAE, a TopK and a Matryoshka SAE, compare."""
    from rqae_pipeline.demo import DemoConfig, run_demo

    try:
        run_demo(DemoConfig(out=out, tokens=tokens, steps=steps, device=device), echo=typer.echo)
    except RQAEError as e:
        _fail(str(e))


@app.command("eval")
def eval_command(
    store: Annotated[Path, typer.Option(help="Activation store.")],
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
) -> None:
    """Reconstruction metrics (MSE, FVU, CE-delta, KL, L0, dead latents, code usage) of a model on a store."""
    from rqae_pipeline.evaluate import EvalConfig, evaluate

    try:
        result = evaluate(EvalConfig(store=store, model=model, rows=rows, workers=workers, scheduler=scheduler,
                                     batch_size=batch_size, ce_contexts=ce_contexts, space=space))
    except RQAEError as e:
        _fail(str(e))
    if out is not None:
        from rqae_pipeline.report.plots import plot_reconstruction_vs_layers

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        plot_reconstruction_vs_layers({model.name: result}, out.with_suffix(".png"))
    typer.echo(f"{model} on {result['tokens']:,} tokens (rows {result['rows'][0]:,}..{result['rows'][1]:,})")
    typer.echo(f"{'reconstruction':16s} {'FVU':>10s} {'MSE':>12s}")
    for label, m in sorted(result["metrics"].items(), key=lambda kv: (len(kv[0]), kv[0])):
        typer.echo(f"{label:16s} {m['fvu']:10.5f} {m['mse']:12.5g}")
    for key in ("l0", "dead_latents", "code_usage"):
        if key in result:
            typer.echo(f"{key}: {result[key]}")
    if "ce" in result:
        typer.echo(f"next-token CE on contexts {result['ce_contexts'][0]}..{result['ce_contexts'][1]}:")
        for label, m in result["ce"].items():
            extra = "".join(f"  {k} {v:.4f}" for k, v in m.items() if k != "ce")
            typer.echo(f"  {label:16s} CE {m['ce']:.4f}{extra}")


@app.command()
def archs() -> None:
    """List the trainable architectures."""
    from rqae_pipeline.models.sae import sae_architectures

    typer.echo("\n".join(["rqae", "codebook", *(f"{a}-sae" for a in sae_architectures())]))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
