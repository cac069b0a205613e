"""`dopsd-bench report`: one self-contained HTML file (no external assets; images base64-embedded, charts inline SVG).

    dopsd-bench report --results runs/grid --out report.html
Tiny CPU example (after a tiny sweep): `dopsd-bench report --results /tmp/sw --out /tmp/sw/report.html`.

It holds, per (backbone, task, budget): the leaderboard tables (as `dopsd-bench leaderboard`), a fidelity-versus-
retention scatter (mean and 95% CI per method), the step curves (retention metrics at 1, 2, 4, 8 steps, the untuned
model dashed), for sequence cells the continual-tuning view (report_views.sequence_section), and the image grids:
per task instance, one row per method and one column per seed, each the run's samples.png, which shows the same
evaluation prompts and seeds for every method, with its teacher.png beside it where the run stored one (the
in-context teacher before and after tuning). After a task's last budget, where a method ran at several budgets, the
cost view (report_views.cost_section). The SVG drawing lives in report_charts.py.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

from dopsd_bench.agreement import HEADER, INTRO, agreement_rows, agreement_table
from dopsd_bench.leaderboard import (
    ReferenceOption,
    build_table,
    check_references,
    section_tables,
    sections,
    write_text_or_fail,
)
from dopsd_bench.report_charts import esc as _esc
from dopsd_bench.report_charts import method_colours, svg_chart
from dopsd_bench.report_views import cost_section, sequence_section
from dopsd_bench.result import TEACHER_SAMPLES_ROWS
from dopsd_bench.store import NO_BUDGET, Results, require_results

STEP_RE = re.compile(r"^step_curve\.(?P<series>.+)@(?P<steps>\d+)$")
console = Console(stderr=True)

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}
td.better{background:#dff5df}td.worse{background:#f8dcdc}
.charts{display:flex;flex-wrap:wrap;gap:1em}
.grid td{vertical-align:top;text-align:center}.grid img{image-rendering:pixelated;max-width:520px}
.pair{display:flex;gap:.6em;align-items:flex-start}.pair figure{margin:0}figcaption{font-size:12px;color:#555}
.teacher img{outline:2px solid #9467bd}
.note{color:#555;font-size:13px}
"""


