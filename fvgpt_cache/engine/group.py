"""The group: K configurations' stacked step, optimiser and training loop (see `fvgpt_cache.engine`)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..heads import BRG_INDICATORS, FRG_INDICATORS, FVGPTHead, brg_indicators, frg_indicators
from ..training import (
    TrainConfig, TrainData, build_head, epoch_batches, lr_at_epoch, subsample_per_class, view_schedule,
)
from .kernels import NUMERICS, adamw_step, float32_numerics, fused_available, sgd_step
from .layout import GATE_INPUTS, Layout, gather, put, scatter
from .mlp import _sum_terms, _times, mlp_backward, mlp_forward

# fields that must be equal inside one group (besides the cache); all others may differ
GROUP_FIELDS = ("backbone", "classes", "batch_size", "device", "fdc_layers")
TERMS = ("frg", "ce_fdc", "dist", "acc_fdc", "ce_pc", "kl_pc")
SMALL_STEP_FLOPS = 2e8  # a step below this trains single-threaded on the CPU (see Group._use_threads)
HISTORY_KEYS = ("frg", "ce_fdc", "dist", "base", "acc_fdc", "ce_pc", "kl_pc", "pc", "total")
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class TrainingStopped(RuntimeError):
    """Training was asked to stop (`should_stop`, e.g. SIGTERM); finished configurations were handed back."""


def group_key(cfg: TrainConfig) -> tuple:
    return tuple(getattr(cfg, k) for k in GROUP_FIELDS)


def _variant(cfg: TrainConfig) -> tuple:
    """What a configuration's rows of frozen statistics depend on besides the data: τ, the FRG margin, the area gate
    and the mask source of its foreground views."""
    return (cfg.tau, cfg.frg_margin, cfg.area_min, cfg.area_max, cfg.fg_source)


class Group:
    """K configurations trained together on one TrainData; see the `fvgpt_cache.engine` docstring."""

    def __init__(self, data: TrainData, cfgs: list[TrainConfig], device: torch.device,
                 heads: list[FVGPTHead] | None = None):
        keys = {group_key(c) for c in cfgs}
        if len(keys) != 1:
            raise ValueError(f"configurations of one group must share {GROUP_FIELDS}; got {sorted(keys)}")
        self.cfgs, self.device, self.data = cfgs, device, data
        self.k, dim = len(cfgs), data.full.shape[-1]
        self.layout = Layout(dim, cfgs, device)
        self.heads = heads if heads is not None else [build_head(dim, c) for c in cfgs]
        lay = self.layout
        flat, mask = torch.zeros(lay.numel), torch.zeros(lay.numel)
        acts = lay.relu_switches()
        for k, (head, cfg) in enumerate(zip(self.heads, cfgs)):
            scatter(lay, k, head, cfg, lay.views(flat), lay.views(mask), acts)
        self.flat, self.grad = flat.to(device), torch.zeros(lay.numel, device=device)
        # Entries outside every configuration's real parameters stay exactly zero when they are only width
        # padding (zero activations, zero gradients, zero decay). The gate's frozen identity and embedding
        # layers, the blocks between its two gates, unused indicator columns and a switched-off adapter's
        # last bias do receive gradients or decay: in the gate blocks and the adapters' last biases,
        # entries whose mask is 0 are put back after each step.
        last = {f"fdc_img.{lay.fdc_depth - 1}.b", f"fdc_txt.{lay.fdc_depth - 1}.b"}
        masks = lay.views(mask.to(device))  # which blocks need it is decided on the CPU copy: no device sync
        self.masks = {n: masks[n] for n, m in lay.views(mask).items()
                      if (n.startswith("gate.") or n in last) and not bool((m == 1).all())}
        # per hidden layer of the gate: which units pass through a ReLU (None: all; a 1-layer gate has none)
        self.acts = None if bool((acts > 0).all()) else (acts > 0).to(device).unsqueeze(2)  # (K, depth−1, 1, 2H)
        self.params, self.grads = lay.views(self.flat), lay.views(self.grad)
        self.layers = {m: lay.layers(self.params, m) for m in lay.dims}
        self.grad_layers = {m: lay.layers(self.grads, m) for m in lay.dims}
        self._factors()

    def _factors(self) -> None:
        """Per-configuration scalars of the loss. Each is computed as a float32 (K, 1) tensor and kept as a
        Python number when every configuration has the same value (then ×1 and +0·x are skipped): the
        same float32 numbers either way, so a configuration computes the same bits alone or in a group."""
        def col(values) -> Tensor:  # on the CPU: whether a factor is uniform is decided without a device sync
            return torch.tensor([float(v) for v in values]).view(-1, 1)

        c = self.cfgs
        has_fdc = [x.use_fdc for x in c]
        has_frg = [x.use_fdc and x.use_frg for x in c]
        w = {
            "ce_fdc": col(f and x.loss_ce_fdc for f, x in zip(has_fdc, c)),
            "dist": col(x.lambda_d if f and x.loss_dist else 0 for f, x in zip(has_fdc, c)),
            "frg": col(x.lambda_frg if f and x.loss_frg else 0 for f, x in zip(has_frg, c)),
            "ce_pc": col(x.use_pc and x.loss_ce_pc for x in c),
            "kl_pc": col(x.use_pc and x.loss_kl_pc for x in c),
            "lambda_pc": col(x.lambda_pc for x in c),
        }
        self.w = w
        tau = col(x.tau for x in c)
        scale_on = col(x.use_scale for x in c)
        # r = usable · (A·σ(q) + B·r* + C), see FVGPTHead.distill_weight
        coefs = []
        for x, frg in zip(c, has_frg):
            if x.r_source == "full":
                coefs.append((0, 0, 0))
            elif x.r_source == "fg":
                coefs.append((0, 0, 1))
            elif frg:
                coefs.append((1, 0, 0))
            else:
                coefs.append({"one": (0, 0, 1), "target": (0, 1, 0), "half": (0, 0, 0.5)}[x.r_without_frg])
        r_a, r_b, r_c = (col(v) for v in zip(*coefs))
        factors = {
            "r_a": r_a, "r_b": r_b, "r_c": r_c, "frg": w["frg"],
            # ∂L/∂q_FRG through r when r is not detached: λ_d · usable · σ'(q) · (KL_fg − KL_full)
            "r_grad": col(not x.detach_r for x in c) * r_a * w["dist"],
            "scale": scale_on * self.data.scale + (1 - scale_on), "tau": tau, "ce_fdc": w["ce_fdc"],
            "dist_tau": w["dist"] / tau, "ce_pc": w["lambda_pc"] * w["ce_pc"],
            "kl_pc_tau": w["lambda_pc"] * w["kl_pc"] / tau,
        }
        uniform = lambda t: float(t[0]) if bool((t == t[0]).all()) else t.to(self.device)  # noqa: E731
        self.f2 = {k: uniform(v) for k, v in factors.items()}  # factors of (K, B) tensors
        self.f3 = {k: v if isinstance(v, float) else v.unsqueeze(-1) for k, v in self.f2.items()}  # of (K, B, C)

    # -- frozen statistics -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Frozen per-row statistics of the group's training rows (flattened image × view), once.

        One table row per training row and *variant* (a distinct τ, FRG margin, area gate and mask source), so
        that a step reads all it needs with one index: the backbone image vector x, z_full, z_clip − z_full, the
        one-hot label, the teacher distributions p_full, p_fg, p_clip at τ and their negative entropies,
        the FRG and BRG indicators (the gate MLP's input), r* and the area gate's verdict. The table is
        allocated once and filled in place (no per-variant pieces, no concatenation)."""
        d, dev = self.data, self.device
        views = d.full.shape[1]
        flat = lambda t: t.flatten(0, 1).to(dev, torch.float32)  # noqa: E731
        x = flat(d.full)
        x_clip = x if d.clip is d.full else flat(d.clip)  # the CLIP view is the backbone's own when it is CLIP
        y = d.y.repeat_interleave(views).to(dev)
        txt_bb, txt_clip = d.txt_bb.to(dev), d.txt_clip.to(dev)
        s = d.scale
        n, C, D = x.shape[0], txt_bb.shape[0], x.shape[1]
        self.cols = {"x": D, "z_full": C, "z_diff": C, "onehot": C, "p_full": C, "p_fg": C, "p_clip": C,
                     "nh_full": 1, "nh_fg": 1, "nh_clip": 1, "gate_in": 2 * GATE_INPUTS, "r_star": 1, "usable": 1}
        self.variants = sorted(set(_variant(c) for c in self.cfgs))
        with torch.no_grad():
            z_full = s * x @ F.normalize(txt_bb, dim=-1).T
            z_clip = s * F.normalize(x_clip, dim=-1) @ F.normalize(txt_clip, dim=-1).T
            del x_clip  # only its logits are needed from here on
            ce_full = F.cross_entropy(z_full, y, reduction="none")
            self.table = torch.empty(len(self.variants) * n, sum(self.cols.values()), device=dev)
            fg_logits: dict[str, tuple] = {}  # per mask source: z_fg, its CE and the areas (shared by its variants)
            for i, (tau, margin, lo, hi, source) in enumerate(self.variants):
                if source not in fg_logits:
                    src = d.source(source)
                    z_fg = s * flat(src.fg) @ F.normalize(txt_bb, dim=-1).T
                    fg_logits[source] = (z_fg, F.cross_entropy(z_fg, y, reduction="none"), flat(src.area))
                z_fg, ce_fg, area = fg_logits[source]
                col = dict(zip(self.cols, self.table[i * n:(i + 1) * n].split(list(self.cols.values()), dim=1)))
                col["x"].copy_(x)
                col["z_full"].copy_(z_full)
                col["z_diff"].copy_(z_clip - z_full)
                col["onehot"].zero_().scatter_(1, y[:, None], 1.0)
                for name, z in (("full", z_full), ("fg", z_fg), ("clip", z_clip)):
                    p = (z / tau).softmax(-1)
                    col[f"p_{name}"].copy_(p)
                    col[f"nh_{name}"].copy_(torch.xlogy(p, p).sum(-1, keepdim=True))
                    del p
                col["gate_in"][:, :GATE_INPUTS].copy_(frg_indicators(z_full, z_fg, area, tau, FRG_INDICATORS))
                col["gate_in"][:, GATE_INPUTS:].copy_(brg_indicators(z_full, z_clip, tau, BRG_INDICATORS))
                usable = ((area >= lo) & (area <= hi)).to(x.dtype)
                col["r_star"].copy_(((ce_fg + margin < ce_full).to(x.dtype) * usable)[:, None])
                col["usable"].copy_(usable[:, None])
        self.txt = txt_bb
        self.n_classes = C
        self._row_offsets()

    def _row_offsets(self) -> None:
        """Where each configuration's variant starts in the table."""
        rows = len(self.table) // len(self.variants)
        self.row_offset = torch.tensor([self.variants.index(_variant(c)) * rows for c in self.cfgs],
                                       device=self.device).view(-1, 1)

    def narrowed(self, keep: list[int]) -> Group:
        """The configurations at positions `keep` as a group of their own, padded only to their own widths and
        depths, with their current parameters and optimiser states and this group's table of statistics."""
        heads = [gather(self.layout, k, self.heads[k], self.cfgs[k], self.params) for k in keep]
        new = Group(self.data, [self.cfgs[k] for k in keep], self.device, heads)
        new.table, new.variants, new.cols, new.txt, new.n_classes = self.table, self.variants, self.cols, self.txt, \
            self.n_classes
        new._row_offsets()
        new._optimizer_setup()
        for key, flat in self.state_flat.items():
            if flat is None or new.state_flat[key] is None:
                continue
            for j, k in enumerate(keep):
                holder = gather(self.layout, k, copy.deepcopy(self.heads[k]), self.cfgs[k], self.layout.views(flat))
                put(new.layout, j, holder, new.cfgs[j], new.layout.views(new.state_flat[key]))
        for j, k in enumerate(keep):
            new.per_config[j]["step"].copy_(self.per_config[k]["step"])
        return new

    # -- one step --------------------------------------------------------------------------------

    def step_losses(self, rows: Tensor, weight: Tensor) -> Tensor:
        """Loss terms (len(TERMS), K) of one batch of rows (K, B); their gradients go into `self.grad`.

        `weight` (K, B) holds 1/n for the n real rows of each configuration's batch and 0 for padding
        (a last batch shorter than the others), so every mean over the batch is `(· * weight).sum(-1)`.
        Returns the unweighted terms in `TERMS` order; `weighted_terms` combines them into base, pc and total."""
        batch = self.table[rows + self.row_offset]  # (K, B, width)
        col = dict(zip(self.cols, batch.split(list(self.cols.values()), dim=-1)))
        x, onehot, p_full, p_fg, p_clip = col["x"], col["onehot"], col["p_full"], col["p_fg"], col["p_clip"]
        r_star, usable = col["r_star"].squeeze(-1), col["usable"].squeeze(-1)
        f2, f3 = self.f2, self.f3
        per_row: dict[str, Tensor] = {}  # the loss terms of every row, averaged over the batch at the end

        # FDC (eqs. 7-8): cos(e, t) of the adapted vectors e = x + A(x), t = T + A_T(T), normalised in the logits
        a_img, in_img = mlp_forward(x, self.layers["fdc_img"], None)
        e = x + a_img
        a_txt, in_txt = mlp_forward(self.txt, self.layers["fdc_txt"], None)
        t = self.txt + a_txt
        n_e, n_t = e.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
        norms = n_e * n_t.transpose(1, 2)  # (K, B, C)
        cos = torch.bmm(e, t.transpose(1, 2)) / norms
        z = _times(cos, f3["scale"])
        logp = z.log_softmax(-1)
        logp_y = (logp * onehot).sum(-1)
        per_row["ce_fdc"] = -logp_y
        per_row["acc_fdc"] = (logp_y >= logp.amax(-1)).to(logp.dtype)  # a fraction; ×100 per epoch
        logq = (z / f3["tau"]).log_softmax(-1)

        # the two gates in one MLP: FRG (eqs. 3-6) and BRG (eq. 13)
        q, in_gate = mlp_forward(col["gate_in"], self.layers["gate"], self.acts)
        q_frg, q_brg = q[..., 0], q[..., 1]
        sig = torch.sigmoid(q_frg)
        per_row["frg"] = F.binary_cross_entropy_with_logits(q_frg, r_star, reduction="none")
        r = usable * _sum_terms(_times(sig, f2["r_a"]), _times(r_star, f2["r_b"]), f2["r_c"], like=sig)
        kl_fg = col["nh_fg"].squeeze(-1) - (p_fg * logq).sum(-1)
        kl_full = col["nh_full"].squeeze(-1) - (p_full * logq).sum(-1)
        kl_gap = kl_fg - kl_full
        per_row["dist"] = torch.addcmul(kl_full, r, kl_gap)

        # PC with BRG (eqs. 11-15)
        b = torch.sigmoid(q_brg)
        z_pc = torch.addcmul(col["z_full"], b.unsqueeze(-1), col["z_diff"])
        lp_pc = z_pc.log_softmax(-1)
        lq_pc = (z_pc / f3["tau"]).log_softmax(-1)
        per_row["ce_pc"] = -(lp_pc * onehot).sum(-1)
        per_row["kl_pc"] = col["nh_clip"].squeeze(-1) - (p_clip * lq_pc).sum(-1)

        # gradients
        wb = weight.unsqueeze(-1)
        teacher = torch.lerp(p_full, p_fg, r.unsqueeze(-1))
        dz = _sum_terms(_times(logp.exp() - onehot, f3["ce_fdc"]), _times(logq.exp() - teacher, f3["dist_tau"]),
                        like=logp) * wb
        # ∂cos/∂e_b = t_c / (|e_b| |t_c|) − cos_bc · e_b / |e_b|², and likewise for t_c
        dcos = _times(dz, f3["scale"])
        dcos_n = dcos / norms
        dcos_cos = dcos * cos
        de = torch.baddbmm(e * (dcos_cos.sum(-1, keepdim=True) / n_e.square()), dcos_n, t, beta=-1)
        dt = torch.baddbmm(t * (dcos_cos.sum(1).unsqueeze(-1) / n_t.square()), dcos_n.transpose(1, 2), e, beta=-1)
        mlp_backward(de, self.layers["fdc_img"], in_img, None, self.grad_layers["fdc_img"])
        mlp_backward(dt, self.layers["fdc_txt"], in_txt, None, self.grad_layers["fdc_txt"])
        dq_frg = _times(sig - r_star, f2["frg"])
        if not (isinstance(f2["r_grad"], float) and f2["r_grad"] == 0.0):
            dq_frg = dq_frg + _times(usable * sig * (1 - sig) * kl_gap, f2["r_grad"])
        dz_pc = _sum_terms(_times(lp_pc.exp() - onehot, f3["ce_pc"]), _times(lq_pc.exp() - p_clip, f3["kl_pc_tau"]),
                           like=lp_pc) * wb
        dq_brg = (dz_pc * col["z_diff"]).sum(-1) * b * (1 - b)
        mlp_backward(torch.stack([dq_frg * weight, dq_brg], -1), self.layers["gate"], in_gate, self.acts,
                     self.grad_layers["gate"])
        return (torch.stack([per_row[key] for key in TERMS]) * weight).sum(-1)  # (len(TERMS), K)

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """base = CE_FDC + λ_frg·L_FRG + λ_d·L_dist, pc = CE_PC + KL_PC, total = base + λ_pc·pc (switched terms
        count 0). Linear in the terms, so epoch means of the terms give the epoch means of these."""
        w = {k: v.squeeze(-1) for k, v in self.w.items()}
        base = w["ce_fdc"] * terms["ce_fdc"] + w["frg"] * terms["frg"] + w["dist"] * terms["dist"]
        pc = w["ce_pc"] * terms["ce_pc"] + w["kl_pc"] * terms["kl_pc"]
        return {"base": base, "pc": pc, "total": base + w["lambda_pc"] * pc}

    # -- the optimiser -----------------------------------------------------------------------------

    def _optimizer_setup(self) -> None:
        """Per-configuration views of the optimiser's tensors, for torch's fused SGD / AdamW kernels."""
        views = [None if t is None else self.layout.rows(t) for t in (self.flat, self.grad)]
        self.kind = [c.optimizer for c in self.cfgs]
        self.fused = {kind: fused_available(kind, self.device) for kind in set(self.kind)}  # probed here, not per step
        self.state_flat = {key: torch.zeros_like(self.flat) if needed in self.kind else None
                           for key, needed in (("buf", "sgd"), ("m", "adamw"), ("v", "adamw"))}
        self.state = {key: None if t is None else self.layout.rows(t) for key, t in self.state_flat.items()}
        self.per_config = []
        for k, c in enumerate(self.cfgs):
            names = list(self.layout.blocks)
            entry = {"params": [views[0][n][k] for n in names], "grads": [views[1][n][k] for n in names],
                     "step": torch.zeros((), device=self.device)}
            for key, rows in self.state.items():
                entry[key] = None if rows is None else [rows[n][k] for n in names]
            self.per_config.append(entry)
        # entries that must not move: frozen identity/embedding layers, unused inputs, switched-off
        # adapters' biases (values as scattered; 0 where padding) are put back after every step
        self.frozen = {name: (mask, self.params[name] * (1 - mask)) for name, mask in self.masks.items()}

    def set_lr(self, lr: list[float]) -> None:
        """The learning rate of each configuration for the coming epoch; configurations with equal
        optimiser settings step together in one fused call (their tensor lists are built here, once)."""
        self.lr = list(lr)
        members: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.cfgs):
            members.setdefault((c.optimizer, self.lr[k], c.weight_decay, c.momentum), []).append(k)
        self.groups = {key: (ks, self._tensor_lists(ks)) for key, ks in members.items()}

    def _tensor_lists(self, members: list[int]) -> dict[str, list[Tensor]]:
        """The optimiser's tensors of `members`, concatenated per kind, as torch's fused kernels take them.

        SGD over every configuration takes the whole flat buffers: one long tensor instead of one per block
        and configuration (AdamW keeps a step count per configuration, so it always takes the blocks)."""
        if len(members) == self.k and self.cfgs[0].optimizer == "sgd":
            flat = {"params": [self.flat], "grads": [self.grad]}
            return {**flat, "buf": [] if self.state_flat["buf"] is None else [self.state_flat["buf"]],
                    "m": [], "v": [], "steps": [], "step_per_tensor": []}
        entries = [self.per_config[k] for k in members]
        out = {key: [t for e in entries for t in e[key]] for key in ("params", "grads")}
        for key in ("buf", "m", "v"):
            out[key] = [] if self.state[key] is None else [t for e in entries for t in e[key]]
        out["steps"] = [e["step"] for e in entries]
        out["step_per_tensor"] = [e["step"] for e in entries for _ in e["params"]]
        return out

    def optimizer_step(self, on: list[float] | None) -> None:
        """One step of every active configuration with torch.optim's own fused SGD (momentum, coupled
        weight decay) or AdamW kernel, called once per set of configurations with equal settings;
        an inactive configuration (its smaller data fraction has no batch left in this epoch; `on[k]` is 0)
        takes no step at all and keeps its states. `on` is a host list (the batch plan is made on the
        host), so choosing the members costs no device sync."""
        for (kind, lr, wd, mom), (members, lists) in self.groups.items():
            if on is not None and not all(on[k] > 0 for k in members):
                members = [k for k in members if on[k] > 0]
                lists = self._tensor_lists(members)
            if not members or lr == 0.0:
                continue
            if kind == "sgd":
                sgd_step(lists["params"], lists["grads"], lists["buf"], lr=lr, weight_decay=wd, momentum=mom,
                         fused=self.fused["sgd"])
            else:
                adamw_step(lists["params"], lists["grads"], lists["m"], lists["v"], lists["steps"],
                           lists["step_per_tensor"], lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=wd,
                           fused=self.fused["adamw"])
        for name, (mask, value) in self.frozen.items():
            self.params[name].mul_(mask).add_(value)

    # -- the loop ---------------------------------------------------------------------------------

    def step_flops(self) -> float:
        """Multiply-adds ×2 of the matrix products of one step (all configurations)."""
        d, h, c, b = self.layout.dim, self.layout.fdc_hidden, len(self.data.txt_bb), self.cfgs[0].batch_size
        return self.k * (10 * (c + b) * d * h + 6 * b * c * d)

    def train(self, progress=None, monitor=None, on_finished=None,
              should_stop=None) -> list[tuple[FVGPTHead, list[dict], np.ndarray]]:
        """Train every configuration; returns (head, per-epoch history, training image indices) for each.

        A configuration whose epochs are over leaves the group at the end of its last epoch (the
        others go on as a narrower group, see `narrowed`), so a grid whose configurations differ in
        epochs does not carry the finished ones along. `on_finished(k, (head, history, images))` hears
        each configuration as soon as it is done (so its result can be written before the others end);
        `should_stop()`, asked after every epoch, ends training with `TrainingStopped` when it is true."""
        threads = torch.get_num_threads()
        try:
            with float32_numerics():  # TF32 off, float32 products at full precision: recorded in the history
                return self._train(progress, threads, monitor, on_finished, should_stop)
        finally:
            torch.set_num_threads(threads)

    def _use_threads(self, threads: int) -> None:
        """On the CPU a group whose step is small (under SMALL_STEP_FLOPS) trains on one intra-op thread:
        more threads only add synchronisation to its many small operations, and on a busy machine a
        descheduled thread stalls every parallel region (we saw 20× slower steps)."""
        small = self.device.type == "cpu" and self.step_flops() < SMALL_STEP_FLOPS
        torch.set_num_threads(1 if small else threads)

    def _heads_now(self, positions: list[int], snapshot: bool = False) -> list[FVGPTHead]:
        """The heads at `positions` as they are now (`snapshot`: copies that later steps leave alone)."""
        params_cpu = self.layout.views(self.flat.cpu())
        return [gather(self.layout, k, copy.deepcopy(self.heads[k]) if snapshot else self.heads[k], self.cfgs[k],
                       params_cpu).eval() for k in positions]

    def _train(self, progress, threads: int, monitor=None, on_finished=None,
               should_stop=None) -> list[tuple[FVGPTHead, list[dict], np.ndarray]]:
        data, cfgs = self.data, self.cfgs
        views = data.full.shape[1]
        labels = data.y.numpy()
        subsets = [torch.from_numpy(subsample_per_class(labels, c.data_fraction, c.seed)) for c in cfgs]
        self.prepare()
        self._optimizer_setup()
        gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        schedules = [view_schedule(len(sub), views, c.epochs, c.seed) for sub, c in zip(subsets, cfgs)]
        batch, epochs = cfgs[0].batch_size, max(c.epochs for c in cfgs)
        histories: list[list[dict]] = [[] for _ in cfgs]
        heads: list[FVGPTHead | None] = [None] * len(cfgs)
        best: dict[int, FVGPTHead] = {}  # select = "val": the head of the best validation epoch so far

        def done(k: int, head: FVGPTHead) -> None:
            if monitor is not None:
                monitor.finish(k, histories[k])
                head = best.get(k, head) if cfgs[k].select == "val" else head
            heads[k] = head
            if on_finished is not None:
                on_finished(k, (head, histories[k], subsets[k].numpy()))

        group, live = self, list(range(len(cfgs)))  # the group training now and its configurations
        group._use_threads(threads)
        for epoch in range(epochs):
            K = len(live)
            plans = [epoch_batches(len(subsets[k]), cfgs[k], gens[k]) for k in live]
            steps = max(len(p) for p in plans)
            rows = torch.zeros(steps, K, batch, dtype=torch.long)
            weight = torch.zeros(steps, K, batch)
            for pos, (k, plan) in enumerate(zip(live, plans)):
                full = [idx for idx in plan if len(idx) == batch]
                if full:
                    idx = torch.stack(full)
                    rows[:len(full), pos] = subsets[k][idx] * views + schedules[k][epoch][idx]
                    weight[:len(full), pos] = 1.0 / batch
                for j, idx in enumerate(plan[len(full):], start=len(full)):  # a last, shorter batch
                    rows[j, pos, :len(idx)] = subsets[k][idx] * views + schedules[k][epoch, idx]
                    weight[j, pos, :len(idx)] = 1.0 / len(idx)
            active = (weight.sum(-1) > 0).to(torch.float32)
            all_active = bool(active.all())
            on = active.tolist()  # host copies of the plan: the steps below never wait for the device
            rows, weight, active = rows.to(self.device), weight.to(self.device), active.to(self.device)
            lr = [lr_at_epoch(epoch, cfgs[k]) for k in live]
            group.set_lr(lr)
            sums = torch.zeros(len(TERMS), K, device=self.device)
            for j in range(steps):
                out = group.step_losses(rows[j], weight[j])
                group.optimizer_step(None if all_active else on[j])
                sums += out if all_active else out * active[j]
            terms = dict(zip(TERMS, sums / active.sum(0).clamp_min(1)))
            terms["acc_fdc"] = terms["acc_fdc"] * 100
            means = {key: v.tolist() for key, v in {**terms, **group.weighted_terms(terms)}.items()}
            for pos, k in enumerate(live):
                record = {"epoch": epoch, "lr": lr[pos]}
                if epoch == 0:  # how this run's numbers were computed: products, and the optimiser's kernel
                    kernel = "fused" if group.fused[cfgs[k].optimizer] else "public fallback"
                    record["numerics"] = {**NUMERICS, "optimizer_kernel": kernel}
                record.update({key: means[key][pos] for key in HISTORY_KEYS if _logged(key, cfgs[k])})
                histories[k].append(record)
            if monitor is not None:
                improved = monitor.observe(epoch, group, live, rows, weight)
                for k, head in zip([live[pos] for pos in improved], group._heads_now(improved, snapshot=True)):
                    best[k] = head
            if progress:
                progress(epoch + 1, epochs, {key: values[0] for key, values in means.items()})
            over = [pos for pos, k in enumerate(live) if epoch + 1 >= cfgs[k].epochs]
            if over and len(over) < len(live):  # done now (written at once by `on_finished`); the rest go on
                for k, head in zip([live[pos] for pos in over], group._heads_now(over)):
                    done(k, head)
                keep = [pos for pos in range(len(live)) if pos not in over]
                group, live = group.narrowed(keep), [live[pos] for pos in keep]
                group._use_threads(threads)
            if should_stop is not None and epoch + 1 < epochs and should_stop():
                raise TrainingStopped(f"stopped after epoch {epoch + 1} of {epochs}; "
                                      f"{sum(h is not None for h in heads)} configuration(s) of this group had finished")
        for k, head in zip(live, group._heads_now(list(range(len(live))))):
            done(k, head)
        return [(heads[k], histories[k], subsets[k].numpy()) for k in range(len(cfgs))]


def _logged(key: str, cfg: TrainConfig) -> bool:
    """The history keys a configuration's run reports (those of `FVGPTHead.losses_from`)."""
    fdc, frg, pc = cfg.use_fdc, cfg.use_fdc and cfg.use_frg, cfg.use_pc
    return {"frg": frg and cfg.loss_frg, "ce_fdc": fdc and cfg.loss_ce_fdc, "dist": fdc and cfg.loss_dist,
            "base": fdc, "acc_fdc": fdc, "ce_pc": pc and cfg.loss_ce_pc, "kl_pc": pc and cfg.loss_kl_pc,
            "pc": pc, "total": True}[key]


