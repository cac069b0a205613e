"""Why a few LoRA steps can *lower* the turbo's retention FD: pixel statistics of world check's retention samples
(256 prompts, its seeds) for the untuned turbo, after random LoRA perturbations, and after a few `sft` steps.

    python reports/retention-early-fall-2026-11-28/probe.py                    # ~4 min, 2 CPU threads
    python reports/retention-early-fall-2026-11-28/probe.py --n 16 --steps 1   # tiny CPU example

Columns: paint = fraction of pixels with colour (channel spread >= 0.1; the world paints objects saturated on
grey), obj-sat = their mean channel spread, edges = mean vertical pixel difference, FD and its mean term
||mu_r - mu_f||^2 (judge features), trace = Tr(covariance) of the samples' judge features (true renders: first row).
"""

import argparse
import tempfile
from dataclasses import replace

import torch

from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.method import Batch
from dopsd_bench.registry import METHODS
from dopsd_bench.train import TrainConfig, train
from dopsd_bench.world import datasets as D
from dopsd_bench.world.check import _batched_sample, judge_retention, retention_setup
from dopsd_bench.world.judge import WorldJudge

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--n", type=int, default=256, help="retention prompts (world check: 256)")
ap.add_argument("--steps", default="3,30", help="sft step counts to try on each task")
args = ap.parse_args()
judge = WorldJudge.load()
prompts, targets, real_feats, seeds = retention_setup(judge, args.n, 0)


def row(name: str, images: torch.Tensor) -> None:
    x = (images + 1) / 2
    spread = x.max(1).values - x.min(1).values
    paint = spread >= 0.1
    r = judge_retention(judge, images, targets, real_feats)
    mean_term = float((r.features.mean(0) - real_feats.mean(0)).pow(2).sum())
    print(f"{name:<34}{paint.float().mean():>7.3f}{spread[paint].mean():>9.3f}"
          f"{(x[..., 1:, :] - x[..., :-1, :]).abs().mean():>8.4f}{r.fd:>8.1f}{mean_term:>8.1f}"
          f"{torch.cov(r.features.T).trace():>8.1f}{float(r.alignment.mean()):>8.3f}", flush=True)


print(f"{'samples':<34}{'paint':>7}{'obj-sat':>9}{'edges':>8}{'FD':>8}{'mean':>8}{'trace':>8}{'align':>8}")
row("true renders", D.true_renders(targets, 0))
turbo = Flux2KleinBackbone.from_pretrained("glyphworld-turbo")
row("turbo, untuned", _batched_sample(turbo, prompts, seeds))
turbo.add_lora("random", rank=8)
for scale in (1.5e-3, 3e-3):  # about the size of three Adam steps at lr 5e-4, and twice it; random directions
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in turbo.denoiser.named_parameters():
            if ".random." in name and "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    row(f"turbo + random LoRA B, std {scale:g}", _batched_sample(turbo, prompts, seeds))
for family, instance in (("style", "dotted"), ("concept", "zorb")):
    for steps in (int(v) for v in args.steps.split(",")):
        bb = Flux2KleinBackbone.from_pretrained("glyphworld-turbo")
        images, captions = D.training_set(family, instance, 8, 0)
        method = METHODS.get("sft")()
        with tempfile.TemporaryDirectory() as tmp:
            train(method, bb, Batch(images, captions), replace(TrainConfig(steps=steps), checkpoint_every=0), tmp)
        bb.set_adapter(method.adapter)
        row(f"sft on {family}/{instance}, {steps} steps", _batched_sample(bb, prompts, seeds))
