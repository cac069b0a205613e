"""Faults on real processes: a sweep SIGKILLed at random points and restarted gives the bits of a sweep that was never
killed; a `run` whose writes find no space says so in one line, leaves nothing half-written, and a re-run finishes
with the result of a run that never failed.

The processes run the product's CLI on the tests' fake backbone and a fast scorer (tests/tiny_cli.py): training,
checkpoints, resume, the sample cache and the run dir are the product's own. A full disk is simulated portably with
a file-size limit (RLIMIT_FSIZE; SIGXFSZ ignored, as Python does): a write past it fails with EFBIG where a full
disk's would fail with ENOSPC, and the product treats both alike (rundir.NO_SPACE_ERRNOS).
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_cli import TINY_TASK

TESTS_DIR = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def _task(tmp_path: Path, text: str = TINY_TASK) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("config.json"))


def _record(out: Path) -> dict[str, dict]:
    """What must not change by one bit, per cell: its metrics, its logged losses and its adapter's bytes."""
    record = {}
    for run_dir in _run_dirs(out):
        result = json.loads((run_dir / "result.json").read_text())
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        record[str(run_dir.relative_to(out))] = {
            "metrics": result["metrics"], "final_loss": result["training"]["final_loss"], "cost": {
                k: result["cost"][k] for k in ("train_steps", "train_flops")},
            "losses": [(line["step"], line["loss"], line["grad_norm"]) for line in log],
            "adapter": (run_dir / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()}
    return record


def _leftovers(out: Path) -> list[Path]:
    """Temporary files or directories, and checkpoints of finished cells: what a clean finish leaves none of."""
    temp = [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    return temp + [p for p in out.rglob("checkpoints")]


# ---- a kill at a random point of a sweep, then a restart -----------------------------------------------------
STEPS = 6
KILLS = 10  # a sweep killed at 10 random points


def _sweep(out: Path, task: str) -> list[str]:
    return [sys.executable, "-m", "dopsd_bench.sweep", "sweep", "--methods", "sft,dopsd", "--tasks", task,
            "--seeds", "0,1", "--budget", f"steps={STEPS},batch_size=2", "--backbone", "fake", "--device", "cpu",
            "--checkpoint-every", "2", "--out", str(out), "--runner", "tiny_cli:run_cell"]


def _steps_logged(out: Path) -> int:
    """Training steps logged under `out` so far; -1 when a directory vanished under the walk (the sweep renames its
    temporary checkpoint dirs as it goes): the caller polls again."""
    try:
        return sum(p.read_bytes().count(b"\n") for p in out.rglob("train_log.jsonl"))
    except FileNotFoundError:
        return -1


@pytest.mark.slow  # twelve interpreters that import torch: ~1.5 min of CPU time
def test_a_sweep_killed_at_random_points_and_restarted_gives_the_same_bits(tmp_path):
    task = _task(tmp_path)
    clean = tmp_path / "clean"
    proc = subprocess.run(_sweep(clean, task), env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = _record(clean)
    n_cells = len(expected)
    assert n_cells == 4 and all(len(cell["losses"]) == STEPS for cell in expected.values())

    # 10 kill points: numbers of training steps logged over the grid, drawn without replacement from its 24 steps (a
    # cell's last step is followed by its scoring and writes; a resumed cell logs again from its checkpoint), each
    # followed by a random delay of up to about one step
    rng = random.Random(20261207)
    points = sorted(rng.sample(range(1, n_cells * STEPS + 1), KILLS))
    out = tmp_path / "killed"
    landed = []
    for point in points:
        proc = subprocess.Popen(_sweep(out, task), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.time() + 300
        while proc.poll() is None and _steps_logged(out) < point and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        running = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        assert running or proc.returncode == 0, stderr.decode()  # a sweep that ended before the kill ended well
        finished = sum(1 for d in _run_dirs(out) if (d / "result.json").exists())
        landed.append((point, running, finished))
    assert sum(running and finished < n_cells for _, running, finished in landed) >= 2, landed  # kills mid-grid

    proc = subprocess.run(_sweep(out, task), env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    got = _record(out)
    assert got.keys() == expected.keys()
    for cell in expected:
        assert got[cell] == expected[cell], (cell, landed)
    assert not _leftovers(out)


# ---- no space left for a write -------------------------------------------------------------------------------
# 16 samples of 3x16x16 fp32: the sample cache's entry of the untuned samples (~49 KB) is the largest file a run
# writes; then the checkpoint's RNG state (~21 KB) and, at 300 steps, the training log (~31 KB)
FULL_DISK_TASK = TINY_TASK.replace("n_samples: 4\neval_seeds: {range: [0, 4]}",
                                   "n_samples: 16\neval_seeds: {range: [0, 16]}")
FULL_DISK_STEPS = 300


def _run(out: Path, task: str, *extra: str, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TESTS_DIR / "tiny_cli.py"), "run", "--backbone", "fake", "--device", "cpu",
           "--task", task, "--method", "sft", "--steps", str(FULL_DISK_STEPS), "--rank", "1", "--batch-size", "2",
           "--checkpoint-every", "50", "--out", str(out), *extra]

    def limit_file_size() -> None:  # in the child: no file may grow past max_file_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, check=False,
                          preexec_fn=limit_file_size if max_file_bytes is not None else None)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.slow  # four interpreters that import torch, ~1000 training steps of the fake model
def test_a_run_that_finds_no_space_says_so_and_a_rerun_finishes_it_exactly(tmp_path):
    task = _task(tmp_path, FULL_DISK_TASK)
    clean = tmp_path / "clean"
    proc = _run(clean, task)
    assert proc.returncode == 0, proc.stderr
    expected = _record(clean)
    out = tmp_path / "full"

    # 1. no room for the first checkpoint (its RNG state): one line naming the file, exit 1, and no trace of the
    # cell (there is nothing to resume from)
    proc = _run(out, task, max_file_bytes=10_000)
    line = _one_line(proc.stderr)
    assert proc.returncode == 1 and "cannot write" in line and "checkpoints" in line and ".pt" in line, line
    assert not _run_dirs(out) and not list(out.rglob("checkpoints")) and not list(out.rglob("result.json"))

    # 2. room for checkpoints, but the training log outgrows its space near step 240: one line naming the run dir,
    # exit 1; the checkpoint of step 200 is complete, nothing half-written is beside it, no result.json
    proc = _run(out, task, "--resume", max_file_bytes=25_000)
    line = _one_line(proc.stderr)
    (run_dir,) = _run_dirs(out)
    assert proc.returncode == 1 and "cannot write" in line and str(run_dir) in line, line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000200"]
    assert not (run_dir / "result.json").exists() and not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not list(run_dir.glob("adapter*"))

    # 3. more room, though not for the sample cache's entry: the resume continues from step 200 (the cut-short log
    # line dropped), the cache entry costs only its reuse (a warning), and the result is the uninterrupted run's
    proc = _run(out, task, "--resume", max_file_bytes=40_000)
    assert proc.returncode == 0, proc.stderr
    assert "could not write the sample cache entry" in proc.stderr and "Traceback" not in proc.stderr
    assert "steps 200->300" in proc.stdout
    assert _record(out) == expected
    assert not _leftovers(out) and not list((out / ".cache").glob("*.safetensors"))


# ---- the same one line for every way a write finds no space ---------------------------------------------------
@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG", "EDQUOT"])
def test_a_write_that_finds_no_space_is_one_line_naming_the_file(tmp_path, monkeypatch, code):
    import errno

    from dopsd_bench import rundir
    from dopsd_bench.errors import DiskFull, RunFailed

    def no_space(fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    target = tmp_path / "result.json"
    monkeypatch.setattr(rundir.os, "fsync", no_space)
    with pytest.raises(DiskFull) as caught:
        rundir.atomic_write_json(target, {"a": 1})
    assert isinstance(caught.value, RunFailed) and isinstance(caught.value, OSError)  # exit 1; OSError handlers hold
    assert str(target) in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.errno == getattr(errno, code) and not list(tmp_path.iterdir())  # no temporary file left


def test_safetensors_reports_no_space_in_its_message_and_is_told_apart():
    from safetensors import SafetensorError

    from dopsd_bench.rundir import no_space_errno

    assert no_space_errno(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == 27
    assert no_space_errno(SafetensorError("Error while serializing: I/O error: No space left (os error 28)")) == 28
    assert no_space_errno(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert no_space_errno(OSError(13, "Permission denied")) is None
    assert no_space_errno(ValueError("(os error 28)")) is None  # only safetensors says it this way
