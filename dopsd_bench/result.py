"""The run directory's file names and result.json's schema: one home for what the runner writes and the store,
sweep and leaderboard read (free of torch, so that reading results stays light)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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


@dataclass
class Result:
    """A cell's result.json: what `run` and `eval` (and a sequence run) write once the cell is complete, and what
    the store, sweep and leaderboard read back. `to_json` gives the file's object."""

    method: str  # the method's name, or `eval`'s label
    task: str
    instance: str
    family: str  # concept, style or sequence
    backbone: str
    model: str  # the model id with its weights digest: which weights made the numbers
    seed: int
    budget: dict[str, Any]  # BUDGET_KEYS; all None for a method that trains nothing (it pairs with every budget)
    cost: dict[str, Any] | None  # COST_KEYS: what training spent; None when nothing trained
    metrics: dict[str, Any]  # name -> {"mean", "per_sample", "higher_is_better", ...} (or a group of those)
    timings: dict[str, float]  # seconds per phase, `total_s` included
    training: dict[str, Any]  # steps run, the step it resumed from, the final loss (a sequence: rounds)
    env: dict[str, Any]  # versions, device, git sha, processes
    scorer: dict[str, Any] | list[dict[str, Any]]  # how it was scored (a sequence: one per round)
    samples_rows: list[str]  # what each row of samples.png shows, top to bottom
    adapter: str | None  # ADAPTER_DIR when the cell saved its LoRA
    precision: dict[str, Any] | None = None  # dtype, checkpointing, evaluation batch (single cells)
    rounds: list[dict[str, Any]] | None = None  # a sequence: every round's record
    sequence: dict[str, Any] | None = None  # a sequence: its accuracy matrix and ACC / BWT / forgetting
    samples: str = SAMPLES_FILE
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The file's object; the optional parts are left out where they do not apply."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None or k not in ("precision", "rounds", "sequence")}


def no_budget() -> dict[str, None]:
    """The budget a method that trains nothing records (store.NO_BUDGET when read)."""
    return dict.fromkeys(BUDGET_KEYS)
