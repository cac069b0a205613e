"""Synthetic run dirs for the aggregation tests (store, stats, leaderboard, report, check).

The values are fake on purpose: these tests check how results are read, paired and compared, not what a model does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def make_result(
    method: str,
    task: str,
    instance: str,
    seed: int,
    metrics: dict[str, tuple[list[float] | None, float | None, bool]],
    budget: dict | None = None,
    backbone: str = "glyph-tiny",
) -> dict:
    """metrics: name -> (per_sample or None, mean or None (= mean of per_sample), higher_is_better)."""
    out = {}
    for name, (per_sample, mean, hib) in metrics.items():
        m = float(np.mean(per_sample)) if mean is None else float(mean)
        out[name] = {"mean": m, "per_sample": per_sample, "higher_is_better": hib}
    return {
        "schema_version": 1,
        "method": method,
        "task": task,
        "instance": instance,
        "backbone": backbone,
        "model": None,
        "seed": seed,
        "budget": budget or {"steps": 10, "batch_size": 2, "lr": 1e-4, "rank": 4},
        "metrics": out,
        "timings": {"train_s": 1.0, "eval_s": 0.5},
        "env": {"python": "3.11"},
    }


def write_run(root: Path, result: dict, name: str | None = None) -> Path:
    name = name or f"{result['method']}/{result['task']}-{result['instance']}/seed{result['seed']}"
    run_dir = Path(root) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run_dir / "result.json")
    return run_dir


def write_grid(
    root: Path,
    methods: dict[str, float],
    tasks: dict[str, list[str]] | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    n: int = 8,
    noise: float = 0.02,
    rng_seed: int = 0,
    samples_png: bytes | None = None,
) -> None:
    """A small grid: each method's fidelity is its offset + shared per-prompt values + small noise.

    Other metrics: alignment (per-sample), retention_fd_ratio (set level, lower is better), and a step curve.
    """
    tasks = tasks or {"concept": ["zorb", "kwel"], "style": ["dotted"]}
    rng = np.random.default_rng(rng_seed)
    prompt_effect = {(t, i): rng.uniform(0.2, 0.6, n) for t, insts in tasks.items() for i in insts}
    for method, offset in methods.items():
        for task, instances in tasks.items():
            for inst in instances:
                for seed in seeds:
                    base = prompt_effect[(task, inst)]
                    fid = (base + offset + rng.normal(0, noise, n)).tolist()
                    ali = (0.8 - offset / 4 + rng.normal(0, noise, n)).tolist()
                    ratio = 1.0 + 2 * offset + float(rng.normal(0, noise))
                    res = make_result(
                        method, task, inst, seed,
                        {"fidelity": (fid, None, True), "alignment": (ali, None, True),
                         "retention_fd_ratio": (None, ratio, False)},
                    )
                    curve = {}
                    for k in (1, 2, 4, 8):  # the shape dopsd_bench/metrics/evaluate.py writes
                        fd_u = 300.0 / k
                        curve[f"fd@{k}"] = {"mean": fd_u * ratio, "per_sample": None, "higher_is_better": False}
                        curve[f"fd_untuned@{k}"] = {"mean": fd_u, "per_sample": None, "higher_is_better": False}
                    res["metrics"]["step_curve"] = curve
                    if samples_png is not None:
                        (write_run(root, res) / "samples.png").write_bytes(samples_png)
                    else:
                        write_run(root, res)
