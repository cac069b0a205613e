"""The report's views beyond one budget's leaderboard: continual tuning (sequence cells) and cost across budgets.

- `sequence_section`: per sequence, each method's accuracy matrix R[i][j] (fidelity on instance j after round i,
  mean over seeds) as a heatmap, and the retention FD ratio after each round, one line per method.
- `cost_section`: where a method ran at several budgets on a task, fidelity against the training FLOPs spent (log
  scale; a point's size grows with its retention FD ratio) and fidelity against retention, each method's budgets
  joined in order of cost, the Pareto front (`pareto_front`) ringed.

Both read what the store loaded (`Results.cells`, the leaderboard table); the sequence view reads each sequence
cell's result.json for its `sequence` record (docs/continual.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dopsd_bench.report_charts import esc, heatmap_svg, svg_chart
from dopsd_bench.result import RESULT_FILE
from dopsd_bench.store import NO_BUDGET

FIDELITY, RETENTION = "fidelity", "retention_fd_ratio"


# ---- Pareto front -------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[Sequence[float]], higher_is_better: Sequence[bool]) -> list[int]:
    """Indices (ascending) of the points no other point dominates. Point a dominates b when a is at least as good
    on every objective and strictly better on one; `higher_is_better[k]` gives objective k's direction. A point
    with a NaN is never on the front; equal points are both on it."""
    sign = np.array([1.0 if h else -1.0 for h in higher_is_better])
    p = np.asarray(points, dtype=float).reshape(len(points), len(sign)) * sign  # every objective: higher is better
    ok = np.isfinite(p).all(axis=1)
    front = []
    for i in np.flatnonzero(ok):
        others = p[ok]
        dominated = ((others >= p[i]).all(axis=1) & (others > p[i]).any(axis=1)).any()
        if not dominated:
            front.append(int(i))
    return front


# ---- continual tuning ---------------------------------------------------------------------------------------
def sequence_runs(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per sequence cell: its keys, `rounds` (labels), `matrix` (R), `transfer` (forward transfer's terms,
    `_transfer_terms`) and `fd_ratio` (after each round), read from the cell's result.json. Empty when the results
    hold no sequence cell."""
    rows = []
    family = cells["family"] if "family" in cells else pd.Series("", index=cells.index)
    for _, c in cells[family == "sequence"].iterrows():
        try:
            seq = json.loads((Path(c["run_dir"]) / RESULT_FILE).read_text()).get("sequence") or {}
        except (OSError, ValueError):
            continue
        if not seq.get("accuracy_matrix"):
            continue
        ratios = [_float(r.get(RETENTION)) for r in seq.get("per_round") or []]
        rows.append({k: c[k] for k in ("method", "task", "instance", "backbone", "seed", "budget")}
                    | {"rounds": tuple(seq.get("rounds") or []),
                       "matrix": seq["accuracy_matrix"], "transfer": _transfer_terms(seq), "fd_ratio": ratios})
    return pd.DataFrame(rows)


def _float(x: object) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _transfer_terms(seq: dict) -> tuple[list, list] | None:
    """(fidelity_before, fidelity_untuned) of a sequence's result when every term was scored; None otherwise
    (results made before forward transfer was scored)."""
    n = len(seq["accuracy_matrix"])
    before, untuned = seq.get("fidelity_before") or [], seq.get("fidelity_untuned") or []
    if len(before) != n or len(untuned) != n or any(not isinstance(v, (int, float)) for v in [*before[1:], *untuned]):
        return None
    return before, untuned


def with_transfer(matrix: list[list[float]], before: list, untuned: list) -> list[list[float]]:
    """R with forward transfer's terms: a first row of the untuned model's fidelity b[j], and right of the diagonal
    of row i the fidelity on round i+1's instance before it trained."""
    n = len(matrix)
    return [list(untuned)] + [row + ([before[i + 1]] if i + 1 < n else []) for i, row in enumerate(matrix)]


def mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    """The element-wise mean of lower-triangular matrices of one shape (row i has i + 1 entries): R over seeds."""
    return [[float(np.mean([m[i][j] for m in matrices])) for j in range(len(row))]
            for i, row in enumerate(matrices[0])]


