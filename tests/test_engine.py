"""The stacked engine's hand-written gradients against autograd of the reference head (heads.py)."""
import copy

import pytest
import torch

from fvgpt_cache.engine import TERMS, Group, gather
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig, prepare

CONFIGS = [
    TrainConfig(seed=1),
    TrainConfig(seed=2, fdc_hidden=16, gate_hidden=8, lambda_d=3, tau=1.5, detach_r=False),
    TrainConfig(seed=3, frg_layers=1, brg_layers=3, frg_indicators=("area", "dH"), use_scale=False, frg_margin=0.3),
    TrainConfig(seed=4, use_frg=False, r_without_frg="target", loss_kl_pc=False, lambda_pc=0.5),
    TrainConfig(seed=5, r_source="full", fdc_textual=False, area_min=0.3),
    TrainConfig(seed=6, use_pc=False, lambda_frg=2.0, brg_layers=1),
    TrainConfig(seed=7, r_source="fg", use_fdc=False, brg_indicators=("cos", "H_bb")),
    TrainConfig(seed=8, loss_ce_fdc=False, loss_frg=False, frg_layers=3, fdc_visual=False),
]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    path = write_feature_cache(tmp_path_factory.mktemp("e") / "e.h5", num_classes=6, shots=8, views=3, dim=32,
                               test_per_class=5)
    data = prepare(open_cache(path), CONFIGS[0])
    g = Group(data, CONFIGS, torch.device("cpu"))
    g.prepare()
    return g, data


def test_losses_and_gradients_equal_autograd_of_the_reference_head(group):
    g, data = group
    n, views = data.full.shape[:2]
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randperm(n * views, generator=gen)[:5] for _ in CONFIGS])
    weight = torch.full((len(CONFIGS), 5), 0.2)
    weight[1, 3:] = 0.0  # a shorter batch: its two padded rows must not count
    weight[1, :3] = 1 / 3
    out = dict(zip(TERMS, g.step_losses(rows, weight)))
    out.update(g.weighted_terms(out))
    out["acc_fdc"] = out["acc_fdc"] * 100  # the engine keeps a fraction per step
    grads = g.layout.views(g.grad)
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    for k, cfg in enumerate(CONFIGS):
        head = copy.deepcopy(g.heads[k])
        r = rows[k][weight[k] > 0]
        frozen = head.frozen(flat(data.full)[r], flat(data.fg)[r], flat(data.clip)[r], flat(data.area)[r],
                             data.y.repeat_interleave(views)[r], data.txt_bb, data.txt_clip, data.scale)
        ref = head.losses_from(frozen, data.txt_bb, data.scale, cfg.lambda_d, **cfg.loss_flags())
        for key, value in ref.items():
            assert torch.allclose(out[key][k], value.detach(), rtol=1e-4, atol=1e-5), (k, key)
        if not ref["total"].requires_grad:
            continue
        ref["total"].backward()
        engine = gather(g.layout, k, copy.deepcopy(g.heads[k]), cfg, grads)
        for (name, a), (_, b) in zip(head.named_parameters(), engine.named_parameters()):
            expected = a.grad if a.grad is not None else torch.zeros_like(a)
            assert torch.allclose(b, expected, rtol=1e-3, atol=1e-5), (k, name, (b - expected).abs().max())
        assert any(a.grad is not None and a.grad.abs().sum() > 0 for a in head.parameters())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_flat_optimizer_equals_torch_optim(group, optimizer):
    """Three steps with fixed gradients: the engine's update equals torch.optim's SGD / AdamW."""
    g, _ = group
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, weight_decay=0.05)
    engine = Group(g.data, [cfg], torch.device("cpu"))
    engine._optimizer_setup()
    engine.set_lr([0.01])
    params = [torch.nn.Parameter(p.detach().clone()) for p in engine.heads[0].parameters()]
    kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    kwargs = {"momentum": 0.9} if optimizer == "sgd" else {}
    ref = kind(params, lr=0.01, weight_decay=0.05, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        ref.step()
        head = engine.heads[0]
        for mod, gr in zip(head.parameters(), grads):
            mod.grad = gr
        # write the same gradients into the engine's flat gradient buffer through its views
        from fvgpt_cache.engine import scatter
        views = engine.layout.views(engine.grad)
        holder = copy.deepcopy(head)
        for q, gr in zip(holder.parameters(), grads):
            q.data.copy_(gr)
        scatter(engine.layout, 0, holder, cfg, views, engine.layout.views(torch.zeros_like(engine.flat)),
                engine.layout.relu_switches())
        engine.optimizer_step(None)
    trained = gather(engine.layout, 0, copy.deepcopy(engine.heads[0]), cfg, engine.layout.views(engine.flat))
    for a, b in zip(trained.parameters(), params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # AdamW: rounding of the division order


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_group_that_narrows_when_its_widest_configuration_finishes_equals_single_runs(group, optimizer):
    """The 32-wide configuration stops after 2 epochs; the 8-wide one goes on in a narrower group that
    carries its parameters and optimiser state. Both equal their own single runs."""
    from fvgpt_cache.engine import Group, train_head

    _, data = group
    cfgs = [TrainConfig(seed=1, fdc_hidden=32, gate_hidden=16, epochs=2, optimizer=optimizer, lr=0.01),
            TrainConfig(seed=2, fdc_hidden=8, gate_hidden=4, epochs=4, optimizer=optimizer, lr=0.01, frg_layers=3)]
    g = Group(data, cfgs, torch.device("cpu"))
    narrowed = []
    original = Group.narrowed
    Group.narrowed = lambda self, keep: narrowed.append(keep) or original(self, keep)
    try:
        together = g.train()
    finally:
        Group.narrowed = original
    assert narrowed == [[1]]
    for cfg, (head, history, _) in zip(cfgs, together):
        alone, alone_history, _ = train_head(data, cfg)
        assert len(history) == cfg.epochs
        for a, b in zip(history, alone_history):
            assert a["total"] == pytest.approx(b["total"], rel=1e-5)
        for (name, p), (_, q) in zip(head.named_parameters(), alone.named_parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
