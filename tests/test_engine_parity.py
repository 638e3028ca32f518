"""The stacked engine against the reference head (heads.py) over several steps, on random mixed configurations.

The adapters start at PyTorch's full default initialisation (`fdc_init_scale=1`), so a wrong adapter gradient
cannot hide under a near-zero init. The gradient check compares each parameter tensor by the relative norm of
its error; `test_the_check_catches_a_one_percent_gradient_error` shows that a 1 % error in any one parameter
tensor's gradient fails it.
"""
import copy
import random

import pytest
import torch

from fvgpt_cache.engine import Group, gather
from fvgpt_cache.store import open_cache
from fvgpt_cache.synthetic import write_feature_cache
from fvgpt_cache.training import TrainConfig, prepare

GRAD_RTOL = 1e-3  # relative norm error per parameter tensor: float32 rounding is ~1e-6, a 1 % error is 1e-2
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6
STEPS = 3

KNOBS = {
    "fdc_hidden": [8, 16], "gate_hidden": [4, 8], "frg_layers": [1, 2, 3], "brg_layers": [1, 2, 3],
    "frg_indicators": [("dH", "cos", "area"), ("area", "dH"), ("cos",)],
    "brg_indicators": [("H_bb", "H_clip", "cos"), ("cos", "H_bb"), ("H_clip",)],
    "use_frg": [True, False], "use_fdc": [True, True, False], "use_pc": [True, True, False],
    "fdc_visual": [True, False], "fdc_textual": [True, False], "tau": [1.0, 2.0, 3.5], "use_scale": [True, False],
    "detach_r": [True, False], "r_without_frg": ["one", "target", "half"], "r_source": ["frg", "frg", "full", "fg"],
    "frg_margin": [0.0, 0.3], "area_min": [0.02, 0.3], "lambda_d": [0.5, 10.0], "lambda_frg": [0.5, 2.0],
    "lambda_pc": [0.5, 1.0], "loss_frg": [True, True, False], "loss_dist": [True, True, False],
    "loss_ce_fdc": [True, True, False], "loss_ce_pc": [True, False], "loss_kl_pc": [True, False],
    "optimizer": ["sgd", "adamw"], "lr": [0.01, 0.003], "weight_decay": [0.0, 5e-4, 0.05], "momentum": [0.0, 0.9],
}


def random_configs(n: int, seed: int, fdc_layers: int) -> list[TrainConfig]:
    rng = random.Random(seed)
    cfgs = []
    while len(cfgs) < n:
        chosen = {name: rng.choice(values) for name, values in KNOBS.items()}
        if not (chosen["use_fdc"] or chosen["use_pc"]):
            continue  # no learnable part
        cfgs.append(TrainConfig(seed=len(cfgs) + 1, fdc_layers=fdc_layers, fdc_init_scale=1.0, **chosen).validate())
    return cfgs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = write_feature_cache(tmp_path_factory.mktemp("p") / "p.h5", num_classes=6, shots=8, views=3, dim=32,
                               test_per_class=5)
    return prepare(open_cache(path), TrainConfig())


