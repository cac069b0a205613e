"""Where a glyphworld model loses an attribute: four probes of one multi-step model, scored by the world judge.

`dopsd-bench world check` says *what* the model gets wrong (e.g. shape accuracy per attribute); these probes say
*where*. Run them on the shipped base or on a candidate build before spending a GPU run on the next one.

    python scripts/diagnose_world.py                                   # the shipped base, about 5 min on 1 CPU thread
    python scripts/diagnose_world.py --model /tmp/gw/glyphworld-base --n 32 --threads 2    # a candidate, quicker
    python scripts/diagnose_world.py --grid-only /tmp/grid.png         # only the picture (below), about 30 s

Probes (one JSON object on stdout, progress on stderr):
- `latent_noise`: true renders -> latents + Gaussian noise of std s -> decoder. If small s already breaks the
  judge's attributes, the VAE's latent space is fragile and every small DiT error shows.
- `from_partial`: true latents noised to sigma0, then the rest of the 32-step schedule (`denoise_latents`, with
  the model's CFG, Euler steps). The sigma0 at which an attribute is lost is the noise level where the model fails
  to form it.
- `cfg`: per-attribute accuracy of full 32-step samples at several guidance scales.
- `sampler`: 32-step samples at the model's guidance with each of the scheduler's two samplers: Euler (the
  probability-flow ODE) and `stochastic` (each step re-noises the x0 prediction). A model whose stochastic samples
  are much better than its ODE's has a fair denoiser whose velocity errors accumulate along the ODE; a turbo
  distilled from ODE trajectories inherits those errors.
- `confusion`: for those samples at the model's own guidance, how the judge labels each shape and fill style a
  prompt asked for. Rows that differ say the model draws something for the word, even where the judge does not
  recognise it (low accuracy); rows that are all alike say the model ignores the word.
- `word_sensitivity`: RMS change of the model's x0 prediction when one caption word changes (same noise), per
  sigma. A word the model ignores moves nothing.
- `latent_gap`: how far the model's 32-step latents lie from what the VAE's encoder makes of images: relative RMS
  of encode(decode(z)) - z for generated latents, against the same for true latents. A large gap says the DiT
  generates latents the decoder was never trained on (one reading of ragged samples).
- `--grid PNG`: a picture of what the model draws: 32-step samples (seeds 0-17) of every base shape (rows) in
  every fill style (columns), large, red, left, on a light background, beside true renders of the same captions.
- `word_signal_in_renders`: the same swaps in the world itself, no model: RMS change of the mean true render (over
  the unsaid factors) when the word changes, and `spread`, one render's RMS distance from its caption's mean. At
  sigma -> 1 the ideal x0 prediction is that mean, so this is how much each word is worth to the loss there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets, render
from dopsd_bench.world.check import judge_all, retention_scores, retention_setup
from dopsd_bench.world.judge import WorldJudge

PROBE_CAPTION = "a large solid red circle at the top, dark background"
WORD_SWAPS = {"shape": ("circle", "square"), "colour": ("red", "blue"), "size": ("large", "small"),
              "style": ("solid", "striped"), "position": ("top", "left")}


def _scores(judge, images, targets, real_feats) -> dict:
    _, fd, accuracy = retention_scores(judge, images, targets, real_feats)
    return {"fd": round(fd, 1), "accuracy": {k: round(v, 3) for k, v in accuracy.items()}}


@torch.no_grad()
def from_partial(bb, judge, latents, prompts, targets, real_feats) -> dict:
    """Always with Euler steps, whatever the model's sampler: a stochastic first step would replace the true
    latent's noise by fresh noise, and the probe would measure the sampler rather than the denoiser."""
    sig = bb.sigmas(32).to(bb.device)
    cond = bb.encode_prompts(prompts)
    own_sampler, bb.stochastic_sampling = bb.stochastic_sampling, False
    out = {}
    for start in (4, 8, 16, 24):
        gen = torch.Generator().manual_seed(start)
        x = flow.add_noise(latents, torch.randn(latents.shape, generator=gen).to(bb.device), sig[start])
        images = bb.decode_latents(bb.denoise_latents(x, cond, sig[start:])).clamp(-1, 1)
        out[f"{float(sig[start]):.3f}"] = _scores(judge, images, targets, real_feats)
    bb.stochastic_sampling = own_sampler
    return out


@torch.no_grad()
def word_sensitivity(bb, n: int) -> dict:
    x = torch.randn((n, *bb.latent_shape()), generator=torch.Generator().manual_seed(0))
    out = {}

    def x0(caption: str, sigma: torch.Tensor) -> torch.Tensor:
        return flow.x0_from_velocity(x, bb.predict_velocity(x, sigma, bb.encode_prompts([caption] * n)), sigma)

    for sigma in (0.95, 0.8, 0.6, 0.4):
        s = torch.full((n,), sigma)
        ref = x0(PROBE_CAPTION, s)
        out[str(sigma)] = {attr: round(float((x0(PROBE_CAPTION.replace(a, b), s) - ref).pow(2).mean().sqrt()), 4)
                           for attr, (a, b) in WORD_SWAPS.items()}
    return out


def confusion(judge, images, targets, attrs: tuple[str, ...] = ("shape", "style")) -> dict:
    """{attribute: {value asked for: {judge's label: fraction of those samples}}}, labels under 5% left out."""
    probs, _ = judge_all(judge, images)
    out = {}
    for attr in attrs:
        rows: dict[str, Counter] = {}
        for target, label in zip(targets, probs[attr].argmax(1).tolist(), strict=True):
            rows.setdefault(target[attr], Counter())[render.ATTRIBUTES[attr][label]] += 1
        out[attr] = {want: {got: round(c / sum(row.values()), 2) for got, c in row.most_common()
                            if c / sum(row.values()) >= 0.05} for want, row in sorted(rows.items())}
    return out


