"""The `rqae` command line: the one `app`, its single error handler and the registration of the
commands, which live in cli_store, cli_train, cli_eval and cli_tools (option declarations over the
stage functions, their printed results and exit codes). Errors are handled once, in `Commands.invoke`."""

from __future__ import annotations

import typer
from typer._click.exceptions import UsageError  # typer vendors click: its own exception classes
from typer.core import TyperGroup

from rqae_pipeline import RQAEError, cli_eval, cli_store, cli_tools, cli_train
from rqae_pipeline.cli_common import EXIT_INTERRUPTED, fail


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
            fail(str(e))
        except UsageError as e:
            where = f"rqae {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else "rqae"
            fail(f"{e.format_message()} (see `{where} --help`)")
        except ValueError as e:
            if not _raised_by_config(e):
                raise
            fail(str(e))
        except KeyboardInterrupt:
            _interrupted()


def _interrupted() -> None:
    typer.echo("interrupted", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


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

# `rqae --help` lists the commands in this order: the pipeline's, not alphabetical or by module
COMMANDS = (
    ("harvest", cli_store.harvest),
    ("inspect", cli_store.inspect),
    ("train", cli_train.train),
    ("demo", cli_train.demo),
    ("sweep", cli_train.sweep),
    ("eval", cli_eval.eval_command),
    ("compare-gemmascope", cli_eval.compare_gemmascope),
    ("archs", cli_train.archs),
    ("encode", cli_tools.encode),
    ("codebook-stats", cli_tools.codebook_stats_command),
    ("search", cli_tools.search),
    ("features", cli_tools.features),
    ("feature-dictionary", cli_tools.feature_dictionary),
    ("steer", cli_tools.steer),
    ("dashboard", cli_tools.dashboard),
    ("verify", cli_store.verify),
)
for name, command in COMMANDS:
    app.command(name)(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
