"""The `rqae` command line: option declarations over the stage functions, their printed results
and exit codes. Errors are handled once, in `Commands.invoke`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import UsageError  # typer vendors click: its own exception classes
from typer.core import TyperGroup

from rqae_pipeline import RQAEError

EXIT_USER_ERROR = 2
EXIT_CORPUS_EXHAUSTED = 3  # harvest: the corpus ran out first; the store holds what it gave
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _raised_by_config(e: ValueError) -> bool:
    """A ValueError raised directly in a config's `__post_init__` is a validation message
    for the user; any other ValueError is a bug and keeps its traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "__post_init__"


class Commands(TyperGroup):
    """Every command runs through `invoke`, so the console script and `CliRunner` share the
    one error handler: RQAEError (and config validation) -> `error: <msg>`, exit 2;
    an option click cannot parse (`--tokens 1e23`) -> the same one line, exit 2;
    Ctrl-C -> `interrupted`, exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RQAEError as e:
            _fail(str(e))
        except UsageError as e:
            where = f"rqae {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else "rqae"
            _fail(f"{e.format_message()} (see `{where} --help`)")
        except ValueError as e:
            if not _raised_by_config(e):
                raise
            _fail(str(e))
        except KeyboardInterrupt:
            _interrupted()


def _interrupted() -> None:
    typer.echo("interrupted", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def _store(value: str):
    """A store option's value as a location: a Path, or a URL whose filesystem is installed
    (urls.location; never `Path("s3://...")`, which is a local folder named `s3:`)."""
    from rqae_pipeline.urls import location

    return location(value)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing the command's output reads `cannot write PATH: reason`."""
    try:
        yield
    except OSError as e:
        raise RQAEError(f"cannot write {path}: {e.strerror or e}") from None


