"""Where a consistency student loses the restart sampler's quality: stages 1..n use the shipped turbo's exact
endpoints (its Euler steps to sigma 0), the rest the student's one-step x0 prediction; every stage's endpoint is
noised afresh to the next sigma (one generator, seed 5). World check's 256 retention prompts and seeds.

    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/restart_hybrid.py STUDENT_TURBO_DIR
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world.check import retention_scores, retention_setup
from dopsd_bench.world.judge import WorldJudge

torch.set_num_threads(1)
judge = WorldJudge.load()
prompts, targets, real, seeds = retention_setup(judge, 256)
old = Flux2KleinBackbone.from_pretrained("glyphworld-turbo")
new = Flux2KleinBackbone.from_pretrained(sys.argv[1])
old.stochastic_sampling = new.stochastic_sampling = False
sig = old.sigmas(4)
cond = old.encode_prompts(prompts)
def run(exact_stages):
    gen = torch.Generator().manual_seed(5)
    x = old.noise(seeds)
    with torch.no_grad():
        for i in range(4):
            if i < exact_stages:
                e = old.denoise_latents(x, cond, sig[i:])
            else:
                e = flow.x0_from_velocity(x, new.predict_velocity(x, sig[i].expand(len(x)), cond), sig[i])
            if i < 3:
                x = flow.add_noise(e, torch.randn(e.shape, generator=gen), sig[i + 1])
    return old.decode_latents(e).clamp(-1, 1)
for n in (0, 1, 2, 3, 4):
    a, fd, acc = retention_scores(judge, run(n), targets, real)
    print(f"exact stages {n}: align {a:.3f} fd {fd:.1f} shape {acc['shape']}", flush=True)
