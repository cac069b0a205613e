"""Run dirs -> pandas: read every result.json under a directory into tidy frames.

One run dir is one cell (method x task x instance x seed x budget). A result.json looks like
    {"schema_version": 2, "method", "task", "instance", "backbone", "seed",
     "budget": {"steps" | "budget_flops" | "budget_seconds", "batch_size", "lr", "rank"},
     "cost": {"train_steps", "train_flops", "flops_per_step", "train_seconds"} | null (older results have none),
     "metrics": {name: {"mean": float, "per_sample": [..] | null, "higher_is_better": bool}, ...},
     "timings": {...}, "env": {...}}
Metrics that are not of that shape (e.g. `step_curve`, a nested structure) are kept raw in `Results.extra`.
A sequence cell (continual tuning, schema 2) also holds `rounds` and `sequence` (docs/continual.md); its metrics
(acc, bwt, forgetting, the last round's retention) load like any cell's. Version-1 files load as they are.
Partial, unreadable or schema-mismatched files are skipped with a warning: a half-finished sweep still aggregates.

    from dopsd_bench.store import load_results
    res = load_results("runs/")
    res.samples   # one row per cell x metric x sample index
    res.summary   # one row per cell x metric (the mean the run reported)
    res.cells     # one row per cell (config, timings, paths)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dopsd_bench.result import (
    BUDGET_KEYS,
    COST_KEYS,
    READABLE_SCHEMA_VERSIONS,
    RESULT_FILE,
    SAMPLES_FILE,
    TEACHER_SAMPLES_FILE,
)

REQUIRED_KEYS = ("schema_version", "method", "task", "instance", "seed", "metrics")
CELL_KEYS = ["method", "task", "instance", "backbone", "seed", "budget"]


@dataclass
class Results:
    samples: pd.DataFrame  # cell keys + cell, metric, sample, value, higher_is_better
    summary: pd.DataFrame  # cell keys + cell, metric, mean, n_samples, higher_is_better
    cells: pd.DataFrame  # cell keys + cell, run_dir, samples_png, teacher_png, family, budget, cost spent, timings
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell -> {metric name: raw value}
    skipped: list[str] = field(default_factory=list)  # "path: why" for every file that was not loaded

    @property
    def empty(self) -> bool:
        return self.cells.empty


NO_BUDGET = "none"  # a run that trained nothing (base, icl): its budget fields are all null


def budget_label(budget: dict[str, Any] | None) -> str:
    """A short stable name for a budget, e.g. 'steps=200,batch_size=4,lr=0.0001,rank=8' ('none' if all null)."""
    budget = budget or {}
    keys = [k for k in BUDGET_KEYS if budget.get(k) is not None]
    keys += sorted(k for k in budget if k not in BUDGET_KEYS and budget[k] is not None)
    # a FLOP budget reads as 1.4e+13, not 14000000000000.0 (the other values keep the form labels always had)
    return ",".join(f"{k}={budget[k]:.6g}" if k == "budget_flops" else f"{k}={budget[k]}" for k in keys) or NO_BUDGET


def _validate(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 -- bad file content
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if data["schema_version"] not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"schema_version {data['schema_version']!r}, this reader knows "
                         f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    if not isinstance(data["metrics"], dict):
        raise ValueError("'metrics' is not an object")  # noqa: TRY004 -- bad file content, caught with the rest
    return data


def _is_metric_entry(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("mean"), (int, float)) and not isinstance(
        value.get("mean"), bool
    )


def _flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> tuple[dict[str, dict], dict[str, Any]]:
    """Split metrics into scalar entries (name -> entry) and anything else (name -> raw).

    A dict whose values are all metric entries (e.g. grouped teacher diagnostics) is flattened to 'parent.child'.
    """
    scalars: dict[str, dict] = {}
    extra: dict[str, Any] = {}
    for name, value in metrics.items():
        full = f"{prefix}{name}"
        if _is_metric_entry(value):
            scalars[full] = value
            if set(value) - {"mean", "per_sample", "higher_is_better", "std", "n"}:
                extra[full] = value  # carries more than a scalar (e.g. a step curve with a summary mean)
        elif isinstance(value, dict) and value and all(_is_metric_entry(v) for v in value.values()):
            inner, _ = _flatten_metrics(value, prefix=f"{full}.")
            scalars.update(inner)
            extra[full] = value
        else:
            extra[full] = value
    return scalars, extra


def _number(x: Any) -> float:
    if x is None:
        return math.nan
    return float(x)


def require_results(results: str | Path, hint: str = "run a sweep first") -> Results:
    """`load_results` for a command that needs at least one complete cell: UserError (with `hint`, what to run)
    when the folder is missing or holds none."""
    from dopsd_bench.errors import UserError

    try:
        res = load_results(results)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if res.empty:
        raise UserError(f"no complete result.json under {results}; {hint}")
    return res


def load_results(root: str | Path, pattern: str = f"**/{RESULT_FILE}") -> Results:
    """Load every result.json under `root`. Files that cannot be used are listed in `skipped` and warned about."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"results dir {root} does not exist; pass the --out dir of a run or sweep")
    sample_rows: list[dict] = []
    summary_rows: list[dict] = []
    cell_rows: list[dict] = []
    extra: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for path in sorted(root.glob(pattern)):
        try:
            data = _validate(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            skipped.append(f"{path}: {e}")
            continue
        run_dir = path.parent
        cell = run_dir.relative_to(root).as_posix()
        keys = _cell_keys(data, cell)
        cell_rows.append(_cell_row(data, keys, run_dir))
        scalars, raw = _flatten_metrics(data["metrics"])
        if raw:
            extra[cell] = raw
        _add_metric_rows(scalars, keys, summary_rows, sample_rows)
    for s in skipped:
        warnings.warn(f"skipped {s}", stacklevel=2)
    key_cols = [*CELL_KEYS, "cell"]
    samples = pd.DataFrame(sample_rows, columns=[*key_cols, "metric", "sample", "value", "higher_is_better"])
    summary = pd.DataFrame(
        summary_rows, columns=[*key_cols, "metric", "mean", "n_samples", "per_sample", "higher_is_better"]
    )
    cells = pd.DataFrame(cell_rows)
    if cells.empty:
        cells = pd.DataFrame(columns=[*key_cols, "family", "run_dir", "samples_png", "teacher_png", *BUDGET_KEYS,
                                      *COST_KEYS])
    _warn_duplicate_cells(cells)
    return Results(samples=samples, summary=summary, cells=cells, extra=extra, skipped=skipped)


def _cell_keys(data: dict[str, Any], cell: str) -> dict[str, Any]:
    """The columns that name a cell, as every row of it carries them."""
    return {
        "method": str(data["method"]),
        "task": str(data["task"]),
        "instance": str(data["instance"]),
        "backbone": str(data.get("backbone", "")),
        "seed": int(data["seed"]),
        "budget": budget_label(data.get("budget") or {}),
        "cell": cell,
    }


def _cell_row(data: dict[str, Any], keys: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One row of `Results.cells`: the cell's keys, config, paths, budget, cost spent and timings."""
    budget = data.get("budget") or {}
    timings = data.get("timings") or {}
    cost = data.get("cost") or {}  # what training spent; NaN where a result predates it or trained nothing
    return {
        **keys,
        "family": str(data.get("family", data["task"])),
        "model": str(data.get("model") or ""),  # id with a weights digest: which weights made the run
        "run_dir": str(run_dir),
        "samples_png": str(run_dir / SAMPLES_FILE) if (run_dir / SAMPLES_FILE).exists() else None,
        "samples_rows": " / ".join(map(str, data.get("samples_rows") or [])),
        "teacher_png": str(run_dir / TEACHER_SAMPLES_FILE) if (run_dir / TEACHER_SAMPLES_FILE).exists() else None,
        **{k: budget.get(k) for k in BUDGET_KEYS},
        **{k: _number(cost.get(k)) for k in COST_KEYS},
        **{f"time_{k}": v for k, v in timings.items() if isinstance(v, (int, float))},
    }


def _add_metric_rows(scalars: dict[str, dict], keys: dict[str, Any], summary_rows: list[dict],
                     sample_rows: list[dict]) -> None:
    """A cell's scalar metrics as rows: one summary row per metric, one sample row per per-sample value."""
    for name, entry in scalars.items():
        hib = bool(entry.get("higher_is_better", True))
        per_sample = entry.get("per_sample")
        if isinstance(per_sample, list) and per_sample:
            values = [_number(v) for v in per_sample]
        else:
            values = [float(entry["mean"])]
            per_sample = None
        summary_rows.append(
            {**keys, "metric": name, "mean": float(entry["mean"]), "n_samples": len(values),
             "per_sample": per_sample is not None, "higher_is_better": hib}
        )
        for i, v in enumerate(values):
            # sample -1 marks a set-level metric (one value per cell, e.g. a Frechet distance)
            sample_rows.append({**keys, "metric": name, "sample": i if per_sample is not None else -1,
                                "value": v, "higher_is_better": hib})


def _warn_duplicate_cells(cells: pd.DataFrame) -> None:
    dupes = cells[cells.duplicated(subset=CELL_KEYS, keep=False)]
    if not dupes.empty:
        warnings.warn(
            f"{len(dupes)} run dirs share the same (method, task, instance, backbone, seed, budget): "
            f"{sorted(dupes['cell'])[:4]} ...; their samples are pooled", stacklevel=3
        )


def models_of(res: Results) -> dict[str, str]:
    """backbone -> the model id its runs were made on. Runs of one backbone on different weights (a rebuilt or
    edited model) are not comparable, so a mix is a UserError that names the models and what to do. Runs that
    recorded no model id are taken to match."""
    from dopsd_bench.errors import UserError

    if res.cells.empty or "model" not in res.cells:
        return {}
    out = {}
    for backbone, g in res.cells.groupby("backbone", sort=True):
        counts = g.loc[g["model"] != "", "model"].value_counts()
        if len(counts) > 1:
            stale = ", ".join(f"{m} ({n} runs, e.g. {g.loc[g['model'] == m, 'run_dir'].iloc[0]})"
                              for m, n in counts.items())
            raise UserError(f"the results mix runs of backbone {backbone} made on different weights: {stale}. "
                            "Their numbers are not comparable: re-run the sweep (it re-runs cells made on other "
                            "weights) or point --results at one model's runs")
        out[str(backbone)] = str(counts.index[0]) if len(counts) else ""
    return out


def metric_direction(res: Results) -> dict[str, bool]:
    """metric name -> higher_is_better, as the runs declared it."""
    if res.summary.empty:
        return {}
    return res.summary.groupby("metric")["higher_is_better"].first().astype(bool).to_dict()