app = typer.Typer(
    name="rqae",
    cls=Commands,
    help="Harvest language-model activations into Zarr, train Residual Quantisation Autoencoders, "
    "and compare them with sparse autoencoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)


@app.command()
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
    resume: Annotated[bool, typer.Option(help="Continue an interrupted (or shorter) store at --out.")] = False,
    workers: Annotated[int, typer.Option(help="dask LocalCluster workers, one model each, a shard per task; "
                                         "with G GPUs worker i uses cuda:(i mod G) (0: this process).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="An existing dask scheduler, e.g. tcp://host:8786 "
                                                  "(dask-cuda: one worker per GPU).")] = None,
) -> None:
    """Stream a corpus through a language model and store normalised residual activations."""
    from rqae_pipeline.harvest import HarvestConfig
    from rqae_pipeline.harvest import harvest as run_harvest

    out = _store(out)
    cfg = HarvestConfig(
        out=out, model=model, hook=layer, dataset=dataset, dataset_config=dataset_config, split=split,
        text_field=text_field, tokens=tokens, context_length=context_length, batch_contexts=batch_size,
        contexts_per_shard=contexts_per_shard, contexts_per_chunk=contexts_per_chunk, dtype=dtype,
        normalisation=normalisation, skip_bos=skip_bos, device=device, model_dtype=model_dtype, resume=resume,
    )
    notice = lambda m: typer.echo(m, err=True)  # noqa: E731
    if workers or scheduler:
        from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel

        result = harvest_parallel(cfg, DaskConfig(workers=workers, scheduler=scheduler), notice=notice)
    else:
        result = run_harvest(cfg, notice=notice)
    if result.interrupted:
        typer.echo(f"interrupted: {result.tokens:,} tokens committed in {out}; rerun with --resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.exhausted:
        _fail(f"the corpus ran out: {out} holds {result.tokens:,} of the {result.requested_tokens:,} tokens "
              f"asked for (recorded in its manifest; `rqae inspect` shows it)", EXIT_CORPUS_EXHAUSTED)
    typer.echo(f"{out}: {result.tokens:,} tokens committed ({result.new_tokens:,} new, "
               f"{result.tokens_per_second:,.0f} tok/s)")


@app.command()
def inspect(
    store: Annotated[str, typer.Argument(help="An activation store: a directory or a URL (s3://, gs://, ...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a store's manifest, counts, bytes per token and a sanity summary of norms."""
    store = _store(store)
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.summary import format_summary, summarise

    summary = summarise(ActivationStore.open(store))
    typer.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:  # not JSON: the plain string
            out[key] = value
    return out


def _parse_ints(text: str, option: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        _fail(f"{option} expects comma-separated {example}; got {text!r}")


@app.command()
def train(
    store: Annotated[str, typer.Option(help="Activation store to train on.")],
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
    nproc: Annotated[int, typer.Option(help="Data-parallel processes, through torchrun (one per GPU on cuda; "
                                       "gloo with one thread each on CPU). --batch-size is the global batch.")] = 1,
) -> None:
    """Train an RQAE, a codebook autoencoder or a sae-lens SAE on a store, without the LM."""
    store = _store(store)
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.train import TrainConfig
    from rqae_pipeline.train import train as run_train

    d_in = ActivationStore.open(store).d
    spec = ModelSpec(arch=arch, d_in=d_in, n_q=n_q, d_sae=d_sae, k=k, lr=lr,  # None: the architecture's default
                     prefix_loss=prefix_loss, mean_init=mean_init, options=_parse_options(option), dtype=dtype)
    cfg = TrainConfig(store=store, out=out, model=spec, batch_size=batch_size, tokens=tokens, seed=seed,
                      heldout_fraction=heldout, checkpoint_every=checkpoint_every, eval_every=eval_every,
                      device=device, resume=resume)
    if nproc != 1:
        _train_in_processes(cfg, nproc)
        return
    _echo_train_result(run_train(cfg), out, arch)


def _echo_train_result(result, out: Path, arch: str) -> None:
    if result.interrupted:
        typer.echo(f"interrupted at step {result.steps}: resume from the checkpoint in {out}; rerun with --resume",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    h = result.heldout
    line = f"{out}: {arch} held-out FVU {h['fvu']:.4f}, MSE {h['mse']:.4g} on {h['tokens']:,} tokens"
    if "fvu_by_prefix" in h:
        line += "; by prefix " + " ".join(f"{m}:{v:.3f}" for m, v in h["fvu_by_prefix"].items())
    typer.echo(line)


def _train_in_processes(cfg, nproc: int) -> None:
    import json

    from rqae_pipeline.launch import launch_training

    code = launch_training(cfg, nproc)
    if code == EXIT_INTERRUPTED:
        typer.echo(f"interrupted: resume from the checkpoint in {cfg.out}; rerun with --resume", err=True)
    if code:
        raise typer.Exit(code)  # the ranks said why on stderr
    h = json.loads((Path(cfg.out) / "train.json").read_text())["heldout_metrics"]
    typer.echo(f"{cfg.out}: {cfg.model.arch} held-out FVU {h['fvu']:.4f}, MSE {h['mse']:.4g} on {h['tokens']:,} "
               f"tokens ({nproc} processes)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's store, models and results.")] = Path("cache/demo"),
    tokens: Annotated[int, typer.Option(help="Tokens to harvest.")] = 65_536,
    steps: Annotated[int, typer.Option(help="Training steps of 1024 tokens per run (sweep and seeds).")] = 50,
    seeds: Annotated[int, typer.Option(help="Training seeds per model at the chosen learning rate.")] = 3,
    device: str | None = None,
) -> None:
    """Offline demo: harvest Gemma-3-270M, train an RQAE and a TopK SAE with the same learning-rate search
    and seeds, print mean ± SE over seeds, compare them, then encode the store, build a feature dictionary
    and write the dashboard."""
    from rqae_pipeline.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, tokens=tokens, steps=steps, seeds=seeds, device=device), echo=typer.echo)


@app.command()
def sweep(
    store: Annotated[str, typer.Option(help="Activation store to train on.")],
    out: Annotated[Path, typer.Option(help="Directory for the runs, sweep.json and quality.json.")],
    arch: Annotated[list[str], typer.Option(help="Architecture to sweep (repeatable): rqae, codebook or "
                                            "<sae-lens architecture>-sae.")] = ["rqae", "topk-sae"],  # noqa: B006
    n_q: Annotated[int, typer.Option("--n-q", help="RQAE quantiser layers.")] = 64,
    d_sae: Annotated[int, typer.Option(help="SAE latents / codebook size.")] = 2048,
    k: Annotated[int, typer.Option(help="Active latents (TopK-style SAEs) / active codes (codebook).")] = 32,
    tokens: Annotated[int, typer.Option(help="Training tokens of every run.")] = 204_800,
    batch_size: int = 1024,
    rates: Annotated[int, typer.Option(help="Half-decade learning rates around each family's default.")] = 3,
    extend: Annotated[int, typer.Option(help="Further rates while the best is at the grid's edge.")] = 2,
    seeds: Annotated[int, typer.Option(help="Seeds trained at the chosen rate.")] = 3,
    heldout_contexts: Annotated[int, typer.Option(help="Test contexts (the store's last); as many again "
                                                  "before them choose the rate.")] = 64,
    ce_contexts: Annotated[int, typer.Option(help="Test contexts for CE-delta/KL (loads the LM); 0 skips.")] = 0,
    device: str | None = None,
) -> None:
    """The same learning-rate search for every architecture, seeds at the chosen rate, mean ± SE table."""
    store = _store(store)
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.sweep import SweepConfig, evaluate_seeds, format_quality_table, jsonable, run_sweep

    d_in = ActivationStore.open(store).d
    models = {a if a != "rqae" else f"rqae-{n_q}": ModelSpec(arch=a, d_in=d_in, n_q=n_q, d_sae=d_sae, k=k)
              for a in arch}
    cfg = SweepConfig(store=store, out=out, models=models, tokens=tokens, batch_size=batch_size, rates=rates,
                      extend=extend, seeds=tuple(range(seeds)), heldout_contexts=heldout_contexts, device=device)
    result = run_sweep(cfg, echo=typer.echo)
    evaluated = evaluate_seeds(cfg, result, ce_contexts=ce_contexts, echo=typer.echo)
    (out / "quality.json").write_text(json.dumps(jsonable(evaluated), indent=1))
    typer.echo(format_quality_table(evaluated))


CE_PREFIXES_HELP = "RQAE prefixes spliced into the LM for CE-delta, comma-separated (default 1,4,16,n_q)."


def _ce_prefixes(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else _parse_ints(text, "--ce-prefixes", "prefix lengths such as 1,4,16")


@app.command("eval")
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
    store = _store(store)
    from rqae_pipeline.evaluate import EvalConfig, evaluate
    from rqae_pipeline.report.evaluation import evaluation_lines, write_evaluation

    result = evaluate(EvalConfig(store=store, model=model, rows=rows, workers=workers, scheduler=scheduler,
                                 batch_size=batch_size, ce_contexts=ce_contexts, space=space,
                                 ce_prefixes=_ce_prefixes(ce_prefixes), device=device))
    if out is not None:
        write_evaluation(result, out, model.name)
    typer.echo("\n".join(evaluation_lines(result, model)))


@app.command("compare-gemmascope")
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
    store = _store(store)
    from rqae_pipeline.compare import CompareConfig, run_comparison
    from rqae_pipeline.evaluate import PretrainedSAE
    from rqae_pipeline.pearson import PearsonConfig
    from rqae_pipeline.report.comparison import summary_lines

    if (sae_path is None) == (release is None and sae_id is None):
        _fail("give either --release and --sae-id (a sae-lens pretrained SAE) or --sae-path (a sae-lens directory)")
    if sae_path is None and (release is None or sae_id is None):
        _fail("--release and --sae-id go together")
    sae = sae_path if sae_path is not None else PretrainedSAE(release, sae_id)
    cfg = CompareConfig(store=store, rqae=rqae, sae=sae, out=out, workers=workers, scheduler=scheduler,
                        ce_contexts=ce_contexts, ce_prefixes=_ce_prefixes(ce_prefixes), device=device,
                        match_layers=match_layers,
                        pearson=PearsonConfig(n_features=features, max_tokens=pearson_tokens))
    report = run_comparison(cfg, echo=lambda m: typer.echo(m, err=True))
    typer.echo("\n".join(summary_lines(report)))
    typer.echo(f"report: {out / 'report.html'}")


@app.command()
def archs() -> None:
    """List the trainable architectures."""
    from rqae_pipeline.models.sae import sae_architectures

    typer.echo("\n".join(["rqae", "codebook", *(f"{a}-sae" for a in sae_architectures())]))


# --------------------------------------------------------------------------- codes and features


def _write_json(out: Path | None, result: dict) -> None:
    if out is None:
        return
    from rqae_pipeline.io import atomic_write_bytes

    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(result, indent=1).encode())
    typer.echo(f"wrote {out}")


@app.command()
def encode(
    store: Annotated[str, typer.Option(help="Activation store to encode.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory written by `rqae train`.")],
    out: Annotated[str | None, typer.Option(help="Codes store to write (default: STORE.codes/<model>-<hash>.zarr "
                                             "beside the store).")] = None,
    batch_size: int = 4096,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
) -> None:
    """Encode every store row once into (N, n_q) int16 RQAE codes (resumes an interrupted run)."""
    store = _store(store)
    out = None if out is None else _store(out)
    from rqae_pipeline.codes import EncodeConfig, encode_store, open_codes

    path = encode_store(EncodeConfig(store=store, model=model, out=out, batch_size=batch_size, device=device))
    codes = open_codes(path)
    typer.echo(f"{path}: {codes.n:,} rows x {codes.n_q} layers of codes")


@app.command("codebook-stats")
def codebook_stats_command(
    store: Annotated[str, typer.Option(help="Activation store the codes were encoded from.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory.")],
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes; "
                                               "encoded first if missing).")] = None,
    out: Annotated[Path | None, typer.Option(help="Directory for codebook_stats.json and the PNG plots "
                                             "(default: beside the codes store).")] = None,
    prefix_layers: Annotated[int, typer.Option(help="Count distinct prefixes of 1..N layers (N <= 6).")] = 4,
    pairs_sample: Annotated[int, typer.Option(help="Projected codes sampled for the pairwise cosines.")] = 4096,
) -> None:
    """Codebook usage: distinct prefixes per layer count, code usage, projected-codebook cosines and norms."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.codebook_stats import CodebookStatsConfig, write_codebook_stats
    from rqae_pipeline.report.codebook import codebook_stats_lines

    result = write_codebook_stats(CodebookStatsConfig(store=store, model=model, codes=codes, out=out,
                                                      prefix_layers=prefix_layers, pairs_sample=pairs_sample))
    typer.echo("\n".join(codebook_stats_lines(result.stats, result.files)))


@app.command()
def search(
    store: Annotated[str, typer.Option(help="Activation store to search.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory.")],
    query: Annotated[str | None, typer.Option(help="Query text (run through the store's LM).")] = None,
    token_index: Annotated[int, typer.Option(help="Which token of --query (0-based; negative from the end).")] = -1,
    address: Annotated[str | None, typer.Option(help="A stored token as SEQ:POS instead of --query.")] = None,
    layers: Annotated[int | None, typer.Option(help="Prefix length m: intensity over layers 1..m "
                                               "(default: all).")] = None,
    top_k: int = 20,
    context: Annotated[int, typer.Option(help="Tokens shown either side of each hit.")] = 8,
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes; encoded "
                                               "first if missing).")] = None,
    include_special: Annotated[bool, typer.Option(help="Also rank BOS and norm-outlier tokens.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the hits as JSON here.")] = None,
) -> None:
    """Rank stored tokens by the L_i-weighted per-layer cosine similarity to one query token."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.token_search import QueryConfig, search_lines, search_tokens

    result = search_tokens(QueryConfig(
        store=store, model=model, addresses=() if address is None else (address,),
        texts=() if query is None else (query,), token_indices=() if query is None else (token_index,),
        layers=layers, top_k=top_k, context=context, codes=codes, include_special=include_special))
    typer.echo("\n".join(search_lines(result)))
    _write_json(out, result.to_dict())