# ---- leaderboard tables -------------------------------------------------------------------------------------
def html_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for c in r:
            cls = ' class="better"' if c.endswith("▲") else ' class="worse"' if c.endswith("▼") else ""
            cells.append(f"<td{cls}>{_esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


# ---- charts of the leaderboard numbers ---------------------------------------------------------------------
def scatter_svg(group: pd.DataFrame, colours: dict[str, str], x_metric: str = "retention_fd_ratio",
                y_metric: str = "fidelity") -> str:
    """Fidelity (up is better) against retention (FD ratio: left is better), one point per method with 95% CIs."""
    by = group.set_index(["method", "metric"])
    series, xerr = {}, {}
    for method in dict.fromkeys(group["method"]):
        if (method, x_metric) in by.index and (method, y_metric) in by.index:
            x, y = by.loc[(method, x_metric)], by.loc[(method, y_metric)]
            series[method] = [(x["mean"], y["mean"], y["lo"], y["hi"])]
            xerr[method] = [(x["lo"], x["hi"])]
    if not series:
        return ""
    return svg_chart(series, colours, f"{y_metric} vs {x_metric}", f"{x_metric} (lower = retention kept)",
                     f"{y_metric} (higher = better)", lines=False, xy_error=xerr)


def step_curve_svgs(group: pd.DataFrame, colours: dict[str, str]) -> list[str]:
    """One chart per step-curve series (e.g. fd_ratio, alignment, fd), one line per method; untuned dashed."""
    rows = []
    for _, r in group.iterrows():
        m = STEP_RE.match(r["metric"])
        if m:
            rows.append({"series": m["series"], "steps": int(m["steps"]), "method": r["method"], "mean": r["mean"],
                         "lo": r["lo"], "hi": r["hi"]})
    if not rows:
        return []
    curves = pd.DataFrame(rows)
    charts = []
    names = list(dict.fromkeys(curves["series"]))
    for name in [n for n in names if not n.endswith("_untuned")]:
        c = curves[curves["series"] == name]
        series = {method: list(zip(g["steps"], g["mean"], g["lo"], g["hi"], strict=True))
                  for method, g in c.groupby("method", sort=False)}
        untuned = curves[curves["series"] == f"{name}_untuned"]
        if not untuned.empty:  # the same model under every method: one dashed line, averaged over the cells
            u = untuned.groupby("steps")["mean"].mean()
            series["untuned"] = [(s, v, math.nan, math.nan) for s, v in u.items()]
        cols = {**colours, "untuned": "#000"}
        charts.append(svg_chart(series, cols, f"step curve: {name}", "sampling steps", name, log2_x=True,
                                dashed={"untuned"}))
    return charts


# ---- image grids --------------------------------------------------------------------------------------------
TEACHER_LABEL = "teacher (prompt + reference)"


def _img(path: str | None) -> str:
    if not path or not Path(path).exists():
        return "<em>no samples.png</em>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(Path(path).parent.name)}">'


def _cell_images(cell: pd.Series) -> str:
    """A grid cell: the run's samples.png and, where the run stored it, its teacher.png beside it."""
    teacher = cell.get("teacher_png")
    if not isinstance(teacher, str) or not Path(teacher).exists():
        return _img(cell["samples_png"])
    return (f"<div class='pair'><figure>{_img(cell['samples_png'])}<figcaption>student (prompt only)</figcaption>"
            f"</figure><figure class='teacher'>{_img(teacher)}<figcaption>{TEACHER_LABEL}</figcaption></figure></div>")


def image_grids(cells: pd.DataFrame, backbone: str, task: str, budget: str, method_order: list[str]) -> str:
    c = cells[(cells["backbone"] == backbone) & (cells["task"] == task) & cells["budget"].isin([budget, NO_BUDGET])]
    if c.empty:
        return ""
    rows_label = next((s for s in c.get("samples_rows", pd.Series(dtype=str)) if s), "")
    out = []
    if rows_label:
        out.append(f'<p class="note">Each image, top to bottom: {_esc(rows_label)}.</p>')
    if c.get("teacher_png", pd.Series(dtype=object)).notna().any():
        out.append(f'<p class="note">Beside it, {TEACHER_LABEL}: the untuned model\'s in-context teacher and the '
                   f'tuned one on the same prompts and seeds, top to bottom: {_esc(" / ".join(TEACHER_SAMPLES_ROWS))}.'
                   "</p>")
    for instance, ci in c.groupby("instance", sort=True):
        seeds = sorted(ci["seed"].unique())
        out.append(f"<h4>{_esc(task)} · {_esc(instance)}</h4><table class='grid'><tr><th>method</th>"
                   + "".join(f"<th>seed {s}</th>" for s in seeds) + "</tr>")
        methods = [m for m in method_order if m in set(ci["method"])]
        for method in methods:
            cm = ci[ci["method"] == method]
            tds = []
            for s in seeds:
                hit = cm[cm["seed"] == s]
                tds.append(f"<td>{_cell_images(hit.iloc[0]) if not hit.empty else ''}</td>")
            out.append(f"<tr><td>{_esc(method)}</td>{''.join(tds)}</tr>")
        out.append("</table>")
    return "\n".join(out)


# ---- the page -----------------------------------------------------------------------------------------------
def render_html(res: Results, table: pd.DataFrame, title: str = "dopsd-bench report", command: str = "",
                agreement: pd.DataFrame | None = None) -> str:
    """The report page; `agreement` (agreement.agreement_table) adds the rank agreement of feature spaces."""
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
              f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>")]
    parts.append(f"<p class='note'>{len(res.cells)} runs; generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
                 + (f"; command: <code>{_esc(command)}</code>" if command else "") + "</p>")
    parts.append("<p class='note'>Mean [95% CI], paired bootstrap over instances × prompts × seeds. Δ tables are "
                 "paired differences (same task, instance, seed and prompt); ▲ green / ▼ red = significantly better "
                 "/ worse (CI excludes 0). ↑ / ↓ = higher / lower is better; n = runs.</p>")
    if res.skipped:
        parts.append(f"<p class='note'>{len(res.skipped)} result files skipped (partial or other schema).</p>")
    if table.empty:
        parts.append("<p>No complete results.</p>")
    colours = method_colours(list(dict.fromkeys(table["method"]))) if not table.empty else {}
    groups = sections(table)
    for k, ((backbone, task, budget), g) in enumerate(groups):
        methods = list(dict.fromkeys(g["method"]))
        parts.append(f"<h2>{_esc(task)} · {_esc(backbone)} · budget {_esc(budget)}</h2>")
        for name, (header, rows) in section_tables(g).items():
            if rows:
                parts.append(f"<h3>{'Scores' if name == 'scores' else 'Δ ' + name}</h3>" + html_table(header, rows))
        charts = [scatter_svg(g, colours), *step_curve_svgs(g, colours)]
        charts = [c for c in charts if c]
        if charts:
            parts.append("<h3>Fidelity vs retention, step curves</h3><div class='charts'>" + "".join(charts)
                         + "</div>")
        parts.append(sequence_section(res.cells, backbone, task, budget, methods, colours))
        parts.append("<h3>Samples</h3>" + image_grids(res.cells, backbone, task, budget, methods))
        if k + 1 == len(groups) or groups[k + 1][0][:2] != (backbone, task):  # the task's last budget: its cost view
            parts.append(cost_section(res.cells, table, backbone, task, list(dict.fromkeys(table["method"])), colours))
    if agreement is not None and not agreement.empty:
        parts.append(f"<h2>Rank agreement of feature spaces</h2><p class='note'>{_esc(INTRO)}</p>"
                     + html_table(HEADER, agreement_rows(agreement)))
    parts.append("</body></html>")
    return "\n".join(parts)


def report_command(
    results: Annotated[Path, typer.Option(help="results root: a sweep's --out dir")],
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="page title")] = "dopsd-bench report",
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    reference: ReferenceOption = None,
) -> None:
    """Write one self-contained HTML report: leaderboard, image grids, step curves, fidelity-vs-retention.

    The image grids show the in-context teacher beside the student; continual-tuning results add each method's
    accuracy matrix and retention per round, and methods run at several budgets add fidelity against cost."""
    import shlex
    import sys

    res = require_results(results)
    table = build_table(res, n_boot=n_boot, seed=seed, references=check_references(reference, res))
    page = render_html(res, table, title=title, command=shlex.join(["dopsd-bench", *sys.argv[1:]]),
                       agreement=agreement_table(res.summary, n_boot=n_boot, seed=seed))
    write_text_or_fail(out, page, "--out")
    console.print(f"wrote {out} ({len(page) / 1e6:.1f} MB)")
