"""leaderboard and report: Markdown/CSV/Parquet/baseline from synthetic run dirs, and the self-contained HTML."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import make_result, write_grid, write_run

from dopsd_bench.leaderboard import build_table, leaderboard_command, render_markdown
from dopsd_bench.report import report_command, svg_chart
from dopsd_bench.store import load_results

app = typer.Typer()
app.command("leaderboard")(leaderboard_command)
app.command("report")(report_command)


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_grid(root, {"base": 0.0, "sft": 0.15, "dopsd": 0.1, "icl": 0.0}, samples_png=_png())
    return root


def test_markdown_sections_rows_and_markers(results):
    table = build_table(load_results(results), n_boot=300)
    md = render_markdown(table, n_boot=300)
    assert md.count("## concept") == 1 and md.count("## style") == 1
    assert "**Δ vs base**" in md and "**Δ vs sft**" in md
    concept = md.split("## concept")[1].split("## style")[0]
    scores = concept.split("**Δ vs base**")[0]
    rows = [line for line in scores.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "sft", "dopsd", "icl"]
    assert "fidelity ↑" in scores and "retention_fd_ratio ↓" in scores
    assert "step_curve" not in md  # drawn in the report, kept in CSV/Parquet/baseline
    vs_base = concept.split("**Δ vs base**")[1].split("**Δ vs sft**")[0]
    sft_row = next(line for line in vs_base.splitlines() if line.startswith("| sft"))
    cells = [c.strip() for c in sft_row.split("|")[1:-1]]
    assert float(cells[2].split()[0]) == pytest.approx(0.15, abs=0.02) and cells[2].endswith("▲")  # better
    assert cells[4].endswith("▼")  # retention_fd_ratio went up: worse
    icl_row = next(line for line in vs_base.splitlines() if line.startswith("| icl"))
    assert "▲" not in icl_row.split("|")[3] and "▼" not in icl_row.split("|")[3]  # same as base: not significant


def test_cli_writes_markdown_csv_parquet_and_baseline(results, tmp_path):
    out = tmp_path / "lb" / "board.md"
    res = CliRunner().invoke(app, ["leaderboard", "--results", str(results), "--out", str(out), "--csv",
                                   "--parquet", "--save-baseline", str(tmp_path / "b.json"), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    assert "## concept" in out.read_text()
    csv = pd.read_csv(out.with_suffix(".csv"))
    pq = pd.read_parquet(out.with_suffix(".parquet"))
    assert len(csv) == len(pq) > 0
    assert {"mean", "lo", "hi", "d_base", "d_sft", "sig_base", "better_sft"} <= set(csv.columns)
    assert "step_curve.fd@4" in set(csv.metric)
    baseline = json.loads((tmp_path / "b.json").read_text())
    assert baseline["schema_version"] == 1 and len(baseline["entries"]) == len(csv)


def test_cli_stdout_and_errors(results, tmp_path):
    res = CliRunner().invoke(app, ["leaderboard", "--results", str(results), "--n-boot", "100",
                                   "--metrics", "fidelity"])
    assert res.exit_code == 0 and "fidelity ↑" in res.output and "alignment" not in res.output
    from dopsd_bench.cli import app as cli_app  # the real CLI: a user's bad input is one line and exit 2

    for args, needle in ((["--results", str(tmp_path / "nope")], "does not exist"),
                         (["--results", str(results), "--metrics", "fidelty"],
                          "unknown metric 'fidelty' (did you mean 'fidelity'?)"),
                         (["--results", str(results), "--n-boot", "0"], "--n-boot must be at least 1"),
                         (["--results", str(results), "--unit", "prompt"], "--unit must be run or sample")):
        res = CliRunner().invoke(cli_app, ["leaderboard", *args])
        assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, args


def test_reference_option_pairs_against_the_named_methods(results, tmp_path):
    out = tmp_path / "board.md"
    res = CliRunner().invoke(app, ["leaderboard", "--results", str(results), "--out", str(out), "--n-boot", "200",
                                   "--reference", "dopsd", "--reference", "base", "--csv"])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    assert "**Δ vs dopsd**" in md and "**Δ vs base**" in md and "**Δ vs sft**" not in md
    vs_dopsd = md.split("## concept")[1].split("**Δ vs dopsd**")[1].split("**Δ vs base**")[0]
    sft_row = next(line for line in vs_dopsd.splitlines() if line.startswith("| sft"))
    delta = float(sft_row.split("|")[3].split()[0])
    assert delta == pytest.approx(0.15 - 0.1, abs=0.02)  # the grid's fidelity offsets, sft minus dopsd
    assert {"d_dopsd", "d_base"} <= set(pd.read_csv(out.with_suffix(".csv")).columns)
    page = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(page), "--n-boot", "100",
                                   "--reference", "icl"])
    assert res.exit_code == 0, res.output
    assert "Δ vs icl" in page.read_text() and "Δ vs sft" not in page.read_text()
    from dopsd_bench.cli import app as cli_app  # the real CLI: a user's bad input is one line and exit 2

    res = CliRunner().invoke(cli_app, ["leaderboard", "--results", str(results), "--reference", "dopds"])
    assert res.exit_code == 2, res.output
    assert "unknown --reference method 'dopds' (did you mean 'dopsd'?); valid: base, dopsd, icl, sft" in res.output


def test_report_is_one_self_contained_html(results, tmp_path):
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", "--results", str(results), "--out", str(out), "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing external
    assert page.count("data:image/png;base64,") == 4 * 3 * 3  # methods x instances x seeds
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first) == _png()
    assert "step curve: fd" in page and "step curve: fd_untuned" not in page
    assert "fidelity vs retention_fd_ratio" in page
    assert page.count("<svg") == 2 * 2  # per task: scatter + one step-curve series
    assert "seed 2" in page and "concept · kwel" in page


def test_svg_chart_places_points_inside_the_plot():
    svg = svg_chart({"a": [(1, 0.0, -1.0, 1.0), (8, 2.0, 1.5, 2.5)]}, {"a": "#123456"}, "t", "x", "y", log2_x=True)
    assert svg.startswith("<svg") and svg.count("<circle") == 2 and "#123456" in svg
    assert svg_chart({"a": []}, {}, "t", "x", "y") == ""


def test_untrained_runs_appear_in_every_budget_section(tmp_path):
    none = {"steps": None, "batch_size": None, "lr": None, "rank": None}
    for seed in (0, 1):
        write_run(tmp_path, make_result("base", "style", "dotted", seed, {"fidelity": ([0.1, 0.2], None, True)},
                                        budget=none))
        for steps in (5, 10):
            write_run(tmp_path, make_result("sft", "style", "dotted", seed,
                                            {"fidelity": ([0.1 + steps / 100, 0.2 + steps / 100], None, True)},
                                            budget={"steps": steps}), name=f"sft{steps}/seed{seed}")
    table = build_table(load_results(tmp_path), n_boot=100)
    assert set(table.budget) == {"steps=5", "steps=10"}
    sft10 = table[(table.budget == "steps=10") & (table.method == "sft")].iloc[0]
    assert sft10["d_base"] == pytest.approx(0.1)
    # base pairs with sft at each budget (closed form: sft is 0.05 / 0.1 above base on every sample)
    for budget, gap in (("steps=5", 0.05), ("steps=10", 0.1)):
        base_row = table[(table.budget == budget) & (table.method == "base")].iloc[0]
        assert base_row["d_sft"] == pytest.approx(-gap) and base_row["d_sft_n"] > 0
    md = render_markdown(table)
    for section in md.split("## style")[1:]:
        assert "| base | 2 | 0.15 [" in section.split("**Δ vs base**")[0]


def test_outputs_that_cannot_be_written_are_one_line(results, tmp_path):
    from dopsd_bench.cli import app as cli_app

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for command, args in (("leaderboard", ["--out", str(a_file / "board.md")]),
                          ("leaderboard", ["--out", str(tmp_path)]),  # a directory
                          ("report", ["--out", str(a_file / "r.html")])):
        res = CliRunner().invoke(cli_app, [command, "--results", str(results), "--n-boot", "50", *args])
        assert res.exit_code == 2 and "--out" in res.stderr and "cannot write it" in res.stderr, (command, args)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_report_shows_the_rank_agreement_of_feature_spaces_when_given(results):
    from dopsd_bench.report import render_html

    res = load_results(results)
    table = build_table(res, n_boot=50)
    agreement = pd.DataFrame([{"backbone": "flux2-klein", "task": "style", "space": "effnet_lite0", "tau": 0.33,
                               "lo": 0.1, "hi": 0.5, "n_methods": 4, "methods": "base, dopsd, icl, sft"}])
    page = render_html(res, table, agreement=agreement)
    section = page.split("<h2>Rank agreement of feature spaces</h2>")[1]
    assert "effnet_lite0" in section and "0.33 [0.10, 0.50]" in section
    assert "Rank agreement" not in render_html(res, table)  # no further feature space scored: no section
    assert "Rank agreement" not in render_html(res, table, agreement=agreement.iloc[:0])
