"""fvgpt-cache: FVG-PT (Foreground View-Guided Prompt Tuning) heads trained from cached CLIP features.

The public API (`from fvgpt_cache import ...`, listed in `__all__`; see docs/api.md and the tutorial
docs/tutorial.md): open a cache, configure, `train` one run, `grid` many, `load_records`, `report`;
below them the pipeline's entry points (extraction, masks, backbones, the study driver) that the
command line calls. Names are imported on first use, so `import fvgpt_cache` stays light (no torch).

The library's modules, in pipeline order: `data` and `datasets` (splits, Dassl few-shot sampling),
`views` (full and foreground views), `models` (open_clip loading), `extraction` and `store` (the
HDF5 cache) and `inspection`, `prompts`, `backbones` and `linear_probe` (backbones and baselines
from the cache), `heads` (the FVG-PT math),
`training`, `evaluation` and `runs` (one run), `records` (its typed results record), `grids` and
`reports` (ablations), `api` (the functions above), `world` (the synthetic world), `synthetic`
(image-free feature caches for tests and benchmarks) and `demo`. The command line lives in `fvgpt_cache.cli`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name → (module, attribute in it); one entry per public name.
_EXPORTS = {
    # --- the Python API: caches, configurations, runs, grids, records, reports
    "open_cache": ("store", "open_cache"),
    "Cache": ("store", "Cache"),
    "CacheError": ("store", "CacheError"),
    "TrainConfig": ("training", "TrainConfig"),
    "configure": ("api", "configure"),
    "parse_value": ("training", "parse_value"),
    "train": ("api", "train"),
    "plan_grid": ("api", "plan_grid"),
    "GridPlan": ("api", "GridPlan"),
    "grid": ("api", "grid"),
    "load_records": ("api", "load_records"),
    "report": ("api", "report"),
    "Report": ("api", "Report"),
    "REPORT_FORMATS": ("api", "REPORT_FORMATS"),
    "baselines": ("api", "baselines"),
    "RunRecord": ("records", "RunRecord"),
    "RecordError": ("records", "RecordError"),
    "SCHEMA_VERSION": ("records", "SCHEMA_VERSION"),
    "load_head": ("runs", "load_head"),
    "write_feature_cache": ("synthetic", "write_feature_cache"),
    # grid settings as the command line and grid files give them
    "PRESETS": ("grids", "PRESETS"),
    "ABLATIONS": ("ablations", "ABLATIONS"),
    "parse_params": ("grids", "parse_params"),
    "parse_seeds": ("grids", "parse_seeds"),
    "merge_params": ("grids", "merge_params"),
    "read_grid_file": ("grids", "read_grid_file"),
    "TrainingStopped": ("engine", "TrainingStopped"),
    "CI_METHODS": ("reports", "CI_METHODS"),
    "describe_averaged": ("reports", "describe_averaged"),
    "check_tensorboard": ("tensorboard", "check_available"),
    "write_tensorboard": ("tensorboard", "write_run"),
    # --- parameters: one declaration each (training.PARAMETERS), plug-in parameters
    "PARAMETERS": ("training", "PARAMETERS"),
    "Parameter": ("parameters", "Parameter"),
    "InvalidParameterError": ("parameters", "InvalidParameterError"),
    "register_parameter": ("parameters", "register_parameter"),
    "unregister_parameter": ("parameters", "unregister_parameter"),
    "all_parameters": ("parameters", "all_parameters"),
    "lookup_parameter": ("parameters", "lookup"),
    "parameters_table": ("parameters", "markdown_table"),
    # --- plug-ins: loading the modules that register them; indicators and loss terms
    "load_plugins": ("plugins", "load_plugins"),
    "register_indicator": ("indicators", "register_indicator"),
    "unregister_indicator": ("indicators", "unregister_indicator"),
    "indicator_names": ("indicators", "indicator_names"),
    "IndicatorInputs": ("indicators", "IndicatorInputs"),
    "register_loss_term": ("loss_terms", "register_loss_term"),
    "unregister_loss_term": ("loss_terms", "unregister_loss_term"),
    "loss_terms": ("loss_terms", "loss_terms"),
    "StepTensors": ("loss_terms", "StepTensors"),
    # --- plug-ins: backbone methods
    "BackboneMethod": ("methods", "BackboneMethod"),
    "Preset": ("methods", "Preset"),
    "register_backbone_method": ("methods", "register_backbone_method"),
    "unregister_backbone_method": ("methods", "unregister_backbone_method"),
    "registered_backbone_method": ("methods", "registered_backbone_method"),
    "backbone_method": ("methods", "backbone_method"),
    "find_backbone_method": ("methods", "find_backbone_method"),
    "backbone_methods": ("methods", "backbone_methods"),
    "backbone_method_names": ("methods", "backbone_method_names"),
    "preset_choices": ("presets", "preset_choices"),
    "COOP": ("methods", "COOP"),
    "KGCOOP": ("methods", "KGCOOP"),
    "PROMPTSRC": ("methods", "PROMPTSRC"),
    "MMRL": ("methods", "MMRL"),
    # --- pipeline entry points: datasets, extraction, masks, mask sources
    "generic_dataset": ("data", "generic_dataset"),
    "parse_shots": ("data", "parse_shots"),
    "short_classes": ("data", "short_classes"),
    "format_short_classes": ("data", "format_short_classes"),
    "load_dataset": ("datasets", "load_dataset"),
    "AugmentConfig": ("views", "AugmentConfig"),
    "load_clip": ("models", "load_clip"),
    "ExtractOptions": ("extraction", "ExtractOptions"),
    "extract": ("extraction", "extract"),
    "default_output": ("extraction", "default_output"),
    "text_key": ("store", "text_key"),
    "inspect_cache": ("inspection", "inspect_cache"),
    "MapSettings": ("masks", "MapSettings"),
    "MaskOptions": ("masks", "MaskOptions"),
    "write_masks": ("masks", "write_masks"),
    "mask_rows": ("masks", "mask_rows"),
    "contact_sheet": ("masks", "contact_sheet"),
    "preview_relpaths": ("masks", "preview_relpaths"),
    "load_clipseg": ("clipseg", "load_clipseg"),
    "SourceOptions": ("fg_sources", "SourceOptions"),
    "add_foreground_source": ("fg_sources", "add_foreground_source"),
    "current_job": ("distributed", "current_job"),
    "resolve_device": ("device", "resolve_device"),
    # --- backbones: training CoOp/KgCoOp from the cache, importing PromptSRC/MMRL, ensembles
    "BackboneConfig": ("backbones", "BackboneConfig"),
    "BACKBONE_RECORD": ("backbones", "BACKBONE_RECORD"),
    "train_backbone": ("backbones", "train_backbone"),
    "write_backbone": ("backbones", "write_backbone"),
    "load_backbone": ("backbones", "load_backbone"),
    "save_coop_checkpoint": ("backbones", "save_coop_checkpoint"),
    "claim_backbone_dir": ("backbones", "claim_backbone_dir"),
    "default_backbone_dir": ("backbones", "default_backbone_dir"),
    "default_epochs": ("backbones", "default_epochs"),
    "ImportOptions": ("backbones", "ImportOptions"),
    "import_backbone": ("backbones", "import_backbone"),
    "write_ensemble": ("backbones", "write_ensemble"),
    # --- demos
    "run_smoke_demo": ("demo", "run_smoke_demo"),
    "run_world_demo": ("demo", "run_world_demo"),
    "demo_spread": ("demo", "spread"),
}

# `study` (the study driver: plans, jobs, shards, `run_study`) is a subpackage, exported as a namespace.
__all__ = [*_EXPORTS, "study"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name == "study":
        return importlib.import_module(".study", __name__)
    raise AttributeError(f"module 'fvgpt_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
