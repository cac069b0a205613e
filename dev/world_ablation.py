"""Small from-scratch ablations of the embedded world's base model: which change makes the shapes learnable.

Each arm trains a new Flux2 DiT (flow matching, the build's mixture of text-only and referenced examples) for a
fixed number of samples and measures its 32-step CFG-2 samples on world check's retention prompts with the shipped
world judge: shape accuracy first, then the other attributes, alignment and judge-feature FD, plus the shape
*information gain* (flow-matching loss with a wrong shape word minus with the right one, at mid noise), which
moves long before sampled shapes do. Not part of the product: a research probe whose results live in docs/world.md.

    python dev/world_ablation.py --arm baseline --steps 1500 --out /tmp/abl          # one arm, ~20 min on 1 core
    python dev/world_ablation.py --arm baseline --steps 20 --eval-every 10 --prompts 32 --out /tmp/abl  # smoke

Arms are combinations of switches: --latent vae|pixel, --text frozen|learned, --blocks D,S, --geometry on|off;
--arm NAME only names the output file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dopsd_bench import flow
from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.backbones.tiny import tiny_flux2_transformer
from dopsd_bench.paths import assets_dir
from dopsd_bench.world import render as R
from dopsd_bench.world.check import judge_retention, retention_setup
from dopsd_bench.world.judge import WorldJudge
from dopsd_bench.world.mixtures import pretrain_example


def make_pool(n: int, seed: int, cache: Path) -> dict:
    """n pretraining examples of the build's mixture, rendered: images, references, captions (cached on disk)."""
    key = {"n": n, "seed": seed, "unsaid": dict(R.UNSAID)}
    if cache.exists():
        data = torch.load(cache, weights_only=False)
        if data["key"] == key:
            return data
    rng = np.random.default_rng(seed)
    ex = [pretrain_example(rng) for _ in range(n)]
    data = {"images": R.to_tensor_batch([R.render(e[0]) for e in ex]),
            "refs": R.to_tensor_batch([R.render(e[2] if e[2] is not None else e[0]) for e in ex]),
            "has_ref": torch.tensor([e[2] is not None for e in ex]), "captions": [e[1] for e in ex], "key": key}
    torch.save(data, cache)
    return data


class Space:
    """Images <-> the DiT's 8x8 token grid: the shipped VAE's normalised latents, or 4x4 pixel patches normalised
    per channel (a space-to-depth 'latent')."""

    def __init__(self, kind: str, bb: Flux2KleinBackbone, images: torch.Tensor):
        self.kind, self.bb = kind, bb
        if kind == "pixel":
            z = F.pixel_unshuffle(images[:4096], 4)
            self.mean, self.std = z.mean((0, 2, 3), keepdim=True), z.std((0, 2, 3), keepdim=True)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixel":
            return (F.pixel_unshuffle(images, 4) - self.mean) / self.std
        return torch.cat([self.bb.encode_images(c) for c in images.split(512)])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "pixel":
            return F.pixel_shuffle(z * self.std + self.mean, 4).clamp(-1, 1)
        return torch.cat([self.bb.decode_latents(c) for c in z.split(256)]).clamp(-1, 1)


class Text:
    """Captions -> the DiT's text tokens through the pipeline's Qwen3 encoder (layers 1, 2), frozen (cached) or with
    trainable token embeddings."""

    def __init__(self, bb: Flux2KleinBackbone, learned: bool):
        self.pipe, self.learned, self.ids = bb.pipe, learned, {}
        self.encoder = bb.pipe.text_encoder
        if learned:
            self.encoder.model.embed_tokens.weight.requires_grad_(True)
        self.frozen = bb

    def params(self) -> list[torch.nn.Parameter]:
        return [self.encoder.model.embed_tokens.weight] if self.learned else []

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if not self.learned:
            return self.frozen._text_embeds(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        for c in missing:
            text = self.pipe.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                           add_generation_prompt=True, enable_thinking=False)
            t = self.pipe.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=24)
            self.ids[c] = (t["input_ids"][0], t["attention_mask"][0])
        ids = torch.stack([self.ids[c][0] for c in captions])
        mask = torch.stack([self.ids[c][1] for c in captions])
        out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return torch.cat([out.hidden_states[1], out.hidden_states[2]], -1)


def predict(model, pipe, x, sigma, txt, ref=None):
    b, c, h, w = x.shape
    tokens, ids = pipe._pack_latents(x), pipe._prepare_latent_ids(x)
    if ref is not None:
        tokens = torch.cat([tokens, pipe._pack_latents(ref)], 1)
        ids = torch.cat([ids, pipe._prepare_image_ids([ref[:1]]).expand(b, -1, -1)], 1)
    out = model(hidden_states=tokens, timestep=sigma, encoder_hidden_states=txt,
                txt_ids=pipe._prepare_text_ids(txt), img_ids=ids, guidance=None, return_dict=False)[0]
    return out[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w)


@torch.no_grad()
def sample(model, pipe, text, space, prompts, seeds, steps, cfg=2.0):
    out = []
    for i in range(0, len(prompts), 128):
        p, s = prompts[i:i + 128], seeds[i:i + 128]
        shape = (space_channels(space), 8, 8)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k in s])
        cond, unc = text(p), text([""] * len(p))
        sig = torch.linspace(1, 0, steps + 1)
        for j in range(steps):
            t = sig[j].expand(len(p))
            vc, vu = predict(model, pipe, x, t, cond), predict(model, pipe, x, t, unc)
            x = flow.euler_step(x, vu + cfg * (vc - vu), sig[j], sig[j + 1])
        out.append(space.decode(x))
    return torch.cat(out)


def space_channels(space: Space) -> int:
    return 48 if space.kind == "pixel" else 32


