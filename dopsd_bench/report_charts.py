"""Inline SVG for the HTML report (dopsd_bench/report.py): line/scatter charts and a heatmap, no dependencies.

    from dopsd_bench.report_charts import svg_chart, heatmap_svg
    svg_chart({"sft": [(1, 0.2, 0.1, 0.3), (2, 0.4, 0.3, 0.5)]}, {"sft": "#1f77b4"}, "title", "x", "y")
    heatmap_svg([[0.5], [0.3, 0.6]], ["after 1", "after 2"], ["a", "b"], "R[i][j]", 0.0, 1.0)

Every function returns one `<svg>` string ('' when there is nothing to draw).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
W, H, PAD = 420, 280, 48
LEGEND_W = 120
POINT_R = 3.5  # a point's radius unless a chart sizes its points
Point = tuple[float, float, float, float]  # x, y, y_lo, y_hi (NaN bounds: no error bar)


def esc(x: object) -> str:
    return html.escape(str(x))


def method_colours(methods: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


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


def _log10_ticks(lo: float, hi: float) -> list[float]:
    """Ticks (in data units) for a log10 axis spanning log10 values lo..hi: the powers of ten inside it, or 1, 2, 5
    times them when fewer than two powers fall inside."""
    exps = range(math.floor(lo), math.ceil(hi) + 1)
    decades = [10.0 ** e for e in exps if lo <= e <= hi]
    if len(decades) >= 2:
        return decades
    return [m * 10.0 ** e for e in exps for m in (1, 2, 5) if lo <= e + math.log10(m) <= hi]


def svg_chart(
    series: dict[str, list[Point]],
    colours: dict[str, str],
    title: str,
    xlabel: str,
    ylabel: str,
    lines: bool = True,
    log2_x: bool = False,
    dashed: set[str] | None = None,
    xy_error: dict[str, list[tuple[float, float]]] | None = None,
    log10_x: bool = False,
    keep_order: bool = False,
    radius: dict[str, list[float]] | None = None,
    ringed: dict[str, list[bool]] | None = None,
    xticks: list[float] | None = None,
) -> str:
    """A small chart: series name -> points (x, y, y_lo, y_hi). Per point, optionally: x error bars (x_lo, x_hi),
    a radius and a ring (a highlighted point), each list aligned with the series' points. Lines join the points in x
    order, or in the given order with `keep_order`. x ticks: `xticks`, else the data's x values on a log2 axis,
    powers of ten on a log10 axis, round numbers otherwise."""
    dashed = dashed or set()
    pts = [p for ps in series.values() for p in ps if math.isfinite(p[0]) and math.isfinite(p[1])]
    if log10_x:
        pts = [p for p in pts if p[0] > 0]
    if not pts:
        return ""
    tx = math.log2 if log2_x else math.log10 if log10_x else (lambda x: x)
    x0, x1, y0, y1 = _chart_range(pts, tx, xy_error)
    pw, ph = W - PAD - LEGEND_W, H - 2 * PAD

    def sx(x: float) -> float:
        return PAD + (tx(x) - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return PAD + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">{esc(title)}</text>',
           f'<rect x="{PAD}" y="{PAD}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    if xticks is None:
        xticks = sorted({p[0] for p in pts}) if log2_x else _log10_ticks(x0, x1) if log10_x else _ticks(x0, x1)
    xfmt = (lambda t: f"{t:.0e}".replace("e+0", "e").replace("e+", "e")) if log10_x else (lambda t: f"{t:g}")
    out += _svg_axes(xticks, _ticks(y0, y1), sx, sy, pw, ph, xlabel, ylabel, xfmt)
    marks = {"x_error": xy_error or {}, "radius": radius or {}, "ringed": ringed or {}}
    for i, (name, ps) in enumerate(series.items()):
        per_point = {k: v.get(name) for k, v in marks.items()}
        out += _svg_series(name, ps, colours.get(name, "#333"), i, lines, name in dashed, per_point, keep_order,
                           sx, sy, pw)
    out.append("</svg>")
    return "\n".join(out)


def _chart_range(pts: list[Point], tx, xy_error: dict[str, list[tuple[float, float]]] | None
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
              ylabel: str, xfmt: Callable[[float], str]) -> list[str]:
    """Tick labels on both axes, horizontal grid lines, and the axis titles."""
    out = [f'<text x="{sx(t):.1f}" y="{PAD + ph + 14}" text-anchor="middle">{xfmt(t)}</text>' for t in xticks]
    for t in yticks:
        out.append(f'<line x1="{PAD}" x2="{PAD + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<text x="{PAD + pw / 2}" y="{H - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text transform="translate(12,{PAD + ph / 2}) rotate(-90)" text-anchor="middle">{esc(ylabel)}'
               "</text>")
    return out


def _svg_series(name: str, ps: list[Point], c: str, i: int, lines: bool, dashed: bool,
                per_point: dict[str, list | None], keep_order: bool, sx, sy, pw: float) -> list[str]:
    """One series: its line (if `lines`), each point with its y interval, x error bar, radius and ring, and its
    legend entry (the i-th)."""
    out = []
    order = [j for j, p in enumerate(ps) if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not keep_order:
        order.sort(key=lambda j: (ps[j][0], ps[j][1]))
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    if lines and len(order) > 1:
        d = " ".join(f"{sx(ps[j][0]):.1f},{sy(ps[j][1]):.1f}" for j in order)
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.8"{dash}/>')
    x_error, radius, ringed = per_point["x_error"], per_point["radius"], per_point["ringed"]
    for j in order:
        x, y, lo, hi = ps[j]
        if math.isfinite(lo) and math.isfinite(hi):
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" '
                       f'stroke="{c}"/>')
        if x_error is not None and j < len(x_error):
            xl, xh = x_error[j]
            if math.isfinite(xl) and math.isfinite(xh):
                out.append(f'<line x1="{sx(xl):.1f}" x2="{sx(xh):.1f}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                           f'stroke="{c}"/>')
        r = radius[j] if radius is not None and j < len(radius) else POINT_R
        ring = ' stroke="#000" stroke-width="2" class="front"' if ringed is not None and ringed[j] else ""
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r:.1f}" fill="{c}" fill-opacity="0.85"{ring}>'
                   f'<title>{esc(name)}: ({x:.4g}, {y:.4g})</title></circle>')
    ly = PAD + 14 * i + 6
    out.append(f'<line x1="{PAD + pw + 10}" x2="{PAD + pw + 26}" y1="{ly}" y2="{ly}" stroke="{c}" '
               f'stroke-width="2"{dash}/><text x="{PAD + pw + 30}" y="{ly + 4}">{esc(name)}</text>')
    return out


# ---- heatmap ------------------------------------------------------------------------------------------------
CELL_W, CELL_H, HEAT_LEFT, HEAT_TOP = 64, 24, 190, 96
LIGHT, DARK = (247, 251, 255), (8, 48, 107)  # the colour of the lowest and the highest value


def shade(value: float, vmin: float, vmax: float) -> str:
    """The cell colour of `value` on a white-to-dark-blue scale over [vmin, vmax] (clamped)."""
    t = 0.5 if vmax <= vmin else min(1.0, max(0.0, (value - vmin) / (vmax - vmin)))
    r, g, b = (round(a + (z - a) * t) for a, z in zip(LIGHT, DARK, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(matrix: list[list[float | None]], row_labels: list[str], col_labels: list[str], title: str,
                vmin: float, vmax: float) -> str:
    """A table of coloured cells with their values printed: row i, column j holds matrix[i][j]. A cell that the
    row does not reach (j >= len(matrix[i])) or holds None/NaN is blank and grey (no value: e.g. an instance not
    learned yet). Each cell is a `<g class="cell" data-row="i" data-col="j">`, blank ones of class "cell blank"."""
    if not matrix:
        return ""
    n_cols = len(col_labels)
    width, height = HEAT_LEFT + n_cols * CELL_W + 80, HEAT_TOP + len(matrix) * CELL_H + 30  # room for the last label
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
           f'<text x="8" y="16" font-weight="bold">{esc(title)}</text>']
    for j, label in enumerate(col_labels):
        cx = HEAT_LEFT + j * CELL_W + CELL_W / 2
        out.append(f'<text transform="translate({cx:.1f},{HEAT_TOP - 6}) rotate(-30)">{esc(label)}</text>')
    for i, row in enumerate(matrix):
        y = HEAT_TOP + i * CELL_H
        out.append(f'<text x="{HEAT_LEFT - 6}" y="{y + CELL_H / 2 + 4:.1f}" text-anchor="end">'
                   f'{esc(row_labels[i])}</text>')
        for j in range(n_cols):
            x = HEAT_LEFT + j * CELL_W
            value = row[j] if j < len(row) else None
            if value is None or not math.isfinite(value):
                out.append(f'<g class="cell blank" data-row="{i}" data-col="{j}"><rect x="{x}" y="{y}" '
                           f'width="{CELL_W}" height="{CELL_H}" fill="#e6e6e6" stroke="#fff"/></g>')
                continue
            fill = shade(value, vmin, vmax)
            ink = "#fff" if vmax > vmin and (value - vmin) / (vmax - vmin) > 0.55 else "#222"
            out.append(f'<g class="cell" data-row="{i}" data-col="{j}"><rect x="{x}" y="{y}" width="{CELL_W}" '
                       f'height="{CELL_H}" fill="{fill}" stroke="#fff"/><text x="{x + CELL_W / 2}" '
                       f'y="{y + CELL_H / 2 + 4:.1f}" text-anchor="middle" fill="{ink}">{value:.3g}</text>'
                       f'<title>{esc(row_labels[i])}, {esc(col_labels[j])}: {value:.6g}</title></g>')
    out.append(f'<text x="8" y="{height - 10}" fill="#555">colour: {vmin:.3g} (white) to {vmax:.3g} (dark blue); '
               "grey: not learned yet</text>")
    out.append("</svg>")
    return "\n".join(out)
