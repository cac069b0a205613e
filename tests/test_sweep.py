"""sweep: grid expansion, sharding, resume, crash isolation, and a SIGKILLed sweep that is restarted.

Cells are run by `fake_run_cell` below (a fast stand-in for dopsd_bench.runner.run_cell, passed with the hidden
--runner option): these tests check the sweep's bookkeeping, not training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import cell_held_elsewhere
from synth_runs import make_result

from dopsd_bench.errors import UserError
from dopsd_bench.rundir import atomic_write_json, cell_lock, is_complete
from dopsd_bench.sweep import (
    SweepSpec,
    _app,
    build_run_config,
    cell_command,
    expand,
    make_spec,
    parse_budget,
    parse_sets,
    parse_shard,
    shard_cells,
)

RUNNER = "test_sweep:fake_run_cell"
TESTS_DIR = str(Path(__file__).parent)


def fake_run_cell(cfg) -> None:
    """Write a result.json the way the runner does (atomically, last, under the cell's lock, never over a finished
    cell); log start/done to a ledger."""
    cid = cfg.cell_id()
    run_dir = Path(cfg.out_dir) / cid
    with cell_lock(run_dir):
        if is_complete(run_dir) and not cfg.force:  # finished by another process since the sweep looked
            return
        _fake_cell_body(cfg, cid, run_dir)


def _fake_cell_body(cfg, cid: str, run_dir: Path) -> None:
    ledger = Path(cfg.out_dir) / "ledger.txt"
    with open(ledger, "a") as f:
        f.write(f"start {cid}\n")
    if cfg.method == os.environ.get("FAKE_FAIL_METHOD"):
        raise RuntimeError("this method always fails")
    run_dir.mkdir(parents=True, exist_ok=True)
    _wait_for_peer_workers(Path(cfg.out_dir) / "workers.txt", int(os.environ.get("FAKE_WAIT_WORKERS", "0")))
    time.sleep(float(os.environ.get("FAKE_CELL_SECONDS", "0")))
    result = make_result(cfg.method, cfg.task_name, cfg.resolved_instance(), cfg.seed,
                         {"fidelity": ([0.5, 0.6], None, True)})
    atomic_write_json(run_dir / "result.json", result)
    with open(ledger, "a") as f:
        f.write(f"done {cid}\n")


def _wait_for_peer_workers(path: Path, n: int, timeout_s: float = 300) -> None:
    """Hold a sweep worker's cell until `n` workers have each started one (so the test sees them side by side
    whatever the machine's load does to their start-up)."""
    if n < 2:
        return
    with open(path, "a") as f:
        f.write(os.environ.get("DOPSD_BENCH_SWEEP_WORKER", "-") + "\n")
    deadline = time.time() + timeout_s
    while len(set(path.read_text().split())) < n and time.time() < deadline:
        time.sleep(0.05)


def _ledger(out: Path) -> list[tuple[str, str]]:
    path = out / "ledger.txt"
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines()] if path.exists() else []


def test_grid_expands_families_and_is_sharded_deterministically(tmp_path):
    spec = SweepSpec(methods=["base", "sft"], tasks=["concept", "style:dotted"], seeds=[0, 1],
                     budgets=[{}, {"steps": 5}], out=tmp_path)
    cells = expand(spec, check_names=False)
    assert len(cells) == 2 * (4 + 1) * 2 * 2
    ids = [c.cell_id() for c in cells]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert any("concept-drup" in i for i in ids) and not any("style-checkered" in i for i in ids)
    shards = [shard_cells(expand(spec, check_names=False), i, 3) for i in range(3)]
    got = [c.cell_id() for s in shards for c in s]
    assert sorted(got) == ids  # disjoint and complete
    assert [c.cell_id() for c in shards[1]] == ids[1::3]


