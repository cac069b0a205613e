"""The run directory's file names and result.json's schema: one home for what the runner writes and the store,
sweep and leaderboard read (free of torch, so that reading results stays light)."""

from __future__ import annotations

# 2: a sequence (continual-tuning) cell adds `rounds` and `sequence`; every version-1 key is unchanged, so both read
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"
# the in-context teacher (prompt + reference image) on the first evaluation prompts: one row each, top to bottom
TEACHER_SAMPLES_FILE = "teacher.png"
TEACHER_SAMPLES_ROWS = ("reference images", "teacher before tuning (untuned model)", "teacher after tuning")
ADAPTER_DIR = "adapter"
RESULT_KEYS = ("schema_version", "method", "task", "instance", "backbone", "model", "seed", "budget", "metrics",
               "timings", "env")
# a cell's training budget, as result.json's `budget` holds it: the same names are RunConfig's fields, the sweep's
# budget keys and (with - for _) `dopsd-bench run`'s flags. One of steps, budget_flops, budget_seconds sets the length.
BUDGET_KEYS = ("steps", "budget_flops", "budget_seconds", "batch_size", "lr", "rank", "grad_accum")
# what a cell's training spent, as result.json's `cost` holds it (and the store's columns of the same names)
COST_KEYS = ("train_steps", "train_flops", "flops_per_step", "train_seconds")
