"""Options whose choices follow the backbone-method registry (`fvgpt_cache.methods`), checked at call time.

A method registered after import (from a plugin or a notebook) is accepted: the choices are not frozen
into the option when the CLI is built, they are read from the registry when the command runs.
"""
from __future__ import annotations

import typer

PRESET_OF_HELP = ("none (plain defaults), or the name of a backbone method to use its preset (`fvgpt-cache "
                  "backbone methods` lists them).")


def _check_preset_of(value: str) -> str:
    from fvgpt_cache import preset_choices

    choices = preset_choices()
    if value not in choices:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(choices)}")
    return value


def preset_of_option(first: str):
    """`--preset-of`, its help starting with `first` (what auto means for the command)."""
    return typer.Option("auto", callback=_check_preset_of, help=f"{first}, {PRESET_OF_HELP}")