@app.command()
def features(
    store: Annotated[str, typer.Option(help="Activation store to search.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory.")],
    address: Annotated[list[str], typer.Option(help="A stored query token SEQ:POS (repeatable).")] = [],  # noqa: B006
    query: Annotated[list[str], typer.Option(help="A query text (repeatable).")] = [],  # noqa: B006
    token_index: Annotated[list[int], typer.Option(help="Token of each --query (repeatable; one value "
                                                   "applies to all; default -1, the last).")] = [],  # noqa: B006
    split: Annotated[list[str], typer.Option(help="Also fit a sub-feature on these query numbers, e.g. 0,2 "
                                             "(repeatable; numbers follow the order printed).")] = [],  # noqa: B006
    layers: Annotated[int | None, typer.Option(help="Layers 1..m scored (default: all).")] = None,
    top_k: int = 20,
    context: Annotated[int, typer.Option(help="Tokens shown either side of each hit.")] = 8,
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the fitted feature(s) and hits as JSON here.")] = None,
) -> None:
    """Fit a von Mises-Fisher feature per layer to several query tokens, rank tokens by its
    L_i-weighted log-density, and optionally split it on subsets of the queries."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.token_search import QueryConfig, features_lines, fit_features

    splits = tuple(_parse_ints(s, "--split", "query numbers such as 0,2,3") for s in split)
    result = fit_features(QueryConfig(
        store=store, model=model, addresses=tuple(address), texts=tuple(query), token_indices=tuple(token_index),
        layers=layers, top_k=top_k, context=context, codes=codes, splits=splits))
    typer.echo("\n".join(features_lines(result)))
    _write_json(out, result.to_dict())


@app.command("feature-dictionary")
def feature_dictionary(
    store: Annotated[str, typer.Option(help="Activation store.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory.")],
    out: Annotated[Path, typer.Option(help="JSON file to write (for the dashboard).")],
    seeds: Annotated[int, typer.Option(help="Seed tokens sampled from the store; each gives a feature per "
                                       "prefix length.")] = 64,
    seed_draw: Annotated[str, typer.Option(help="'unique-tokens': a distinct token id uniformly, then one of its "
                                           "rows (the write-up's); 'occurrences': rows uniformly, so frequent "
                                           "tokens are seeded in proportion to their count.")] = "unique-tokens",
    layers: Annotated[str, typer.Option(help="Prefix lengths, comma-separated (capped at n_q).")] = "16,64,256",
    top_k: Annotated[int, typer.Option(help="Top examples kept per feature.")] = 16,
    context: Annotated[int, typer.Option(help="Tokens of text either side of an example.")] = 8,
    seed: int = 0,
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes).")] = None,
) -> None:
    """Features from seed tokens' code prefixes at 16/64/256 layers, each with its top examples, as JSON."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.features import (
        DictionaryConfig,
        build_feature_dictionary,
        dictionary_summary,
    )

    cfg = DictionaryConfig(store=store, model=model, out=out, codes=codes, seeds=seeds, seed_draw=seed_draw,
                           layers=_parse_ints(layers, "--layers", "prefix lengths such as 16,64,256"),
                           top_k=top_k, context=context, seed=seed)
    with _writing(out):
        result = build_feature_dictionary(cfg)
    typer.echo(f"{out}: {dictionary_summary(result)}, {top_k} examples each")


