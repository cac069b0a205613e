"""The shipped turbo at its 4 steps with Euler, partly and fully stochastic steps (128 retention prompts).

    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/turbo_sampler.py   # -> turbo_sampler_n128.txt
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets as D
from dopsd_bench.world.check import judge_all, retention_scores
from dopsd_bench.world.judge import WorldJudge

torch.set_num_threads(1)
n = 128
judge = WorldJudge.load()
prompts, targets, _ = D.retention_prompts(n, 0)
real = judge_all(judge, D.true_renders(targets, 0))[1]
bb = Flux2KleinBackbone.from_pretrained("glyphworld-turbo", device="cpu")
cond = bb.encode_prompts(prompts)
noise = bb.noise(list(range(10_000, 10_000 + n)))
sig = torch.linspace(1, 0, 5)
for eta in (0.0, 0.5, 1.0):
    gen, x = torch.Generator().manual_seed(1), noise.clone()
    with torch.no_grad():
        for i in range(4):
            s, sn = sig[i], sig[i + 1]
            v = bb.predict_velocity(x, s.expand(n), cond)
            if eta == 0 or sn == 0:
                x = x + (sn - s) * v
                continue
            x0, eps = x - s * v, x + (1 - s) * v
            x = (1 - sn) * x0 + sn * ((1 - eta**2) ** 0.5 * eps + eta * torch.randn(x.shape, generator=gen))
        align, fd, acc = retention_scores(judge, bb.decode_latents(x).clamp(-1, 1), targets, real)
    print(f"turbo eta {eta}: align {align:.3f} fd {fd:.1f} shape {acc['shape']} fill {acc['style']}", flush=True)
