import math

import pytest
import torch

from fvgpt_cache.equations import (
    backbone_logits, clip_logits, distill_loss, entropy, foreground_shift, frg_target, harmonic_mean, kl_div,
    pc_logits, pc_loss, prob_cosine, roc_auc, usable_foreground,
)
from fvgpt_cache.heads import Adapter, FDC, FVGPTHead, GateMLP
from fvgpt_cache.indicators import brg_indicators, frg_indicators
import torch.nn.functional as F_

ln = math.log
P = [0.5, 0.25, 0.25]
Q = [0.25, 0.5, 0.25]
R = [0.8, 0.1, 0.1]
U = [1 / 3, 1 / 3, 1 / 3]
H_P = 1.5 * ln(2)
H_R = -(0.8 * ln(0.8) + 0.2 * ln(0.1))


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def logits_for(probs, tau=2.0):
    """Logits whose softmax at temperature tau is `probs`."""
    return [tau * ln(p) for p in probs]


def close(actual, expected, tol=1e-9):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float64),
                          torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0), (actual, expected)


# --- statistics ---------------------------------------------------------------------------------

def test_backbone_logits_keep_the_image_vector_as_given():
    """MMRL's fused base vector is shorter than 1 and must not be renormalised; the text side is."""
    img, txt = t([0.6, 0.0]), t([2.0, 0.0], [0.0, 3.0])
    close(backbone_logits(img, txt, 100.0), [[60.0, 0.0]])
    close(clip_logits(img, txt, 100.0), [[100.0, 0.0]])


def test_clip_logits_normalises_both_sides():
    close(clip_logits(t([3.0, 4.0]), t([1.0, 0.0], [0.0, 2.0]), 10.0), [[6.0, 8.0]])


def test_entropy_cosine_kl_by_hand():
    close(entropy(t(P, U, [1.0, 0.0, 0.0])), [H_P, ln(3), 0.0])
    # p·q = 0.3125, |p|² = |q|² = 0.375
    close(prob_cosine(t(P), t(Q)), [0.3125 / 0.375])
    close(prob_cosine(t(U), t(R)), [(1 / 3) / (math.sqrt(1 / 3) * math.sqrt(0.66))])
    close(kl_div(t(P), t(Q)), [0.5 * ln(2) + 0.25 * ln(0.5)])
    close(kl_div(t([1.0, 0.0, 0.0]), t(U)), [ln(3)])
    close(kl_div(t(P), t(P)), [0.0])


def test_statistics_finite_for_one_hot_uniform_and_extreme_logits():
    one_hot, uniform = t([0.0, 1.0, 0.0]), t(U)
    for p in (one_hot, uniform):
        for q in (one_hot, uniform):
            assert torch.isfinite(kl_div(p, q)).all()
            assert torch.isfinite(prob_cosine(p, q)).all()
        assert torch.isfinite(entropy(p)).all()
    close(kl_div(uniform, one_hot), [-ln(3) - (2 / 3) * ln(1e-12)])  # log q is floored at 1e-12
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    z2 = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]])
    assert torch.isfinite(entropy(z.softmax(-1))).all()
    assert torch.isfinite(kl_div(z.softmax(-1), z2.softmax(-1))).all()
    assert torch.isfinite(frg_indicators(z, z2, torch.ones(2), 2.0)).all()
    assert torch.isfinite(brg_indicators(z, z2, 2.0)).all()
    assert torch.isfinite(foreground_shift(z, z2, 2.0))
    assert torch.isfinite(pc_loss(z, torch.tensor([1, 0]), z2.softmax(-1), 2.0))


# --- gates' inputs and targets ------------------------------------------------------------------

# sample 0: full P, fg R, label 0 -> CE_full = ln 1.5, CE_fg = ln(.66/.64) -> r* = 1
# sample 1: full U, fg P, label 1 -> CE_full = ln 3,   CE_fg = ln 6        -> r* = 0
Z_FULL = t(logits_for(P), logits_for(U))
Z_FG = t(logits_for(R), logits_for(P))
Y = torch.tensor([0, 1])


