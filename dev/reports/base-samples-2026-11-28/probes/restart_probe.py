"""Restart (multistep-consistency) sampling: at each of the turbo's sigmas, run the ODE to sigma 0, then noise the
result afresh to the next sigma; the last ODE endpoint is the sample. World check's 256 retention prompts and seeds.

    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/restart_probe.py turbo   # or: base
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
which = sys.argv[1]
judge = WorldJudge.load()
prompts, targets, real, seeds = retention_setup(judge, 256)
bb = Flux2KleinBackbone.from_pretrained(f"glyphworld-{which}")
bb.stochastic_sampling = False  # the ODE inside each segment
sig = bb.sigmas(32 if which == "base" else 4)
per = len(sig) // 4  # schedule entries per turbo interval
boundaries = [0, per, 2 * per, 3 * per]


def restart(restart_at: list[int]) -> torch.Tensor:
    out = []
    for b in range(0, 256, 128):
        cond = bb.encode_prompts(prompts[b:b + 128])
        x = bb.noise(seeds[b:b + 128])
        gen = torch.Generator().manual_seed(123 + b)
        k = 0
        while True:
            later = [j for j in restart_at if j > k]
            if not later:
                x = bb.denoise_latents(x, cond, sig[k:])
                break
            x0 = bb.denoise_latents(x, cond, sig[k:])
            k = later[0]
            x = flow.add_noise(x0, torch.randn(x0.shape, generator=gen), sig[k])
        out.append(bb.decode_latents(x).clamp(-1, 1))
    return torch.cat(out)


for name, at in (("ode", []), ("restart at 0.5, 0.25", boundaries[2:]), ("restart at 0.25", boundaries[3:]),
                 ("restart at 0.75, 0.5, 0.25", boundaries[1:])):
    align, fd, acc = retention_scores(judge, restart(at), targets, real)
    print(f"{which} {name}: align {align:.3f} fd {fd:.1f} shape {acc['shape']} fill {acc['style']}", flush=True)
