"""`dopsd-bench leaderboard`: run dirs -> Markdown tables with 95% intervals and deltas vs `base` and `sft`.

    dopsd-bench leaderboard --results runs/grid                       # Markdown to stdout
    dopsd-bench leaderboard --results runs/grid --out leaderboards/embedded.md --csv --parquet \
        --save-baseline leaderboards/embedded_baseline.json
Tiny CPU example (after a tiny sweep): `dopsd-bench leaderboard --results /tmp/sw`.

One section per (backbone, task, budget); rows are methods, columns metrics. Three tables per section: scores
(mean [95% CI]), the paired delta vs `base` and the paired delta vs `sft` (both with 95% CI), where ▲ marks a
significantly better and ▼ a significantly worse difference (the interval excludes 0; direction from the metric's
higher_is_better). Intervals are paired bootstraps, see dopsd_bench/stats.py. CSV/Parquet hold the same numbers
in long form, one row per (backbone, task, budget, method, metric); they are written next to --out (or into the
results dir). The baseline file (--save-baseline) is what `dopsd-bench check` compares new results with.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console

from dopsd_bench.agreement import agreement_markdown, agreement_table
from dopsd_bench.errors import UnknownNameError, UserError
from dopsd_bench.metrics.info import key_metrics
from dopsd_bench.stats import REFERENCES, compare
from dopsd_bench.store import NO_BUDGET, Results, models_of, require_results

METHOD_ORDER = ("base", "sft")
BASELINE_SCHEMA = 1
DEFAULT_TOLERANCE = 0.05  # relative to |baseline mean|
console = Console(stderr=True)


def build_table(res: Results, n_boot: int = 2000, seed: int = 0, unit: str = "run",
                references: tuple[str, ...] = REFERENCES) -> pd.DataFrame:
    """The leaderboard in long form (stats.compare over the loaded samples, paired against each of `references`),
    with rows in display order and the model id each backbone's runs were made on (a UserError if runs of one
    backbone used different weights)."""
    models = models_of(res)
    samples = spread_untrained(res.samples) if not res.samples.empty else res.samples
    table = compare(samples, references=references, unit=unit, n_boot=n_boot, seed=seed)
    if table.empty:
        return table
    table["model"] = table["backbone"].map(models).fillna("")
    table["method_rank"] = table["method"].map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    key = key_metrics()
    table["metric_rank"] = table["metric"].map(lambda m: key.index(m) if m in key else len(key))
    table = table.sort_values(["backbone", "task", "budget", "method_rank", "method", "metric_rank", "metric"])
    return table.drop(columns=["method_rank", "metric_rank"]).reset_index(drop=True)


def spread_untrained(samples: pd.DataFrame) -> pd.DataFrame:
    """Copy the samples of runs that trained nothing (budget 'none': base, icl) into every budget of their task.

    Their numbers do not depend on the budget. Spread before the statistics, each budget's section gets them as
    rows *and* as the paired reference: `base` vs `sft` at that budget, not a blank row when `sft` ran at several.
    """
    out = []
    for _, g in samples.groupby(["backbone", "task"], sort=False):
        budgets = [b for b in dict.fromkeys(g["budget"]) if b != NO_BUDGET]
        untrained = g[g["budget"] == NO_BUDGET]
        if untrained.empty or not budgets:
            out.append(g)
            continue
        out += [g[g["budget"] != NO_BUDGET]] + [untrained.assign(budget=b) for b in budgets]
    return pd.concat(out, ignore_index=True)


def fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    s = f"{x:+.3g}" if signed else f"{x:.3g}"
    return s


def _interval(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    if math.isnan(lo):
        return fmt(mean, signed)
    return f"{fmt(mean, signed)} [{fmt(lo, signed)}, {fmt(hi, signed)}]"


def _marker(better: int) -> str:
    return {1: " ▲", -1: " ▼"}.get(int(better), "")


def metric_order(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table["metric"]))
    key = key_metrics()
    return [m for m in key if m in present] + sorted(m for m in present if m not in key)


def display_metrics(table: pd.DataFrame) -> list[str]:
    """The Markdown columns: everything except the step curve (the report draws it) and the untuned model's and
    the references' own values (the same in every row). CSV, Parquet and the baseline keep every metric."""
    return [m for m in metric_order(table)
            if not m.startswith("step_curve.") and not m.endswith(("_untuned", "_oracle"))]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


