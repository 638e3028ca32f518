"""One declaration per parameter (issue 22, item 2): TrainConfig's fields, their checks, text forms, help and plug-ins."""
import inspect
import json
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli

from fvgpt_cache import equations, heads, parameters
from fvgpt_cache.grids import expand, parse_params, read_grid_file
from fvgpt_cache.parameters import InvalidParameterError, Parameter, register_parameter, unregister_parameter
from fvgpt_cache.records import RunInput
from fvgpt_cache.runs import load_head, run_id, save_head
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import PARAMETERS, RULES, TrainConfig, build_head, config_with, parse_value

DECLARED = list(PARAMETERS.values())
IDS = [p.name for p in DECLARED]
INPUTS = [RunInput(role="train", path="/x", fingerprint="0123abcd")]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"


def _error(p: Parameter, value) -> str:
    with pytest.raises(InvalidParameterError) as info:
        TrainConfig.from_dict({p.name: value}).validate()
    message = str(info.value)
    # the documented form: the parameter and its value, what is allowed, the default
    assert message.startswith(f"{p.name}={value!r}: use {p.allowed()}"), message
    assert message.endswith(f"default {p.format(p.default)}"), message
    return message


# ------------------------------------------------------------------ every field declared, once


def test_every_field_has_a_declaration_of_the_kind_its_annotation_says():
    names = [f.name for f in fields(TrainConfig) if f.name != "extra"]
    assert names == list(PARAMETERS)
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        p = PARAMETERS[f.name]
        assert parameters.ANNOTATIONS[f.type] == p.kind and p.default == f.default and p.help.strip()
        assert p.check(p.default) == p.default  # every default is allowed


def test_a_field_without_a_declaration_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Partial:
        a: int = parameters.param(1, "An a.")
        b: int = 2

    with pytest.raises(TypeError, match=r"Partial\.b: declare it with param"):
        parameters.declare_dataclass(Partial)


def test_the_heads_defaults_are_the_declared_defaults():
    """The keyword defaults of the heads (for direct use in tests and notebooks) do not drift from the declarations."""
    signature = inspect.signature(heads.FVGPTHead.__init__).parameters
    for name in TrainConfig().head_kwargs():
        assert signature[name].default == PARAMETERS[name].default, name
    losses = inspect.signature(heads.FVGPTHead.losses_from).parameters
    for name in [*(n for n in TrainConfig().loss_flags() if n != "loss_weights"), "lambda_d"]:  # registered terms: a dict
        assert losses[name].default == PARAMETERS[name].default, name
    same = {heads.GateMLP: {"hidden": "gate_hidden", "layers": "frg_layers"},
            heads.Adapter: {"hidden": "fdc_hidden", "layers": "fdc_layers", "init_scale": "fdc_init_scale"},
            heads.FDC: {"hidden": "fdc_hidden", "layers": "fdc_layers", "init_scale": "fdc_init_scale"},
            equations.usable_foreground: {"area_min": "area_min", "area_max": "area_max"},
            equations.frg_target: {"margin": "frg_margin"}}
    for function, names in same.items():
        signature = inspect.signature(function).parameters
        for arg, name in names.items():
            assert signature[arg].default == PARAMETERS[name].default, (function, arg)


