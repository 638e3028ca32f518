"""Registered indicators and loss terms: defined in a few lines, batched in grids, equal to their references."""
import copy

import pytest
import torch
from conftest import assert_close_history
from test_engine_parity import gradient_errors, random_configs, reference_losses

from fvgpt_cache.engine import Group, gather, shape_parts, train_head
from fvgpt_cache.grids import expand, group_key, parse_params, run_grid
from fvgpt_cache import register_indicator, register_loss_term, unregister_indicator, unregister_loss_term
from fvgpt_cache.equations import entropy
from fvgpt_cache.runs import run_training
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig, config_with, parse_value, prepare

SMALL = dict(num_classes=6, shots=8, views=2, dim=32, test_per_class=10)


@pytest.fixture()
def fg_entropy():
    """A user-defined FRG indicator: the foreground view's own entropy, in a few lines."""
    @register_indicator("H_fg", "frg")
    def fg_entropy(s):
        """H(p_fg): how unsure the foreground view alone is."""
        return entropy(s.p_fg)

    yield fg_entropy
    unregister_indicator("H_fg", "frg")


@pytest.fixture()
def mse_term():
    """A user-defined loss term: the MSE between FDC's and the foreground view's probabilities at τ."""
    @register_loss_term("mse_fg", needs=("fdc",))
    def mse_fg(t):
        """MSE between softmax(z_FDC/τ) and p_fg."""
        return (t.log_q.exp() - t.p_fg).square().mean(-1)

    yield mse_fg
    unregister_loss_term("mse_fg")


@pytest.fixture()
def ce_again():
    """The built-in CE of the FDC logits, registered again as a plug-in."""
    register_loss_term("ce_again", lambda t: -(t.z_fdc.log_softmax(-1) * t.onehot).sum(-1), help="CE(z_FDC, y)")
    yield
    unregister_loss_term("ce_again")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_feature_cache(tmp_path_factory.mktemp("pl") / "pl.h5", num_classes=6, shots=8, views=3, dim=32,
                               test_per_class=5)
    return prepare(open_cache(path), TrainConfig())


def test_a_registered_indicator_is_ablated_in_a_grid_and_each_row_equals_its_single_run(fg_entropy, tmp_path):
    cache = write_feature_cache(tmp_path / "syn.h5", **SMALL)
    params = parse_params(["frg_indicators=dH+cos+area,dH+cos+area+H_fg,H_fg", "brg_layers=1,2"])
    runs = expand([cache], [1], params, TrainConfig(epochs=2))
    assert len(runs) == 6
    assert len({group_key(r) for r in runs}) == 1 and len(shape_parts([r.config for r in runs])) == 1  # one batch
    records = {r.run_id: r for r in run_grid(runs, tmp_path / "grid")}
    for run in runs:
        single = run_training(cache, run.config, save=False)
        grid = records[run.run_id]
        assert grid.config["frg_indicators"] == list(run.config.frg_indicators)
        assert grid.metrics == single.metrics
        assert_close_history(grid.history, single.history, 1e-5)
    # the new column changes what FRG learns: the rows with and without it differ
    by_indicators = {tuple(r.config["frg_indicators"]): r for r in records.values() if r.config["brg_layers"] == 2}
    assert by_indicators[("dH", "cos", "area")].history[-1]["frg"] != \
        by_indicators[("dH", "cos", "area", "H_fg")].history[-1]["frg"]


def test_a_registered_brg_indicator_reaches_evaluation_and_the_curves(tmp_path):
    """A BRG indicator is also read at test time (new classes) and by the per-epoch curves: grid rows equal their
    single runs, with the new column in b."""
    @register_indicator("margin_clip", "brg")
    def margin_clip(s):
        """The gap between CLIP's two most probable classes."""
        top = s.p_clip.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]

    try:
        cache = write_feature_cache(tmp_path / "syn.h5", **SMALL)
        runs = expand([cache], [1], parse_params(["brg_indicators=H_bb+H_clip+cos,cos+margin_clip"]),
                      TrainConfig(epochs=2))
        records = {r.run_id: r for r in run_grid(runs, tmp_path / "grid")}
        for run in runs:
            single = run_training(cache, run.config, save=False)
            assert records[run.run_id].metrics == single.metrics
            assert_close_history(records[run.run_id].history, single.history, 1e-5)
        b = {tuple(r.config["brg_indicators"]): r.history[-1]["b_mean_new"] for r in records.values()}
        assert b[("cos", "margin_clip")] != b[("H_bb", "H_clip", "cos")]
    finally:
        unregister_indicator("margin_clip", "brg")


