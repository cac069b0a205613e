"""check: the CI gate fails on a results dir whose fidelity dropped by 0.5 and passes on the baseline's own results."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import typer
from synth_runs import write_grid

from dopsd_bench.check import check_command, compare_to_baseline
from dopsd_bench.errors import UserError
from dopsd_bench.leaderboard import baseline_from_table, build_table, leaderboard_command
from dopsd_bench.store import load_results

app = typer.Typer()
app.command("leaderboard")(leaderboard_command)
app.command("check")(check_command)


@pytest.fixture()
def baseline_dir(tmp_path):
    results = tmp_path / "results"
    write_grid(results, {"base": 0.0, "sft": 0.1, "dopsd": 0.08})
    baseline = tmp_path / "baseline.json"
    res = CliRunner().invoke(app, ["leaderboard", "--results", str(results), "--save-baseline", str(baseline),
                                   "--n-boot", "300"])
    assert res.exit_code == 0, res.output
    return results, baseline


def _lower_fidelity(src: Path, dst: Path, by: float) -> None:
    shutil.copytree(src, dst)
    for path in dst.glob("**/result.json"):
        data = json.loads(path.read_text())
        fid = data["metrics"]["fidelity"]
        fid["mean"] -= by
        fid["per_sample"] = [v - by for v in fid["per_sample"]]
        path.write_text(json.dumps(data))


def test_baseline_own_results_pass(baseline_dir):
    results, baseline = baseline_dir
    res = CliRunner().invoke(app, ["check", "--results", str(results), "--baseline", str(baseline)])
    assert res.exit_code == 0, res.output
    assert "no metric moved" in res.output and "check passed" in res.output


def test_fidelity_lowered_by_half_fails(baseline_dir, tmp_path):
    results, baseline = baseline_dir
    _lower_fidelity(results, tmp_path / "worse", 0.5)
    res = CliRunner().invoke(app, ["check", "--results", str(tmp_path / "worse"), "--baseline", str(baseline)])
    assert res.exit_code == 1, res.output
    assert "regressed" in res.output and "fidelity" in res.output and "check failed" in res.output


def test_small_moves_inside_interval_pass_and_direction_matters(baseline_dir):
    results, baseline = baseline_dir
    base = json.loads(baseline.read_text())
    table = build_table(load_results(results), n_boot=300)
    fid = (table.metric == "fidelity") & (table.method == "sft")
    ratio = (table.metric == "retention_fd_ratio") & (table.method == "sft")
    moved = table.copy()
    moved.loc[fid, "mean"] += 1.0  # a big gain in a higher-is-better metric is an improvement
    moved.loc[ratio, "mean"] -= 1.0  # and so is a big drop in a lower-is-better one
    out = compare_to_baseline(moved, base).set_index(["task", "method", "metric"])
    assert (out.xs(("sft", "fidelity"), level=("method", "metric"))["status"] == "improved").all()
    assert (out.xs(("sft", "retention_fd_ratio"), level=("method", "metric"))["status"] == "improved").all()
    worse = table.copy()
    worse.loc[ratio, "mean"] += 1.0
    out = compare_to_baseline(worse, base)
    assert set(out[out.status == "regressed"]["metric"]) == {"retention_fd_ratio"}
    # a move smaller than the tolerance (5% of the mean) is not a regression, with a zero-width interval too
    tiny = table.copy()
    tiny.loc[fid, "mean"] -= 0.01 * tiny.loc[fid, "mean"].abs()
    no_ci = {**base, "entries": [{**e, "lo": None, "hi": None} for e in base["entries"]]}
    assert (compare_to_baseline(tiny, no_ci)["status"] == "ok").all()
    assert (compare_to_baseline(tiny, no_ci, tolerance=0.0)["status"] == "regressed").sum() == 2


def test_missing_entries(baseline_dir, tmp_path):
    results, baseline = baseline_dir
    partial = tmp_path / "partial"
    shutil.copytree(results, partial)
    shutil.rmtree(partial / "dopsd")
    args = ["check", "--results", str(partial), "--baseline", str(baseline)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, [*args, "--strict"]).exit_code == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    from dopsd_bench.cli import app as cli_app  # the real CLI: one line on stderr, exit 2, no table

    res = CliRunner().invoke(cli_app, ["check", "--results", str(empty), "--baseline", str(baseline)])
    assert res.exit_code == 2 and "no complete result.json" in res.stderr and res.stdout == ""


def test_bad_baseline_exits_2(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    from dopsd_bench.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["check", "--results", str(tmp_path), "--baseline", str(tmp_path / "b.json")])
    assert res.exit_code == 2 and "schema" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_baseline_entries_carry_interval_and_tolerance(tmp_path):
    write_grid(tmp_path, {"base": 0.0, "sft": 0.1})
    b = baseline_from_table(build_table(load_results(tmp_path), n_boot=200), tolerance=0.1)
    e = next(e for e in b["entries"] if e["method"] == "sft" and e["metric"] == "fidelity" and e["task"] == "concept")
    assert e["lo"] < e["mean"] < e["hi"] and e["tolerance"] == pytest.approx(0.1 * e["mean"])


def _set_model(root: Path, model: str, only: str = "") -> None:
    for path in root.glob("**/result.json"):
        if only in str(path):
            path.write_text(json.dumps({**json.loads(path.read_text()), "model": model}))


def test_results_on_other_weights_fail_the_check_and_a_mix_is_refused(tmp_path):
    """Numbers of a rebuilt model are not comparable with the old ones: the gate says so instead of comparing,
    and the leaderboard refuses to pool runs of two weights."""
    results, baseline, md = tmp_path / "results", tmp_path / "baseline.json", tmp_path / "lb.md"
    write_grid(results, {"base": 0.0, "sft": 0.1})
    _set_model(results, "glyphworld@aaaa")
    res = CliRunner().invoke(app, ["leaderboard", "--results", str(results), "--save-baseline", str(baseline),
                                   "--out", str(md), "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    assert "`glyph-tiny`: `glyphworld@aaaa`" in md.read_text()
    assert {e["model"] for e in json.loads(baseline.read_text())["entries"]} == {"glyphworld@aaaa"}

    _set_model(results, "glyphworld@bbbb")
    res = CliRunner().invoke(app, ["check", "--results", str(results), "--baseline", str(baseline)])
    out = " ".join(res.output.split())
    assert res.exit_code == 1 and "glyph-tiny: glyphworld@aaaa -> glyphworld@bbbb" in out and "re-baseline" in out

    _set_model(results, "glyphworld@aaaa", only="/sft/")
    with pytest.raises(UserError, match="made on different weights: glyphworld@"):
        build_table(load_results(results))
