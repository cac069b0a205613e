"""How the retention figures see two known failures, on true renders of the world's retention prompts.

Leakage: a share q of the renders repainted with a held-out fill (every other attribute kept). Blur: every render
Gaussian-blurred. For each, the judge-feature Fréchet distance and KID to another draw of true renders of the same
prompts, the judge's probability of the fill (what retention_leakage reads) and the Laplacian energy relative to the
clean renders (retention_sharpness). Needs only the shipped judge; about 10 s on one CPU core. `--extra-fd` adds the
FD and KID in a feature space that owes nothing to the world (metrics/imagenet.py; about 2 min more at n = 256).

    python scripts/probe_retention_parts.py                 # 256 prompts, fill 'dotted'
    python scripts/probe_retention_parts.py --n 32 --fill checkered
    python scripts/probe_retention_parts.py --extra-fd effnet_lite0
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from dopsd_bench.metrics import retention
from dopsd_bench.metrics.features import JudgeFeatures, load_judge
from dopsd_bench.metrics.frechet import frechet_distance, kernel_distance
from dopsd_bench.metrics.imagenet import extra_fd_features
from dopsd_bench.metrics.scores import label_index
from dopsd_bench.world import datasets, render
from dopsd_bench.world.render import HELD_OUT_STYLES

LEAK_SHARES = (0.0, 0.05, 0.1, 0.25, 0.5)
BLUR_SIGMAS = (0.5, 0.7, 1.0)


def renders(targets: list[dict[str, str]], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return render.to_tensor_batch([render.render(render.Scene(**t).jitter(rng)) for t in targets])


def gaussian_blur(images: torch.Tensor, sigma: float, radius: int = 3) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(images.shape[1], 1, -1, -1)
    return F.conv2d(F.pad(images, (radius,) * 4, mode="reflect"), kernel, groups=images.shape[1])


def main(n: int, fill: str, seed: int, extra_fd: str = "") -> list[dict[str, float | str]]:
    _, targets, _ = datasets.retention_prompts(n, seed=seed)
    judge = JudgeFeatures(load_judge())
    spaces = extra_fd_features(extra_fd)
    label = label_index("style", fill)
    real_images = renders(targets, seed + 1)
    real = judge.embed(real_images)
    real_extra = {name: space.embed(real_images) for name, space in spaces.items()}
    clean = renders(targets, seed + 2)
    clean_energy = retention.laplacian_energy(clean)

    def row(name: str, images: torch.Tensor) -> dict[str, float | str]:
        f = judge.extract(images)
        out = {"case": name, "fd": frechet_distance(real, f.embedding),
               "kid": kernel_distance(real, f.embedding)[0],
               "p_fill": float(retention.label_probability(f.attributes["style"], label).mean()),
               "sharpness": float(retention.relative_to_reference(retention.laplacian_energy(images),
                                                                  clean_energy).mean())}
        for space_name, space in spaces.items():
            emb = space.embed(images)
            out[f"fd_{space_name}"] = frechet_distance(real_extra[space_name], emb)
            out[f"kid_{space_name}"] = kernel_distance(real_extra[space_name], emb)[0]
        return out

    rows = []
    for q in LEAK_SHARES:
        painted = [{**t, "style": fill} if i < round(q * len(targets)) else t for i, t in enumerate(targets)]
        rows.append(row(f"{fill} on {q:.0%}", renders(painted, seed + 2)))
    rows += [row(f"blur sigma {s}", gaussian_blur(clean, s)) for s in BLUR_SIGMAS]
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="retention prompts (one render each)")
    ap.add_argument("--fill", default="dotted", choices=HELD_OUT_STYLES, help="the held-out fill that leaks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-fd", default="", help="further feature spaces, comma-separated (e.g. effnet_lite0)")
    args = ap.parse_args()
    rows = main(args.n, args.fill, args.seed, args.extra_fd)
    extra = [k for k in rows[0] if k not in ("case", "fd", "kid", "p_fill", "sharpness")]
    print(f"{'case':<18} {'FD':>8} {'KID':>8} {'p(fill)':>8} {'sharpness':>9}"
          + "".join(f" {k:>20}" for k in extra) + f"   (n = {args.n})")
    for r in rows:
        print(f"{r['case']:<18} {r['fd']:8.2f} {r['kid']:8.3f} {r['p_fill']:8.3f} {r['sharpness']:9.3f}"
              + "".join(f" {r[k]:20.3f}" for k in extra))
