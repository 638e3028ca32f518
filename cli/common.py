"""What every command shares: the Typer app, the consoles, progress bars and the error exit."""
from __future__ import annotations

from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

app = typer.Typer(help="FVG-PT heads trained from cached CLIP features.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "… img/s", style="progress.data.speed")


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


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)



def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"