def test_cell_command_uses_accelerate_for_several_processes(tmp_path):
    spec = SweepSpec(methods=["dopsd"], tasks=["style:dotted"], overrides={"teacher": "frozen"}, out=tmp_path)
    cell = expand(spec, check_names=False)[0]
    cmd = cell_command(cell, RUNNER, 4)
    assert cmd[:7] == ["accelerate", "launch", "--num_processes", "4", "-m", "dopsd_bench.sweep", "cell"]
    assert cell_command(cell, RUNNER, 1)[:4] == [sys.executable, "-m", "dopsd_bench.sweep", "cell"]
    payload = json.loads(cmd[cmd.index("--config-json") + 1])
    cfg = build_run_config(payload)
    assert cfg.cell_id() == cell.cell_id() and cfg.overrides == {"teacher": "frozen"} and cfg.resume


def test_shard_from_flag_and_slurm():
    assert parse_shard("2/4", env={}) == (2, 4)
    assert parse_shard(None, env={}) == (0, 1)
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard(None, env=slurm) == (2, 4)
    assert parse_shard("0/2", env=slurm) == (0, 2)  # the flag wins
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad, env={})


def test_flag_parsing_and_file_merge():
    assert parse_budget("steps=100,lr=1e-4") == {"steps": 100, "lr": 1e-4}
    with pytest.raises(UserError, match="allowed"):
        parse_budget("epochs=3")
    assert parse_sets(["a=1", "dopsd:teacher=ema"]) == ({"a": "1"}, {"dopsd": {"teacher": "ema"}})
    assert parse_sets(["url=a:b"]) == ({"url": "a:b"}, {})  # a colon in the value names no method
    # each part is checked as `run --set` checks it
    for bad, error in ((["dopsd:teacher"], "expects key=value"), (["dopsd:bad key=1"], "not a config field"),
                       (["dopsd:k=1", "dopsd:k=2"], "given twice")):
        with pytest.raises(UserError, match=error):
            parse_sets(bad)
    spec = make_spec({"methods": ["base", "dopsd"], "tasks": ["style"], "seeds": [0, 1, 2],
                      "budgets": [{"steps": 10}], "method_set": {"dopsd": {"teacher": "frozen"}}},
                     seeds=["4"], sets=({}, {"dopsd": {"decay": "0.9"}}))
    assert spec.seeds == [4] and spec.budgets == [{"steps": 10}]
    assert spec.method_overrides == {"dopsd": {"teacher": "frozen", "decay": "0.9"}}
    with pytest.raises(UserError, match="at least one method"):
        make_spec({"tasks": ["style"]})