def test_the_heads_do_not_validate_again():
    """FVGPTHead, GateMLP and Adapter trust their arguments: no check, no message of their own."""
    for init in (heads.FVGPTHead.__init__, heads.GateMLP.__init__, heads.Adapter.__init__):
        assert "raise" not in inspect.getsource(init)
    heads.FVGPTHead(8, r_source="gate")  # built as asked; a TrainConfig would have refused it
    linear = [m for m in heads.GateMLP(3, hidden=4, layers=4).mlp if isinstance(m, heads.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(3, 4), (4, 4), (4, 4), (4, 1)]  # as asked, too
    with pytest.raises(ValueError, match="r_source='gate': use one of frg, full, fg"):
        build_head(8, TrainConfig(r_source="gate"))


def test_the_run_id_of_configurations_without_plugins_did_not_change():
    """Pinned against the values computed on main before the declarations (run ids hash `to_dict()`)."""
    assert run_id(INPUTS, TrainConfig()) == "628b04baf80c5076"
    mmrl = {"optimizer": "adamw", "lr": 0.001, "lambda_d": 5.0, "batch_size": 32, "epochs": 5, "warmup_epochs": 0}
    cfg = TrainConfig(**mmrl, backbone="mmrl", frg_indicators=("dH", "cos")).validate()
    assert run_id(INPUTS, cfg) == "3cb74b7980c09dab"
    assert "extra" not in TrainConfig().to_dict()


# ------------------------------------------------------------------ each kind of bad value


@pytest.mark.parametrize("p", [p for p in DECLARED if p.low is not None], ids=lambda p: p.name)
def test_below_low_is_refused(p):
    value = p.low if p.low_open else p.low - 1
    _error(p, int(value) if p.kind == "int" else float(value))


@pytest.mark.parametrize("p", [p for p in DECLARED if p.high is not None], ids=lambda p: p.name)
def test_above_high_is_refused(p):
    value = p.high if p.high_open else p.high + 1
    _error(p, int(value) if p.kind == "int" else float(value))


@pytest.mark.parametrize("p", [p for p in DECLARED if p.choices is not None], ids=lambda p: p.name)
def test_not_in_choices_is_refused(p):
    bad = max(p.allowed_choices()) + 1 if p.kind == "int" else ("nope",) if p.kind == "names" else "nope"
    _error(p, bad)
    if p.kind == "names":
        first = p.allowed_choices()[0]
        _error(p, (first, first))  # a name twice
        _error(p, ())  # none


WRONG_TYPE = {"bool": "yes", "int": 2.5, "float": "0.5", "str": 3, "optional_str": 3, "names": "dH"}


@pytest.mark.parametrize("p", DECLARED, ids=IDS)
def test_a_value_of_the_wrong_type_is_refused(p):
    _error(p, WRONG_TYPE[p.kind])
    if p.kind in ("int", "float"):
        _error(p, True)  # a bool is not a number here


def test_values_are_normalised():
    cfg = TrainConfig(lambda_d=np.int64(5), epochs=np.int64(3), use_frg=np.bool_(False),
                      frg_indicators=["dH", "cos"]).validate()
    assert (cfg.lambda_d, cfg.epochs, cfg.use_frg, cfg.frg_indicators) == (5.0, 3, False, ("dH", "cos"))
    assert type(cfg.lambda_d) is float and type(cfg.epochs) is int and type(cfg.use_frg) is bool


@pytest.mark.parametrize("values, message", [
    ({"warmup_epochs": 3, "epochs": 3}, "warmup_epochs=3, epochs=3: use 0 ≤ warmup_epochs < epochs"),
    ({"area_min": 0.5, "area_max": 0.4}, "area_min=0.5, area_max=0.4: use area_min ≤ area_max"),
])
def test_rules_name_every_field_they_relate(values, message):
    assert {r.name for r in RULES} == {"warmup_shorter_than_training", "area_range"}
    with pytest.raises(InvalidParameterError) as info:
        TrainConfig(**values).validate()
    assert str(info.value).startswith(message)


def test_unknown_names_get_the_valid_ones_and_a_close_match():
    with pytest.raises(ValueError, match="unknown parameter 'lamda_d' \\(did you mean lambda_d\\?\\); valid parameters: "
                                         "backbone, classes"):
        TrainConfig.from_dict({"lamda_d": 1.0})
    with pytest.raises(ValueError, match="unknown parameter 'lamda_d'"):
        parse_value("lamda_d", "1")


# ------------------------------------------------------------------ the text form


@pytest.mark.parametrize("p", DECLARED, ids=IDS)
def test_parse_reads_back_what_format_writes(p):
    values = [p.default]
    choices = p.allowed_choices()
    if p.kind == "names":
        values.append(tuple(reversed(choices[:2])))
    elif choices is not None:
        values += list(choices)
    elif p.kind == "bool":
        values.append(not p.default)
    elif p.kind in ("int", "float"):
        values.append(p.check((p.low or 0) + (0.25 if p.kind == "float" else 3)))
    elif p.kind == "optional_str":
        values.append("coop")
    for value in values:
        assert p.parse(p.format(value)) == value
        assert parse_value(p.name, " " + p.format(value) + " ") == value


def test_parse_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"parameter epochs='ten' is not a valid int: use an integer ≥ 1"):
        parse_value("epochs", "ten")
    with pytest.raises(ValueError, match="frg_layers=5: use one of 1, 2, 3 \\(Table 5\\); default 2"):
        parse_value("frg_layers", "5")
    assert parse_value("use_frg", "off") is False and parse_value("backbone", "auto") is None
    assert parse_value("frg_indicators", "dH+cos") == parse_value("frg_indicators", "dH;cos") == ("dH", "cos")