def test_frg_target_by_hand():
    import torch.nn.functional as F
    close(F.cross_entropy(Z_FULL, Y, reduction="none"), [ln(1.5), ln(3)])
    close(F.cross_entropy(Z_FG, Y, reduction="none"), [ln(0.66 / 0.64), ln(6)])
    close(frg_target(Z_FULL, Z_FG, Y), [1.0, 0.0])
    close(frg_target(Z_FULL, Z_FULL.clone(), Y), [0.0, 0.0])  # a tie is not "lower"


def test_frg_indicators_by_hand():
    u = frg_indicators(Z_FULL, Z_FG, t(0.3, 0.7), tau=2.0)
    expected = [
        [H_P - H_R, 0.45 / math.sqrt(0.375 * 0.66), 0.3],
        [ln(3) - H_P, (1 / 3) / math.sqrt((1 / 3) * 0.375), 0.7],
    ]
    close(u, expected)
    close(frg_indicators(Z_FULL, Z_FG, t(0.3, 0.7), 2.0, use=("area", "dH")),
          [[0.3, H_P - H_R], [0.7, ln(3) - H_P]])


def test_frg_indicators_use_temperature():
    # at tau = 1 the distributions are P², R² renormalised, not P, R
    u = frg_indicators(Z_FULL[:1], Z_FG[:1], t(0.3), tau=1.0, use=("dH",))
    p = [v / 0.375 for v in (0.25, 0.0625, 0.0625)]
    r = [v / 0.66 for v in (0.64, 0.01, 0.01)]
    close(u, [[-sum(v * ln(v) for v in p) + sum(v * ln(v) for v in r)]])


def test_indicator_names_are_validated():
    with pytest.raises(ValueError, match="unknown FRG"):
        frg_indicators(Z_FULL, Z_FG, torch.ones(2), 2.0, use=("dH", "entropy"))
    with pytest.raises(ValueError, match="repeat"):
        brg_indicators(Z_FULL, Z_FG, 2.0, use=("cos", "cos"))
    with pytest.raises(ValueError, match="empty"):
        brg_indicators(Z_FULL, Z_FG, 2.0, use=())


def test_brg_indicators_by_hand():
    v = brg_indicators(Z_FULL, Z_FG, tau=2.0)
    close(v, [[H_P, H_R, 0.45 / math.sqrt(0.375 * 0.66)],
              [ln(3), H_P, (1 / 3) / math.sqrt((1 / 3) * 0.375)]])
    close(brg_indicators(Z_FULL, Z_FG, 2.0, use=("H_clip",)), [[H_R], [H_P]])


# --- losses -------------------------------------------------------------------------------------

def test_distill_loss_value_and_detached_r():
    p_fg = t(P, [1.0, 0.0, 0.0])
    p_full = t(R, U)
    kl_fg = [ln(3) - H_P, ln(3)]  # KL(p ‖ uniform) = ln 3 − H(p)
    kl_full = [ln(3) - H_R, 0.0]
    expected = (0.5 * kl_fg[0] + 0.5 * kl_full[0] + 0.25 * kl_fg[1] + 0.75 * kl_full[1]) / 2

    student_logits = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    loss = distill_loss(r, p_fg, p_full, student_logits.log_softmax(-1))
    close(loss, expected)
    loss.backward()
    assert r.grad is None
    assert student_logits.grad.abs().sum() > 0

    r2 = r.detach().clone().requires_grad_(True)
    distill_loss(r2, p_fg, p_full, student_logits.log_softmax(-1), detach_r=False).backward()
    close(r2.grad, [(kl_fg[0] - kl_full[0]) / 2, (kl_fg[1] - kl_full[1]) / 2])


def test_pc_logits_by_hand_and_endpoints():
    z_bb, z_clip = t([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]), t([3.0, 2.0, 1.0], [1.0, 0.0, 0.0])
    close(pc_logits(z_bb, z_clip, t(0.25, 0.5)), [[1.5, 2.0, 2.5], [0.5, 0.0, 0.0]])
    close(pc_logits(z_bb, z_clip, t([0.25], [0.5])), [[1.5, 2.0, 2.5], [0.5, 0.0, 0.0]])
    close(pc_logits(z_bb, z_clip, torch.zeros(2, dtype=torch.float64)), z_bb)
    close(pc_logits(z_bb, z_clip, torch.ones(2, 1, dtype=torch.float64)), z_clip)
    with pytest.raises(ValueError, match="shape"):
        pc_logits(z_bb, z_clip, torch.ones(2, 3))


