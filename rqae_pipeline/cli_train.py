"""`rqae train`, `sweep`, `archs` and `demo`: training runs on a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rqae_pipeline.cli_common import EXIT_INTERRUPTED, fail, store_location


def _parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:  # not JSON: the plain string
            out[key] = value
    return out


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
    streams: Annotated[int | None, typer.Option(
        help="Shuffled streams each global batch is read from in equal parts; each process reads only its own. "
             "Default: one per process (a resumed run keeps its own). The data order depends on it: pass the same "
             "--streams to compare runs on different numbers of processes.")] = None,
) -> None:
    """Train an RQAE, a codebook autoencoder or a sae-lens SAE on a store, without the LM."""
    store = store_location(store)
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.store import ActivationStore
    from rqae_pipeline.train import TrainConfig
    from rqae_pipeline.train import train as run_train

    d_in = ActivationStore.open(store).d
    spec = ModelSpec(arch=arch, d_in=d_in, n_q=n_q, d_sae=d_sae, k=k, lr=lr,  # None: the architecture's default
                     prefix_loss=prefix_loss, mean_init=mean_init, options=_parse_options(option), dtype=dtype)
    cfg = TrainConfig(store=store, out=out, model=spec, batch_size=batch_size, tokens=tokens, seed=seed,
                      heldout_fraction=heldout, checkpoint_every=checkpoint_every, eval_every=eval_every,
                      device=device, resume=resume, streams=streams)
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
    from rqae_pipeline.launch import launch_training

    code = launch_training(cfg, nproc)
    if code == EXIT_INTERRUPTED:
        typer.echo(f"interrupted: resume from the checkpoint in {cfg.out}; rerun with --resume", err=True)
    if code:
        raise typer.Exit(code)  # the ranks said why on stderr
    h = json.loads((Path(cfg.out) / "train.json").read_text())["heldout_metrics"]
    typer.echo(f"{cfg.out}: {cfg.model.arch} held-out FVU {h['fvu']:.4f}, MSE {h['mse']:.4g} on {h['tokens']:,} "
               f"tokens ({nproc} processes)")


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
    store = store_location(store)
    from rqae_pipeline.io import atomic_write_text
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
    atomic_write_text(out / "quality.json", json.dumps(jsonable(evaluated), indent=1))
    typer.echo(format_quality_table(evaluated))


def archs() -> None:
    """List the trainable architectures."""
    from rqae_pipeline.models.sae import sae_architectures

    typer.echo("\n".join(["rqae", "codebook", *(f"{a}-sae" for a in sae_architectures())]))


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
