"""Do two feature spaces rank the methods alike? Kendall's tau of the methods' retention FD ratios in the world
judge's features and in each further space a run scored (`retention_fd_ratio_<space>`, metrics/imagenet.py), per
task, with a bootstrap interval over each method's runs: the leaderboard's check that a retention finding does not
belong to one feature space."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dopsd_bench.stats import rank_agreement

PRIMARY = "retention_fd_ratio"


def agreement_table(summary: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (backbone, task, further space): tau, its interval, and the methods compared. `summary` is the
    store's per-cell table (cell keys, metric, mean). A method is one (method, budget); it counts when every one of
    its runs has both ratios."""
    rows = []
    spaces = sorted(m[len(PRIMARY) + 1:] for m in set(summary["metric"]) if m.startswith(PRIMARY + "_"))
    for (backbone, task), group in summary.groupby(["backbone", "task"], sort=True):
        for space in spaces:
            wide = group[group["metric"].isin([PRIMARY, f"{PRIMARY}_{space}"])].pivot_table(
                index=["method", "budget", "cell"], columns="metric", values="mean", aggfunc="first").dropna()
            if f"{PRIMARY}_{space}" not in wide or wide.empty:
                continue
            methods = wide.groupby(level=["method", "budget"], sort=True)
            runs_a = [np.asarray(g[PRIMARY]) for _, g in methods]
            runs_b = [np.asarray(g[f"{PRIMARY}_{space}"]) for _, g in methods]
            if len(runs_a) < 3:
                continue
            tau = rank_agreement(runs_a, runs_b, n_boot=n_boot, seed=seed)
            rows.append({"backbone": backbone, "task": task, "space": space, "tau": tau.mean, "lo": tau.lo,
                         "hi": tau.hi, "n_methods": tau.n_units,
                         "methods": ", ".join(m for m, _ in methods.groups)})
    return pd.DataFrame(rows)


HEADER = ["task", "space", "tau", "methods"]
INTRO = (f"Kendall's tau between the methods' `{PRIMARY}` (world-judge features) and the same ratio in another feature "
         "space; 95% bootstrap interval over each method's runs. 1: the same order; 0: unrelated.")


def agreement_rows(table: pd.DataFrame) -> list[list[str]]:
    """`agreement_table`'s rows as the leaderboard and the report print them (HEADER's columns)."""
    rows = []
    for _, r in table.iterrows():
        interval = "" if np.isnan(r["lo"]) else f" [{r['lo']:.2f}, {r['hi']:.2f}]"
        rows.append([str(r["task"]), str(r["space"]), f"{r['tau']:.2f}{interval}", str(r["n_methods"])])
    return rows


def agreement_markdown(table: pd.DataFrame) -> str:
    """The leaderboard's section on rank agreement, or "" when no run was scored in a further space."""
    if table.empty:
        return ""
    lines = ["## Rank agreement of feature spaces", "", INTRO, "", "| " + " | ".join(HEADER) + " |",
             "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in agreement_rows(table)]
    return "\n".join(lines) + "\n"
