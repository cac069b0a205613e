"""Painted-pixel fraction of world check's retention samples (256 prompts, its seeds) by sampler: where the turbo's
over-painting comes from. Edit the candidate path (a consistency build, not shipped) or drop its line.

    python reports/retention-early-fall-2026-11-28/paint_by_sampler.py      # ~3 min on 2 CPU threads
"""
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world.check import _batched_sample, retention_setup
from dopsd_bench.world.judge import WorldJudge

judge = WorldJudge.load()
prompts, targets, real_feats, seeds = retention_setup(judge, 256, 0)
def paint(x):
    x = (x + 1) / 2
    return float(((x.max(1).values - x.min(1).values) >= 0.1).float().mean())
base = Flux2KleinBackbone.from_pretrained("glyphworld-base")
print("base stochastic 32", paint(_batched_sample(base, prompts, seeds, 32)), flush=True)
print("base stochastic 4", paint(_batched_sample(base, prompts, seeds, 4)), flush=True)
base.stochastic_sampling = False
print("base euler 32", paint(_batched_sample(base, prompts, seeds, 32)), flush=True)
base.guidance_scale = 1.0
print("base euler 32 cfg1", paint(_batched_sample(base, prompts, seeds, 32)), flush=True)
cand = Flux2KleinBackbone.from_pretrained("/tmp/lead/gw_c3/glyphworld-turbo")
print("consistency candidate", paint(_batched_sample(cand, prompts, seeds)), flush=True)
