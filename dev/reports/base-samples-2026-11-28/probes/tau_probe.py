"""ODE (base, 32 Euler steps) and turbo (4 steps) from Gaussian noise scaled by tau.
    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/tau_probe.py
"""
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets as D
from dopsd_bench.world.check import judge_all, retention_scores
from dopsd_bench.world.judge import WorldJudge

torch.set_num_threads(1)
n = 128
judge = WorldJudge.load()
prompts, targets, _ = D.retention_prompts(n, 0)
real = judge_all(judge, D.true_renders(targets, 0))[1]
seeds = list(range(10_000, 10_000 + n))
bb = Flux2KleinBackbone.from_pretrained("glyphworld-base", device="cpu"); bb.stochastic_sampling = False
turbo = Flux2KleinBackbone.from_pretrained("glyphworld-turbo", device="cpu")
def score(m, lat):
    a, fd, acc = retention_scores(judge, m.decode_latents(lat).clamp(-1, 1), targets, real)
    return {"align": round(a, 3), "fd": round(fd, 1), "shape": acc["shape"], "style": acc["style"], "size": acc["size"]}
tc, bc = turbo.encode_prompts(prompts), bb.encode_prompts(prompts)
for tau in (0.5, 0.6, 0.7, 0.8, 0.9):
    print("turbo", tau, score(turbo, turbo.denoise_latents(tau * turbo.noise(seeds), tc, turbo.sigmas(4))), flush=True)
for tau in (0.6, 0.7, 0.8):
    print("base-ode32", tau, score(bb, bb.denoise_latents(tau * bb.noise(seeds), bc, bb.sigmas(32))), flush=True)