def _seed_mean(runs: pd.DataFrame) -> list[list[float]]:
    """R averaged over the runs (seeds), with forward transfer's row and cells where every run has its terms."""
    matrix = mean_matrix(list(runs["matrix"]))
    terms = list(runs["transfer"])
    if not all(isinstance(t, tuple) for t in terms):
        return matrix
    before = [None] + [float(np.mean([t[0][j] for t in terms])) for j in range(1, len(matrix))]
    untuned = [float(np.mean([t[1][j] for t in terms])) for j in range(len(matrix))]
    return with_transfer(matrix, before, untuned)


def _retention_by_round(runs: pd.DataFrame) -> list[tuple[float, float, float, float]]:
    """(round, mean, min, max) of the retention FD ratio over the runs (seeds); no bar where they all agree."""
    n = max(len(r) for r in runs["fd_ratio"])
    out = []
    for k in range(n):
        vals = [r[k] for r in runs["fd_ratio"] if k < len(r) and math.isfinite(r[k])]
        if vals:
            lo, hi = (min(vals), max(vals)) if min(vals) < max(vals) else (math.nan, math.nan)
            out.append((float(k + 1), float(np.mean(vals)), lo, hi))
    return out


def sequence_section(cells: pd.DataFrame, backbone: str, task: str, budget: str, method_order: list[str],
                     colours: dict[str, str]) -> str:
    """The continual-tuning view of one leaderboard section ('' without sequence cells): per sequence, a heatmap
    of R per method and one chart of retention vs round."""
    runs = sequence_runs(cells[(cells["backbone"] == backbone) & (cells["task"] == task)
                               & cells["budget"].isin([budget, NO_BUDGET])])
    if runs.empty:
        return ""
    out = [("<h3>Continual tuning</h3><p class='note'>R[i][j] = fidelity on round j's instance after round i, mean "
            "over seeds; grey cells: instance j is not learned yet. Where forward transfer was scored, the first row "
            "is the untuned model and the cell right of each diagonal one is the next instance before its round "
            "(FWT: its mean excess over the untuned row). Retention: FD ratio of the retention samples over "
            "the untuned model's after each round (1 = unchanged, lower is better); bars: min to max over seeds.</p>")]
    for (instance, labels), g in runs.groupby(["instance", "rounds"], sort=True):
        methods = [m for m in method_order if m in set(g["method"])] + sorted(set(g["method"]) - set(method_order))
        means = {m: _seed_mean(g[g["method"] == m]) for m in methods}
        values = [v for mat in means.values() for row in mat for v in row if math.isfinite(v)]
        vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
        rows = [f"after {i + 1}: {label}" for i, label in enumerate(labels)]
        cols = [f"{j + 1} {label}" for j, label in enumerate(labels)]
        charts = []
        for m in methods:
            n = int((g["method"] == m).sum())
            transfer = len(means[m]) > len(labels)  # its untuned row leads
            charts.append(heatmap_svg(means[m], ["untuned"] * transfer + rows, cols,
                                      f"{m}: R[i][j] ({n} seed{'s' * (n != 1)})", vmin, vmax))
        series = {m: _retention_by_round(g[g["method"] == m]) for m in methods}
        series["untuned"] = [(1.0, 1.0, math.nan, math.nan), (float(len(labels)), 1.0, math.nan, math.nan)]
        charts.append(svg_chart(series, {**colours, "untuned": "#000"}, "retention FD ratio after each round",
                                "round", "retention FD ratio", dashed={"untuned"}, radius={"untuned": [0.0, 0.0]},
                                xticks=[float(k) for k in range(1, len(labels) + 1)]))
        out.append(f"<h4>sequence {esc(instance)}: {esc(' → '.join(labels))}</h4><div class='charts'>"
                   + "".join(c for c in charts if c) + "</div>")
    return "\n".join(out)