@torch.no_grad()
def latent_gap(bb, latents: torch.Tensor) -> float:
    """Relative RMS of encode(decode(z)) - z: 0 for latents the VAE reproduces exactly."""
    again = bb.encode_images(bb.decode_latents(latents).clamp(-1, 1))
    return round(float(((again - latents).pow(2).mean() / latents.pow(2).mean()).sqrt()), 4)


def word_signal_in_renders(n: int = 1000) -> dict:
    """Pixel-space RMS change of the mean render (over `n` jittered scenes) for each word swap of PROBE_CAPTION."""
    import numpy as np

    rng = np.random.default_rng(0)
    probe = render.Scene("circle", "red", "large", "top", "solid", "dark")
    assert render.caption(probe) == PROBE_CAPTION

    def renders(scene: render.Scene) -> np.ndarray:
        return np.stack([render.render(scene.jitter(rng)) for _ in range(n)])

    ref = renders(probe)
    mean = ref.mean(0)
    out = {"spread": round(float(np.sqrt(((ref - mean) ** 2).mean())), 4)}
    for attr, (_, word) in WORD_SWAPS.items():
        other = renders(replace(probe, **{attr: word})).mean(0)
        out[attr] = round(float(np.sqrt(((other - mean) ** 2).mean())), 4)
    return out


@torch.no_grad()
def sample_grid(bb, path: Path) -> None:
    """Write `--grid`'s picture: the model's samples (left block) beside true renders (right block), 4x enlarged."""
    import numpy as np
    from PIL import Image

    scenes = [render.Scene(shape, "red", "large", "left", style, "light")
              for shape in render.SHAPES for style in render.STYLES]
    samples = bb.sample([render.caption(s) for s in scenes], list(range(len(scenes))), 32)
    rng = np.random.default_rng(0)
    renders = render.to_tensor_batch([render.render(s.jitter(rng)) for s in scenes])

    def block(images: torch.Tensor) -> np.ndarray:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        width = len(render.STYLES)
        rows = [np.concatenate(list(pixels[i:i + width]), 1) for i in range(0, len(pixels), width)]
        return np.concatenate(rows, 0)

    left, right = block(samples), block(renders)
    grid = np.concatenate([left, np.zeros((left.shape[0], 8, 3), np.uint8), right], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="glyphworld-base", help="embedded name or a saved pipeline folder")
    ap.add_argument("--n", type=int, default=128, help="retention prompts per probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None, help="also write a PNG of samples beside true renders")
    ap.add_argument("--grid-only", type=Path, default=None, help="only write that PNG (no probes)")
    args = ap.parse_args()
    if args.n < 8:
        ap.error(f"--n {args.n}: expected at least 8 prompts (a Fréchet distance needs several samples)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = Flux2KleinBackbone.from_pretrained(args.model, device="cpu")
    if args.grid or args.grid_only:
        sample_grid(bb, args.grid or args.grid_only)
        print(f"wrote {args.grid or args.grid_only}", file=sys.stderr)
        if args.grid_only:
            return
    judge = WorldJudge.load()
    prompts, targets, real_feats, seeds = retention_setup(judge, args.n)
    latents = bb.encode_images(datasets.true_renders(targets, 7))
    out: dict = {"model": args.model, "n": args.n, "guidance_scale": bb.guidance_scale,
                 "dit_parameters": sum(p.numel() for p in bb.denoiser.parameters())}

    def progress(probe: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {probe} done", file=sys.stderr, flush=True)

    gen = torch.Generator().manual_seed(1)
    out["latent_noise"] = {str(s): _scores(judge, bb.decode_latents(latents + s * torch.randn(latents.shape,
                                                                                               generator=gen)),
                                           targets, real_feats) for s in (0.0, 0.1, 0.3, 0.5)}
    progress("latent_noise")
    out["from_partial"] = from_partial(bb, judge, latents, prompts, targets, real_feats)
    progress("from_partial")
    cfg = {}
    own = float(out["guidance_scale"] or 1.0)  # the confusion is read at the model's own guidance
    for g in sorted({1.0, 2.0, 4.0, own}):
        bb.guidance_scale = g
        generated = bb.sample_latents(bb.encode_prompts(prompts), seeds, 32)
        images = bb.decode_latents(generated).clamp(-1, 1)  # as bb.sample makes them
        cfg[str(g)] = _scores(judge, images, targets, real_feats)
        if g == own:
            out["confusion"] = confusion(judge, images, targets)
            out["latent_gap"] = {"generated": latent_gap(bb, generated), "true": latent_gap(bb, latents)}
    bb.guidance_scale = out["guidance_scale"]
    out["cfg"] = cfg
    progress("cfg")
    own_sampler = bb.stochastic_sampling  # its samples are cfg's at the model's guidance: sample the other only
    names = {False: "euler", True: "stochastic"}
    out["sampler"] = {"own": names[own_sampler], names[own_sampler]: cfg[str(own)]}
    bb.stochastic_sampling = not own_sampler
    out["sampler"][names[not own_sampler]] = _scores(judge, bb.sample(prompts, seeds, 32), targets, real_feats)
    bb.stochastic_sampling = own_sampler
    progress("sampler")
    out["word_sensitivity"] = word_sensitivity(bb, min(args.n, 64))
    out["word_signal_in_renders"] = word_signal_in_renders()
    out["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
