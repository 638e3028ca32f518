"""`params`: the training parameters that `train --set`, `grid --param` and grid files take, from their declarations."""
from __future__ import annotations

import json
import textwrap
from typing import Optional

import typer

from .common import app

FORMATS = ("text", "markdown", "json")


@app.command()
def params(
    names: Optional[list[str]] = typer.Argument(None, help="Only these parameters (default: all)."),
    fmt: str = typer.Option("text", "--format", help="text|markdown|json"),
):
    """List the training parameters: type, default, allowed values and what each does.

    Every one can be set with `train --set NAME=VALUE`, varied with `grid --param NAME=V1,V2` or in a
    grid file; plug-in parameters registered in this process are listed after the built-in ones."""
    from fvgpt_cache import PARAMETERS  # noqa: F401  (declares TrainConfig's parameters)
    from fvgpt_cache import all_parameters, lookup_parameter as lookup, parameters_table as markdown_table

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    chosen = {n: lookup(n) for n in names} if names else all_parameters()
    if fmt == "markdown":
        typer.echo(markdown_table(chosen), nl=False)
    elif fmt == "json":
        typer.echo(json.dumps([{"name": p.name, "kind": p.kind, "default": p.to_json(p.default),
                                "allowed": p.allowed(), "fix": p.fix, "help": p.help} for p in chosen.values()],
                              indent=1))
    else:
        for p in chosen.values():  # fits 80 columns
            typer.echo(f"{p.name} ({p.kind})\n" + textwrap.fill(p.help_text(), 80, initial_indent="    ",
                                                                subsequent_indent="    ", break_on_hyphens=False))