def test_grid_files_take_native_toml_values(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('[params]\nlambda_d = [1, 5]\nfrg_indicators = ["dH+cos", ["area"]]\n'
                    '[base]\nuse_pc = false\nbrg_indicators = ["H_bb", "cos"]\n')
    params, extra = read_grid_file(grid)
    assert params == {"lambda_d": [1.0, 5.0], "frg_indicators": [("dH", "cos"), ("area",)]}
    assert extra["base"] == {"use_pc": False, "brg_indicators": ("H_bb", "cos")}
    grid.write_text("[params]\nepochs = [10.5]\n")
    with pytest.raises(ValueError, match=r"epochs=10.5: use an integer ≥ 1 \(got a float\)"):
        read_grid_file(grid)


# ------------------------------------------------------------------ help: the CLI and the docs


def test_cli_params_lists_every_parameter_with_its_help():
    done = run_cli("params")
    assert done.exit_code == 0, done.output
    assert max(map(len, done.output.splitlines())) <= 80
    flat = " ".join(done.output.split())
    for p in DECLARED:
        assert f"{p.name} ({p.kind}) {' '.join(p.help_text().split())}" in flat
    listed = json.loads(run_cli("params", "--format", "json").output)
    assert [d["name"] for d in listed] == IDS and listed[0]["help"] == DECLARED[0].help
    assert " ".join(run_cli("params", "lr").output.split()) == f"lr (float) {PARAMETERS['lr'].help_text()}"
    assert "unknown parameter 'lrr'" in run_cli("params", "lrr").output


def test_train_and_grid_help_point_at_the_parameter_list():
    for command in ("train", "grid"):
        assert "fvgpt-cache params" in " ".join(run_cli(command, "--help").output.split())


def test_the_docs_page_is_the_declarations():
    """docs/parameters.md holds `fvgpt-cache params --format markdown` as it is now."""
    assert parameters.markdown_table(PARAMETERS) in DOCS.read_text()
    assert run_cli("params", "--format", "markdown").output == parameters.markdown_table(PARAMETERS)


# ------------------------------------------------------------------ plug-in parameters


@pytest.fixture()
def plugin():
    p = register_parameter(Parameter("lambda_test", "float", 0.0, "Weight of a test loss term.", low=0))
    try:
        yield p
    finally:
        unregister_parameter("lambda_test")


def test_register_refuses_declared_names(plugin):
    with pytest.raises(ValueError, match="'lr' is a built-in training parameter"):
        register_parameter(Parameter("lr", "float", 0.0, "Another lr."))
    with pytest.raises(ValueError, match="'lambda_test' is already registered"):
        register_parameter(Parameter("lambda_test", "float", 0.0, "Again."))
    with pytest.raises(InvalidParameterError, match="lambda_bad=-1.0"):
        register_parameter(Parameter("lambda_bad", "float", -1.0, "A default out of its own range.", low=0))


def test_a_plugin_parameter_is_a_parameter_everywhere(plugin):
    default = TrainConfig()
    assert parse_params(["lambda_test=0,0.5"]) == {"lambda_test": [0.0, 0.5]}
    assert parse_value("lambda_test", "0.25") == 0.25
    cfg = config_with(default, lambda_test=0.5)
    assert cfg.get("lambda_test") == 0.5 and default.get("lambda_test") == 0.0 and cfg.get("lr") == default.lr
    assert cfg.to_dict()["lambda_test"] == 0.5 and "extra" not in cfg.to_dict()
    assert run_id(INPUTS, cfg) != run_id(INPUTS, default)
    at_default = config_with(default, lambda_test=0.0)
    assert "lambda_test" not in at_default.to_dict() and run_id(INPUTS, at_default) == run_id(INPUTS, default)
    assert at_default == default and at_default.extra == {}
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg  # what a record stores reads back
    from fvgpt_cache.runs import record_slot, run_slot

    record = SimpleNamespace(inputs=INPUTS, cache="/x", config=cfg.to_dict())  # the parts of a RunRecord a slot reads
    assert record_slot(record) == run_slot(["/x"], cfg.to_dict()) != run_slot(["/x"], default.to_dict())
    assert "lambda_test" in TrainConfig.parameter_names() and "lambda_test" not in TrainConfig.field_names()
    with pytest.raises(ValueError, match=r"lambda_test=-1.0: use a number ≥ 0"):
        config_with(default, lambda_test=-1.0)
    with pytest.raises(ValueError, match=r"parameter lambda_test='x' is not a valid float"):
        parse_params(["lambda_test=x"])
    assert "lambda_test (float) Weight of a test loss term." in " ".join(run_cli("params").output.split())


def test_a_plugin_parameter_varies_in_a_grid_and_survives_a_saved_head(plugin, tmp_path):
    syn = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=2, views=2, dim=16, test_per_class=2)
    runs = expand([syn], [1], parse_params(["lambda_test=0,2"]), {"lambda_d": 1.0})
    assert [r.config.get("lambda_test") for r in runs] == [0.0, 2.0]
    assert runs[0].run_id != runs[1].run_id and runs[1].params == {"lambda_test": 2.0}
    cfg = runs[1].config
    save_head(build_head(16, cfg), cfg, 16, tmp_path / "head.pt")
    assert load_head(tmp_path / "head.pt")[1].get("lambda_test") == 2.0
    unregister_parameter("lambda_test")
    try:
        with pytest.raises(ValueError, match="unknown parameter 'lambda_test'"):
            load_head(tmp_path / "head.pt")
        with pytest.raises(ValueError, match="unknown parameter 'lambda_test'"):
            cfg.validate()
    finally:
        register_parameter(plugin)


