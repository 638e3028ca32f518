"""fvgpt-cache: FVG-PT (Foreground View-Guided Prompt Tuning) heads trained from cached CLIP features.

The library's modules, in pipeline order: `data` and `datasets` (splits, Dassl few-shot sampling),
`views` (full and foreground views), `models` (open_clip loading), `extraction` and `store` (the
HDF5 cache) and `inspection`, `prompts`, `backbones` and `linear_probe` (backbones and baselines
from the cache), `heads` (the FVG-PT math),
`training`, `evaluation` and `runs` (one run), `grids` and `reports` (ablations), `world` (the
synthetic world), `synthetic` (image-free feature caches for tests and benchmarks) and `demo`. The command line lives in `fvgpt_cache.cli`.
"""

__version__ = "0.1.0"
