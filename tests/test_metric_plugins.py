"""Metrics as an extension point: a metric registered in a user's file is computed by evaluate(), written to
result.json, shown in the run's closing table and in the leaderboard; bad specs and bad values are one clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import FakeBackbone
from test_metrics import FakeJudge
from test_runner import TINY_WORLD_TASK, cfg_for

from dopsd_bench import runner
from dopsd_bench.errors import ConfigError, UserError
from dopsd_bench.metrics.info import METRIC_INFO, MetricSpec, Score, headline_metrics, key_metrics, metric_specs
from dopsd_bench.registry import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = '''\
from dopsd_bench.metrics.info import register_metric


@register_metric("brightness", higher_is_better=True, headline=0,
                 description="mean pixel value of each evaluation sample")
def brightness(s):
    return s.images.mean(dim=(1, 2, 3))


@register_metric("retention_brightness_gap", higher_is_better=False, per_sample=False, key=0)
def brightness_gap(s):
    """|mean retention pixel value, tuned - untuned| at native steps"""
    return abs(float(s.retention[s.native].mean() - s.retention_untuned[s.native].mean()))
'''


@pytest.fixture
def plugin_file(restore_registries, tmp_path, monkeypatch) -> Path:
    """PLUGIN in a user folder named by DOPSD_BENCH_METRICS_PATH, read when METRICS next loads."""
    folder = tmp_path / "my_metrics"
    folder.mkdir()
    (folder / "brightness.py").write_text(PLUGIN)
    monkeypatch.setenv("DOPSD_BENCH_METRICS_PATH", str(folder))
    METRICS._loaded = False  # load again (the built-ins stay registered): entry points, then the path above
    return folder / "brightness.py"


def test_a_metric_from_a_user_file_lands_in_result_json_and_the_leaderboard(plugin_file, tmp_path, monkeypatch,
                                                                            capsys):
    from dopsd_bench.leaderboard import build_table, display_metrics, render_markdown
    from dopsd_bench.metrics.features import JudgeFeatures
    from dopsd_bench.store import load_results

    assert key_metrics()[0] == "retention_brightness_gap" and headline_metrics()[0] == "brightness"
    task = tmp_path / "tiny_style.yaml"
    task.write_text(TINY_WORLD_TASK)
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: FakeBackbone())
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *args: JudgeFeatures(FakeJudge()))
    run_dir = runner.run_cell(cfg_for(str(task), tmp_path / "runs"))

    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    bright = metrics["brightness"]
    assert len(bright["per_sample"]) == 4 and bright["higher_is_better"] is True
    assert bright["mean"] == pytest.approx(sum(bright["per_sample"]) / 4) and -1 <= bright["mean"] <= 1
    gap = metrics["retention_brightness_gap"]
    assert gap["per_sample"] is None and gap["higher_is_better"] is False and gap["mean"] > 0  # sft moved the LoRA
    assert {"fidelity", "retention_fd_ratio", "step_curve"} <= set(metrics)  # the built-ins still run
    assert list(metrics)[-2:] == ["brightness", "retention_brightness_gap"]  # after the built-ins, as registered
    assert "│ brightness " in capsys.readouterr().out  # headline=0: the first row of the run's closing table

    table = build_table(load_results(tmp_path / "runs"), n_boot=50)
    assert display_metrics(table)[0] == "retention_brightness_gap"  # key=0: the first leaderboard column
    markdown = render_markdown(table, n_boot=50)
    assert "retention_brightness_gap ↓" in markdown and "brightness ↑" in markdown
    assert f"{bright['mean']:.3g}" in markdown


def test_metrics_path_option_lists_the_metric(restore_registries, tmp_path, monkeypatch):
    from dopsd_bench.cli import app

    monkeypatch.delenv("DOPSD_BENCH_METRICS_PATH", raising=False)  # the option exports it for sweep workers
    plugin = tmp_path / "brightness.py"
    plugin.write_text(PLUGIN)
    result = CliRunner().invoke(app, ["--metrics-path", str(plugin), "list", "metrics"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "│ brightness " in result.stdout and "mean pixel value" in result.stdout
    assert "retention_brightness_gap" in result.stdout
    assert METRICS.describe()["retention_brightness_gap"].startswith("|mean retention pixel value")  # its docstring
    result = CliRunner().invoke(app, ["--metrics-path", str(tmp_path / "missing.py"), "list", "metrics"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_a_compute_result_becomes_an_entry_with_the_specs_direction():
    per_sample = MetricSpec("m", "a metric", False, True, lambda s: [1.0, 2.0, 6.0])
    assert per_sample.score(None) == {"mean": 3.0, "per_sample": [1.0, 2.0, 6.0], "higher_is_better": False}
    one = MetricSpec("m", "a metric", True, False, lambda s: Score(0.5, {"steps": 4}))
    assert one.score(None) == {"mean": 0.5, "per_sample": None, "higher_is_better": True, "steps": 4}
    assert MetricSpec("m", "not scored here", True, False, lambda s: None).score(None) is None


def test_bad_metrics_are_one_clear_error(restore_registries):
    with pytest.raises(UserError, match="'m' returned str, expected one value per sample"):
        MetricSpec("m", "a metric", True, True, lambda s: "abc").score(None)
    with pytest.raises(ConfigError, match="higher_is_better must be True or False"):
        MetricSpec("m", "a metric", "yes", True, lambda s: 1.0)
    METRICS.add("not-a-spec", object(), "registered the old way")
    with pytest.raises(UserError, match="'not-a-spec' is registered as a object, not a MetricSpec"):
        metric_specs()


def test_the_built_in_key_and_headline_orders():
    assert key_metrics() == ("fidelity", "alignment", "retention_fd_ratio", "retention_alignment", "retention_leakage",
                             "few_step_gap_ratio", "retention_sharpness", "retention_fd", "diversity", "copying")
    assert headline_metrics() == ("fidelity", "alignment", "retention_fd", "retention_fd_ratio",
                                  "retention_alignment", "retention_leakage", "few_step_gap_ratio",
                                  "retention_sharpness", "diversity", "copying", "teacher_fidelity_after")
    assert [s.name for s in metric_specs()][:len(METRIC_INFO)] == list(METRIC_INFO)
