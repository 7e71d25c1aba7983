"""What the `rqae` command modules share: exit codes, the one-line failure, option parsing and
store locations. It sits below the command modules (and below cli.py, which registers them), so
none of them has to import cli.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from rqae_pipeline import RQAEError

EXIT_USER_ERROR = 2
EXIT_CORPUS_EXHAUSTED = 3  # harvest: the corpus ran out first; the store holds what it gave
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def echo_err(message: str) -> None:
    """Progress and notices go to stderr, so stdout holds only the command's result."""
    typer.echo(message, err=True)


def store_location(value: str):
    """A store option's value as a location: a Path, or a URL whose filesystem is installed
    (urls.location; never `Path("s3://...")`, which is a local folder named `s3:`)."""
    from rqae_pipeline.urls import location

    return location(value)


def optional_store_location(value: str | None):
    return None if value is None else store_location(value)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing the command's output reads `cannot write PATH: reason`."""
    try:
        yield
    except OSError as e:
        raise RQAEError(f"cannot write {path}: {e.strerror or e}") from None


def check_out(out: Path | None) -> None:
    """A command's --out file refused before its work when it could not be written."""
    if out is not None:
        from rqae_pipeline.io import check_output_file

        check_output_file(out)


def parse_ints(text: str, option: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} expects comma-separated {example}; got {text!r}")


def write_json(out: Path | None, result: dict) -> None:
    """Write a command's result as JSON to --out, when given, and say so."""
    if out is None:
        return
    from rqae_pipeline.io import atomic_write_bytes, json_text

    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json_text(result).encode())
    typer.echo(f"wrote {out}")
