"""Per-epoch curves of a group: every configuration evaluated at the end of every epoch, in one batched pass.

At the end of an epoch the monitor runs the group's stacked heads (the same padded tensors and
`mlp_forward` a training step uses) on

* every test image: the base branch's prediction (argmax over base classes of z_FDC), the new
  branch's (argmax over new classes of z_PC) and BRG's b. Test labels are not read until training
  is over (`finish`), so nothing can choose an epoch on the test split;
* the validation split, scored at once (the only split `select = "val"` may choose by);
* the epoch's training views: FRG's mean r and its AUC against r* (on views the area gate keeps),
  as `evaluation.gate_summary` computes them after training.

`finish` scores the stored test predictions and writes each epoch's numbers into the run's history
(`test_base`, `test_new`, `test_hm` or `test_all`; `val_*`; `r_mean`, `frg_auc`, `b_mean_new`), and
marks the reported epoch with `selected`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation import CurveData, CurveSplit, gate_summary, score_predictions
from ..indicators import brg_indicators
from ..training import TrainConfig
from .mlp import mlp_forward
from .table import gate_columns

CHUNK_ELEMENTS = 1 << 22  # the largest (K, rows, D) intermediate of the batched pass, in elements


class Monitor:
    """Evaluates the configurations of one group (`cfgs`, positions 0…K−1) at the end of every epoch."""

    def __init__(self, curve: CurveData, cfgs: list[TrainConfig], device: torch.device):
        self.curve, self.cfgs, self.device = curve, cfgs, device
        self.classes = curve.classes
        self.columns = gate_columns(cfgs)  # the gate MLP's inputs of the group (and of its narrowed groups)
        self.txt = curve.txt_bb.to(device, torch.float32)
        ids = curve.base if self.classes == "base" else torch.arange(len(curve.txt_bb)).numpy()
        self.sets = {"base" if self.classes == "base" else "all": torch.as_tensor(ids, device=device)}
        if self.classes == "base":
            self.sets["new"] = torch.as_tensor(curve.new, device=device)
        # the validation split is evaluated when a configuration chooses its epoch by it (its curve is recorded too)
        by_val = any(c.select == "val" for c in cfgs)
        self.splits = {"test": self._frozen(curve.test),
                       **({"val": self._frozen(curve.val)} if curve.val and by_val else {})}
        self.test_pred: list[list[dict]] = [[] for _ in cfgs]  # per configuration, per epoch: predictions (CPU)
        self.epochs: list[list[dict]] = [[] for _ in cfgs]  # per configuration, per epoch: val and gate numbers
        self.best: list[float | None] = [None for _ in cfgs]
        self.best_epoch: list[int | None] = [None for _ in cfgs]
        self._labels: Tensor | None = None  # the test labels, read by the first `finish`

    def _frozen(self, split: CurveSplit) -> dict:
        """What does not change during training: image vectors and, per τ, the new branch's logits and BRG input."""
        dev = self.device
        out = {"x": split.full.to(dev, torch.float32), "labels": split.labels}
        out["x_new"] = out["x"] if split.full_new is split.full else split.full_new.to(dev, torch.float32)
        if "new" in self.sets:
            new = self.sets["new"]
            s = self.curve.scale
            z_full = s * out["x_new"] @ F.normalize(self.txt[new], dim=-1).T
            z_clip = s * F.normalize(split.clip.to(dev, torch.float32), dim=-1) @ \
                F.normalize(self.curve.txt_clip.to(dev, torch.float32)[new], dim=-1).T
            out["z_full_new"], out["z_diff_new"] = z_full, z_clip - z_full
            out["gate_in"] = {}
            for tau in sorted({c.tau for c in self.cfgs}):
                v = brg_indicators(z_full, z_clip, tau, self.columns[1])
                frg_unused = v.new_zeros(v.shape[0], len(self.columns[0]))  # FRG's columns: unused here
                out["gate_in"][tau] = torch.cat([frg_unused, v], dim=-1)
        return out

    # -- the batched pass ----------------------------------------------------------------------

    @staticmethod
    def _fdc_argmax(x: Tensor, layers, tn: Tensor, cols: Tensor) -> Tensor:
        """(K, N) class positions (in `cols`) of the largest cos(x + A(x), t) over the classes `cols`; `tn` is
        n(t). The image vector's norm scales a row of cosines and leaves its argmax, so it is not divided out."""
        k, n, d = tn.shape[0], x.shape[0], x.shape[1]
        step = max(1, CHUNK_ELEMENTS // max(1, k * max(d, tn.shape[1])))
        t_cols = tn[:, cols].transpose(1, 2)
        out = []
        for i in range(0, n, step):
            xs = x[i:i + step]
            e = xs + mlp_forward(xs, layers, None)[0]  # (K, n, D)
            out.append(torch.bmm(e, t_cols).argmax(-1))
        return torch.cat(out, dim=1)

    def _b(self, frozen: dict, group, live: list[int]) -> Tensor:
        """BRG's b on every image of a split, (K, N), each configuration at its own τ."""
        b = None
        for tau, gate_in in frozen["gate_in"].items():
            q = mlp_forward(gate_in, group.layers["gate"], group.acts)[0][..., 1]
            rows = torch.tensor([self.cfgs[k].tau == tau for k in live], device=self.device)
            b = torch.sigmoid(q) if b is None else torch.where(rows.view(-1, 1), torch.sigmoid(q), b)
        return b

    def _predict(self, frozen: dict, group, live: list[int], tn: Tensor) -> dict[str, Tensor]:
        """Predicted class ids (K, N) of the base/new branches (or all classes), and b, on one split."""
        layers = group.layers["fdc_img"]
        out = {}
        for name, ids in self.sets.items():
            if name == "new":
                continue
            out[name] = ids[self._fdc_argmax(frozen["x"], layers, tn, ids)]
        if "new" in self.sets:
            ids = self.sets["new"]
            b = self._b(frozen, group, live)
            z = frozen["z_full_new"]
            n = z.shape[0]
            step = max(1, CHUNK_ELEMENTS // max(1, len(live) * z.shape[1]))
            pc = torch.cat([torch.addcmul(z[i:i + step], b[:, i:i + step, None], frozen["z_diff_new"][i:i + step])
                            .argmax(-1) for i in range(0, n, step)], dim=1)
            pc_on = torch.tensor([self.cfgs[k].use_pc for k in live], device=self.device).view(-1, 1)
            if not bool(pc_on.all()):  # without PC new classes go through the one adapted head (`predict_new`)
                fdc = self._fdc_argmax(frozen["x_new"], layers, tn, ids)
                pc = torch.where(pc_on, pc, fdc)
            out["new"] = ids[pc]
            out["b"] = torch.where(pc_on, b, torch.full_like(b, float("nan")))
        return out

    @torch.no_grad()
    def observe(self, epoch: int, group, live: list[int], rows: Tensor, weight: Tensor) -> list[int]:
        """Evaluate the group's configurations (`live`: their positions in `cfgs`) after `epoch`, whose
        training rows were `rows`/`weight` (steps, K, B). Returns the positions in `live` whose
        validation score improved and which select by validation: their heads are the ones to keep."""
        tn = F.normalize(self.txt + mlp_forward(self.txt, group.layers["fdc_txt"], None)[0], dim=-1)  # (K, C, D)
        test = self._predict(self.splits["test"], group, live, tn)
        val = None
        if "val" in self.splits:
            v = self.splits["val"]
            preds = self._predict(v, group, live, tn)
            labels = v["labels"].to(self.device)
            val = [score_predictions({k2: p[pos] for k2, p in preds.items()}, labels, self.curve)
                   for pos in range(len(live))]
        gates = self._gate_stats(group, live, rows, weight)
        improved = []
        for pos, k in enumerate(live):
            self.test_pred[k].append({name: p[pos].to("cpu", torch.float16 if name == "b" else torch.int32)
                                      for name, p in test.items()})
            entry = {"epoch": epoch, **gates[pos]}
            if val is not None:
                entry.update({f"val_{key}": value for key, value in val[pos].items() if key != "b_mean_new"})
                score = val[pos].get("all" if self.classes == "all" else "hm")
                if self.cfgs[k].select == "val" and score is not None and (self.best[k] is None or score > self.best[k]):
                    self.best[k], self.best_epoch[k] = score, epoch
                    improved.append(pos)
            self.epochs[k].append(entry)
        return improved

    def _gate_table(self, group) -> Tensor:
        """The columns of the group's statistics table the gate statistics read (gate input, r*, usable),
        copied once per table (narrowed groups share their parent's)."""
        if getattr(self, "_slim_of", None) is not group.table:
            stats = group.statistics
            first = stats.start("gate_in")
            cols = [*range(first, first + stats.cols["gate_in"]), stats.start("r_star"), stats.start("usable")]
            self._slim, self._slim_of = group.table[:, cols], group.table
        return self._slim

    def _gate_stats(self, group, live: list[int], rows: Tensor, weight: Tensor) -> list[dict]:
        """FRG's mean r and AUC on the epoch's training views (None without FRG)."""
        k = len(live)
        r_rows = rows.permute(1, 0, 2).reshape(k, -1)
        w = weight.permute(1, 0, 2).reshape(k, -1) > 0
        table = self._gate_table(group)[r_rows + group.row_offset]  # (K, R, gate inputs + 2)
        gate_in, r_star, usable = table[..., :-2], table[..., -2], table[..., -1]
        r = torch.sigmoid(mlp_forward(gate_in, group.layers["gate"], group.acts)[0][..., 0])
        out = []
        for pos, idx in enumerate(live):
            cfg = self.cfgs[idx]
            if not (cfg.use_fdc and cfg.use_frg):
                out.append({"r_mean": None, "frg_auc": None})
                continue
            m = w[pos]
            s = gate_summary(r[pos][m].cpu(), r_star[pos][m].cpu(), usable[pos][m].cpu())
            out.append({"r_mean": s["r_mean"], "frg_auc": s["frg_auc"]})
        return out

    # -- after training ------------------------------------------------------------------------

    def selected_epoch(self, k: int) -> int:
        """The epoch configuration k reports: the last, or (select = "val") the first with the best
        validation score."""
        last = len(self.epochs[k]) - 1
        if self.cfgs[k].select == "val":
            if self.best_epoch[k] is None:
                raise ValueError("select='val' needs a validation split with images of the run's classes; this "
                                 "cache has none (extract with val images, or use select=last)")
            return self.best_epoch[k]
        return last

    def finish(self, k: int, history: list[dict]) -> None:
        """Configuration k has trained its last epoch: choose its epoch, then (and only then) read the test
        labels, score its stored predictions and write each epoch's numbers into its `history`."""
        chosen = self.selected_epoch(k)
        if self._labels is None:
            self._labels = self.curve.read_test_labels()
        for epoch, (entry, extra, pred) in enumerate(zip(history, self.epochs[k], self.test_pred[k])):
            scores = score_predictions(pred, self._labels, self.curve)
            entry.update({f"test_{key}" if key != "b_mean_new" else key: value for key, value in scores.items()})
            entry.update({key: value for key, value in extra.items() if key != "epoch"})
            entry["selected"] = epoch == chosen
        self.test_pred[k] = []  # scored: the predictions are no longer needed