def test_pc_loss_by_hand():
    def softmax(zs):
        e = [math.exp(z) for z in zs]
        return [v / sum(e) for v in e]

    z_pc = [[1.5, 2.0, 2.5], [0.5, 0.0, 0.0]]
    z_clip = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    y = [2, 0]
    ce = -(ln(softmax(z_pc[0])[2]) + ln(softmax(z_pc[1])[0])) / 2
    kl = 0.0
    for zp, zc in zip(z_pc, z_clip):
        p = softmax([v / 2 for v in zc])
        q = softmax([v / 2 for v in zp])
        kl += sum(a * (ln(a) - ln(b)) for a, b in zip(p, q)) / 2
    p_clip = (t(*z_clip) / 2).softmax(-1)
    close(pc_loss(t(*z_pc), torch.tensor(y), p_clip, tau=2.0), ce + kl)


def test_foreground_shift_and_harmonic_mean():
    close(foreground_shift(t(logits_for(P)), t(logits_for(Q)), 2.0), 0.5 * ln(2) + 0.25 * ln(0.5))
    assert harmonic_mean(80.0, 70.0) == pytest.approx(2 * 80 * 70 / 150)
    assert harmonic_mean(0.0, 0.0) == 0.0
    close(harmonic_mean(torch.tensor([80.0, 0.0]), torch.tensor([70.0, 0.0])), [2 * 80 * 70 / 150, 0.0], 1e-4)


# --- modules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, n_linear, n_params", [(1, 1, 3 + 1), (2, 2, 161), (3, 3, 161 + 32 * 32 + 32)])
def test_gate_shapes_and_sizes(layers, n_linear, n_params):
    gate = GateMLP(3, hidden=32, layers=layers)
    u = torch.randn(5, 3)
    assert gate(u).shape == (5,) and gate.logit(u).shape == (5,)
    close(gate(u), torch.sigmoid(gate.logit(u)))
    assert ((gate(u) > 0) & (gate(u) < 1)).all()
    assert sum(isinstance(m, torch.nn.Linear) for m in gate.modules()) == n_linear
    assert sum(p.numel() for p in gate.parameters()) == n_params


@pytest.mark.parametrize("layers, n_params", [(1, 16 * 16 + 16), (2, 16 * 4 + 4 + 4 * 16 + 16),
                                              (3, 16 * 4 + 4 + 4 * 4 + 4 + 4 * 16 + 16)])
def test_adapter_shapes_and_sizes(layers, n_params):
    adapter = Adapter(16, hidden=4, layers=layers)
    x = torch.randn(5, 16)
    out = adapter(x)
    assert out.shape == (5, 16)
    close(out.norm(dim=-1), torch.ones(5), 1e-6)
    assert sum(p.numel() for p in adapter.parameters()) == n_params


def test_adapter_with_zero_last_layer_is_normalisation():
    x = torch.randn(4, 16)
    adapter = Adapter(16, hidden=4)
    with torch.no_grad():
        adapter.mlp[-1].weight.zero_()
        adapter.mlp[-1].bias.zero_()
    assert torch.equal(adapter(x), torch.nn.functional.normalize(x, dim=-1))
    assert torch.equal(Adapter(16, hidden=4, init_scale=0)(x), torch.nn.functional.normalize(x, dim=-1))
    off = Adapter(16, enabled=False)
    assert list(off.parameters()) == [] and torch.equal(off(x), torch.nn.functional.normalize(x, dim=-1))


def test_module_arguments_are_validated_by_the_configuration():
    """The modules trust their arguments; `build_head` validates the TrainConfig they come from."""
    from fvgpt_cache.training import TrainConfig, build_head

    for bad, match in (({"frg_layers": 4}, "frg_layers=4"), ({"fdc_hidden": 0}, "fdc_hidden=0"),
                       ({"r_without_frg": "zero"}, "r_without_frg='zero'"),
                       ({"brg_indicators": ("H_bb", "dH")}, "brg_indicators=.*H_bb, H_clip, cos"),
                       ({"fdc_init_scale": -1.0}, "fdc_init_scale=-1.0")):
        with pytest.raises(ValueError, match=match):
            build_head(8, TrainConfig(**bad))


