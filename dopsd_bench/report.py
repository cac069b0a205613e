"""`dopsd-bench report`: one self-contained HTML file (no external assets; images base64-embedded, charts inline SVG).

    dopsd-bench report --results runs/grid --out report.html
Tiny CPU example (after a tiny sweep): `dopsd-bench report --results /tmp/sw --out /tmp/sw/report.html`.

It holds, per (backbone, task, budget): the leaderboard tables (as `dopsd-bench leaderboard`), a fidelity-versus-
retention scatter (mean and 95% CI per method), the step curves (retention metrics at 1, 2, 4, 8 steps, the untuned
model dashed), and the image grids: per task instance, one row per method and one column per seed, each the run's
samples.png, which shows the same evaluation prompts and seeds for every method.
"""

from __future__ import annotations

import base64
import html
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console

from dopsd_bench.leaderboard import (
    ReferenceOption,
    build_table,
    check_references,
    section_tables,
    sections,
    write_text_or_fail,
)
from dopsd_bench.store import NO_BUDGET, Results, load_results

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
STEP_RE = re.compile(r"^step_curve\.(?P<series>.+)@(?P<steps>\d+)$")
W, H, PAD = 420, 280, 48
console = Console(stderr=True)

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}
td.better{background:#dff5df}td.worse{background:#f8dcdc}
.charts{display:flex;flex-wrap:wrap;gap:1em}
.grid td{vertical-align:top;text-align:center}.grid img{image-rendering:pixelated;max-width:520px}
.note{color:#555;font-size:13px}
"""


def _esc(x: object) -> str:
    return html.escape(str(x))


def method_colours(methods: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


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


# ---- SVG charts ---------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi == lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def svg_chart(
    series: dict[str, list[tuple[float, float, float, float]]],
    colours: dict[str, str],
    title: str,
    xlabel: str,
    ylabel: str,
    lines: bool = True,
    log2_x: bool = False,
    dashed: set[str] | None = None,
    xy_error: dict[str, list[tuple[float, float]]] | None = None,
) -> str:
    """A small chart: series name -> points (x, y, y_lo, y_hi); optional x error bars (x_lo, x_hi) per point."""
    dashed = dashed or set()
    pts = [p for ps in series.values() for p in ps if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return ""
    tx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    x0, x1, y0, y1 = _chart_range(pts, tx, xy_error)
    legend_w = 120
    pw, ph = W - PAD - legend_w, H - 2 * PAD

    def sx(x: float) -> float:
        return PAD + (tx(x) - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return PAD + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<rect x="{PAD}" y="{PAD}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    xticks = sorted({p[0] for p in pts}) if log2_x else _ticks(x0, x1)
    out += _svg_axes(xticks, _ticks(y0, y1), sx, sy, pw, ph, xlabel, ylabel)
    for i, (name, ps) in enumerate(series.items()):
        out += _svg_series(name, ps, colours.get(name, "#333"), i, lines, name in dashed,
                           (xy_error or {}).get(name), sx, sy, pw)
    out.append("</svg>")
    return "\n".join(out)


def _chart_range(pts: list[tuple[float, ...]], tx, xy_error: dict[str, list[tuple[float, float]]] | None
                 ) -> tuple[float, float, float, float]:
    """The plotted (x0, x1, y0, y1): the points, their y intervals and x error bars, with a margin around them
    (x in the chart's own scale: log2 for a log2 axis)."""
    xs = [tx(p[0]) for p in pts]
    ys = [v for p in pts for v in p[1:] if math.isfinite(v)]
    if xy_error:
        xs += [tx(v) for e in xy_error.values() for pair in e for v in pair if math.isfinite(v)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    mx, my = (x1 - x0) * 0.06, (y1 - y0) * 0.08
    return x0 - mx, x1 + mx, y0 - my, y1 + my


def _svg_axes(xticks: list[float], yticks: list[float], sx, sy, pw: float, ph: float, xlabel: str,
              ylabel: str) -> list[str]:
    """Tick labels on both axes, horizontal grid lines, and the axis titles."""
    out = [f'<text x="{sx(t):.1f}" y="{PAD + ph + 14}" text-anchor="middle">{t:g}</text>' for t in xticks]
    for t in yticks:
        out.append(f'<line x1="{PAD}" x2="{PAD + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<text x="{PAD + pw / 2}" y="{H - 8}" text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(f'<text transform="translate(12,{PAD + ph / 2}) rotate(-90)" text-anchor="middle">{_esc(ylabel)}'
               "</text>")
    return out


def _svg_series(name: str, ps: list[tuple[float, float, float, float]], c: str, i: int, lines: bool, dashed: bool,
                x_error: list[tuple[float, float]] | None, sx, sy, pw: float) -> list[str]:
    """One series: its line (if `lines`), each point with its y interval and x error bar, and its legend entry
    (the i-th)."""
    out = []
    ps = sorted(p for p in ps if math.isfinite(p[0]) and math.isfinite(p[1]))
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    if lines and len(ps) > 1:
        d = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in ps)
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.8"{dash}/>')
    for j, (x, y, lo, hi) in enumerate(ps):
        if math.isfinite(lo) and math.isfinite(hi):
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" '
                       f'stroke="{c}"/>')
        if x_error is not None and j < len(x_error):
            xl, xh = x_error[j]
            if math.isfinite(xl) and math.isfinite(xh):
                out.append(f'<line x1="{sx(xl):.1f}" x2="{sx(xh):.1f}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                           f'stroke="{c}"/>')
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{c}"><title>{_esc(name)}: '
                   f'({x:.4g}, {y:.4g})</title></circle>')
    ly = PAD + 14 * i + 6
    out.append(f'<line x1="{PAD + pw + 10}" x2="{PAD + pw + 26}" y1="{ly}" y2="{ly}" stroke="{c}" '
               f'stroke-width="2"{dash}/><text x="{PAD + pw + 30}" y="{ly + 4}">{_esc(name)}</text>')
    return out


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
def _img(path: str | None) -> str:
    if not path or not Path(path).exists():
        return "<em>no samples.png</em>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(Path(path).parent.name)}">'


def image_grids(cells: pd.DataFrame, backbone: str, task: str, budget: str, method_order: list[str]) -> str:
    c = cells[(cells["backbone"] == backbone) & (cells["task"] == task) & cells["budget"].isin([budget, NO_BUDGET])]
    if c.empty:
        return ""
    rows_label = next((s for s in c.get("samples_rows", pd.Series(dtype=str)) if s), "")
    out = []
    if rows_label:
        out.append(f'<p class="note">Each image, top to bottom: {_esc(rows_label)}.</p>')
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
                tds.append(f"<td>{_img(hit['samples_png'].iloc[0]) if not hit.empty else ''}</td>")
            out.append(f"<tr><td>{_esc(method)}</td>{''.join(tds)}</tr>")
        out.append("</table>")
    return "\n".join(out)


# ---- the page -----------------------------------------------------------------------------------------------
def render_html(res: Results, table: pd.DataFrame, title: str = "dopsd-bench report", command: str = "") -> str:
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
    for (backbone, task, budget), g in sections(table):
        parts.append(f"<h2>{_esc(task)} · {_esc(backbone)} · budget {_esc(budget)}</h2>")
        for name, (header, rows) in section_tables(g).items():
            if rows:
                parts.append(f"<h3>{'Scores' if name == 'scores' else 'Δ ' + name}</h3>" + html_table(header, rows))
        charts = [scatter_svg(g, colours), *step_curve_svgs(g, colours)]
        charts = [c for c in charts if c]
        if charts:
            parts.append("<h3>Fidelity vs retention, step curves</h3><div class='charts'>" + "".join(charts)
                         + "</div>")
        parts.append("<h3>Samples</h3>" + image_grids(res.cells, backbone, task, budget,
                                                         list(dict.fromkeys(g["method"]))))
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
    """Write one self-contained HTML report: leaderboard, image grids, step curves, fidelity-vs-retention."""
    import shlex
    import sys

    try:
        res = load_results(results)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if res.empty:
        console.print(f"[red]error:[/red] no complete result.json under {results}; run a sweep first")
        raise typer.Exit(2)
    table = build_table(res, n_boot=n_boot, seed=seed, references=check_references(reference, res))
    page = render_html(res, table, title=title, command=shlex.join(["dopsd-bench", *sys.argv[1:]]))
    write_text_or_fail(out, page, "--out")
    console.print(f"wrote {out} ({len(page) / 1e6:.1f} MB)")