# --------------------------------------------------------------------------- steering and the dashboard


@app.command()
def steer(
    store: Annotated[str, typer.Option(help="Activation store (its LM, hook and normalisation are used).")],
    model: Annotated[Path, typer.Option(help="RQAE (or codebook, with --code) model directory.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt to continue (repeatable).")],
    feature: Annotated[str | None, typer.Option(help="DICT.json#ID (a feature-dictionary entry) or FEATURE.json[#NAME] "
                                                "(written by `rqae features --out`).")] = None,
    address: Annotated[list[str], typer.Option(help="Or query tokens: a stored token SEQ:POS (repeatable).")] = [],  # noqa: B006
    query: Annotated[list[str], typer.Option(help="Or query tokens: a query text (repeatable).")] = [],  # noqa: B006
    token_index: Annotated[list[int], typer.Option(help="Token of each --query (default -1).")] = [],  # noqa: B006
    code: Annotated[int | None, typer.Option(help="Codebook model: the code to activate.")] = None,
    strength: Annotated[float, typer.Option(help="0 (no steering) .. 1 (codes set to the feature's mean).")] = 0.8,
    top_k_layers: Annotated[int, typer.Option(help="Steer the RQAE layers with the k largest kappa.")] = 8,
    splice: Annotated[str, typer.Option(help="delta (add the change of the reconstruction, keep the error) or "
                                        "replace (splice the steered reconstruction).")] = "delta",
    word: Annotated[list[str], typer.Option(help="Concept word counted in the generations (repeatable; default: "
                                            "the feature's top-example tokens).")] = [],  # noqa: B006
    max_new_tokens: int = 32,
    samples: Annotated[int, typer.Option(help="Generations per prompt.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.5,
    repetition_penalty: float = 1.5,
    seed: int = 0,
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the generations and counts as JSON here.")] = None,
) -> None:
    """Generate with and without steering toward a feature; report how often its concept appears."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.steer import (
        GenerationConfig,
        SteerConfig,
        SteerRunConfig,
        run_steering,
        steering_lines,
    )

    cfg = SteerRunConfig(
        store=store, model=model, prompts=tuple(prompt), feature=feature, addresses=tuple(address),
        texts=tuple(query), token_indices=tuple(token_index), code=code, words=tuple(word), codes=codes,
        steer=SteerConfig(strength=strength, top_k_layers=top_k_layers, splice=splice),
        generation=GenerationConfig(max_new_tokens=max_new_tokens, samples=samples, temperature=temperature,
                                    repetition_penalty=repetition_penalty, seed=seed), device=device)
    result = run_steering(cfg, echo=lambda m: typer.echo(m, err=True))
    typer.echo("\n".join(steering_lines(result)))
    _write_json(out, result)


@app.command()
def dashboard(
    store: Annotated[str, typer.Option(help="Activation store.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory.")],
    out: Annotated[Path, typer.Option(help="Directory to write (index.html and the codebook plots).")],
    features: Annotated[Path | None, typer.Option(help="Feature dictionary JSON (`rqae feature-dictionary`); "
                                                 "default: built here and saved in OUT.")] = None,
    query: Annotated[list[str], typer.Option(help="A search query text (repeatable).")] = [],  # noqa: B006
    token_index: Annotated[list[int], typer.Option(help="Token of each --query (default -1).")] = [],  # noqa: B006
    address: Annotated[list[str], typer.Option(help="A stored query token SEQ:POS (repeatable).")] = [],  # noqa: B006
    layers: Annotated[int | None, typer.Option(help="Prefix length of the searches (default: all).")] = None,
    top_k: Annotated[int, typer.Option(help="Hits per search.")] = 10,
    examples: Annotated[int, typer.Option(help="Examples shown per feature.")] = 8,
    context: Annotated[int, typer.Option(help="Tokens either side of an example.")] = 8,
    seeds: Annotated[int, typer.Option(help="Seed tokens when the dictionary is built here.")] = 64,
    codes: Annotated[str | None, typer.Option(help="Codes store (default: the one `rqae encode` writes).")] = None,
    serve: Annotated[bool, typer.Option(help="Then serve OUT on http://127.0.0.1:PORT until Ctrl-C.")] = False,
    port: int = 8000,
) -> None:
    """A static HTML dashboard: features with intensity-shaded examples, searches and codebook plots."""
    store = _store(store)
    codes = None if codes is None else _store(codes)
    from rqae_pipeline.dashboard import (
        DashboardConfig,
        build_dashboard,
        serve_dashboard,
    )

    cfg = DashboardConfig(store=store, model=model, out=out, features=features, codes=codes, texts=tuple(query),
                          token_indices=tuple(token_index), addresses=tuple(address), query_layers=layers,
                          top_k=top_k, examples=examples, context=context, seeds=seeds)
    with _writing(out):
        index = build_dashboard(cfg, echo=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {index}")
    if serve:
        serve_dashboard(out, port, echo=typer.echo)


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="An activation store: a directory or a URL (s3://, gs://, ...).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar (one step per shard).")] = True,
) -> None:
    """Read every committed row of every array once: shard files present, checksums, shapes, the
    manifest's counts, finiteness, seq/pos and flags. Lists every problem found. Exit status: 0 when
    the store is intact, 1 when any damage is found, 2 when STORE is not an activation store."""
    store = _store(store)
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.verify import EXIT_DAMAGED, format_report, verify_store

    report = verify_store(ActivationStore.open(store), progress=progress)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(EXIT_DAMAGED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