def test_a_plugin_parameter_is_set_from_the_command_line(plugin, tmp_path):
    syn = write_feature_cache(tmp_path / "syn.h5", num_classes=4, shots=2, views=2, dim=16, test_per_class=2)
    done = run_cli("train", syn, "--set", "lambda_test=-2", "--epochs", "2")
    assert done.exit_code == 2 and "lambda_test=-2.0: use a number ≥ 0" in done.output
    done = run_cli("train", syn, "--set", "lambda_test=0.5", "--epochs", "2", "--json", "--out", tmp_path / "run")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["lambda_test"] == 0.5


def test_a_plugin_parameter_is_a_sweep_axis_of_reports(plugin):
    from fvgpt_cache.reports import sweep

    def record(config, base):  # the parts of a RunRecord a sweep reads
        return SimpleNamespace(config=config, dataset="d", metrics={"fvgpt": {"base": base, "new": base - 10}})

    out = sweep([record({"lambda_test": 2.0}, 80.0), record({}, 60.0)], "lambda_test")  # {}: at its default
    assert {v: row["base"] for v, row in out["d"].items()} == {0.0: 60.0, 2.0: 80.0}
    with pytest.raises(ValueError, match="unknown parameter 'lambda_tst'"):
        sweep([], "lambda_tst")
