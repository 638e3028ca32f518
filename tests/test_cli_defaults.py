"""CLI defaults the library also owns (issue 22, item 2).

The training commands leave TrainConfig's parameters unset unless given (the declarations own them;
tests/test_parameters.py). The other commands keep literal defaults so that `--help` shows them
without importing torch at start-up; this test holds each one equal to the option class it fills, so
the two cannot drift apart.
"""
import dataclasses
import inspect

import pytest

from fvgpt_cache.backbones import BackboneConfig
from fvgpt_cache.cli import backbone, extract, grid, masks, train
from fvgpt_cache.cli.extract import parse_batch_size, parse_scale
from fvgpt_cache.data import parse_shots
from fvgpt_cache.extraction import ExtractOptions
from fvgpt_cache.fg_sources import SourceOptions
from fvgpt_cache.masks import MapSettings, MaskOptions

READ = {"shots": parse_shots, "batch_size": lambda v: parse_batch_size(v) if isinstance(v, str) else v,
        "splits": lambda v: tuple(v.split(",")), "rrc_scale": parse_scale}
RENAMED = {"dtype": "store_dtype", "map_kind": "map"}
COMMANDS = [(extract.extract, [ExtractOptions]), (masks.masks, [MaskOptions, MapSettings]),
            (masks.add_masks, [SourceOptions]), (backbone.backbone_train, [BackboneConfig])]


def _cli_defaults(command) -> dict:
    return {name: p.default.default for name, p in inspect.signature(command).parameters.items()}


@pytest.mark.parametrize("command, classes", COMMANDS, ids=lambda c: getattr(c, "__name__", ""))
def test_cli_literal_defaults_equal_the_library_ones(command, classes):
    library = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)
               if f.default is not dataclasses.MISSING}
    compared = 0
    for name, default in _cli_defaults(command).items():
        field = RENAMED.get(name, name)
        if field not in library or default is None:  # None: unset, the library's default applies
            continue
        assert READ.get(name, lambda v: v)(default) == library[field], f"{command.__name__} --{name}"
        compared += 1
    assert compared >= 4


def test_augmentation_default_is_the_library_one():
    from fvgpt_cache.views import AugmentConfig

    assert parse_scale(_cli_defaults(extract.extract)["rrc_scale"]) == tuple(AugmentConfig().scale)


def test_training_commands_restate_no_training_default():
    """Every option of train and grid that sets a TrainConfig parameter is unset (None) unless given."""
    from fvgpt_cache.training import PARAMETERS

    aliases = {"frg": "use_frg", "fdc": "use_fdc", "pc": "use_pc", "lambda_new": "lambda_pc"}
    for command in (train.train, grid.grid):
        for name, default in _cli_defaults(command).items():
            if aliases.get(name, name) in PARAMETERS:
                assert default is None, f"{command.__name__} --{name} restates {default!r}"
