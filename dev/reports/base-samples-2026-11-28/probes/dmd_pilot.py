"""DMD pilot: distribution-matching fine-tune of the shipped turbo against the shipped base (CPU, text-only).

    python reports/base-samples-2026-11-28/probes/dmd_pilot.py --steps 300 --eval-every 50 --lr-g 2e-5
    # -> dmd_lr2e-5.txt
    python reports/base-samples-2026-11-28/probes/dmd_pilot.py --steps 300 --eval-every 50 --lr-g 1e-4
    # -> dmd_lr1e-4.txt
    python reports/base-samples-2026-11-28/probes/dmd_pilot.py --steps 1000 --eval-every 100 --lr-g 2e-5
    # -> dmd_lr2e-5_1000.txt

Text-only captions from the pretraining distribution, batch 32, 100 fake-score warm-up updates, then per step one
generator update (backward simulation to a random one of its 4 levels; DMD gradient at a random noise level, the
base with CFG 2 as the real score) and 2 fake-score updates; the turbo measured on 128 retention prompts every 50.
"""
import argparse
import contextlib
import copy
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import build_world as W

from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets as D
from dopsd_bench.world.check import judge_all, retention_scores
from dopsd_bench.world.judge import WorldJudge
from dopsd_bench.world.mixtures import pretrain_example

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr-g", type=float, default=5e-5)
ap.add_argument("--lr-f", type=float, default=1e-4)
ap.add_argument("--fake-updates", type=int, default=2)
ap.add_argument("--eval-every", type=int, default=100)
ap.add_argument("--fake-warmup", type=int, default=100)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default="/tmp/dmd")
args = ap.parse_args()
torch.set_num_threads(args.threads)

judge = WorldJudge.load()
n_eval = 128
prompts, targets, _ = D.retention_prompts(n_eval, 0)
real_feats = judge_all(judge, D.true_renders(targets, 0))[1]
eval_seeds = list(range(10_000, 10_000 + n_eval))

base = Flux2KleinBackbone.from_pretrained("glyphworld-base", device="cpu")
turbo = Flux2KleinBackbone.from_pretrained("glyphworld-turbo", device="cpu")
fake = copy.deepcopy(base.denoiser).train().requires_grad_(True)
gen_model = turbo.denoiser.train().requires_grad_(True)
opt_g = torch.optim.AdamW(gen_model.parameters(), lr=args.lr_g, weight_decay=0.0)
opt_f = torch.optim.AdamW(fake.parameters(), lr=args.lr_f, weight_decay=0.0)
rng = np.random.default_rng(123)
captions = [pretrain_example(rng)[1] for _ in range(8192)]
g = torch.Generator().manual_seed(5)
sig = turbo.sigmas(4)


def evaluate(tag):
    gen_model.eval()
    with torch.no_grad():
        lat = turbo.sample_latents(turbo.encode_prompts(prompts), eval_seeds)
        a, fd, acc = retention_scores(judge, turbo.decode_latents(lat).clamp(-1, 1), targets, real_feats)
    gen_model.train()
    r = {"tag": tag, "align": round(a, 3), "fd": round(fd, 1), "shape": acc["shape"], "style": acc["style"],
         "size": acc["size"]}
    print(json.dumps(r), flush=True)
    return r


@contextlib.contextmanager
def fake_active():
    """The base adapter with the fake score's DiT in place of its own."""
    saved = base.pipe.transformer
    base.pipe.transformer = base.denoiser = fake
    try:
        yield
    finally:
        base.pipe.transformer = base.denoiser = saved


results = [evaluate("start")]
t0 = time.time()
for step in range(-args.fake_warmup, args.steps):
    idx = torch.randint(len(captions), (args.batch,), generator=g).tolist()
    caps = [captions[i] if torch.rand(1, generator=g).item() > 0.1 else "" for i in idx]
    cond = turbo.encode_prompts(caps)
    uncond = base.encode_prompts([""] * args.batch)
    # backward simulation: the generator's own state at a random one of its 4 levels
    k = int(torch.randint(4, (1,), generator=g))
    x = torch.randn((args.batch, *turbo.latent_shape()), generator=g)
    with torch.no_grad():
        gen_model.eval()
        for i in range(k):
            x = flow.euler_step(x, turbo.predict_velocity(x, sig[i].expand(args.batch), cond), sig[i], sig[i + 1])
        gen_model.train()
    s_k = sig[k].expand(args.batch)
    x0_gen = flow.x0_from_velocity(x, turbo.predict_velocity(x, s_k, cond), s_k)
    # distribution matching gradient at a random noise level
    t = (0.02 + 0.96 * torch.rand(args.batch, generator=g))
    noise = torch.randn(x0_gen.shape, generator=g)
    with torch.no_grad():
        x_t = flow.add_noise(x0_gen.detach(), noise, t)
        v_c = base.predict_velocity(x_t, t, cond)
        v_u = base.predict_velocity(x_t, t, uncond)
        real_x0 = flow.x0_from_velocity(x_t, v_u + 2.0 * (v_c - v_u), t)
        fake.eval()
        with fake_active():
            fake_x0 = flow.x0_from_velocity(x_t, base.predict_velocity(x_t, t, cond), t)
        fake.train()
        norm = (x0_gen.detach() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        grad = (fake_x0 - real_x0) / norm
    loss_g = 0.5 * F.mse_loss(x0_gen, (x0_gen - grad).detach())
    opt_g.zero_grad()
    if step >= 0:  # after the fake score's warm-up on the untouched generator
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(gen_model.parameters(), 1.0)
        opt_g.step()
    # the fake score follows the generator's distribution (flow matching on its samples, text-conditioned)
    for _ in range(args.fake_updates):
        t2 = W.sample_sigma(args.batch, g)
        eps2 = torch.randn(x0_gen.shape, generator=g)
        x_t2 = flow.add_noise(x0_gen.detach(), eps2, t2)
        with fake_active():
            loss_f = F.mse_loss(base.predict_velocity(x_t2, t2, cond), flow.velocity_target(x0_gen.detach(), eps2))
        opt_f.zero_grad()
        loss_f.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        opt_f.step()
    if step % 20 == 0:
        print(f"step {step} k {k} loss_g {loss_g.item():.4f} loss_f {loss_f.item():.4f} "
              f"{(time.time() - t0) / (step + args.fake_warmup + 1):.2f} s/step", flush=True)
    if step >= 0 and (step + 1) % args.eval_every == 0:
        results.append(evaluate(f"step{step + 1}"))
with open(args.out + ".json", "w") as f:
    json.dump(results, f)
W.save_pipeline(turbo.pipe, turbo.settings, __import__("pathlib").Path(args.out) / "glyphworld-turbo")
