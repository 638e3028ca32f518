"""Tuned backbones in a cache: one module per method, one for checkpoints, one for the cache's CLIP model.

* `coop`: CoOp and KgCoOp prompt learning from the cached image features, and their official checkpoints;
* `ensemble`: CLIP's prompt-ensemble baseline;
* `checkpoints`: reading Dassl checkpoints with `weights_only=True`;
* `cache_model`: rebuilding and verifying the CLIP model a cache was extracted with;
* `promptsrc`, `mmrl`: the prompted forwards of PromptSRC and MMRL on open_clip's towers, and their
  official checkpoints; `towers`: the pieces of open_clip's towers they recombine;
* `image_pass`: importing those checkpoints, one more pass over the cached views.
"""
from .cache_model import VERIFY_THRESHOLD, model_for_cache, verify_model
from .checkpoints import (
    BACKBONE_RECORD, claim_backbone_dir, default_backbone_dir, find_checkpoint, load_context, load_state_dict,
    resolve_checkpoint, save_coop_checkpoint,
)
from .coop import (
    KGCOOP_CTX_INIT, METHODS, BackboneConfig, BackboneResult, backbone_features, default_epochs, kgcoop_loss_term,
    load_backbone, train_backbone, write_backbone,
)
from .ensemble import TEMPLATE_SETS, ensemble_text_features, write_ensemble
from .image_pass import ImportOptions, ImportSummary, import_backbone, import_partial
from .mmrl import DEFAULT_ALPHA, MMRLRepresentation, mmrl_image_features, mmrl_text_features, read_mmrl
from .promptsrc import PromptSRCPrompts, promptsrc_image_features, promptsrc_text_features, read_promptsrc

__all__ = [
    "BACKBONE_RECORD", "claim_backbone_dir", "default_backbone_dir", "VERIFY_THRESHOLD", "model_for_cache", "verify_model", "load_context", "resolve_checkpoint", "save_coop_checkpoint",
    "KGCOOP_CTX_INIT", "METHODS", "BackboneConfig", "BackboneResult", "backbone_features", "default_epochs",
    "kgcoop_loss_term", "load_backbone", "train_backbone", "write_backbone", "TEMPLATE_SETS",
    "ensemble_text_features", "write_ensemble", "find_checkpoint", "load_state_dict", "ImportOptions",
    "ImportSummary", "import_backbone", "import_partial", "DEFAULT_ALPHA", "MMRLRepresentation", "mmrl_image_features",
    "mmrl_text_features", "read_mmrl", "PromptSRCPrompts", "promptsrc_image_features", "promptsrc_text_features",
    "read_promptsrc",
]
