"""What every command shares: the Typer app, the consoles, progress bars and the error handling.

Errors are handled here and only here (`HandledGroup`): a command raises, and every exception that
reaches the app is printed as one `error:` paragraph without a traceback (`fvgpt-cache --debug …`
or FVGPT_CACHE_DEBUG=1 shows it). ValueError, OSError and RuntimeError are the user's (bad input, a
missing file: the message says what to do); anything else is called an unexpected error. Usage
errors (a mistyped command or option) are click's own message with its close matches and the
`--help` hint. Ctrl-C exits with status 130 and, for commands that resume (`resumable()`), says that
rerunning the same command resumes.
"""
from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click (typer._click); older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import ClickException

console = Console()
err = Console(stderr=True)
_state = {"debug": False, "resumable": False}
INTERRUPTED = 130


def resumable() -> None:
    """Called by commands whose rerun continues where an interrupted run stopped."""
    _state["resumable"] = True


def _show_traceback() -> None:
    if _state["debug"] and sys.exc_info()[0] is not None:
        err.print(escape("".join(traceback.format_exc())), highlight=False, soft_wrap=True)


def _report(exc: BaseException) -> None:
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError, RuntimeError)) or isinstance(exc, (NotImplementedError, RecursionError)):
        message = (f"{type(exc).__name__}: {message} (an unexpected error; rerun with fvgpt-cache --debug … for the "
                   "traceback and report it)")
    _show_traceback()
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


class HandledGroup(TyperGroup):
    """The root command group: one place that turns exceptions and Ctrl-C into messages and exit codes."""

    def invoke(self, ctx: typer.Context):
        _state.update(resumable=False, debug=False)
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, ClickException):  # exit codes, and usage errors click prints itself
            raise
        except KeyboardInterrupt:
            _show_traceback()
            hint = "; rerun the same command to resume" if _state["resumable"] else ""
            err.print(f"[yellow]interrupted{hint}[/]", highlight=False)
            raise typer.Exit(code=INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001  (the one handler: no traceback for the user)
            _report(exc)
            raise typer.Exit(code=2) from None


# rich_markup_mode=None: help texts are shown as written ([params], [base] are literal text).
app = typer.Typer(help="FVG-PT heads trained from cached CLIP features.", no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None, cls=HandledGroup)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", envvar="FVGPT_CACHE_DEBUG",
                                     help="Show the traceback of an error."),
          plugin: list[str] = typer.Option([], "--plugin", envvar="FVGPT_CACHE_PLUGINS",
                                           help="A Python module (name or .py file) to import first: it registers "
                                                "indicators, loss terms, backbone methods or parameters; repeatable. "
                                                "Installed packages' fvgpt_cache.plugins entry points load too.")
          ) -> None:
    from fvgpt_cache import load_plugins

    _state["debug"] = debug
    load_plugins(plugin)


def narrow_table(title: str | None = None, **kwargs) -> Table:
    """A table that fits 80 columns: no vertical borders, one rule under the header."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, **kwargs)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "- img/s", style="progress.data.speed")


@contextmanager
def split_progress():
    """A rich progress bar per split; yields the callback the library calls after each batch."""
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as bar:
        def update(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(split, total=total, completed=done)
            bar.update(tasks[split], completed=done)
        yield update


def rank_rates(ranks: list[dict]) -> str:
    """The final line of a torchrun job: images per second of every rank's pass and of the whole job."""
    rate = lambda rows, seconds: rows / seconds if seconds > 0 else 0.0  # noqa: E731
    each = ", ".join(f"rank {r['rank']} {rate(r['rows'], r['seconds']):.1f} img/s ({r['rows']} images)" for r in ranks)
    total = rate(sum(r["rows"] for r in ranks), max(r["seconds"] for r in ranks))
    return f"{len(ranks)} processes: {each}; total {total:.1f} img/s"


DIST_TIMEOUT_HELP = ("torchrun jobs: seconds without a heartbeat from a rank before the others stop (a rank whose "
                     "process or node is gone).")


def fail(message: str) -> NoReturn:
    """Stop the command with `message` as its one `error:` paragraph (a command's own check of its
    options); the command group prints it, as it prints every error (module docstring)."""
    raise ValueError(message)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"