def test_fdc_logits_scale_option():
    img, txt = torch.randn(3, 8), torch.randn(4, 8)
    fdc = FDC(8, hidden=4, visual=False, textual=False)
    expected = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    close(fdc(img, txt, 100.0), 100.0 * expected, 1e-5)
    close(FDC(8, visual=False, textual=False, use_scale=False)(img, txt, 100.0), expected, 1e-6)


def test_head_parameter_counts_vit_b16():
    head = FVGPTHead(512)
    assert head.num_parameters("fdc") == 2 * (512 * 64 + 64 + 64 * 512 + 512) == 132_224
    assert head.num_parameters("frg") == head.num_parameters("brg") == 3 * 32 + 32 + 32 + 1 == 161
    assert head.num_parameters() == 132_546
    assert FVGPTHead(512, fdc_textual=False).num_parameters() == 66_112 + 161 + 161
    assert FVGPTHead(512, use_frg=False).num_parameters() == 132_224 + 161
    assert FVGPTHead(512, use_pc=False, frg_indicators=("dH", "cos")).num_parameters() == 132_224 + 2 * 32 + 32 + 33
    only_pc = FVGPTHead(512, use_fdc=False)
    assert only_pc.fdc is None and only_pc.frg is None and only_pc.num_parameters() == 161


# --- the head -----------------------------------------------------------------------------------

