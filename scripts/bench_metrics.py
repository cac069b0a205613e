"""Benchmark scoring: judge feature extraction (images/s) and one full `evaluate()` on a Flux2 backbone.

Scores a LoRA-tuned stand-in (random LoRA weights: what scoring sees after any training) on a built-in task at its
full size (16 eval samples, 64 retention prompts, step curve 1/2/4/8), twice: with an empty untuned-sample cache
(the first cell of a sweep) and with a warm one (every later cell). The goal is <= 60 s per cell on 2 CPU cores.
It prints wall time and process CPU time: on a shared box, CPU seconds / threads is the uncontended estimate.

    python scripts/bench_metrics.py                          # tiny random Flux2 + random judge (no assets needed)
    python scripts/bench_metrics.py --model glyphworld --judge default --threads 2   # the embedded default
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from dopsd_bench.method import Method
from dopsd_bench.metrics.evaluate import evaluate
from dopsd_bench.metrics.features import JudgeFeatures, load_judge
from dopsd_bench.tasks import load_task


class RandomLoRA(Method):
    name = "random-lora"

    def attach(self, backbone, rank: int = 8, seed: int = 0) -> RandomLoRA:
        self.backbone = backbone
        backbone.add_lora(self.adapter, rank=rank)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in backbone.lora_parameters(self.adapter):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        return self


def build_backbone(model: str):
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone

    if model == "tiny":
        from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline

        pipe, settings = tiny_flux2_klein_pipeline(0)
        return Flux2KleinBackbone(pipe, settings, model_id="tiny-random-0", device="cpu")
    return Flux2KleinBackbone.from_pretrained(model, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random config built here), an embedded name or a path")
    ap.add_argument("--judge", default="random", help="'random' (untrained WorldJudge), 'default' or a path")
    ap.add_argument("--task", default="concept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retention", type=int, default=None,
                    help="score only the first N retention prompts (default: all; for a quick look on a busy box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.judge == "random":
        from dopsd_bench.world.judge import WorldJudge

        torch.manual_seed(0)
        judge = WorldJudge()
    else:
        judge = load_judge(None if args.judge == "default" else args.judge)
    features = JudgeFeatures(judge)

    images = torch.rand(512, 3, 32, 32) * 2 - 1
    features.extract(images[:64])  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    features.extract(images)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    judge_ips = images.shape[0] / wall
    print(f"judge features (embedding + attributes, one pass): {judge_ips:.0f} images/s wall, "
          f"{images.shape[0] * args.threads / cpu:.0f} images/s per {args.threads} uncontended threads")

    t = time.perf_counter()
    backbone = build_backbone(args.model)
    task = load_task(args.task).build(resolution=backbone.resolution)
    if args.retention:
        n = args.retention
        task.retention_prompts, task.retention_seeds = task.retention_prompts[:n], task.retention_seeds[:n]
        task.retention_targets, task.retention_real = task.retention_targets[:n], task.retention_real[:n]
    print(f"backbone + task built in {time.perf_counter() - t:.1f} s; {len(task.eval_prompts)} eval samples, "
          f"{len(task.retention_prompts)} retention prompts")
    method = RandomLoRA().attach(backbone)
    result = {"judge_images_per_s": judge_ips}
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold", "warm"):
            timings: dict[str, float] = {}
            t, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate(backbone, task, method, features=features, cache_dir=cache_dir, timings=timings)
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            # images the tuned model generated in this call (untuned ones come from the cache when warm)
            n_tuned = len(task.eval_prompts) * 2 + len(task.retention_prompts) * 4  # eval + teacher, 4 step counts
            # CPU seconds / threads: the wall time an uncontended machine would need (the box may be shared)
            print(f"evaluate ({label} cache): {wall:.1f} s wall, {cpu:.1f} s CPU ({cpu / args.threads:.1f} s per "
                  f"thread), {n_tuned / wall:.1f} tuned images/s; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
            result[f"evaluate_{label}_s"] = wall
            result[f"evaluate_{label}_cpu_s"] = cpu
            result[f"evaluate_{label}_images_per_s"] = n_tuned / wall
    print(f"retention_fd_ratio {metrics['retention_fd_ratio']['mean']:.3f}, fidelity {metrics['fidelity']['mean']:.3f}")
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))


if __name__ == "__main__":
    main()