def test_unknown_names_exit_2(tmp_path):
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style:dottd", "--out", str(tmp_path),
                                    "--runner", RUNNER])
    assert res.exit_code == 2
    assert "did you mean 'dotted'" in res.output
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base,dopsdd", "--tasks", "style", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "did you mean 'dopsd'" in res.output
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style", "--seeds", "a,b",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 2 and "seeds: 'a' is not an integer" in res.output and "Traceback" not in res.output
    (tmp_path / "grid.yaml").write_text("methods: [base]\ntasks: [style]\nseeds: [0, 4294967296]\n")
    res = CliRunner().invoke(_app, ["sweep", "--config", str(tmp_path / "grid.yaml"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "seeds: 4294967296 is out of range" in res.output
    assert not (tmp_path / "sweep.log").exists()


def test_untrained_methods_run_once_for_all_budgets(tmp_path):
    spec = SweepSpec(methods=["base", "sft"], tasks=["style:dotted"], budgets=[{"steps": 5}, {"steps": 10}],
                     out=tmp_path)
    cells = expand(spec)  # looks up `trains` in the method registry
    assert sorted(c.config["method"] for c in cells) == ["base", "sft", "sft"]
    assert "steps" not in next(c for c in cells if c.config["method"] == "base").config


def test_in_process_sweep_resumes_and_isolates_failures(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(TESTS_DIR)
    monkeypatch.setenv("FAKE_FAIL_METHOD", "icl")
    args = ["sweep", "--methods", "base,icl", "--tasks", "style", "--seeds", "0,1", "--out", str(tmp_path),
            "--runner", RUNNER]
    res = CliRunner().invoke(_app, args)
    assert res.exit_code == 1, res.output  # the icl cells failed ...
    done = [c for e, c in _ledger(tmp_path) if e == "done"]
    assert len(done) == 4 and all("/base/" in c for c in done)  # ... and every base cell still ran
    log = (tmp_path / "sweep.log").read_text()
    assert log.count('"event": "fail"') == 4 and "this method always fails" in log
    res = CliRunner().invoke(_app, args[:2] + ["base"] + args[3:])
    assert res.exit_code == 0, res.output
    assert len([c for e, c in _ledger(tmp_path) if e == "start" and "/base/" in c]) == 4  # nothing re-run
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style", "--seeds", "0", "--out",
                                    str(tmp_path), "--runner", RUNNER, "--dry-run"])
    assert res.exit_code == 0 and res.output.count("done\t") == 2


@pytest.mark.slow  # three interpreters that each import torch: ~10 s apiece on a loaded 2-core machine
def test_isolated_cells_run_in_subprocesses(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "dopsd_bench.sweep", "sweep", "--methods", "base", "--tasks", "style:dotted",
           "--seeds", "0,1", "--out", str(tmp_path), "--runner", RUNNER, "--isolate"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pids = {line.split()[0] for line in (tmp_path / "ledger.txt").read_text().splitlines()}
    assert len(list(tmp_path.glob("**/result.json"))) == 2 and pids == {"start", "done"}


def test_sigkilled_sweep_restarts_and_finishes_every_cell_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
           "FAKE_CELL_SECONDS": "0.4"}
    cmd = [sys.executable, "-m", "dopsd_bench.sweep", "sweep", "--methods", "base,sft,dopsd", "--tasks", "concept",
           "--seeds", "0", "--out", str(tmp_path), "--runner", RUNNER]
    n_cells = 3 * 4
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len([e for e, _ in _ledger(tmp_path) if e == "done"]) < 4:
        time.sleep(0.05)
    time.sleep(0.2)  # land inside a cell
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _ledger(tmp_path)
    done_before = {c for e, c in before if e == "done"}
    assert 4 <= len(done_before) < n_cells, "the kill must land mid-grid"

    env["FAKE_CELL_SECONDS"] = "0"
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    after = _ledger(tmp_path)
    done = [c for e, c in after if e == "done"]
    assert len(done) == n_cells and len(set(done)) == n_cells  # every cell finished exactly once
    restarted = {c for e, c in after[len(before):] if e == "start"}
    assert not restarted & done_before  # finished cells were not run again
    results = list(tmp_path.glob("**/result.json"))
    assert len(results) == n_cells
    assert not [p for p in tmp_path.rglob("*") if "result.json" in p.name and p.name != "result.json"]


def test_dry_run_tells_cells_made_on_other_weights_stale(tmp_path):
    """A rebuilt model changes the model id (a digest of its weights): its old results are stale, not done."""
    from dopsd_bench.backbones import backbone_identity

    args = ["sweep", "--methods", "base", "--tasks", "style:dotted", "--seeds", "0", "--out", str(tmp_path),
            "--dry-run"]
    res = CliRunner().invoke(_app, args)
    assert res.exit_code == 0, res.output
    state, cell = res.output.split()
    assert state == "todo"
    result = make_result("base", "style", "dotted", 0, {"fidelity": ([0.1, 0.2], None, True)},
                         backbone="flux2-klein")
    for model, expected in (("glyphworld@0000000000", "stale"), (backbone_identity("flux2-klein"), "done")):
        atomic_write_json(tmp_path / cell / "result.json", {**result, "model": model})
        res = CliRunner().invoke(_app, args)
        assert res.output.split() == [expected, cell], res.output


def test_a_shard_skips_a_cell_another_process_is_running(tmp_path, monkeypatch):
    from dopsd_bench.rundir import cell_lock

    monkeypatch.syspath_prepend(TESTS_DIR)
    spec = SweepSpec(methods=["base"], tasks=["style:dotted"], seeds=[0, 1], out=tmp_path)
    busy = expand(spec, check_names=False)[0].run_config().run_dir()
    with cell_held_elsewhere(busy) as holder:
        res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style:dotted", "--seeds", "0,1",
                                        "--out", str(tmp_path), "--runner", RUNNER], terminal_width=300)
        assert res.exit_code == 0, res.output
        assert f"being run by pid {holder.pid}" in res.output and "skipped here" in res.output
        started = [c for e, c in _ledger(tmp_path) if e == "start"]
        assert len(started) == 1 and not str(busy).endswith(started[0])  # only the free cell ran here
        assert '"event": "busy"' in (tmp_path / "sweep.log").read_text()
    with cell_lock(busy):  # free again once its holder is gone
        pass