Rows = tuple[list[str], list[list[str]]]  # (header, rows) of display strings


def references_of(table: pd.DataFrame) -> list[str]:
    """The methods a table was paired against (build_table's `references`), from its sig_<reference> columns."""
    return [c.removeprefix("sig_") for c in table.columns if c.startswith("sig_")]


def section_tables(group: pd.DataFrame, metrics: list[str] | None = None) -> dict[str, Rows]:
    """For one (backbone, task, budget): {'scores' | 'vs <reference>' ...: (header, rows)} of display strings, one
    'vs' table per reference the table was paired against that ran in this section."""
    metrics = [m for m in (metrics or display_metrics(group)) if m in set(group["metric"])]
    hib = group.groupby("metric")["higher_is_better"].first().to_dict()
    header = ["method", "n"] + [f"{m} {'↑' if hib[m] else '↓'}" for m in metrics]
    methods = list(dict.fromkeys(group["method"]))
    by = group.set_index(["method", "metric"])
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    scores = []
    for method in methods:
        n = int(group[group["method"] == method]["n_cells"].max())
        row = [method, str(n)]
        for m in metrics:
            r = by.loc[(method, m)] if (method, m) in by.index else None
            row.append("–" if r is None else _interval(r["mean"], r["lo"], r["hi"]))
        scores.append(row)
    out["scores"] = (header, scores)
    for ref in references_of(group):
        if ref not in methods:
            continue
        rows = []
        for method in methods:
            if method == ref:
                continue
            row = [method, str(int(group[group["method"] == method]["n_cells"].max()))]
            for m in metrics:
                r = by.loc[(method, m)] if (method, m) in by.index else None
                if r is None or r[f"d_{ref}_n"] == 0:
                    row.append("–")
                else:
                    row.append(_interval(r[f"d_{ref}"], r[f"d_{ref}_lo"], r[f"d_{ref}_hi"], signed=True)
                               + _marker(r[f"better_{ref}"]))
            rows.append(row)
        out[f"vs {ref}"] = (header, rows)
    return out


def sections(table: pd.DataFrame) -> list[tuple[tuple[str, str, str], pd.DataFrame]]:
    return [(key, g) for key, g in table.groupby(["backbone", "task", "budget"], sort=False)]


def render_markdown(table: pd.DataFrame, metrics: list[str] | None = None, n_boot: int = 2000,
                    command: str | None = None) -> str:
    if table.empty:
        return "_No complete results found._\n"
    units = sorted(set(table["unit"]))
    parts = [(
        "Mean [95% CI]. Intervals: paired bootstrap over instances × prompts × seeds "
        f"(resampling unit: {', '.join(units)}; B = {n_boot}). Δ columns are paired differences "
        "(same task, instance, seed and prompt); ▲ / ▼ = significantly better / worse (CI excludes 0). "
        "↑ / ↓ = higher / lower is better; n = runs."
    )]
    if command:
        parts.append(f"Produced by: `{command}`")
    if "model" in table:
        models = table.groupby("backbone", sort=True)["model"].first()
        named = [f"`{b}`: `{m}`" for b, m in models.items() if m]
        if named:
            parts.append("Weights (model id with a digest of the denoiser's weights): " + ", ".join(named))
    multi_backbone = table["backbone"].nunique() > 1
    for (backbone, task, budget), g in sections(table):
        title = f"## {task}" + (f" · {backbone}" if multi_backbone else "") + f" · budget {budget}"
        parts.append(title)
        for name, (header, rows) in section_tables(g, metrics).items():
            if rows:
                label = "Scores" if name == "scores" else f"Δ {name}"
                parts.append(f"**{label}**\n\n" + _md_table(header, rows))
    return "\n\n".join(parts) + "\n"


