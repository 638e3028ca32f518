"""Training K FVG-PT configurations at once: stacked tensors, hand-written gradients, one optimiser step.

Every run trains here; a single `train` is a group of one. The configurations of a group share the
training data (one cache, class set and backbone), the batch size, the device and the FDC depth;
everything else may differ per configuration and becomes data:

* components and loss terms: per-configuration 0/1 factors on the loss terms and on r;
* λ_d, λ_frg, λ_pc, τ, the logit scale switch, the FRG margin, the area gate, r's source: factors;
* widths: zero-padded hidden units (a padded unit starts at zero and its gradient is exactly zero);
  `train_group` trains each padded shape (FDC width, gate width, gate depth) as its own part, since
  padding costs more than a part;
* gate depths: layers padded to the group's depth with frozen identity layers, and a 1-layer gate
  as a frozen embedding of its inputs followed by its one real layer (per-layer activation masks);
* indicator subsets: the columns a configuration does not use are zero and frozen;
* lr, weight decay, momentum, optimiser (SGD / AdamW), warm-up and epochs: per-configuration
  schedules; configurations with equal settings step together in one call of torch's fused SGD or
  AdamW kernel; a configuration whose (smaller) data fraction has no batch left in an epoch takes no
  step, and one whose epochs are over leaves the group (`Group.narrowed`);
* data fraction, seed, drop_last: per-configuration batch plans.

The built-in terms' gradients are written by hand (`step.manual_backward`, checked against autograd of
`heads.FVGPTHead.losses_from` in the tests; autograd over the same stacked forward costs 1.5–1.9× more per step, see
docs/decisions.md); registered loss terms run through autograd on the same stacked tensors. A step is about a
hundred small tensor operations. To keep
that number down, a step reads all its frozen statistics with one index into a single table, the FRG
and BRG gates run as one block-diagonal MLP, the FDC cosine logits are normalised after the product
(no normalised copies of the adapted vectors), and SGD over a whole group is one fused call on the
flat buffers.
Parameters and gradients live in flat buffers; the parameter of a layer is a contiguous
(K, out, in) view into them. Entries that must not move (frozen identity and embedding layers,
unused indicator columns, a switched-off adapter's bias) are put back after every step.
"""
from .group import GROUP_FIELDS, SMALL_STEP_FLOPS, Group, TrainingStopped, group_key
from .step import TERMS
from .layout import Layout, gather, scatter
from .parts import available_memory, memory_estimate, split_for_memory, train_group, train_head, shape_parts

__all__ = ["GROUP_FIELDS", "SMALL_STEP_FLOPS", "TERMS", "Group", "TrainingStopped", "Layout", "available_memory", "gather", "group_key",
           "memory_estimate", "scatter", "split_for_memory", "train_group", "train_head", "shape_parts"]
