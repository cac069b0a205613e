"""Wall time of the main job (`dopsd-bench run`, end to end: model load, training, sampling, scoring) on N CPU cores,
and how close its training comes to what those cores can compute.

Runs the CLI in a subprocess pinned to the first N cores (taskset when the machine has more; torch threads = N),
into a fresh results dir, so the first run starts with an empty sample cache (what a new user sees), and prints the
wall time with its load/train/sample/score split from the run's result.json. Then, with the same arguments:
- `--vs sft` (the default) runs that method too and reports the step-time ratio and the FLOP-per-step ratio of the
  two (FLOPs as the training loop counts them, `result.json`'s `cost`);
- the machine's matmul peak is measured in this process on the same cores and threads, after the runs: a 2048^3
  matmul in fp32 and in bf16. The training's achieved GFLOP/s (`cost.train_flops / cost.train_seconds`) is
  reported against both.
Run it on a quiet machine: anything else on the cores inflates the times and deflates the peaks. The last printed
line is one JSON object. The main job's goal is <= 60 s on 2 cores.

    python scripts/bench_run.py                                    # the main job: --method dopsd --task style
    python scripts/bench_run.py --vs none -- --steps 4             # tiny CPU example (~30 s on 2 cores)
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

import torch

GOAL_S = 60.0
PEAK_SIDE = 2048


def run_once(method: str, args: argparse.Namespace, out: Path) -> dict:
    """One `dopsd-bench run` pinned to the first --cores cores; its wall time, timings and cost."""
    cmd = [sys.executable, "-m", "dopsd_bench", "run", "--method", method, "--task", args.task,
           "--out", str(out), "--force", "--device", "cpu", *args.extra]
    if shutil.which("taskset") and (os.cpu_count() or 1) > args.cores:
        cmd = ["taskset", "-c", f"0-{args.cores - 1}", *cmd]
    n = str(args.cores)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "HF_HUB_OFFLINE": "1"}
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, check=False)
    wall = time.perf_counter() - t0
    results = sorted(out.glob(f"**/{method}/**/result.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not results:
        sys.exit(f"`dopsd-bench run --method {method}` failed (exit {proc.returncode}); no result.json written")
    result = json.loads(results[-1].read_text())
    return {"wall_s": wall, "timings": result["timings"], "cost": result.get("cost") or {}}


def achieved_gflops(cost: dict) -> float | None:
    """Training FLOPs over training seconds, as the run recorded them (None for a method that trains nothing)."""
    if not cost or not cost.get("train_seconds"):
        return None
    return cost["train_flops"] / cost["train_seconds"] / 1e9


def matmul_gflops(dtype: torch.dtype, side: int = PEAK_SIDE, seconds: float = 2.0) -> float:
    """The best of a few timed repeats of a side^3 matmul in `dtype`, in GFLOP/s."""
    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    a @ b  # warm-up: kernels chosen, pages touched
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * side**3 / dt / 1e9)
    return best


def measure_peaks(cores: int) -> dict:
    """fp32 and bf16 matmul peaks on the first `cores` cores with as many torch threads, as the runs had them."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cores:
        os.sched_setaffinity(0, range(cores))
    torch.set_num_threads(cores)
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}


def report(label: str, run: dict, peaks: dict) -> dict:
    timings, wall = run["timings"], run["wall_s"]
    print(f"\n{label}: wall {wall:.1f} s on the cores given (goal {GOAL_S:.0f} s: {wall / GOAL_S:.2f}x of it)")
    for key in ("load_s", "train_s", "sample_s", "score_s", "base_s", "total_s"):
        if key in timings:
            print(f"  {key:<8} {timings[key]:8.1f} s  ({timings[key] / wall:5.1%} of wall)")
    print(f"  step_s   {timings.get('step_s', 0.0):8.3f} s  per training step ({run['cost'].get('train_steps')} "
          f"steps); process start and imports: {wall - timings.get('total_s', 0.0):.1f} s")
    entry = {"wall_s": round(wall, 2), **{k: round(v, 3) for k, v in timings.items()}}
    rate = achieved_gflops(run["cost"])
    if rate is not None:
        entry["train_gflops_per_s"] = round(rate, 1)
        entry["fraction_of_fp32_peak"] = round(rate / peaks["fp32"], 3)
        entry["fraction_of_bf16_peak"] = round(rate / peaks["bf16"], 3)
        print(f"  training at {rate:.1f} GFLOP/s = {rate / peaks['fp32']:.0%} of the fp32 peak, "
              f"{rate / peaks['bf16']:.0%} of the bf16 peak")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dopsd")
    parser.add_argument("--task", default="style")
    parser.add_argument("--vs", default="sft", help="a second method to run with the same arguments, for the "
                        "step-time and FLOP ratios (default sft; `none` skips it)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to run on (default 2)")
    parser.add_argument("--runs", type=int, default=1, help="run this many times; runs after the first reuse the cache")
    parser.add_argument("--out", default=None, help="results dir (default: a temporary dir, removed afterwards)")
    parser.add_argument("extra", nargs="*", help="more `dopsd-bench run` arguments, after --")
    args = parser.parse_args()
    if args.cores < 1 or args.runs < 1:
        parser.error(f"--cores and --runs must be >= 1, got {args.cores} and {args.runs}")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        runs = [run_once(args.method, args, out) for _ in range(args.runs)]
        other = run_once(args.vs, args, out) if args.vs != "none" else None
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    peaks = measure_peaks(args.cores)
    print(f"\nmatmul peak on {args.cores} core(s), {PEAK_SIDE}^3: fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    summary = {"method": args.method, "task": args.task, "cores": args.cores, "goal_s": GOAL_S,
               "peak_gflops_per_s": {k: round(v, 1) for k, v in peaks.items()},
               "runs": [report(f"{args.method} run {i + 1} ({'empty sample cache' if i == 0 else 'cache warm'})",
                               run, peaks) for i, run in enumerate(runs)]}
    if other is not None:
        summary["vs"] = {"method": args.vs, **report(f"{args.vs} (cache warm)", other, peaks)}
        mine, theirs = runs[0], other
        if mine["cost"] and theirs["cost"]:
            summary["step_time_ratio"] = round(mine["timings"]["step_s"] / theirs["timings"]["step_s"], 2)
            summary["flop_ratio"] = round(mine["cost"]["flops_per_step"] / theirs["cost"]["flops_per_step"], 2)
            print(f"\n{args.method} / {args.vs} per step: time {summary['step_time_ratio']:.2f}x, "
                  f"FLOPs {summary['flop_ratio']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
