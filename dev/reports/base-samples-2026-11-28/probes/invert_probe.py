"""Can the base's stochastic samples be reached by its ODE? Invert them (Euler, sigma 0 -> 1) and look at the noises.

    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/invert_probe.py
"""
import json
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from dopsd_bench import flow
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
bb = Flux2KleinBackbone.from_pretrained("glyphworld-base", device="cpu")
turbo = Flux2KleinBackbone.from_pretrained("glyphworld-turbo", device="cpu")
cond, uncond = bb.encode_prompts(prompts), bb.encode_prompts([""] * n)
sig = bb.sigmas(32)


def v_cfg(x, s):
    s = s.expand(n)
    vc, vu = bb.predict_velocity(x, s, cond), bb.predict_velocity(x, s, uncond)
    return vu + 2.0 * (vc - vu)


def score(lat):
    a, fd, acc = retention_scores(judge, bb.decode_latents(lat).clamp(-1, 1), targets, real)
    return {"align": round(a, 3), "fd": round(fd, 1), "shape": acc["shape"], "style": acc["style"]}


with torch.no_grad():
    x_sde = bb.sample_latents(cond, seeds, 32)
    out = {"sde": score(x_sde)}
    print(out, flush=True)
    x = x_sde.clone()
    for i in range(32, 0, -1):  # sig[i] -> sig[i-1]: backwards Euler with the velocity at the current point
        x = x + (sig[i - 1] - sig[i]) * v_cfg(x, sig[i])
    z = x
    flat = z.flatten(1)
    per_sample = flat.std(1)
    out["z_stats"] = {"mean": round(float(z.mean()), 3), "std": round(float(z.std()), 3),
                      "per_sample_std_min_max": [round(float(per_sample.min()), 3), round(float(per_sample.max()), 3)],
                      "kurtosis": round(float(((z - z.mean()) / z.std()).pow(4).mean()), 3),
                      "per_channel_std": [round(float(c), 3) for c in z.std(dim=(0, 2, 3))][:8]}
    print(out["z_stats"], flush=True)
    bb.stochastic_sampling = False
    x = z.clone()
    for i in range(32):
        x = flow.euler_step(x, v_cfg(x, sig[i]), sig[i], sig[i + 1])
    out["ode_from_inverted"] = score(x)
    rel_err = (x - x_sde).pow(2).mean().sqrt() / x_sde.pow(2).mean().sqrt()
    out["ode_from_inverted"]["latent_rel_err"] = round(float(rel_err), 3)
    print(out, flush=True)
    tc = turbo.encode_prompts(prompts)
    out["turbo_from_inverted"] = score(turbo.denoise_latents(z.clone(), tc, turbo.sigmas(4)))
    out["turbo_from_gaussian"] = score(turbo.sample_latents(tc, seeds))
    out["ode_from_gaussian"] = score(bb.sample_latents(cond, seeds, 32))
    print(json.dumps(out), flush=True)
