"""`rqae encode`, `codebook-stats`, `search`, `features`, `feature-dictionary`, `steer` and
`dashboard`: the tools that work on a trained RQAE's codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rqae_pipeline.cli_common import (
    check_out,
    echo_err,
    fail,
    optional_store_location,
    parse_ints,
    store_location,
    write_json,
    writing,
)


def encode(
    store: Annotated[str, typer.Option(help="Activation store to encode.")],
    model: Annotated[Path, typer.Option(help="RQAE model directory written by `rqae train`.")],
    out: Annotated[str | None, typer.Option(help="Codes store to write (default: STORE.codes/<model>-<hash>.zarr "
                                             "beside the store).")] = None,
    batch_size: int = 4096,
    device: Annotated[str | None, typer.Option(help="cuda/cpu; default: cuda when present.")] = None,
) -> None:
    """Encode every store row once into (N, n_q) int16 RQAE codes (resumes an interrupted run)."""
    store = store_location(store)
    out = optional_store_location(out)
    from rqae_pipeline.codes import EncodeConfig, encode_store, open_codes

    path = encode_store(EncodeConfig(store=store, model=model, out=out, batch_size=batch_size, device=device))
    codes = open_codes(path)
    typer.echo(f"{path}: {codes.n:,} rows x {codes.n_q} layers of codes")


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
    store = store_location(store)
    codes = optional_store_location(codes)
    from rqae_pipeline.codebook_stats import CodebookStatsConfig, write_codebook_stats
    from rqae_pipeline.report.codebook import codebook_stats_lines

    result = write_codebook_stats(CodebookStatsConfig(store=store, model=model, codes=codes, out=out,
                                                      prefix_layers=prefix_layers, pairs_sample=pairs_sample))
    typer.echo("\n".join(codebook_stats_lines(result.stats, result.files)))


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
    store = store_location(store)
    check_out(out)
    codes = optional_store_location(codes)
    from rqae_pipeline.token_search import QueryConfig, search_lines, search_tokens

    result = search_tokens(QueryConfig(
        store=store, model=model, addresses=() if address is None else (address,),
        texts=() if query is None else (query,), token_indices=() if query is None else (token_index,),
        layers=layers, top_k=top_k, context=context, codes=codes, include_special=include_special))
    typer.echo("\n".join(search_lines(result)))
    write_json(out, result.to_dict())


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
    store = store_location(store)
    check_out(out)
    codes = optional_store_location(codes)
    from rqae_pipeline.token_search import QueryConfig, features_lines, fit_features

    splits = tuple(parse_ints(s, "--split", "query numbers such as 0,2,3") for s in split)
    result = fit_features(QueryConfig(
        store=store, model=model, addresses=tuple(address), texts=tuple(query), token_indices=tuple(token_index),
        layers=layers, top_k=top_k, context=context, codes=codes, splits=splits))
    typer.echo("\n".join(features_lines(result)))
    if out is not None:  # the model the vMFs belong to: `rqae steer` refuses them for another
        from rqae_pipeline.codes import model_identity

        write_json(out, {**result.to_dict(), "model": model_identity(model)})


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
    store = store_location(store)
    check_out(out)
    codes = optional_store_location(codes)
    from rqae_pipeline.features import (
        DictionaryConfig,
        build_feature_dictionary,
        dictionary_summary,
    )

    cfg = DictionaryConfig(store=store, model=model, out=out, codes=codes, seeds=seeds, seed_draw=seed_draw,
                           layers=parse_ints(layers, "--layers", "prefix lengths such as 16,64,256"),
                           top_k=top_k, context=context, seed=seed)
    with writing(out):
        result = build_feature_dictionary(cfg)
    typer.echo(f"{out}: {dictionary_summary(result)}, {top_k} examples each")


def steer(
    store: Annotated[str, typer.Option(help="Activation store (its LM, hook and normalisation are used).")],
    model: Annotated[Path, typer.Option(help="RQAE (or codebook, with --code) model directory.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt to continue (repeatable).")],
    feature: Annotated[str | None, typer.Option(help="DICT.json#ID (a feature-dictionary entry), or FEATURE.json "
                                                "or FEATURE.json#NAME (written by `rqae features --out`).")] = None,
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
    store = store_location(store)
    check_out(out)
    codes = optional_store_location(codes)
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
    result = run_steering(cfg, echo=echo_err)
    typer.echo("\n".join(steering_lines(result)))
    write_json(out, result)


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
    if serve and not 0 < port < 65536:  # before the dashboard is built, not after
        fail(f"--port must be in 1..65535, got {port}")
    store = store_location(store)
    codes = optional_store_location(codes)
    from rqae_pipeline.dashboard import (
        DashboardConfig,
        build_dashboard,
        serve_dashboard,
    )

    cfg = DashboardConfig(store=store, model=model, out=out, features=features, codes=codes, texts=tuple(query),
                          token_indices=tuple(token_index), addresses=tuple(address), query_layers=layers,
                          top_k=top_k, examples=examples, context=context, seeds=seeds)
    with writing(out):
        index = build_dashboard(cfg, echo=echo_err)
    typer.echo(f"wrote {index}")
    if serve:
        serve_dashboard(out, port, echo=typer.echo)