def wrong_shape(caption: str, rng: np.random.Generator) -> str | None:
    for s in R.SHAPES:
        if f" {s} " in f" {caption} ".replace(",", " "):
            return caption.replace(s, str(rng.choice([t for t in R.SHAPES if t != s])), 1)
    return None


@torch.no_grad()
def shape_gain(model, pipe, text, data, z, n=256, seed=5) -> float:
    """Loss with a wrong shape word minus loss with the right one (text-only base examples, sigma in [0.3, 0.9]),
    relative to the right one's: > 0 once the model reads the shape word."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    idx = [i for i in torch.nonzero(~data["has_ref"]).squeeze(1).tolist() if wrong_shape(data["captions"][i], rng)]
    idx = idx[:n]
    caps = [data["captions"][i] for i in idx]
    wrong = [wrong_shape(c, rng) for c in caps]
    x0 = z[idx]
    eps = torch.randn(x0.shape, generator=gen)
    sigma = 0.3 + 0.6 * torch.rand(len(idx), generator=gen)
    xs = flow.add_noise(x0, eps, sigma)
    target = flow.velocity_target(x0, eps)
    right_l = (predict(model, pipe, xs, sigma, text(caps)) - target).pow(2).mean()
    wrong_l = (predict(model, pipe, xs, sigma, text(wrong)) - target).pow(2).mean()
    return float((wrong_l - right_l) / right_l)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", required=True)
    ap.add_argument("--latent", choices=["vae", "pixel"], default="vae")
    ap.add_argument("--text", choices=["frozen", "learned"], default="frozen")
    ap.add_argument("--blocks", default="1,3")
    ap.add_argument("--geometry", choices=["on", "off"], default="on")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-frac", type=float, default=0.5)
    ap.add_argument("--object-weight", type=float, default=0.0)
    ap.add_argument("--pool", type=int, default=24_576)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/abl"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.geometry == "off":
        R.UNSAID.update(angle=0.0, scale=0.0, shift=0.0)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_path = a.out / f"{a.arm}.jsonl"
    log_path.write_text("")

    def log(rec: dict) -> None:
        rec = {"arm": a.arm, "t": round(time.time() - t0, 1), **rec}
        print(json.dumps(rec), flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    log({"args": {k: str(v) for k, v in vars(a).items()}})
    bb = Flux2KleinBackbone.from_pretrained("glyphworld-base", device="cpu")
    judge = WorldJudge.load(assets_dir() / "judge").eval()
    data = make_pool(a.pool, 1, a.out / f"pool_{a.pool}_geom{a.geometry}.pt")
    space = Space(a.latent, bb, data["images"])
    z, zref = space.encode(data["images"]), space.encode(data["refs"])
    log({"pool_s": round(time.time() - t0, 1), "z_std": float(z.std())})
    text = Text(bb, a.text == "learned")
    blocks = tuple(int(b) for b in a.blocks.split(","))
    model = tiny_flux2_transformer(space_channels(space), 128, a.width, blocks)
    params = list(model.parameters()) + text.params()
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.01},
                             {"params": text.params(), "weight_decay": 0.0}], lr=a.lr)
    prompts, targets, real_feats, seeds = retention_setup(judge, a.prompts, seed=0)
    gen = torch.Generator().manual_seed(1)
    idx_text = torch.nonzero(~data["has_ref"]).squeeze(1)
    idx_ref = torch.nonzero(data["has_ref"]).squeeze(1)
    n_text = round(a.batch * a.text_frac)

    def evaluate(step: int) -> None:
        model.eval()
        t = time.time()
        r = judge_retention(judge, sample(model, bb.pipe, text, space, prompts, seeds, 32), targets, real_feats)
        log({"step": step, "samples": step * a.batch, "shape": r.accuracy["shape"], "accuracy": r.accuracy,
             "alignment": round(float(r.alignment.mean()), 4), "fd32": round(r.fd, 1),
             "shape_gain": round(shape_gain(model, bb.pipe, text, data, z), 4), "eval_s": round(time.time() - t, 1)})
        model.train()

    model.train()
    t_train = time.time()
    for step in range(a.steps):
        warm = min(1.0, (step + 1) / 100)
        lr = a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        total = 0.0
        for pool, use_ref, n in ((idx_text, False, n_text), (idx_ref, True, a.batch - n_text)):
            if n == 0:
                continue
            i = pool[torch.randint(len(pool), (n,), generator=gen)]
            x0 = z[i]
            caps = [data["captions"][k] if torch.rand(1, generator=gen).item() > 0.1 else "" for k in i.tolist()]
            eps = torch.randn(x0.shape, generator=gen)
            ln = torch.sigmoid(torch.randn(n, generator=gen))
            sigma = torch.where(torch.rand(n, generator=gen) < 0.25, torch.rand(n, generator=gen), ln).clamp(1e-3, 1)
            v = predict(model, bb.pipe, flow.add_noise(x0, eps, sigma), sigma, text(caps), zref[i] if use_ref else None)
            err = (v - flow.velocity_target(x0, eps)).pow(2)
            if a.object_weight:
                img = data["images"][i]
                obj = F.adaptive_avg_pool2d((img.amax(1, keepdim=True) - img.amin(1, keepdim=True)) / 2, 8)
                w = 1 + a.object_weight * obj
                loss = (err * w).mean() / w.mean()
            else:
                loss = err.mean()
            (loss * n / a.batch).backward()
            total += loss.item() * n / a.batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            ms = (time.time() - t_train) / (step + 1) * 1000
            log({"step": step, "loss": round(total, 4), "ms_per_step": round(ms)})
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            evaluate(step + 1)
    log({"done": True, "train_s": round(time.time() - t_train, 1)})


if __name__ == "__main__":
    main()
