"""Tuned backbones in a cache: one module per method, one for checkpoints, one for the cache's CLIP model.

* `coop`: CoOp and KgCoOp prompt learning from the cached image features, and their official checkpoints;
* `ensemble`: CLIP's prompt-ensemble baseline;
* `checkpoints`: reading Dassl checkpoints with `weights_only=True`;
* `cache_model`: rebuilding and verifying the CLIP model a cache was extracted with.
"""
from .cache_model import VERIFY_THRESHOLD, model_for_cache, verify_model
from .checkpoints import load_context, resolve_checkpoint, save_coop_checkpoint
from .coop import (
    KGCOOP_CTX_INIT, METHODS, BackboneConfig, BackboneResult, backbone_features, default_epochs, kgcoop_loss_term,
    load_backbone, train_backbone, write_backbone,
)
from .ensemble import TEMPLATE_SETS, ensemble_text_features, write_ensemble

__all__ = [
    "VERIFY_THRESHOLD", "model_for_cache", "verify_model", "load_context", "resolve_checkpoint", "save_coop_checkpoint",
    "KGCOOP_CTX_INIT", "METHODS", "BackboneConfig", "BackboneResult", "backbone_features", "default_epochs",
    "kgcoop_loss_term", "load_backbone", "train_backbone", "write_backbone", "TEMPLATE_SETS",
    "ensemble_text_features", "write_ensemble",
]
