"""`dopsd-bench check`: the CI regression gate. Exit 1 when a metric got worse than the baseline allows, else 0.

    dopsd-bench leaderboard --results runs/ci --save-baseline leaderboards/ci_baseline.json   # once, committed
    dopsd-bench check --results runs/ci --baseline leaderboards/ci_baseline.json              # in CI
Tiny CPU example: `dopsd-bench check --results /tmp/sw --baseline /tmp/sw_baseline.json`.

A baseline saved on other weights (its entries' model ids differ from the results') fails the check outright: after
an intended rebuild of a model, re-baseline. For every baseline entry (backbone, task, budget, method, metric) the
new mean is compared with the baseline mean. The allowed slack is the larger of the baseline's own 95% half-interval
on the worse side and its tolerance (relative to |baseline mean|; --tolerance overrides the value stored in the
file). A new mean beyond baseline ± slack on the worse side (direction from higher_is_better) is a regression;
beyond it on the better side an improvement (reported, never a failure). Entries missing from the new results are
reported, and fail only with --strict or when none is present (a gate that compared nothing has not passed). A table
of everything that moved is printed either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from dopsd_bench.errors import UserError
from dopsd_bench.leaderboard import BASELINE_SCHEMA, build_table, fmt
from dopsd_bench.store import require_results

KEYS = ["backbone", "task", "budget", "method", "metric"]
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # a failed check says why on stderr, as every error does


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"baseline {path} does not exist; write one with "
                                "`dopsd-bench leaderboard --results DIR --save-baseline FILE`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"baseline {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema_version") != BASELINE_SCHEMA or "entries" not in data:
        raise ValueError(f"baseline {path} is not a baseline file of schema {BASELINE_SCHEMA} "
                         "(written by `dopsd-bench leaderboard --save-baseline`)")
    return data


def model_mismatch(table: pd.DataFrame, baseline: dict[str, Any]) -> list[str]:
    """'backbone: baseline model -> results model' for every backbone whose weights changed since the baseline
    (entries or results without a model id match anything: baselines saved before ids were recorded)."""
    now = table.groupby("backbone")["model"].first().to_dict() if "model" in table and not table.empty else {}
    then = {e["backbone"]: e.get("model") for e in baseline["entries"] if e.get("model")}
    return [f"{b}: {m} -> {now[b]}" for b, m in sorted(then.items()) if now.get(b) and now[b] != m]


def compare_to_baseline(table: pd.DataFrame, baseline: dict[str, Any], tolerance: float | None = None) -> pd.DataFrame:
    """One row per baseline entry: old, new, slack, change, status (ok | regressed | improved | missing)."""
    new = {tuple(r[k] for k in KEYS): r for _, r in table.iterrows()} if not table.empty else {}
    rows = []
    for e in baseline["entries"]:
        key = tuple(e[k] for k in KEYS)
        old, hib = float(e["mean"]), bool(e["higher_is_better"])
        tol = abs(old) * tolerance if tolerance is not None else float(e.get("tolerance", 0.0))
        # the baseline's own interval on the worse side: a mean that stays inside it has not moved beyond noise
        worse_bound = e.get("lo") if hib else e.get("hi")
        half = abs(old - worse_bound) if worse_bound is not None and math.isfinite(worse_bound) else 0.0
        slack = max(half, tol)
        row = {**dict(zip(KEYS, key, strict=True)), "higher_is_better": hib, "old": old, "slack": slack}
        if key not in new:
            rows.append({**row, "new": math.nan, "change": math.nan, "status": "missing"})
            continue
        value = float(new[key]["mean"])
        change = value - old
        worse_by = -change if hib else change  # > 0 means worse
        status = "regressed" if worse_by > slack + 1e-12 else "improved" if -worse_by > slack + 1e-12 else "ok"
        rows.append({**row, "new": value, "change": change, "status": status})
    return pd.DataFrame(rows, columns=[*KEYS, "higher_is_better", "old", "new", "change", "slack", "status"])


def print_moves(moves: pd.DataFrame, show_all: bool = False) -> None:
    order = {"regressed": 0, "missing": 1, "improved": 2, "ok": 3}
    shown = moves if show_all else moves[(moves["status"] != "ok") | (moves["change"].abs() > 1e-12)]
    if shown.empty:
        console.print(f"no metric moved ({len(moves)} compared)")
        return
    shown = shown.sort_values("status", key=lambda s: s.map(order), kind="stable")
    table = Table(title="what moved vs the baseline")
    for col in ("status", "task", "budget", "method", "metric", "baseline", "new", "change", "allowed"):
        table.add_column(col, justify="right" if col in ("baseline", "new", "change", "allowed") else "left",
                         overflow="fold")
    colour = {"regressed": "red", "missing": "yellow", "improved": "green", "ok": "dim"}
    for _, r in shown.iterrows():
        arrow = "↑" if r["higher_is_better"] else "↓"
        table.add_row(f"[{colour[r['status']]}]{r['status']}[/]", r["task"], r["budget"], r["method"],
                      f"{r['metric']} {arrow}", fmt(r["old"]), fmt(r["new"]), fmt(r["change"], signed=True),
                      f"±{fmt(r['slack'])}")
    console.print(table)
    regressed = shown[shown["status"] == "regressed"]
    if not regressed.empty:
        names = [f"{r['method']}/{r['task']}/{r['metric']}" for _, r in regressed.iterrows()]
        console.print("regressed: " + ", ".join(names), soft_wrap=True)


def check_command(
    results: Annotated[Path, typer.Option(help="results root to check")],
    baseline: Annotated[Path, typer.Option(help="baseline file from `leaderboard --save-baseline`")],
    tolerance: Annotated[float | None, typer.Option(help="relative tolerance for every metric "
                                                         "(default: the one stored in the baseline)")] = None,
    strict: Annotated[bool, typer.Option(help="also fail when a baseline entry is missing from the results")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list every compared metric, not only what moved")] = False,
) -> None:
    """Exit 1 when a metric is worse than the baseline beyond its interval or tolerance; 0 otherwise."""
    if tolerance is not None and tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    try:
        base = load_baseline(baseline)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    # nothing to compare: say so, rather than list every baseline entry as missing
    res = require_results(results, "run the sweep the baseline was saved from first")
    table = build_table(res, n_boot=int(base.get("n_boot", 2000)), unit=str(base.get("unit", "run")))
    changed = model_mismatch(table, base)
    if changed:
        errors.print(f"[red]check failed[/red]: the baseline was saved on other weights ({'; '.join(changed)}). A "
                      "rebuilt model moves every number, so comparing them says nothing. After an intended rebuild, "
                      f"re-baseline: `dopsd-bench leaderboard --results {results} --save-baseline {baseline}`")
        raise typer.Exit(1)
    moves = compare_to_baseline(table, base, tolerance)
    print_moves(moves, show_all)
    counts = moves["status"].value_counts().to_dict()
    console.print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("regressed", "missing", "improved", "ok")))
    if len(moves) and counts.get("missing", 0) == len(moves):
        errors.print(f"[red]check failed[/red]: none of the baseline's entries is in {results}; "
                      "run the sweep the baseline was saved from")
        raise typer.Exit(1)
    if counts.get("regressed", 0) or (strict and counts.get("missing", 0)):
        errors.print("[red]check failed[/red]")
        raise typer.Exit(1)
    console.print("[green]check passed[/green]")
