"""A whole study from one plan file: extract → backbones → FVG-PT grids → report, resumable and shared.

A plan (TOML, `load_plan`) names the data, the model, the datasets, seeds, shots, backbones and what
to train; `build_jobs` turns it into jobs with explicit outputs under the plan's `out` folder and
their dependencies. Each job calls the library (extraction, backbone training or import, grids,
reports) and, when it ends, writes a status file `out/jobs/<job>.json` (done, failed or skipped,
with the job's settings) and keeps its log in `out/logs/<job>.log`. The files on the shared disk
are the whole coordination:

* a rerun skips every job whose status says done with the same settings (a job done with other
  settings is refused by name before anything runs); an interrupted job resumes through the
  resume of its own step (extraction's partial file, the grid's results.jsonl);
* a failing job is recorded with its error, its dependants are skipped, the rest goes on;
* `shard=(i, n)` runs a deterministic share: the caches (a dataset, a seed, a crop scale) are
  dealt round robin and every job of a cache goes to its shard, so two shards never write one file;
  the report is written by whichever process finds every other job finished;
* under torchrun (`distributed.current_job()`), image passes (extraction, PromptSRC/MMRL imports)
  run on every rank together as `extract` does, then the caches' head jobs (CoOp/KgCoOp training,
  grids) are taken from a queue one cache at a time by whichever rank is free; with
  `image_passes="per-rank"` a rank takes whole caches, image passes included;
* Table 2's jobs write into several caches (the ImageNet source and every target), so they are
  tail jobs (no cache of their own) that run on one process once every cache's jobs have finished.

Modules: `plan` (the file), `jobs` (the graph, shards, status files), `runners` (what each kind of
job calls), `driver` (`run_study`: order, failures, torchrun), `estimate` (the dry run).
"""
from .driver import IMAGE_PASSES, Outcome, StudyResult, execute, run_study
from .estimate import estimate, measure_rates, missing_inputs, overview
from .jobs import (FINAL, STAGES, StudyJob, build_jobs, cache_path, check_settings, finished_since, log_path,
                   parse_shard, read_status, results_digest, shard_units, status_path)
from .plan import DatasetEntry, study_backbones, Plan, PlanError, load_plan, paper_plan
from .runners import RUNNERS

__all__ = ["IMAGE_PASSES", "Outcome", "StudyResult", "execute", "run_study", "estimate", "measure_rates",
           "missing_inputs", "overview", "FINAL", "STAGES", "StudyJob", "build_jobs", "cache_path", "check_settings",
           "finished_since", "log_path", "parse_shard", "read_status", "results_digest", "shard_units", "status_path",
           "study_backbones", "DatasetEntry", "Plan", "PlanError", "load_plan", "paper_plan", "RUNNERS"]
