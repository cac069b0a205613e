"""`dopsd-bench sweep --workers N`: N local processes run one sweep side by side, each on its share of the CPU cores.

Every worker is the same sweep command (without --workers) and walks the same cells in the same order; a cell is
taken by the first worker to lock it (rundir.cell_lock) and skipped by the others, so a worker that finishes early
takes more cells and no cell runs twice. On a small model much of a step is per-op overhead that leaves cores
idle, which a second single-threaded process fills (the measured gain: docs/speed.md, "Cells side by side"). A
worker's output goes to OUT/sweep-worker<i>.log; this process shows one progress bar over the cells and exits 1 if
a worker failed.

    dopsd-bench sweep --config leaderboards/ci.sweep.yaml --workers 2
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dopsd_bench.errors import UserError

WORKER_VAR = "DOPSD_BENCH_SWEEP_WORKER"  # set in a worker's environment: its index (a worker never spawns workers)
SINCE_VAR = "DOPSD_BENCH_SWEEP_SINCE"  # and when the sweep started (epoch seconds): what its peers finished since
POLL_S = 5.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Each worker's torch threads: the cores split evenly, at least one."""
    return max(1, (cores or available_cores()) // workers)


def worker_argv(argv: list[str]) -> list[str]:
    """The sweep's command line (after the program name) without --workers N / --workers=N."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def finished_since(run_dir: Path, since: float) -> bool:
    """Whether the cell's result.json was written at or after `since` (epoch seconds)."""
    from dopsd_bench.rundir import RESULT_FILE

    result = Path(run_dir) / RESULT_FILE
    return result.exists() and result.stat().st_mtime >= since


def done_by_a_peer(run_dir: Path) -> bool:
    """In a worker of a --force sweep: whether another worker of the same sweep finished this cell (its result.json
    is newer than the sweep), so that forcing re-runs each cell once, not once per worker."""
    since = os.environ.get(SINCE_VAR)
    return since is not None and finished_since(run_dir, float(since))


def check_workers(workers: int, processes: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and processes > 1:
        raise UserError("--workers N runs cells side by side on this machine's cores; --processes N runs each cell "
                        "on N devices (accelerate): choose one")


def run_workers(workers: int, cells: list, out: Path, model_of, label: str, force: bool) -> int:
    """Start `workers` copies of this sweep command, show the cells' progress until they exit; 1 if one failed.
    `model_of(cell)` is the model id a complete cell must record to count as done (None: any); with `force`, only
    results written by this sweep count."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dopsd_bench.rundir import cell_state
    from dopsd_bench.sweep import console

    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_worker(workers)
    command = [sys.executable, "-m", "dopsd_bench", *worker_argv(sys.argv[1:])]
    since = time.time()
    procs, logs = [], []
    for i in range(workers):
        log_path = out / f"sweep-worker{i}.log"
        env = {**os.environ, WORKER_VAR: str(i), SINCE_VAR: str(since), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        log = open(log_path, "w")  # noqa: SIM115 -- open while the worker runs, closed below
        logs.append(log)
        procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
        console.print(f"worker {i}: {threads} thread(s), log {log_path}")
    models = [model_of(c) for c in cells]
    finished: set[int] = set()

    def done() -> int:
        """Cells complete so far; a cell found complete is not read again."""
        for k, cell in enumerate(cells):
            if k not in finished and cell_state(cell.run_dir(), models[k])[0] == "done" \
                    and (not force or finished_since(cell.run_dir(), since)):
                finished.add(k)
        return len(finished)

    t0 = time.perf_counter()
    columns = (TextColumn(f"sweep {label} ({workers} workers)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("cells", total=len(cells), completed=done())
            while any(p.poll() is None for p in procs):
                time.sleep(POLL_S)
                progress.update(bar, completed=done())
            progress.update(bar, completed=done())
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for log in logs:
            log.close()
    codes = [p.wait() for p in procs]
    complete = done()
    console.print(f"sweep {label}: {complete} of {len(cells)} cells complete with {workers} workers, "
                  f"{time.perf_counter() - t0:.1f} s; worker exit codes {codes}")
    return 1 if any(codes) else 0
