"""The group: K configurations trained together on one TrainData (see `fvgpt_cache.engine`).

A group owns the padded parameters (`layout`), the statistics table (`table.StatisticsTable`), the step
(`step`: stacked forward, gradients) and the optimiser (`optimizer.StackedOptimizer`), and runs the loop.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor

from ..heads import FVGPTHead
from ..loss_terms import BUILTIN_TERMS
from ..training import TrainConfig, TrainData, build_head, epoch_batches, lr_at_epoch, subsample_per_class, view_schedule
from .kernels import NUMERICS, float32_numerics
from .layout import Layout, gather, scatter
from .optimizer import StackedOptimizer
from .step import BACKWARDS, TERMS, LossFactors, forward, manual_backward, plugin_terms
from .table import StatisticsTable

# fields that must be equal inside one group (besides the cache); all others may differ
GROUP_FIELDS = ("backbone", "classes", "batch_size", "device", "fdc_layers")
SMALL_STEP_FLOPS = 2e8  # a step below this trains single-threaded on the CPU (see Group._use_threads)
HISTORY_KEYS = BUILTIN_TERMS  # the built-in terms a history logs, in order; registered terms follow


class TrainingStopped(RuntimeError):
    """Training was asked to stop (`should_stop`, e.g. SIGTERM); finished configurations were handed back."""


def group_key(cfg: TrainConfig) -> tuple:
    return tuple(getattr(cfg, k) for k in GROUP_FIELDS)


class Group:
    """K configurations trained together on one TrainData; see the `fvgpt_cache.engine` docstring.

    `backward`: "manual" (the hand-written gradients of the built-in terms) or "autograd" (every term through
    autograd over the same stacked forward: the reference the tests and benchmarks compare with)."""

    def __init__(self, data: TrainData, cfgs: list[TrainConfig], device: torch.device,
                 heads: list[FVGPTHead] | None = None, columns: tuple | None = None, backward: str = "manual"):
        keys = {group_key(c) for c in cfgs}
        if len(keys) != 1:
            raise ValueError(f"configurations of one group must share {GROUP_FIELDS}; got {sorted(keys)}")
        if backward not in BACKWARDS:
            raise ValueError(f"backward={backward!r}; choose one of {BACKWARDS}")
        self.cfgs, self.device, self.data, self.backward = cfgs, device, data, backward
        self.k, dim = len(cfgs), data.full.shape[-1]
        self.layout = Layout(dim, cfgs, device, columns)
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
        # last layer (its bias; with one layer, its weight too, whose input is the feature itself) do receive
        # gradients or decay: in those blocks, entries whose mask is 0 are put back after each step.
        last = {f"{m}.{lay.fdc_depth - 1}.{p}" for m in ("fdc_img", "fdc_txt")
                for p in (("b", "w") if lay.fdc_depth == 1 else ("b",))}
        masks = lay.views(mask.to(device))  # which blocks need it is decided on the CPU copy: no device sync
        self.masks = {n: masks[n] for n, m in lay.views(mask).items()
                      if (n.startswith("gate.") or n in last) and not bool((m == 1).all())}
        # per hidden layer of the gate: which units pass through a ReLU (None: all; a 1-layer gate has none)
        self.acts = None if bool((acts > 0).all()) else (acts > 0).to(device).unsqueeze(2)  # (K, depth−1, 1, 2H)
        self.params, self.grads = lay.views(self.flat), lay.views(self.grad)
        self.layers = {m: lay.layers(self.params, m) for m in lay.dims}
        self.grad_layers = {m: lay.layers(self.grads, m) for m in lay.dims}
        self.factors = LossFactors.of(cfgs, data.scale, device)
        self.statistics: StatisticsTable | None = None
        self.optimizer: StackedOptimizer | None = None

    # -- frozen statistics -----------------------------------------------------------------------

    def prepare(self, statistics: StatisticsTable | None = None) -> None:
        """The frozen statistics of the group's training rows, once (`statistics`: a parent group's table)."""
        self.statistics = statistics or StatisticsTable(self.data, self.cfgs, self.device, self.layout.columns)
        self.row_offset = self.statistics.offsets(self.cfgs, self.device)

    @property
    def table(self) -> Tensor:
        return self.statistics.table

    @property
    def variants(self) -> list[tuple]:
        return self.statistics.variants

    @property
    def cols(self) -> dict[str, int]:
        return self.statistics.cols

    def narrowed(self, keep: list[int]) -> Group:
        """The configurations at positions `keep` as a group of their own, padded only to their own widths and
        depths, with their current parameters and optimiser states and this group's table of statistics."""
        heads = [gather(self.layout, k, self.heads[k], self.cfgs[k], self.params) for k in keep]
        new = Group(self.data, [self.cfgs[k] for k in keep], self.device, heads, self.layout.columns, self.backward)
        new.prepare(self.statistics)
        new._optimizer_setup()
        new.optimizer.carry_over(self.optimizer, keep, self.heads)
        return new

    # -- one step --------------------------------------------------------------------------------

    def step_losses(self, rows: Tensor, weight: Tensor) -> Tensor:
        """Loss terms (len(term_names), K) of one batch of rows (K, B); their gradients go into `self.grad`.

        `weight` (K, B) holds 1/n for the n real rows of each configuration's batch and 0 for padding
        (a last batch shorter than the others), so every mean over the batch is `(· * weight).sum(-1)`.
        Returns the unweighted terms in `term_names` order; `weighted_terms` combines them into base, pc and
        total. The built-in terms' gradients are hand-written (`backward="manual"`); registered terms, and every
        term with `backward="autograd"`, go through autograd on the same stacked tensors."""
        col = self.statistics.split(self.table[rows + self.row_offset])  # (K, B, ·) each
        f, manual = self.factors, self.backward == "manual"
        if manual and not f.plugins:
            fw = forward(col, self.layers, self.statistics.txt, self.acts, f)
            manual_backward(fw, col, weight, self.layers, self.grad_layers, self.acts, f)
            return (torch.stack([fw[key] for key in TERMS]) * weight).sum(-1)
        leaves = {n: v.detach().requires_grad_() for n, v in self.params.items()}  # share the parameters' storage
        with torch.enable_grad():
            fw = forward(col, {m: self.layout.layers(leaves, m) for m in self.layout.dims}, self.statistics.txt,
                         self.acts, f)
            terms = (torch.stack([fw[key] for key in TERMS]) * weight).sum(-1)
            objective = terms.new_zeros(())
            if f.plugins:
                extra = plugin_terms(fw, col, weight, f)
                objective = objective + (f.plugin_weights * extra).sum()
                terms = torch.cat([terms, extra])
            if not manual:
                objective = objective + (f.builtin_weights * terms[:len(TERMS)]).sum()
            grads = (torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
                     if objective.requires_grad else [None] * len(leaves))  # a term of frozen tensors only
        if manual:
            manual_backward(fw, col, weight, self.layers, self.grad_layers, self.acts, f)
        for (name, target), g in zip(self.grads.items(), grads):
            if g is not None:
                target.add_(g) if manual else target.copy_(g)
            elif not manual:
                target.zero_()
        return terms.detach()

    @property
    def term_names(self) -> tuple[str, ...]:
        """The rows `step_losses` returns: the built-in terms, then the registered terms the group weights."""
        return self.factors.term_names

    def weighted_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """base, pc and total from the terms (see `LossFactors.weighted_terms`)."""
        return self.factors.weighted_terms(terms)

    # -- the optimiser -----------------------------------------------------------------------------

    def _optimizer_setup(self) -> None:
        self.optimizer = StackedOptimizer(self.layout, self.cfgs, self.flat, self.grad, self.masks, self.device)

    @property
    def fused(self) -> dict[str, bool]:
        return self.optimizer.fused

    def set_lr(self, lr: list[float]) -> None:
        self.optimizer.set_lr(lr)

    def optimizer_step(self, on: list[float] | None) -> None:
        self.optimizer.step(on)

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
            names = group.term_names
            sums = torch.zeros(len(names), K, device=self.device)
            for j in range(steps):
                out = group.step_losses(rows[j], weight[j])
                group.optimizer_step(None if all_active else on[j])
                sums += out if all_active else out * active[j]
            terms = dict(zip(names, sums / active.sum(0).clamp_min(1)))
            terms["acc_fdc"] = terms["acc_fdc"] * 100
            means = {key: v.tolist() for key, v in {**terms, **group.weighted_terms(terms)}.items()}
            for pos, k in enumerate(live):
                record = {"epoch": epoch, "lr": lr[pos]}
                if epoch == 0:  # how this run's numbers were computed: products, and the optimiser's kernel
                    kernel = "fused" if group.fused[cfgs[k].optimizer] else "public fallback"
                    record["numerics"] = {**NUMERICS, "optimizer_kernel": kernel}
                record.update({key: means[key][pos] for key in HISTORY_KEYS + names[len(TERMS):]
                               if _logged(key, cfgs[k])})
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
    builtin = {"frg": frg and cfg.loss_frg, "ce_fdc": fdc and cfg.loss_ce_fdc, "dist": fdc and cfg.loss_dist,
               "base": fdc, "acc_fdc": fdc, "ce_pc": pc and cfg.loss_ce_pc, "kl_pc": pc and cfg.loss_kl_pc,
               "pc": pc, "total": True}
    return builtin[key] if key in builtin else key in cfg.loss_weights()
