"""The `fvgpt-cache` command line: one module per command group, each a thin shell over the library."""
from . import backbone, demo, extract, grid, masks, params, run, train  # noqa: F401  (each module registers its commands)
from .common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