def test_an_unknown_indicator_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="H_fg") as err:
        TrainConfig(frg_indicators=("dH", "H_fg")).validate()
    assert "dH" in str(err.value)


def test_a_registered_loss_term_trains_and_its_gradient_equals_autograd_of_the_reference(mse_term, data):
    cfgs = [config_with(c, use_fdc=True, lambda_mse_fg=w)
            for c, w in zip(random_configs(8, 41, 2), (0, 1, 5, 0.5, 2, 1, 3, 1))]
    g = Group(data, cfgs, torch.device("cpu"))
    g.prepare()
    assert g.term_names[-1] == "mse_fg"
    n = data.full.shape[0] * data.full.shape[1]
    gen = torch.Generator().manual_seed(4)
    rows = torch.stack([torch.randperm(n, generator=gen)[:5] for _ in cfgs])
    weight = torch.full((len(cfgs), 5), 0.2)
    terms = dict(zip(g.term_names, g.step_losses(rows, weight)))
    grads = g.layout.views(g.grad)
    for k, cfg in enumerate(cfgs):
        head = copy.deepcopy(g.heads[k])
        ref = reference_losses(head, data, rows[k], cfg)
        if cfg.get("lambda_mse_fg"):
            assert torch.allclose(terms["mse_fg"][k], ref["mse_fg"].detach(), rtol=1e-5, atol=1e-7)
        else:
            assert "mse_fg" not in ref
        ref["total"].backward()
        engine = gather(g.layout, k, copy.deepcopy(head), cfg, grads)
        assert max(gradient_errors(engine, head).values()) < 1e-3, k
    # it trains: a run whose only loss is the new term logs it, and the term falls
    alone = config_with(TrainConfig(epochs=4, lr=0.05, warmup_epochs=0), loss_ce_fdc=False, loss_dist=False,
                        loss_frg=False, use_pc=False, lambda_mse_fg=100.0)
    _, history, _ = train_head(data, alone)
    assert history[-1]["mse_fg"] < 0.9 * history[0]["mse_fg"]
    assert history[-1]["total"] == pytest.approx(100.0 * history[-1]["mse_fg"], rel=1e-5)
    assert "mse_fg" not in train_head(data, TrainConfig(epochs=2))[1][0]


def test_a_built_in_loss_registered_again_reproduces_the_built_in_run(ce_again, data):
    builtin = TrainConfig(epochs=3, seed=5)
    plugin = config_with(builtin, loss_ce_fdc=False, lambda_ce_again=1.0)
    head_a, hist_a, _ = train_head(data, builtin)
    head_b, hist_b, _ = train_head(data, plugin)
    for (name, p), (_, q) in zip(head_a.named_parameters(), head_b.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-5), name
    for a, b in zip(hist_a, hist_b):
        assert b["total"] == pytest.approx(a["total"], rel=1e-5)
        assert b["ce_again"] == pytest.approx(a["ce_fdc"], rel=1e-5)


def test_a_loss_term_weight_is_a_grid_parameter_and_needs_its_components(mse_term):
    assert parse_params(["lambda_mse_fg=0,1,10"]) == {"lambda_mse_fg": [0.0, 1.0, 10.0]}
    assert parse_value("lambda_mse_fg", "2") == 2.0
    with pytest.raises(ValueError, match="use_fdc"):
        TrainConfig(use_fdc=False, extra={"lambda_mse_fg": 1.0}).validate()
    with pytest.raises(ValueError, match="already"):
        register_loss_term("mse_fg", lambda t: t.r)
    with pytest.raises(ValueError, match="built-in"):
        register_loss_term("dist", lambda t: t.r)