def test_set_keys_are_checked_per_method_before_any_cell_runs(tmp_path):
    def grid(*extra):
        return CliRunner().invoke(_app, ["sweep", "--methods", "base,sft,dopsd", "--tasks", "style:dotted",
                                         "--out", str(tmp_path), "--dry-run", *extra])

    res = grid("--set", "bogus=1")
    assert res.exit_code == 2 and "--set bogus: no method of this sweep has that setting" in res.output
    res = grid("--set", "teacher=frozen")  # a dopsd setting, given to the whole grid: only dopsd takes it
    assert res.exit_code == 0, res.output
    spec = SweepSpec(methods=["base", "sft", "dopsd"], tasks=["style:dotted"], overrides={"teacher": "frozen"},
                     out=tmp_path)
    by_method = {c.config["method"]: c.config.get("overrides") for c in expand(spec)}
    assert by_method == {"base": None, "sft": None, "dopsd": {"teacher": "frozen"}}
    res = grid("--set", "dopsd:teacher=bogus")
    assert res.exit_code == 2 and "--set for method dopsd" in res.output
    assert not (tmp_path / "sweep.log").exists()


@pytest.mark.slow  # three interpreters that import torch
def test_workers_take_cells_side_by_side_and_run_each_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
           "FAKE_CELL_SECONDS": "0.2", "FAKE_WAIT_WORKERS": "2"}
    cmd = [sys.executable, "-m", "dopsd_bench.sweep", "sweep", "--methods", "base,sft,dopsd", "--tasks", "concept",
           "--seeds", "0", "--out", str(tmp_path), "--runner", RUNNER, "--workers", "2"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "12 of 12 cells complete with 2 workers" in " ".join(proc.stderr.split())
    done = [c for e, c in _ledger(tmp_path) if e == "done"]
    assert len(done) == 12 and len(set(done)) == 12  # every cell once, though both workers walk the whole grid
    ran_by = (tmp_path / "workers.txt").read_text().split()  # the worker of each cell run, as it started
    assert sorted(set(ran_by)) == ["0", "1"] and len(ran_by) == 12  # shared, first come first served
    assert all("sweep 0/1:" in (tmp_path / f"sweep-worker{i}.log").read_text() for i in range(2))

    (tmp_path / "workers.txt").unlink()
    proc = subprocess.run([*cmd, "--force"], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    forced = [c for e, c in _ledger(tmp_path) if e == "done"][12:]
    assert sorted(forced) == sorted(done)  # --force re-runs every cell once, not once per worker


def test_workers_are_refused_beside_multi_device_cells(tmp_path):
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style", "--out", str(tmp_path),
                                    "--runner", RUNNER, "--workers", "2", "--processes", "2"])
    assert res.exit_code == 2 and "choose one" in res.output
    res = CliRunner().invoke(_app, ["sweep", "--methods", "base", "--tasks", "style", "--out", str(tmp_path),
                                    "--runner", RUNNER, "--workers", "0"])
    assert res.exit_code == 2 and "--workers must be >= 1, got 0" in res.output
