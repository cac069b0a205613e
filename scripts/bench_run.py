"""Wall time of one `dopsd-bench run`, end to end (model load, training, sampling, scoring), on N CPU cores.

Runs the CLI in a subprocess pinned to the first N cores (taskset when the machine has more; torch threads = N),
into a fresh results dir, so the first run starts with an empty sample cache (what a new user sees), then prints
the wall time and the breakdown from the run's result.json timings. With --runs 2 the second run (--force, same
results dir) shows the time with the untuned model's samples cached. The goal for the default run is <= 180 s on
2 cores. The last line is JSON (one entry per run).

    python scripts/bench_run.py                                   # the default: --method dopsd --task style
    python scripts/bench_run.py --method sft --runs 2 -- --steps 2   # anything after -- goes to `dopsd-bench run`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dopsd")
    parser.add_argument("--task", default="style")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to run on (default 2)")
    parser.add_argument("--runs", type=int, default=1, help="run this many times; runs after the first reuse the cache")
    parser.add_argument("--out", default=None, help="results dir (default: a temporary dir, removed afterwards)")
    parser.add_argument("extra", nargs="*", help="more `dopsd-bench run` arguments, after --")
    args = parser.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_run_"))
    cmd = [sys.executable, "-m", "dopsd_bench", "run", "--method", args.method, "--task", args.task,
           "--out", str(out), "--force", "--device", "cpu", *args.extra]
    if shutil.which("taskset") and (os.cpu_count() or 1) > args.cores:
        cmd = ["taskset", "-c", f"0-{args.cores - 1}", *cmd]
    n = str(args.cores)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "HF_HUB_OFFLINE": "1"}
    print("running:", " ".join(cmd), flush=True)
    summary = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, check=False)
        wall = time.perf_counter() - t0
        results = sorted(out.glob("**/result.json"), key=lambda p: p.stat().st_mtime)
        if proc.returncode != 0 or not results:
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
            sys.exit(f"the run failed (exit {proc.returncode}); no result.json written")
        result = json.loads(results[-1].read_text())
        timings = result["timings"]
        cache = "empty sample cache" if i == 0 else "untuned samples cached"
        print(f"\nrun {i + 1} ({cache}): {args.method} on {args.task}, wall {wall:.1f} s on {args.cores} cores "
              f"(goal {GOAL_S:.0f} s: {wall / GOAL_S:.2f}x of it)")
        for key in ("load_s", "train_s", "sample_s", "score_s", "base_s", "total_s"):
            if key in timings:
                print(f"  {key:<8} {timings[key]:8.1f} s  ({timings[key] / wall:5.1%} of wall)")
        print(f"  step_s   {timings.get('step_s', 0.0):8.3f} s  per training step ({result['budget'].get('steps')} "
              f"steps); process start and imports: {wall - timings.get('total_s', 0.0):.1f} s")
        summary.append({"run": i + 1, "wall_s": round(wall, 2), **{k: round(v, 3) for k, v in timings.items()}})
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"method": args.method, "task": args.task, "cores": args.cores, "goal_s": GOAL_S,
                      "runs": summary}))


if __name__ == "__main__":
    main()
