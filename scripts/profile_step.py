"""Where a training step's time goes: torch.profiler by op and cProfile by Python function, for one method on the
embedded model, through `Method.loss_and_backward` as the training loop calls it (default batch and K).

    python scripts/profile_step.py --method dopsd                      # 10 steps after 2 warm-up steps
    python scripts/profile_step.py --method sft --steps 3 --top 10     # quick look (~30 s on 2 CPU cores)

Prints the top ops by self CPU time (torch.profiler) and the top Python functions by cumulative time (cProfile),
each with its share of the profiled steps' wall time, then one JSON line with the step time and the shares.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dopsd_bench.backbones import load_backbone
from dopsd_bench.method import Batch, config_from_overrides
from dopsd_bench.registry import METHODS
from dopsd_bench.tasks import load_task
from dopsd_bench.train import DEFAULT_BUDGET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dopsd")
    ap.add_argument("--task", default="style")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="method config key=value")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    backbone = load_backbone("flux2-klein", device="cpu")
    data = load_task(a.task).build(resolution=backbone.resolution)
    cls = METHODS.get(a.method)
    method = cls(config_from_overrides(cls.Config, dict(s.split("=", 1) for s in a.sets)))
    gen = torch.Generator().manual_seed(0)
    method.setup(backbone, Batch(data.train_images, list(data.train_captions), data.token), DEFAULT_BUDGET["rank"],
                 gen)
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = DEFAULT_BUDGET["batch_size"]

    def step(i: int) -> None:
        idx = torch.randint(data.train_images.shape[0], (b,), generator=gen)
        batch = Batch(data.train_images[idx], [data.train_captions[j] for j in idx.tolist()], data.token)
        opt.zero_grad(set_to_none=True)
        method.loss_and_backward(batch, gen)
        opt.step()
        method.after_step(i + 1)

    for i in range(2):
        step(i)
    py = cProfile.Profile()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        py.enable()
        for i in range(a.steps):
            step(i + 2)
        py.disable()
    wall = time.perf_counter() - t0
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    out = io.StringIO()
    pstats.Stats(py, stream=out).sort_stats("cumulative").print_stats(a.top)
    print(out.getvalue())
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in ops)
    shares = {e.key: round(e.self_cpu_time_total / total_us, 3) for e in ops[: a.top]}
    print(json.dumps({"method": a.method, "step_s": round(wall / a.steps, 4), "threads": a.threads,
                      "op_self_time_share": shares}))


if __name__ == "__main__":
    main()