def baseline_from_table(table: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE, results: str = "",
                        n_boot: int = 2000, unit: str = "run") -> dict[str, Any]:
    """The file `check` reads: per (backbone, task, budget, method, metric) the mean, its CI and a tolerance."""
    entries = []
    for _, r in table.iterrows():
        entries.append({
            "backbone": r["backbone"], "model": r.get("model", ""), "task": r["task"], "budget": r["budget"],
            "method": r["method"],
            "metric": r["metric"], "higher_is_better": bool(r["higher_is_better"]), "n_cells": int(r["n_cells"]),
            "mean": float(r["mean"]), "lo": None if math.isnan(r["lo"]) else float(r["lo"]),
            "hi": None if math.isnan(r["hi"]) else float(r["hi"]),
            "tolerance": float(tolerance * abs(r["mean"])),
        })
    return {
        "schema_version": BASELINE_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
        "n_boot": n_boot,
        "unit": unit,
        "tolerance_rel": tolerance,
        "entries": entries,
    }


ReferenceOption = Annotated[list[str] | None, typer.Option(
    help=f"a method every other is paired against (a Δ table each); repeatable (default: {', '.join(REFERENCES)})")]


def check_references(reference: list[str] | None, res: Results) -> tuple[str, ...]:
    """--reference as given (default REFERENCES); an UnknownNameError (the CLI's exit 2, with the methods that ran
    and the closest one) for a method with no runs in `res`."""
    if not reference:
        return REFERENCES
    ran = sorted(set(res.samples["method"])) if not res.samples.empty else []
    for r in reference:
        if r not in ran:
            raise UnknownNameError("--reference method", r, ran)  # valid: the methods that ran
    return tuple(dict.fromkeys(reference))


def write_outputs(table: pd.DataFrame, results: Path, out: Path | None, csv: bool, parquet: bool) -> list[Path]:
    stem = out.with_suffix("") if out else Path(results) / "leaderboard"
    written = []
    if csv:
        path = stem.with_suffix(".csv")
        table.to_csv(path, index=False)
        written.append(path)
    if parquet:
        path = stem.with_suffix(".parquet")
        table.to_parquet(path, index=False)
        written.append(path)
    return written


def write_text_or_fail(path: Path, text: str, option: str) -> None:
    """Write a user-named output file; a path that cannot be written is a UserError naming the option."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write it ({e.strerror or e}); give a file path in a writable "
                        "folder") from None


def leaderboard_command(
    results: Annotated[Path, typer.Option(help="results root: a sweep's --out dir")],
    out: Annotated[Path | None, typer.Option(help="write the Markdown here instead of stdout")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="also write the long table as CSV (next to --out)")] = False,
    parquet: Annotated[bool, typer.Option("--parquet", help="also write it as Parquet (next to --out)")] = False,
    save_baseline: Annotated[Path | None, typer.Option(help="write the baseline file that `check` reads")] = None,
    tolerance: Annotated[float, typer.Option(help="baseline tolerance, relative to |mean|")] = DEFAULT_TOLERANCE,
    metrics: Annotated[str | None, typer.Option(help="comma-separated metric columns (default: all)")] = None,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    unit: Annotated[str, typer.Option(help="resampling unit: run (cluster bootstrap) or sample")] = "run",
    reference: ReferenceOption = None,
) -> None:
    """Aggregate run dirs into a leaderboard with paired-bootstrap 95% intervals."""
    import shlex
    import sys

    if unit not in ("run", "sample"):
        raise UserError(f"--unit must be run or sample, got {unit!r}")
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1 resample (the default is 2000), got {n_boot}")
    res = require_results(results)
    references = check_references(reference, res)
    table = build_table(res, n_boot=n_boot, seed=seed, unit=unit, references=references)
    wanted = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    if wanted:
        known = sorted(set(table["metric"]))
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise UnknownNameError("metric", unknown[0], known)
    md = render_markdown(table, metrics=wanted, n_boot=n_boot, command=shlex.join(["dopsd-bench", *sys.argv[1:]]))
    agreement = agreement_markdown(agreement_table(res.summary, n_boot=n_boot, seed=seed))
    md += f"\n{agreement}" if agreement else ""
    if out:
        write_text_or_fail(out, md, "--out")
        console.print(f"wrote {out}")
    else:
        print(md)
    for path in write_outputs(table, results, out, csv, parquet):
        console.print(f"wrote {path}")
    if save_baseline:
        baseline = baseline_from_table(table, tolerance, str(results), n_boot, unit)
        write_text_or_fail(save_baseline, json.dumps(baseline, indent=1) + "\n", "--save-baseline")
        console.print(f"wrote baseline {save_baseline} ({len(baseline['entries'])} entries)")