D, CB, B, S = 16, 5, 6, 100.0


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize
    txt_bb = n(torch.randn(CB, D, generator=g), dim=-1)
    txt_clip = n(txt_bb + 0.5 * torch.randn(CB, D, generator=g), dim=-1)
    img_bb = n(torch.randn(B, D, generator=g), dim=-1)
    img_fg = n(img_bb + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    img_clip = n(img_bb + 0.3 * torch.randn(B, D, generator=g), dim=-1)
    area = 0.1 + 0.8 * torch.rand(B, generator=g)  # inside the area gate [0.02, 0.98]
    y = torch.randint(0, CB, (B,), generator=g)
    return dict(img_bb=img_bb.to(dtype), img_bb_fg=img_fg.to(dtype), img_clip=img_clip.to(dtype),
                area=area, y=y, txt_bb=txt_bb.to(dtype), txt_clip=txt_clip.to(dtype), scale=S)


def make_head(seed=0, **kw):
    torch.manual_seed(seed)
    return FVGPTHead(D, fdc_hidden=8, gate_hidden=8, **kw)


def test_head_losses_match_the_equations():
    head, b = make_head(), batch()
    out = head.losses(**b, lambda_d=10.0)
    assert set(out) == {"frg", "ce_fdc", "dist", "base", "ce_pc", "kl_pc", "pc", "total", "acc_fdc"}
    F = torch.nn.functional
    z_full = clip_logits(b["img_bb"], b["txt_bb"], S)
    z_fg = clip_logits(b["img_bb_fg"], b["txt_bb"], S)
    z_clip = clip_logits(b["img_clip"], b["txt_clip"], S)
    q = head.frg.logit(frg_indicators(z_full, z_fg, b["area"], 2.0))
    frg = F.binary_cross_entropy(torch.sigmoid(q), frg_target(z_full, z_fg, b["y"]))
    z_fdc = S * head.fdc.image(b["img_bb"]) @ head.fdc.text(b["txt_bb"]).T
    dist = distill_loss(torch.sigmoid(q), (z_fg / 2).softmax(-1), (z_full / 2).softmax(-1), (z_fdc / 2).log_softmax(-1))
    z_pc = pc_logits(z_full, z_clip, head.brg(brg_indicators(z_full, z_clip, 2.0)))
    pc = pc_loss(z_pc, b["y"], (z_clip / 2).softmax(-1), 2.0)
    close(out["frg"], frg, 1e-5)
    close(out["dist"], dist, 1e-5)
    close(out["ce_fdc"], F.cross_entropy(z_fdc, b["y"]), 1e-5)
    close(out["pc"], pc, 1e-5)
    close(out["total"], out["ce_fdc"] + frg + 10.0 * dist + pc, 1e-4)
    close(head.predict_base(b["img_bb"], b["txt_bb"], S), z_fdc, 1e-5)
    close(head.predict_new(b["img_bb"], b["img_clip"], b["txt_bb"], b["txt_clip"], S), z_pc, 1e-5)


def test_head_loss_flags_and_disabled_parts():
    b = batch()
    out = make_head().losses(**b, loss_frg=False, loss_kl_pc=False)
    assert set(out) == {"ce_fdc", "dist", "base", "ce_pc", "pc", "total", "acc_fdc"}
    close(out["total"], out["ce_fdc"] + 10.0 * out["dist"] + out["ce_pc"], 1e-5)
    assert set(make_head(use_fdc=False).losses(**b)) == {"ce_pc", "kl_pc", "pc", "total"}
    assert set(make_head(use_pc=False).losses(**b)) == {"frg", "ce_fdc", "dist", "base", "total", "acc_fdc"}
    empty = make_head(use_fdc=False, use_pc=False)
    assert empty.losses(**b)["total"].item() == 0.0
    z_bb = backbone_logits(b["img_bb"], b["txt_bb"], S)
    close(empty.predict_base(b["img_bb"], b["txt_bb"], S), z_bb)
    close(empty.predict_new(b["img_bb"], b["img_clip"], b["txt_bb"], b["txt_clip"], S), z_bb)


@pytest.mark.parametrize("mode", ["one", "target", "half"])
def test_r_without_frg(mode):
    head, b = make_head(use_frg=False, r_without_frg=mode), batch()
    assert head.frg is None
    out = head.losses(**b)
    assert "frg" not in out
    z_full = clip_logits(b["img_bb"], b["txt_bb"], S)
    z_fg = clip_logits(b["img_bb_fg"], b["txt_bb"], S)
    r_star = frg_target(z_full, z_fg, b["y"])
    assert 0 < r_star.sum() < B  # the batch mixes both targets, so the three modes differ
    r = {"one": torch.ones(B), "target": r_star, "half": torch.full((B,), 0.5)}[mode]
    log_q = (head.predict_base(b["img_bb"], b["txt_bb"], S) / 2).log_softmax(-1)
    close(out["dist"], distill_loss(r, (z_fg / 2).softmax(-1), (z_full / 2).softmax(-1), log_q), 1e-5)


def reached(head, loss):
    """Names of the head's submodules that get a non-zero gradient from `loss`."""
    named = [(n, p) for n, p in head.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n.split(".")[0] for (n, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}


def test_gradients_reach_only_their_parameters():
    head = make_head()
    out = head.losses(**batch())
    assert reached(head, out["pc"]) == {"brg"}
    assert reached(head, out["base"]) == {"fdc", "frg"}
    assert reached(head, out["frg"]) == {"frg"}
    assert reached(head, out["dist"] + out["ce_fdc"]) == {"fdc"}
    assert reached(head, out["total"]) == {"fdc", "frg", "brg"}
    brg = {id(p) for p in head.brg.parameters()}
    assert brg.isdisjoint(id(p) for m in (head.fdc, head.frg) for p in m.parameters())

    coupled = make_head(detach_r=False)
    assert reached(coupled, coupled.losses(**batch())["dist"]) == {"fdc", "frg"}


def test_features_are_frozen_inputs():
    b = batch()
    for k in ("img_bb", "img_bb_fg", "img_clip", "txt_bb", "txt_clip"):
        b[k] = b[k].clone().requires_grad_(True)
    make_head().losses(**b)["total"].backward()
    assert b["img_bb_fg"].grad is None and b["img_clip"].grad is None and b["txt_clip"].grad is None
    assert b["img_bb"].grad is not None  # through the FDC adapter, as eq. 7 says


def test_predict_new_never_calls_fdc():
    head, b = make_head(), batch()
    args = (b["img_bb"], b["img_clip"], b["txt_bb"], b["txt_clip"], S)
    before = head.predict_new(*args)
    with torch.no_grad():
        for p in list(head.fdc.parameters()) + list(head.frg.parameters()):
            p.fill_(float("nan"))
    after = head.predict_new(*args)
    assert torch.isfinite(after).all() and torch.equal(before, after)
    assert torch.isnan(head.predict_base(b["img_bb"], b["txt_bb"], S)).all()


def test_float16_features_are_accepted():
    """A float16 cache gives the numbers its values give in float32: every loss term, gradient and prediction
    equals the float32 computation on the same (float16-rounded) features.
    Break used: `FVGPTHead.frozen` computing the backbone logits from the float16 inputs before the cast
    (logits at scale 100 rounded to float16); the old check saw only a finite float32 total."""
    b16 = batch(dtype=torch.float16)
    b32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b16.items()}
    heads = [make_head(), make_head()]
    outs = [h.losses(**b) for h, b in zip(heads, (b16, b32))]
    assert outs[0].keys() == outs[1].keys() and outs[0]["total"].dtype == torch.float32
    for key in outs[1]:
        close(outs[0][key], outs[1][key], tol=1e-6)
    for out in outs:
        out["total"].backward()
    for (name, p16), (_, p32) in zip(heads[0].named_parameters(), heads[1].named_parameters()):
        close(p16.grad, p32.grad, tol=1e-6)
    for method, args in (("predict_base", ("img_bb", "txt_bb")), ("predict_new", ("img_bb", "img_clip", "txt_bb", "txt_clip"))):
        got = [getattr(h, method)(*(b[a] for a in args), S) for h, b in zip(heads, (b16, b32))]
        close(got[0], got[1], tol=1e-5)


def test_determinism():
    h1, h2 = make_head(seed=3), make_head(seed=3)
    s1, s2 = h1.state_dict(), h2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(h1.losses(**batch())["total"], h2.losses(**batch())["total"])
    h3 = make_head(seed=4)
    assert not torch.equal(h1.brg.mlp[0].weight, h3.brg.mlp[0].weight)


def test_without_pc_new_classes_go_through_fdc():
    """Table 3 rows (1) and (3): with FDC but no PC, new-class accuracy is FDC's, not the backbone's."""
    torch.manual_seed(0)
    head = FVGPTHead(8, use_pc=False)
    img, txt = torch.randn(5, 8), torch.randn(4, 8)
    close(head.predict_new(img, img, txt, txt, S), head.predict_base(img, txt, S))
    assert not torch.allclose(head.predict_new(img, img, txt, txt, S), clip_logits(img, txt, S))


# --- the release's constants (issue 10) ------------------------------------------------------------

def test_fdc_last_layer_starts_at_a_thousandth_of_the_default_init_with_zero_bias():
    for layers in (1, 2, 3):
        torch.manual_seed(5)
        ref = Adapter(16, hidden=64, layers=layers, init_scale=1.0)
        torch.manual_seed(5)
        scaled = Adapter(16, hidden=64, layers=layers)  # default init_scale = 1e-3 (RDBOOST_FDC_INIT_SCALE)
        assert torch.allclose(scaled.mlp[-1].weight, 1e-3 * ref.mlp[-1].weight)
        assert torch.count_nonzero(scaled.mlp[-1].bias) == 0 and torch.count_nonzero(ref.mlp[-1].bias) == 0
        if layers > 1:  # earlier layers keep PyTorch's default
            assert torch.equal(scaled.mlp[0].weight, ref.mlp[0].weight)
    zero = Adapter(16, hidden=8, init_scale=0)
    assert torch.count_nonzero(zero.mlp[-1].weight) == 0


def test_area_gate_on_hand_made_areas():
    area = t(0.0, 0.01, 0.02, 0.5, 0.98, 0.99, 1.0)
    assert usable_foreground(area).tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert usable_foreground(area, 0.0, 1.0).tolist() == [1] * 7


def test_frg_margin_moves_the_target():
    z_full = t([2.0, 0.0], [2.0, 0.0])
    z_fg = t([2.5, 0.0], [3.0, 0.0])  # the foreground lowers CE by a little and by more
    y = torch.tensor([0, 0])
    gain = F_.cross_entropy(z_full, y, reduction="none") - F_.cross_entropy(z_fg, y, reduction="none")
    assert frg_target(z_full, z_fg, y).tolist() == [1, 1]
    delta = float((gain[0] + gain[1]) / 2)  # between the two gains
    assert frg_target(z_full, z_fg, y, margin=delta).tolist() == [0, 1]


def test_each_weight_changes_the_loss_by_the_hand_computed_amount():
    head, b = make_head(), batch()
    ref = head.losses(**b)
    for key, term in (("lambda_frg", "frg"), ("lambda_pc", "pc")):
        out = head.losses(**b, **{key: 3.0})
        close(out["total"] - ref["total"], 2.0 * ref[term], 1e-5)
    out = head.losses(**b, lambda_d=4.0)
    close(out["total"] - ref["total"], -6.0 * ref["dist"], 1e-4)
    close(ref["total"], ref["ce_fdc"] + ref["frg"] + 10 * ref["dist"] + ref["pc"], 1e-4)


def test_area_gate_zeroes_target_and_distillation_weight():
    b = batch()
    b["area"] = t(0.5, 0.01, 0.99, 0.5, 0.5, 0.0).float()
    head = make_head()
    frozen = head.frozen(b["img_bb"], b["img_bb_fg"], b["img_clip"], b["area"], b["y"], b["txt_bb"], b["txt_clip"], S)
    cut = torch.tensor([False, True, True, False, False, True])
    assert frozen["usable"].tolist() == (~cut).float().tolist()
    assert (frozen["r_star"][cut] == 0).all()
    z_full, z_fg = backbone_logits(b["img_bb"], b["txt_bb"], S), backbone_logits(b["img_bb_fg"], b["txt_bb"], S)
    assert torch.equal(frozen["r_star"][~cut], frg_target(z_full, z_fg, b["y"])[~cut])
    q = head.frg.logit(frozen["u"])
    r = head.distill_weight(frozen, q)
    assert (r[cut] == 0).all() and torch.allclose(r[~cut], torch.sigmoid(q)[~cut])
    out = head.losses_from(frozen, b["txt_bb"], S)
    log_q = (head.predict_base(b["img_bb"], b["txt_bb"], S) / 2).log_softmax(-1)
    by_hand = distill_loss(torch.sigmoid(q) * (~cut), (z_fg / 2).softmax(-1), (z_full / 2).softmax(-1), log_q)
    close(out["dist"], by_hand, 1e-5)


@pytest.mark.parametrize("source, expected", [("full", 0.0), ("fg", 1.0)])
def test_r_source_controls(source, expected):
    b = batch()
    head = make_head(r_source=source)
    assert head.frg is not None  # the gate still exists and trains; only L_dist ignores it
    out = head.losses(**b)
    z_full, z_fg = backbone_logits(b["img_bb"], b["txt_bb"], S), backbone_logits(b["img_bb_fg"], b["txt_bb"], S)
    log_q = (head.predict_base(b["img_bb"], b["txt_bb"], S) / 2).log_softmax(-1)
    r = torch.full((B,), expected)
    close(out["dist"], distill_loss(r, (z_fg / 2).softmax(-1), (z_full / 2).softmax(-1), log_q), 1e-5)
    assert "frg" in out
    from fvgpt_cache.training import TrainConfig

    with pytest.raises(ValueError, match="r_source"):  # checked by the configuration the head is built from
        TrainConfig(r_source="gate").validate()


def test_roc_auc_by_hand():
    # scores of positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4, 0.9>0.1, 0.4=0.4, 0.4>0.1) → 3.5 / 4
    assert roc_auc(t(0.9, 0.4, 0.4, 0.1), t(1, 1, 0, 0)) == pytest.approx(0.875)
    assert roc_auc(t(0.1, 0.2), t(1, 0)) == 0.0
    assert roc_auc(t(0.3, 0.3, 0.3), t(1, 0, 1)) == 0.5
    assert roc_auc(t(0.3, 0.2), t(1, 1)) is None
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(5000, generator=g), (torch.rand(5000, generator=g) > 0.6).float()  # > 4M pairs: rank path
    scores = torch.round(scores * 20) / 20  # many ties
    pos, neg = scores[labels > 0], scores[labels == 0]
    pairwise = float(((pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum())
                     / (pos.numel() * neg.numel()))
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    from fvgpt_cache.equations import _average_ranks
    ranks = _average_ranks(t(3.0, 1.0, 3.0, 2.0))
    assert ranks.tolist() == [3.5, 1.0, 3.5, 2.0]
