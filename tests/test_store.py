"""store: result.json files under a dir -> tidy pandas frames; partial and mismatched files are skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import make_result, write_run

from dopsd_bench.store import NO_BUDGET, budget_label, load_results


def test_tidy_rows_per_sample_and_set_level(tmp_path):
    write_run(tmp_path, make_result("sft", "concept", "zorb", 0, {
        "fidelity": ([0.1, 0.2, 0.3], None, True),
        "retention_fd": (None, 42.0, False),
    }))
    write_run(tmp_path, make_result("base", "concept", "zorb", 0, {"fidelity": ([0.0, 0.1, 0.2], None, True)}))
    res = load_results(tmp_path)
    assert len(res.cells) == 2 and not res.skipped
    fid = res.samples[(res.samples.method == "sft") & (res.samples.metric == "fidelity")]
    assert fid["sample"].tolist() == [0, 1, 2]
    assert fid["value"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    fd = res.samples[res.samples.metric == "retention_fd"]
    assert fd["sample"].tolist() == [-1] and fd["value"].tolist() == [42.0]
    assert not bool(fd["higher_is_better"].iloc[0])
    summ = res.summary.set_index(["method", "metric"])
    assert summ.loc[("sft", "fidelity"), "mean"] == pytest.approx(0.2)
    assert summ.loc[("sft", "fidelity"), "n_samples"] == 3
    assert res.cells["budget"].iloc[0] == "steps=10,batch_size=2,lr=0.0001,rank=4"


def test_partial_and_mismatched_files_are_skipped_with_warning(tmp_path):
    write_run(tmp_path, make_result("sft", "style", "dotted", 1, {"fidelity": ([0.5], None, True)}))
    bad = tmp_path / "partial" / "result.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "method": "sft", "metr')
    old = tmp_path / "old" / "result.json"
    old.parent.mkdir()
    old.write_text(json.dumps({**make_result("sft", "style", "x", 0, {}), "schema_version": 99}))
    with pytest.warns(UserWarning, match="skipped"):
        res = load_results(tmp_path)
    assert len(res.cells) == 1
    assert len(res.skipped) == 2
    assert any("schema_version" in s for s in res.skipped)
    assert {Path(s.split(":")[0]) for s in res.skipped} == {bad, old}


def test_nested_metrics_are_flattened_or_kept_raw(tmp_path):
    res = make_result("dopsd", "concept", "zorb", 0, {"fidelity": ([0.4, 0.6], None, True)})
    res["metrics"]["teacher"] = {"fidelity_before": {"mean": 0.7, "per_sample": None, "higher_is_better": True}}
    res["metrics"]["step_curve"] = {"fd@1": {"mean": 3.0, "per_sample": None, "higher_is_better": False}}
    res["metrics"]["unknown_curve"] = {"steps": [1, 2, 4], "fd": [3.0, 2.0, 1.0]}
    write_run(tmp_path, res)
    out = load_results(tmp_path)
    assert set(out.summary.metric) == {"fidelity", "teacher.fidelity_before", "step_curve.fd@1"}
    cell = out.cells["cell"].iloc[0]
    assert out.extra[cell]["unknown_curve"]["fd"] == [3.0, 2.0, 1.0]  # kept raw, not aggregated


def test_empty_dir_gives_empty_frames_and_missing_dir_errors(tmp_path):
    res = load_results(tmp_path)
    assert res.empty and res.samples.empty
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope")


def test_budget_label():
    assert budget_label({}) == "none" and budget_label({"steps": None}) == "none"
    from dopsd_bench.result import no_budget

    assert budget_label(no_budget()) == NO_BUDGET  # what a cell that trains nothing writes
    assert budget_label({"lr": 1e-3, "steps": 5, "rank": None}) == "steps=5,lr=0.001"
