"""Does the sampler, not the DiT, make the base's shapes ragged? Same base, same prompts and noise, several samplers.

    OMP_NUM_THREADS=1 python reports/base-samples-2026-11-28/probes/sampler_probe.py --n 128
"""
import argparse
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets as D
from dopsd_bench.world.check import judge_all, retention_scores
from dopsd_bench.world.judge import WorldJudge


def shifted(steps, shift):
    s = torch.linspace(1, 0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample(bb, cond, uncond, x, sigmas, eta=0.0, gen=None):
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        v = bb.predict_velocity(x, s.expand(x.shape[0]), cond)
        vu = bb.predict_velocity(x, s.expand(x.shape[0]), uncond)
        v = vu + bb.guidance_scale * (v - vu)
        if eta == 0 or sn == 0:
            x = flow.euler_step(x, v, s, sn)
            continue
        x0 = x - s * v
        eps = x + (1 - s) * v
        fresh = torch.randn(x.shape, generator=gen)
        mix = (1 - eta**2) ** 0.5 * eps + eta * fresh
        x = (1 - sn) * x0 + sn * mix
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--model", default="glyphworld-base")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    judge = WorldJudge.load()
    prompts, targets, _ = D.retention_prompts(args.n, 0)
    real = judge_all(judge, D.true_renders(targets, 0))[1]
    bb = Flux2KleinBackbone.from_pretrained(args.model)
    cond = bb.encode_prompts(prompts)
    uncond = bb.encode_prompts([""] * len(prompts))
    noise = bb.noise(list(range(10_000, 10_000 + args.n)))
    variants = {
        "euler32": (shifted(32, 1.0), 0.0),
        "euler128": (shifted(128, 1.0), 0.0),
        "euler32_shift3": (shifted(32, 3.0), 0.0),
        "euler32_shift0.33": (shifted(32, 1 / 3), 0.0),
        "sde32_eta0.5": (shifted(32, 1.0), 0.5),
        "sde32_eta1": (shifted(32, 1.0), 1.0),
        "sde64_eta1": (shifted(64, 1.0), 1.0),
        "euler4": (shifted(4, 1.0), 0.0),
        "sde4_eta1": (shifted(4, 1.0), 1.0),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    out = {}
    for name, (sig, eta) in variants.items():
        t0 = time.time()
        lat = sample(bb, cond, uncond, noise.clone(), sig, eta, torch.Generator().manual_seed(1))
        align, fd, acc = retention_scores(judge, bb.decode_latents(lat).clamp(-1, 1), targets, real)
        out[name] = {"align": round(align, 3), "fd": round(fd, 1), "shape": acc["shape"], "style": acc["style"],
                     "size": acc["size"], "s": round(time.time() - t0)}
        print(name, out[name], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