# ---- cost across budgets ------------------------------------------------------------------------------------
def cost_points(cells: pd.DataFrame, table: pd.DataFrame, backbone: str, task: str) -> pd.DataFrame:
    """One row per (method, budget) trained on the task: mean training FLOPs and seconds spent over its cells, and
    the leaderboard's fidelity (mean, 95% CI) and retention FD ratio; in order of method, then cost."""
    c = cells[(cells["backbone"] == backbone) & (cells["task"] == task) & (cells["budget"] != NO_BUDGET)]
    if c.empty or "train_flops" not in c:
        return pd.DataFrame()
    spent = c.groupby(["method", "budget"], sort=False)[["train_flops", "train_seconds"]].mean().reset_index()
    t = table[(table["backbone"] == backbone) & (table["task"] == task)].set_index(["method", "budget", "metric"])
    rows = []
    for _, r in spent.iterrows():
        fid, ret = (r["method"], r["budget"], FIDELITY), (r["method"], r["budget"], RETENTION)
        if fid not in t.index:
            continue
        rows.append({**r.to_dict(), "fidelity": t.loc[fid, "mean"], "fidelity_lo": t.loc[fid, "lo"],
                     "fidelity_hi": t.loc[fid, "hi"], "retention": t.loc[ret, "mean"] if ret in t.index else math.nan})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["method", "train_flops", "train_seconds", "budget"], kind="stable")


def several_budgets(points: pd.DataFrame) -> bool:
    """True when some method holds two or more budgets: what makes a cost chart worth drawing."""
    return not points.empty and bool((points.groupby("method")["budget"].nunique() >= 2).any())


def cost_section(cells: pd.DataFrame, table: pd.DataFrame, backbone: str, task: str, method_order: list[str],
                 colours: dict[str, str]) -> str:
    """The cost view of one (backbone, task): '' unless a method ran at several budgets."""
    pts = cost_points(cells, table, backbone, task)
    if not several_budgets(pts):
        return ""
    cost = next((k for k in ("train_flops", "train_seconds") if pts[k].notna().all() and (pts[k] > 0).all()), None)
    objectives = ["fidelity", "retention", *([cost] if cost else [])]
    front = set(pareto_front(pts[objectives].to_numpy().tolist(), [True, False, False][:len(objectives)]))
    pts = pts.assign(front=[i in front for i in range(len(pts))])
    ratio = pts["retention"]
    lo, hi = ratio.min(), ratio.max()
    size = [3.0 + 6.0 * ((r - lo) / (hi - lo) if hi > lo else 0.5) if math.isfinite(r) else 3.0 for r in ratio]
    pts = pts.assign(size=size)
    methods = [m for m in method_order if m in set(pts["method"])] + sorted(set(pts["method"]) - set(method_order))
    by = {m: pts[pts["method"] == m] for m in methods}
    ringed = {m: list(g["front"]) for m, g in by.items()}
    charts = []
    if cost:
        series = {m: list(zip(g[cost], g["fidelity"], g["fidelity_lo"], g["fidelity_hi"], strict=True))
                  for m, g in by.items()}
        label = "training FLOPs" if cost == "train_flops" else "training seconds"
        charts.append(svg_chart(series, colours, f"fidelity vs {label}", f"{label} (log scale)",
                                "fidelity (higher = better)", log10_x=True, keep_order=True,
                                radius={m: list(g["size"]) for m, g in by.items()}, ringed=ringed))
    series = {m: list(zip(g["retention"], g["fidelity"], g["fidelity_lo"], g["fidelity_hi"], strict=True))
              for m, g in by.items()}
    charts.append(svg_chart(series, colours, "fidelity vs retention across budgets",
                            "retention FD ratio (lower = kept)", "fidelity (higher = better)", keep_order=True,
                            ringed=ringed))
    on_front = ", ".join(f"{m} at {b}" for m, g in by.items() for b in g.loc[g["front"], "budget"])
    return (f"<h2>{esc(task)} · {esc(backbone)} · cost across budgets</h2><p class='note'>Each method's budgets are "
            "joined in order of training cost; larger points: higher retention FD ratio (more few-step quality lost). "
            f"Ringed: the Pareto front over {', '.join(objectives)} (highest fidelity, lowest retention ratio, lowest "
            f"cost): {esc(on_front) or 'none'}.</p><div class='charts'>" + "".join(c for c in charts if c) + "</div>")
