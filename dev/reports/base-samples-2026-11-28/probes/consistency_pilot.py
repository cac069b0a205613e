"""Pilot: re-distil the shipped turbo into a 4-step *consistency* model sampled with restarts (diffusers'
stochastic_sampling: each step's x0 prediction is noised afresh to the next sigma).

Targets come from the shipped turbo's own restart roll-outs: at each of its sigmas s_i, the state x_i and the
endpoint e_i of its Euler steps from x_i to 0 (x_1 is Gaussian noise; x_{i+1} is e_i noised afresh to s_{i+1}).
The student learns x_i - s_i * v(x_i) = e_i in one step. Half the examples carry a reference image (the teacher
path), as in the build's distillation. Evaluated with world check's 256 retention prompts and seeds.

    OMP_NUM_THREADS=2 python reports/base-samples-2026-11-28/probes/consistency_pilot.py --out /tmp/cons \
        [--examples 8192 --steps 1000 --batch 64 --lr 1e-4]
    # tiny CPU smoke run: --examples 256 --steps 4 --batch 8 --eval-n 16
"""
import argparse
import copy
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import build_world as W

from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.losses import ema_update
from dopsd_bench.paths import PACKAGE_ASSETS as ASSETS
from dopsd_bench.world.check import retention_figures, retention_setup
from dopsd_bench.world.judge import WorldJudge

ap = argparse.ArgumentParser()
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--examples", type=int, default=8192)
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--eval-every", type=int, default=250)
ap.add_argument("--eval-n", type=int, default=256)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--loss", choices=["x0", "velocity"], default="x0",
                help="x0: uniform over sigmas; velocity: the x0 error / sigma^2 (weights the last steps)")
ap.add_argument("--targets", choices=["turbo", "base"], default="turbo",
                help="whose ODE gives the endpoints: the turbo's Euler steps, or the base's (32-step schedule, CFG)")
ap.add_argument("--init", default="glyphworld-turbo", help="the student's starting weights (a turbo dir)")
ap.add_argument("--rollout-cache", type=Path, default=None, help="save the roll-outs here, or load them")
args = ap.parse_args()
t0 = time.time()

bb = Flux2KleinBackbone.from_pretrained(args.init)
bb.stochastic_sampling = False
ode = bb if args.targets == "turbo" else Flux2KleinBackbone.from_pretrained("glyphworld-base")
ode.stochastic_sampling = False
ode_sig = ode.sigmas(4 if args.targets == "turbo" else 32)
per = len(ode_sig) // 4
data = W.make_dataset(bb, args.examples, args.seed + 5)
sig = bb.sigmas(4)
gen = torch.Generator().manual_seed(args.seed + 81)


@torch.no_grad()
def rollouts() -> dict:
    states, ends = [], []
    for b in range(0, args.examples, 256):
        sl = slice(b, b + 256)
        caps, refs, has = data["captions"][sl], data["refs"][sl], data["has_ref"][sl]
        xs, es = torch.empty(len(caps), 4, *bb.latent_shape()), torch.empty(len(caps), 4, *bb.latent_shape())
        for use_ref in (False, True):
            idx = torch.nonzero(has == use_ref).squeeze(1)
            if len(idx) == 0:
                continue
            cond = W.cond_for(ode, [caps[i] for i in idx.tolist()], refs[idx] if use_ref else None)
            x = torch.randn((len(idx), *bb.latent_shape()), generator=gen)
            for i in range(4):
                e = ode.denoise_latents(x, cond, ode_sig[per * i:])
                xs[idx, i], es[idx, i] = x, e
                if i < 3:
                    x = flow.add_noise(e, torch.randn(e.shape, generator=gen), sig[i + 1])
        states.append(xs.half())
        ends.append(es.half())
        print(f"roll-outs {min(b + 256, args.examples)}/{args.examples} ({time.time() - t0:.0f} s)", flush=True)
    return {"states": torch.cat(states), "ends": torch.cat(ends)}


if args.rollout_cache and args.rollout_cache.exists():
    traj = torch.load(args.rollout_cache)
else:
    traj = rollouts()
    if args.rollout_cache:
        torch.save(traj, args.rollout_cache)
judge = WorldJudge.load()
prompts, targets, real, seeds = retention_setup(judge, args.eval_n)


def evaluate(model, label: str) -> None:
    keep = bb.pipe.transformer
    bb.pipe.transformer = bb.denoiser = model.eval()
    bb.stochastic_sampling = True
    align, fd, acc = retention_figures(bb, judge, prompts, targets, real, seeds)
    bb.stochastic_sampling = False
    bb.pipe.transformer = bb.denoiser = keep
    print(f"[{label}] restart 4 NFE: align {align:.3f} fd {fd:.1f} shape {acc['shape']} fill {acc['style']} "
          f"({time.time() - t0:.0f} s)", flush=True)


teacher = bb.denoiser
student = copy.deepcopy(teacher).train().requires_grad_(True)
ema = copy.deepcopy(student).requires_grad_(False)
evaluate(ema, "step 0")
opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
idx_text = torch.nonzero(~data["has_ref"]).squeeze(1)
idx_ref = torch.nonzero(data["has_ref"]).squeeze(1)
bb.pipe.transformer = bb.denoiser = student
per_k, count = [0.0] * 4, [0] * 4
for step in range(1, args.steps + 1):
    opt.zero_grad()
    total = 0.0
    for pool, use_ref in ((idx_text, False), (idx_ref, True)):
        idx = pool[torch.randint(len(pool), (args.batch // 2,), generator=gen)]
        k = torch.randint(4, (len(idx),), generator=gen)
        x, e = traj["states"][idx, k].float(), traj["ends"][idx, k].float()
        s = sig[k]
        cond = W.cond_for(bb, [data["captions"][i] for i in idx.tolist()], data["refs"][idx] if use_ref else None)
        err = (flow.x0_from_velocity(x, bb.predict_velocity(x, s, cond), s) - e).pow(2).mean((1, 2, 3))
        for j in range(4):
            per_k[j] += float(err.detach()[k == j].sum())
            count[j] += int((k == j).sum())
        loss = (err / s**2).mean() if args.loss == "velocity" else err.mean()
        (loss / 2).backward()
        total += loss.item() / 2
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    for g in opt.param_groups:
        g["lr"] = W.cosine_lr(step, args.steps, args.lr, warmup=50)
    opt.step()
    ema_update(ema.parameters(), student.parameters(), min(0.995, (1 + step) / (10 + step)))
    if step % 50 == 0:
        by_k = " ".join(f"{per_k[j] / max(count[j], 1):.4f}" for j in range(4))
        print(f"step {step} loss {total:.4f}; x0 error at sigma 1/.75/.5/.25: {by_k} ({time.time() - t0:.0f} s)",
              flush=True)
        per_k, count = [0.0] * 4, [0] * 4
    if step % args.eval_every == 0 or step == args.steps:
        bb.pipe.transformer = bb.denoiser = teacher
        evaluate(ema, f"step {step}")
        bb.pipe.transformer = bb.denoiser = student

out = args.out / "glyphworld-turbo"
shutil.copytree(ASSETS / "glyphworld-turbo", out, dirs_exist_ok=True)
ema.save_pretrained(out / "transformer")
cfg = out / "scheduler" / "scheduler_config.json"
cfg.write_text(cfg.read_text().replace('"stochastic_sampling": false', '"stochastic_sampling": true'))
if not (args.out / "glyphworld-base").exists():
    shutil.copytree(ASSETS / "glyphworld-base", args.out / "glyphworld-base")
print(f"saved {out} ({time.time() - t0:.0f} s)", flush=True)