def test_the_extending_page_runs():
    """docs/extending.md's code blocks, in order, in one namespace; its registrations are removed afterwards."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    blocks = [b.split("```")[0] for b in page.split("```python")[1:]]
    assert len(blocks) == 3
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "docs/extending.md", "exec"), namespace)
    finally:
        unregister_indicator("H_fg", "frg")
        unregister_loss_term("mse_fg")


def test_the_command_line_loads_a_plugin_file_and_grids_its_weight(tmp_path):
    """`fvgpt-cache --plugin FILE.py grid … --param lambda_<term>=…`: the file registers a loss term first."""
    import sys

    from conftest import run_cli

    from fvgpt_cache import load_records

    plugin = tmp_path / "my_terms.py"
    plugin.write_text("from fvgpt_cache import register_loss_term\n\n"
                      "register_loss_term('cli_probe', lambda t: t.log_q.exp().square().sum(-1), help='a test term')\n")
    cache = write_feature_cache(tmp_path / "syn.h5", **SMALL)
    try:
        done = run_cli("--plugin", plugin, "grid", cache, "--param", "lambda_cli_probe=0,1", "--set", "epochs=2",
                       "--out", tmp_path / "g")
        assert done.exit_code == 0, done.output
        records = load_records(tmp_path / "g")
        assert sorted(r.config.get("lambda_cli_probe", 0.0) for r in records) == [0.0, 1.0]
        assert ["cli_probe" in r.history[-1] for r in sorted(records, key=lambda r: "lambda_cli_probe" in r.config)] \
            == [False, True]
    finally:
        unregister_loss_term("cli_probe")
        for name in [m for m in sys.modules if m.startswith("fvgpt_cache_plugin_my_terms")]:
            del sys.modules[name]
    missing = run_cli("--plugin", "no_such_module_xyz", "params")
    assert missing.exit_code == 2 and "no module 'no_such_module_xyz'" in missing.output


def test_editing_a_plugins_code_makes_its_runs_new_and_sets_the_old_records_aside(tmp_path):
    """A run id covers the code of the registered plug-ins it used: a grid rerun after an edit retrains those
    runs, moves their old records to stale/ with the reason, and keeps the runs that do not use the plug-in."""
    cache = write_feature_cache(tmp_path / "syn.h5", **SMALL)

    def grid():
        params = parse_params(["frg_indicators=dH+cos+area,dH+cos+area+H_fg"])  # H_fg: registered below
        runs = expand([cache], [1], params, TrainConfig(epochs=2))
        return {tuple(r.config.frg_indicators): r.run_id for r in runs}, run_grid(runs, tmp_path / "grid")

    register_indicator("H_fg", "frg", lambda s: entropy(s.p_fg))
    try:
        ids, first = grid()
        plain, with_plugin = ids[("dH", "cos", "area")], ids[("dH", "cos", "area", "H_fg")]
        by_id = {r.run_id: r for r in first}
        assert by_id[plain].plugins is None and list(by_id[with_plugin].plugins) == ["indicator:frg:H_fg"]
        register_indicator("H_fg", "frg", lambda s: 2 * entropy(s.p_fg), replace=True)  # the same name, new code
        ids_after, second = grid()
    finally:
        unregister_indicator("H_fg", "frg")
    assert ids_after[("dH", "cos", "area")] == plain and ids_after[("dH", "cos", "area", "H_fg")] != with_plugin
    assert [r.run_id for r in second] == [ids_after[("dH", "cos", "area", "H_fg")]]  # only that run retrains
    stale = [line for f in (tmp_path / "grid" / "stale").iterdir() for line in f.read_text().splitlines()]
    assert len(stale) == 1 and "plug-in code changed since: indicator:frg:H_fg" in stale[0]


def test_two_plugin_files_with_one_name_both_load(tmp_path):
    import sys

    from fvgpt_cache import all_parameters, load_plugins, unregister_parameter

    paths = []
    for folder, name in (("a", "lambda_probe_a"), ("b", "lambda_probe_b")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "terms.py"
        path.write_text("from fvgpt_cache import Parameter, register_parameter\n"
                        f"register_parameter(Parameter({name!r}, 'float', 0.0, 'A test weight.', low=0))\n")
        paths.append(str(path))
    try:
        assert load_plugins(paths, entry_points=False) == paths
        assert {"lambda_probe_a", "lambda_probe_b"} <= set(all_parameters())
        load_plugins(paths[:1], entry_points=False)  # the same file again: not executed twice (no duplicate error)
    finally:
        for name in ("lambda_probe_a", "lambda_probe_b"):
            if name in all_parameters():
                unregister_parameter(name)
        for name in [m for m in sys.modules if m.startswith("fvgpt_cache_plugin_terms")]:
            del sys.modules[name]
    with pytest.raises(ValueError, match="not found"):
        load_plugins([str(tmp_path / "missing.py")], entry_points=False)