def gradient_errors(engine: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """Relative norm error ‖g_engine − g_ref‖ / ‖g_ref‖ of each parameter tensor's gradient (absolute when the
    reference gradient is zero). `engine` holds the engine's gradients as its parameter values."""
    out = {}
    for (name, g), (_, p) in zip(engine.named_parameters(), reference.named_parameters()):
        g = g.detach()
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = ref.norm()
        out[name] = float((g - ref).norm() / scale) if scale > 0 else float(g.norm())
    return out


def reference_losses(head, data, rows: torch.Tensor, cfg: TrainConfig) -> dict:
    views = data.full.shape[1]
    flat = lambda t: t.flatten(0, 1)  # noqa: E731
    frozen = head.frozen(flat(data.full)[rows], flat(data.fg)[rows], flat(data.clip)[rows], flat(data.area)[rows],
                         data.y.repeat_interleave(views)[rows], data.txt_bb, data.txt_clip, data.scale)
    return head.losses_from(frozen, data.txt_bb, data.scale, cfg.lambda_d, **cfg.loss_flags())


def reference_optimizer(head, cfg: TrainConfig):
    """torch.optim over the head's parameters. Gradients start at zero and are zeroed (not set to None) between
    steps: a parameter no active term reaches still decays, as it does in the engine."""
    for p in head.parameters():
        p.grad = torch.zeros_like(p)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def batches(data, k: int, steps: int, seed: int):
    n = data.full.shape[0] * data.full.shape[1]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.stack([torch.randperm(n, generator=gen)[:5] for _ in range(k)])
        weight = torch.full((k, 5), 0.2)
        weight[step % k, 3:], weight[step % k, :3] = 0.0, 1 / 3  # a shorter batch: its padded rows must not count
        yield rows, weight


@pytest.mark.parametrize("fdc_layers,seed", [(2, 11), (1, 12), (3, 13)])
def test_engine_equals_the_reference_over_several_steps(data, fdc_layers, seed):
    cfgs = random_configs(8, seed, fdc_layers)
    g = Group(data, cfgs, torch.device("cpu"))
    g.prepare()
    g._optimizer_setup()
    g.set_lr([c.lr for c in cfgs])
    heads = [copy.deepcopy(h) for h in g.heads]
    optimizers = [reference_optimizer(h, c) for h, c in zip(heads, cfgs)]
    for rows, weight in batches(data, len(cfgs), STEPS, seed):
        g.step_losses(rows, weight)
        grads = g.layout.views(g.grad)
        for k, (cfg, head, opt) in enumerate(zip(cfgs, heads, optimizers)):
            opt.zero_grad(set_to_none=False)
            ref = reference_losses(head, data, rows[k][weight[k] > 0], cfg)
            if ref["total"].requires_grad:
                ref["total"].backward()
            engine = gather(g.layout, k, copy.deepcopy(head), cfg, grads)
            bad = {n: e for n, e in gradient_errors(engine, head).items() if e > GRAD_RTOL}
            assert not bad, (k, cfg, bad)
        g.optimizer_step(None)
        for opt in optimizers:
            opt.step()
        for k, (cfg, head) in enumerate(zip(cfgs, heads)):
            engine = gather(g.layout, k, copy.deepcopy(head), cfg, g.params)
            for (name, p), (_, q) in zip(engine.named_parameters(), head.named_parameters()):
                assert torch.allclose(p, q, rtol=PARAM_RTOL, atol=PARAM_ATOL), (k, name, (p - q).abs().max())
    assert any(any(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters()) for h in heads)


def test_the_check_catches_a_one_percent_gradient_error(data):
    """Scale the engine's gradient of any one parameter tensor by 1.01: the parity check above fails."""
    cfgs = random_configs(4, 21, 2)
    g = Group(data, cfgs, torch.device("cpu"))
    g.prepare()
    (rows, weight), = batches(data, len(cfgs), 1, 21)
    g.step_losses(rows, weight)
    grads = g.layout.views(g.grad)
    checked = 0
    for k, cfg in enumerate(cfgs):
        head = copy.deepcopy(g.heads[k])
        ref = reference_losses(head, data, rows[k][weight[k] > 0], cfg)
        ref["total"].backward()
        engine = gather(g.layout, k, copy.deepcopy(head), cfg, grads)
        assert max(gradient_errors(engine, head).values()) <= GRAD_RTOL
        for name, p in engine.named_parameters():
            if p.abs().sum() == 0:
                continue  # a parameter whose gradient is zero in this batch (its 1 % error is zero too)
            with torch.no_grad():
                p.mul_(1.01)
            assert gradient_errors(engine, head)[name] > GRAD_RTOL, (k, name)
            with torch.no_grad():
                p.div_(1.01)
            checked += 1
    assert checked > 10


def test_autograd_backward_equals_the_hand_written_one(data):
    """The engine's `backward="autograd"` path (every term through autograd) gives the hand-written gradients."""
    cfgs = random_configs(8, 31, 2)
    grads = {}
    (rows, weight), = batches(data, len(cfgs), 1, 31)
    for backward in ("manual", "autograd"):
        g = Group(data, cfgs, torch.device("cpu"), backward=backward)
        g.prepare()
        terms = g.step_losses(rows, weight)
        grads[backward] = (terms, g.grad.clone())
    assert torch.allclose(grads["manual"][0], grads["autograd"][0])
    a, b = grads["manual"][1], grads["autograd"][1]
    assert float((a - b).norm() / b.norm()) < 1e-5
