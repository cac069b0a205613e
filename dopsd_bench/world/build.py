"""The embedded world's build recipe: every stage that `scripts/build_world.py` runs (world judge, VAE, dataset, base
flow matching, trajectories, trajectory, guidance and consistency distillation), its recipe constants, and the
orchestration of the model stages (`build_models`). The script is its command line; `scripts/tune_base.py` reuses
the stages.

    from dopsd_bench.world import build
    judge, accuracy = build.train_judge(steps=100, seed=0, device=torch.device("cpu"))
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dopsd_bench import flow
from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline, tiny_flux2_transformer
from dopsd_bench.losses import ema_update
from dopsd_bench.paths import assets_dir
from dopsd_bench.world import datasets, render
from dopsd_bench.world.check import judge_accuracy, target_accuracy, teacher_figures
from dopsd_bench.world.judge import WorldJudge
from dopsd_bench.world.mixtures import judge_scene, pretrain_example

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data: what each stage sees
# ---------------------------------------------------------------------------------------------------------------
RENDER_POOL: ProcessPoolExecutor | None = None  # set by start_render_pool (workers > 1)


def batch_tensor(scenes: list[render.Scene]) -> torch.Tensor:
    """Render scenes to a (N, 3, 32, 32) tensor in [-1, 1]; large batches go to the worker processes."""
    if RENDER_POOL is None or len(scenes) < 512:
        return render.to_tensor_batch([render.render(s) for s in scenes])
    return render.to_tensor_batch(list(RENDER_POOL.map(render.render, scenes, chunksize=256)))


def start_render_pool(workers: int) -> None:
    """Render large batches in `workers` processes (none for 1). Spawned, not forked: the parent may already hold a
    CUDA context."""
    global RENDER_POOL
    if workers > 1:
        RENDER_POOL = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def where_built(device: torch.device, workers: int) -> dict:
    """What build_summary.json records of an invocation's machine and command."""
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "workers": workers, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------
def train_judge(steps: int, seed: int, device: torch.device) -> tuple[WorldJudge, dict]:
    rng = np.random.default_rng(seed + 11)
    judge = WorldJudge(width=32).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        scenes = [judge_scene(rng) for _ in range(64)]
        x = batch_tensor(scenes).to(device)
        labels = [s.judge_labels() for s in scenes]
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[k], torch.tensor([lab[k] for lab in labels], device=device))
                   for k in logits)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 2e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f}")
    judge.eval()
    rng = np.random.default_rng(seed + 12)
    acc = judge_accuracy(judge, [judge_scene(rng) for _ in range(2000)])
    log(f"judge accuracy on fresh renders: {acc}")
    return judge, acc


def train_vae(vae, steps: int, batch: int, pool_size: int, seed: int, device: torch.device, lr: float = 3e-3,
              judge: WorldJudge | None = None) -> None:
    """Reconstruction of judge-distribution renders (held-out glyphs and styles included: the teacher can only
    copy what the VAE can represent), drawn from a pre-rendered pool of `pool_size` scenes. The decoder reads the
    posterior mean, as every user of the VAE does (`encode_images` takes the mode). A run that sampled the posterior
    (at a lower lr) had about twice the round-trip error at 400 steps; not a clean ablation, but no reason to sample.
    With `judge`, the log also reports the held-out styles' judge accuracy after a round trip (diagnostic only)."""
    rng = np.random.default_rng(seed + 21)
    pool = batch_tensor([judge_scene(rng) for _ in range(pool_size)])
    log(f"vae pool: {pool_size} renders")
    probe = batch_tensor([judge_scene(np.random.default_rng(seed + 22)) for _ in range(64)]).to(device)
    fills = {style: datasets.training_set("style", style, 64, seed + j)[0].to(device)  # as `world check` reads them
             for j, style in enumerate(render.HELD_OUT_STYLES)}
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 23)

    def roundtrip(images: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(images).latent_dist.mode()).sample

    for step in range(steps):
        x = pool[torch.randint(pool_size, (batch,), generator=gen)].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mode()).sample
        kl = dist.kl().mean() / x[0].numel()
        # objects are small and saturated, backgrounds grey: weight errors by saturation so colour is kept
        weight = 1 + 8 * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True))
        err = (recon - x).abs()
        loss = (weight * (err + err**2)).mean() + 1e-3 * kl
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            with torch.no_grad():
                msg = f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.4f} probe mse " \
                      f"{(roundtrip(probe) - probe).pow(2).mean():.4f}"
                if judge is not None:
                    acc = {k: round(target_accuracy(judge, roundtrip(im), "style", k), 3) for k, im in fills.items()}
                    msg += f" round-trip style acc {acc}"
            log(msg)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_stats(pipe, seed: int, device) -> None:
    """The Flux2 pipelines normalise patchified latents by vae.bn's running stats; set them from data."""
    rng = np.random.default_rng(seed + 31)
    lats = []
    for _ in range(8):
        x = batch_tensor([judge_scene(rng) for _ in range(256)]).to(device)
        lats.append(pipe._patchify_latents(pipe.vae.encode(x).latent_dist.mode()))
    lat = torch.cat(lats)
    pipe.vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
    pipe.vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3)))


def object_map(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Where the object is, per latent cell: the world paints objects in saturated colours on grey backgrounds, so
    a pixel's channel spread (max - min) is its objectness. (N, 3, H, W) in [-1, 1] -> (N, 1, grid, grid) in [0, 1]."""
    spread = (images.amax(1, keepdim=True) - images.amin(1, keepdim=True)) / 2
    return F.adaptive_avg_pool2d(spread, grid)


@torch.no_grad()
def make_dataset(bb, n: int, seed: int, cache: Path | None = None) -> dict:
    """Pre-render and pre-encode n pretraining examples: target latents, object maps, captions, references (as
    the backbone's teacher reads them: `reference_inputs`). With `cache`, a dataset saved there for the same
    backbone, seed and size is loaded instead (and a new one is saved)."""
    reference = bb.reference_inputs(torch.zeros(1, 3, render.RES, render.RES))  # what the teacher reads
    key = {"seed": seed, "n": n, "latent_shape": list(bb.latent_shape()), "unsaid": dict(render.UNSAID),
           "backbone": bb.name, "reference": [*reference.shape[1:], str(reference.dtype)]}
    if cache is not None and cache.exists():
        data = torch.load(cache, weights_only=False)
        if data.get("key") == key:
            log(f"dataset: loaded from {cache}")
            return data
        log(f"dataset: {cache} holds {data.get('key')}, not {key}: making it again")
    rng = np.random.default_rng(seed + 41)
    examples = [pretrain_example(rng) for _ in range(n)]
    lat, obj, ref, has_ref, caps = [], [], [], [], []
    grid = bb.latent_shape()[-1]
    for i in range(0, n, 8192):
        chunk = examples[i:i + 8192]
        targets = batch_tensor([e[0] for e in chunk])
        refs = batch_tensor([e[2] if e[2] is not None else e[0] for e in chunk])
        for j in range(0, len(chunk), 512):
            lat.append(bb.encode_images(targets[j:j + 512]).cpu())
            ref.append(bb.reference_inputs(refs[j:j + 512]).cpu())
        obj.append(object_map(targets, grid).half())
        has_ref += [e[2] is not None for e in chunk]
        caps += [e[1] for e in chunk]
        log(f"dataset {i + len(chunk)}/{n}")
    data = {"latents": torch.cat(lat), "objects": torch.cat(obj), "refs": torch.cat(ref),
            "has_ref": torch.tensor(has_ref), "captions": caps, "key": key}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")  # renamed when whole: another process may wait for it
        torch.save(data, partial)
        os.replace(partial, cache)
        log(f"dataset: saved to {cache}")
    return data


def cond_for(bb, captions: list[str], refs: torch.Tensor | None) -> dict:
    """Text-only, or the adapter's teacher conditioning from the dataset's references (`reference_inputs`)."""
    return bb.encode_prompts(captions) if refs is None else bb.teacher_cond(captions, refs)


class LearnedConditioning:
    """What trains with the base DiT besides it: the text encoder's token embeddings (`learn_text`; the rest of the
    encoder stays frozen at its random init unless `learn_encoder`, which trains all of it) and the teacher's own
    reference encoder where the backbone has one (Z-Image's VL vision tower: at this size nothing pretrained gives
    the teacher its in-context ability). `cond` encodes through the adapter's uncached `trainable_cond`, so
    gradients reach them; each has an EMA, which `finish` writes back. `of` gives None when nothing but the DiT
    trains."""

    def __init__(self, bb, params: list[torch.nn.Parameter]):
        self.bb, self.params = bb, params
        for p in params:
            p.requires_grad_(True)
        self.ema = [p.detach().clone() for p in params]

    @classmethod
    def of(cls, bb, learn_text: bool, learn_encoder: bool = False) -> LearnedConditioning | None:
        text = bb.pipe.text_encoder
        params = list(text.parameters()) if learn_encoder else [text.get_input_embeddings().weight] if \
            learn_text else []
        reference = bb.reference_encoder()
        params += list(reference.parameters()) if reference is not None else []
        return cls(bb, params) if params else None

    def cond(self, captions: list[str], refs: torch.Tensor | None) -> dict:
        return self.bb.trainable_cond(captions, refs)

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Exchange the trained weights with their EMA (twice restores them): the probe samples with the EMA."""
        for p, e in zip(self.params, self.ema):
            kept = p.detach().clone()
            p.copy_(e)
            e.copy_(kept)
        self.bb._text_cache.clear()

    def finish(self) -> None:
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
                p.requires_grad_(False)
        self.bb._text_cache.clear()  # encodings made with the old table


def sample_sigma(n: int, gen: torch.Generator, loc: float = 0.0) -> torch.Tensor:
    """Logit-normal sigmas (SD3; location `loc`, > 0 favours high noise) mixed with 25% uniform, so the high-noise
    end is not starved."""
    ln = torch.sigmoid(torch.randn(n, generator=gen) + loc)
    uni = torch.rand(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.25, uni, ln).clamp(1e-3, 1.0)


@torch.no_grad()
def reference_use(bb, data: dict, learned: LearnedConditioning | None = None, n: int = 64) -> dict[str, float]:
    """Does the model read its references? The flow-matching loss on the first `n` referenced examples of `data`
    at sigma 0.2, 0.5 and 0.8 with their own references and with each given its neighbour's (same noise), and the
    relative gap. An early, cheap sign of in-context ability, long before the teacher's samples show any: a model
    that ignores its references reads a gap of 0 (glyphworld's shipped base: 0.95 on the seed-0 dataset)."""
    idx = torch.nonzero(data["has_ref"]).squeeze(1)[:n]
    x0 = data["latents"][idx].to(bb.device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(bb.device)
    captions = [data["captions"][i] for i in idx.tolist()]
    refs = data["refs"][idx].to(bb.device)
    sigmas = [torch.full((len(idx),), s, device=bb.device) for s in (0.2, 0.5, 0.8)]
    loss = {}
    for name, given in (("own", refs), ("other", refs.roll(1, 0))):
        cond = learned.cond(captions, given) if learned is not None else cond_for(bb, captions, given)
        loss[name] = sum((bb.predict_velocity(flow.add_noise(x0, eps, s), s, cond)
                          - flow.velocity_target(x0, eps)).pow(2).mean().item() for s in sigmas) / len(sigmas)
    return {"ref_loss_own": round(loss["own"], 4), "ref_loss_other": round(loss["other"], 4),
            "ref_gap": round((loss["other"] - loss["own"]) / loss["own"], 4)}


class BaseProbe:
    """What `world check` measures of a base, during training: the world judge's accuracy per attribute and its
    alignment on `n` retention prompts, sampled by the EMA DiT at 32 Euler steps with CFG `guidance` (fixed prompts
    and seeds, so the figures of one build compare across steps), its in-context teacher's accuracy on the
    held-out glyphs and fills (`world check`'s R3 figures, 4 samples per instance, at the same 32 steps) and, given
    the build's `data`, how much its loss depends on the references (`reference_use`)."""

    def __init__(self, n: int, guidance: float, data: dict | None = None):
        from dopsd_bench.world.check import retention_setup

        self.judge = WorldJudge.load().eval()
        self.prompts, self.targets, self.real, self.seeds = retention_setup(self.judge, n, seed=0)
        self.guidance = guidance
        self.data = data

    @torch.no_grad()
    def __call__(self, bb, ema: torch.nn.Module, learned: LearnedConditioning | None) -> dict:
        from dopsd_bench.world.check import retention_figures

        saved = bb.denoiser, bb.pipe.transformer, bb.guidance_scale, bb.stochastic_sampling, bb.native_steps
        if learned is not None:  # sample with the EMA of what trains with the DiT, as the saved base will
            learned.swap_ema()
        try:
            bb.denoiser = bb.pipe.transformer = ema.eval()
            bb.guidance_scale, bb.stochastic_sampling, bb.native_steps = self.guidance, False, 32
            alignment, fd, accuracy = retention_figures(bb, self.judge, self.prompts, self.targets, self.real,
                                                        self.seeds, steps=32)
            teacher = {k: round(v, 3) for family in ("concept", "style")
                       for k, v in teacher_figures(bb, self.judge, family, 4, seed=0).items()}
            if self.data is not None:
                teacher |= reference_use(bb, self.data, learned)
        finally:
            bb.denoiser, bb.pipe.transformer, bb.guidance_scale, bb.stochastic_sampling, bb.native_steps = saved
            if learned is not None:
                learned.swap_ema()
        return {"alignment": round(alignment, 4), "fd32": round(fd, 1), **accuracy, **teacher}


class BaseCheckpoint:
    """The base stage's state (DiT, EMA, optimiser, data stream, what trains with the DiT and their EMAs) saved every
    `every` steps to `path`, so a stopped build resumes where it was: the same command resumes from a state saved
    for the same `recipe` (anything else is refused, not mixed). The stage's outcome does not depend on where it
    was stopped: the random stream is saved with the weights."""

    def __init__(self, path: Path, every: int, recipe: dict):
        self.path, self.every, self.recipe = path, every, recipe

    def resume(self, parts: dict, gen: torch.Generator, learned: LearnedConditioning | None) -> int:
        """Load a saved state into `parts`, `gen` and `learned`; returns the step to go on from (0: none saved)."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        if state["recipe"] != self.recipe:
            raise SystemExit(f"{self.path} was saved by a base of another recipe ({state['recipe']}, not "
                             f"{self.recipe}): delete it to start this one afresh")
        for name, part in parts.items():
            part.load_state_dict(state[name])
        gen.set_state(state["gen"])
        with torch.no_grad():
            for p, saved in zip(learned.params if learned else [], state["learned"]):
                p.copy_(saved)
            for e, saved in zip(learned.ema if learned else [], state["learned_ema"]):
                e.copy_(saved)
        log(f"base: resumed from {self.path} at step {state['step']}")
        return state["step"]

    def save(self, parts: dict, gen: torch.Generator, learned: LearnedConditioning | None, step: int) -> None:
        state = {name: part.state_dict() for name, part in parts.items()}
        state |= {"gen": gen.get_state(), "step": step, "recipe": self.recipe,
                  "learned": [p.detach().clone() for p in (learned.params if learned else [])],
                  "learned_ema": [e.clone() for e in (learned.ema if learned else [])]}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, partial)
        os.replace(partial, self.path)  # atomic: a build stopped while saving keeps the previous state

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


class _WallBudget:
    """train_base's wall-time budget: after PLAN_AFTER steps the step count becomes what the measured rate allows
    (so that the cosine schedule still ends), and training stops once the budget is spent."""

    def __init__(self, budget_s: float):
        self.budget_s, self.t_start, self.t_rate = budget_s, time.time(), time.time()

    def fitted(self, step: int, steps: int) -> int:
        if step == PLAN_AFTER // 5:
            self.t_rate = time.time()  # the rate is measured after the first steps' warm-up
        if step != PLAN_AFTER:
            return steps
        rate = (time.time() - self.t_rate) / (PLAN_AFTER - PLAN_AFTER // 5)
        elapsed = time.time() - self.t_start
        steps = min(steps, max(PLAN_AFTER + 1, int(PLAN_AFTER + (self.budget_s - elapsed) / rate)))
        log(f"base: {rate * 1000:.0f} ms/step, {steps} steps fit the budget of {self.budget_s:g} s")
        return steps

    def spent(self, step: int, steps: int) -> bool:
        if time.time() - self.t_start <= self.budget_s:
            return False
        log(f"base: budget of {self.budget_s:g} s spent at step {step} of {steps}")
        return True


def _flow_matching_loss(bb, data: dict, idx: torch.Tensor, use_ref: bool, gen: torch.Generator,
                        learned: LearnedConditioning | None, sigma_loc: float, object_weight: float) -> torch.Tensor:
    """The base's loss on examples `idx` of `data` (10% of captions dropped, for CFG), with their references when
    `use_ref`; each latent cell weighted by 1 + object_weight x its objectness."""
    x0 = data["latents"][idx].to(bb.device)
    caps = [data["captions"][i] if torch.rand(1, generator=gen).item() > 0.1 else "" for i in idx.tolist()]
    refs = data["refs"][idx].to(bb.device) if use_ref else None
    cond = learned.cond(caps, refs) if learned is not None else cond_for(bb, caps, refs)
    eps = torch.randn(x0.shape, generator=gen).to(bb.device)
    sigma = sample_sigma(len(idx), gen, sigma_loc).to(bb.device)
    v = bb.predict_velocity(flow.add_noise(x0, eps, sigma), sigma, cond)
    weight = 1 + object_weight * data["objects"][idx].to(bb.device, torch.float32)
    return ((v - flow.velocity_target(x0, eps)).pow(2) * weight).mean() / weight.mean()


def train_base(bb, data: dict, steps: int, batch: int, lr: float, seed: int, sigma_loc: float = 0.0,
               object_weight: float = 0.0, text_frac: float = 0.5, budget_s: float | None = None,
               learn_text: bool = False, probe: BaseProbe | None = None, probe_every: int = 0,
               checkpoint: BaseCheckpoint | None = None, learn_encoder: bool = False
               ) -> tuple[torch.nn.Module, int]:
    """Flow matching on `data`; returns the EMA of the trained DiT and the steps it took. Each batch holds
    `text_frac` text-only examples, the rest with their reference. `object_weight` > 0 weights each latent cell's
    squared error by 1 + object_weight x its objectness (`object_map`): the object, a small part of the image,
    counts for more than the unsaid background. `budget_s`: a wall-time budget (`_WallBudget`). `learn_text`: the
    text encoder's token embeddings train too (LearnedConditioning, which also trains a backbone's reference
    encoder, with an EMA). `probe`: every `probe_every` steps and at the end the EMA model is measured (BaseProbe)
    and the figures logged. `checkpoint`: the stage's state is saved every `checkpoint.every` steps, and a saved
    state of the same recipe is resumed (BaseCheckpoint)."""
    model = bb.denoiser
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    learned = LearnedConditioning.of(bb, learn_text, learn_encoder)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
    if learned is not None:
        groups.append({"params": learned.params, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr)
    gen = torch.Generator().manual_seed(seed + 51)
    idx_text = torch.nonzero(~data["has_ref"]).squeeze(1)
    idx_ref = torch.nonzero(data["has_ref"]).squeeze(1)
    n_text = round(batch * text_frac)
    wall = _WallBudget(budget_s) if budget_s is not None else None
    step = 0
    parts = {"model": model, "ema": ema, "opt": opt}
    if checkpoint is not None:
        step = checkpoint.resume(parts, gen, learned)
    while step < steps:
        if wall is not None:
            steps = wall.fitted(step, steps)
            if wall.spent(step, steps):
                break
        loss_total = 0.0
        opt.zero_grad()
        for pool, use_ref, n in ((idx_text, False, n_text), (idx_ref, True, batch - n_text)):
            if n == 0:
                continue
            idx = pool[torch.randint(len(pool), (n,), generator=gen)]
            loss = _flow_matching_loss(bb, data, idx, use_ref, gen, learned, sigma_loc, object_weight)
            (loss * n / batch).backward()
            loss_total += loss.item() * n / batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema.parameters(), model.parameters(), decay)
        if learned is not None:
            ema_update(learned.ema, learned.params, decay)
        if step % 250 == 0 or step == steps - 1:
            log(f"base step {step}/{steps} loss {loss_total:.4f}")
        step += 1
        if checkpoint is not None and step % checkpoint.every == 0 and step < steps:
            checkpoint.save(parts, gen, learned, step)
        if probe is not None and probe_every and (step % probe_every == 0 or step == steps):
            t_probe = time.time()
            figures = probe(bb, ema, learned)
            model.train()
            log(f"base probe at step {step} ({step * batch} samples, {time.time() - t_probe:.0f} s): "
                f"{json.dumps(figures)}")
    if learned is not None:
        learned.finish()
    return ema, step


def rollouts_by_reference(bb, data: dict, order: torch.Tensor, batch: int, label: str, roll) -> dict:
    """`roll(cond, n) -> {name: tensor}` over the examples `order` of `data`, in batches, text-only and referenced
    examples apart (one batch's conditioning has one form); its outputs are collected with their captions, reference
    latents and has_ref flags, as the distillation stages read them."""
    outs, caps, refs, has_ref = {}, [], [], []
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        for use_ref in (False, True):
            sel = idx[data["has_ref"][idx] == use_ref]
            if len(sel) == 0:
                continue
            c = [data["captions"][i] for i in sel.tolist()]
            cond = cond_for(bb, c, data["refs"][sel].to(bb.device) if use_ref else None)
            for name, value in roll(cond, len(sel)).items():
                outs.setdefault(name, []).append(value.cpu())
            caps += c
            refs.append(data["refs"][sel])
            has_ref += [use_ref] * len(sel)
        log(f"{label} {min(b + batch, len(order))}/{len(order)}")
    return {**{k: torch.cat(v) for k, v in outs.items()}, "captions": caps, "refs": torch.cat(refs),
            "has_ref": torch.tensor(has_ref)}


@torch.no_grad()
def make_trajectories(bb, data: dict, n: int, guidance: float, seed: int, batch: int = 256) -> dict:
    """Teacher (base, CFG `guidance`) trajectories from fixed noise: states at the 4-step schedule's sigmas. They
    follow the ODE (Euler steps) whatever the base's own sampler: distillation needs a deterministic map from the
    noise to the sample."""
    gen = torch.Generator().manual_seed(seed + 61)
    sig = bb.sigmas(32).to(bb.device)
    keep = [0, 8, 16, 24, 32]
    order = torch.randperm(len(data["captions"]), generator=gen)[:n]

    def roll(cond: dict, m: int) -> dict:
        uncond = cond_for(bb, [""] * m, None)
        x = torch.randn((m, *bb.latent_shape()), generator=gen).to(bb.device)
        traj = [x]
        for i in range(32):
            s = sig[i].expand(m)
            vc = bb.predict_velocity(x, s, cond)
            vu = bb.predict_velocity(x, s, uncond)
            x = flow.euler_step(x, vu + guidance * (vc - vu), sig[i], sig[i + 1])
            traj.append(x)
        return {"states": torch.stack([traj[k] for k in keep], 1)}

    return {**rollouts_by_reference(bb, data, order, batch, "trajectories", roll), "sigmas": sig[keep].cpu()}


@torch.no_grad()
def restart_rollouts(bb, data: dict, n: int, seed: int, batch: int = 256) -> dict:
    """The consistency stage's targets, from the trajectory-distilled turbo `bb` (Euler steps, guidance baked in):
    at each native sigma s_i, the state x_i and the endpoint e_i of the turbo's Euler steps from x_i to 0. x_1 is
    Gaussian noise and x_{i+1} is e_i noised afresh to s_{i+1}: the states a consistency turbo meets when it samples
    with restarts (diffusers' stochastic_sampling; docs/world.md, "Restart sampling"). The first n examples of
    `data` (captions, and references where it has them) condition them."""
    gen = torch.Generator().manual_seed(seed + 81)
    sig = bb.sigmas(4).to(bb.device)

    def roll(cond: dict, m: int) -> dict:
        x = torch.randn((m, *bb.latent_shape()), generator=gen).to(bb.device)
        xs, es = [], []
        for i in range(4):
            e = bb.denoise_latents(x, cond, sig[i:])
            xs.append(x)
            es.append(e)
            if i < 3:
                x = flow.add_noise(e, torch.randn(e.shape, generator=gen).to(bb.device), sig[i + 1])
        return {"states": torch.stack(xs, 1), "ends": torch.stack(es, 1)}

    return {**rollouts_by_reference(bb, data, torch.arange(n), batch, "restart roll-outs", roll),
            "sigmas": sig[:4].cpu()}


def _distill_loop(bb, steps: int, batch: int, lr: float, gen: torch.Generator, has_ref: torch.Tensor, label: str,
                  loss_of) -> torch.nn.Module:
    """The distillation stages' loop: each step draws half its batch from the text-only examples and half from the
    referenced ones (`loss_of(idx, use_ref)` -> that half's loss), then AdamW with clipping, a cosine lr and an EMA
    (0.995) of the denoiser, which it returns."""
    model = bb.denoiser
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pools = ((torch.nonzero(~has_ref).squeeze(1), False), (torch.nonzero(has_ref).squeeze(1), True))
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for pool, use_ref in pools:
            loss = loss_of(pool[torch.randint(len(pool), (batch // 2,), generator=gen)], use_ref)
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=50)
        opt.step()
        ema_update(ema.parameters(), model.parameters(), min(0.995, (1 + step) / (10 + step)))
        if step % 250 == 0 or step == steps - 1:
            log(f"{label} step {step}/{steps} loss {total:.4f}")
    return ema


def distill(bb, traj: dict, steps: int, batch: int, lr: float, seed: int, consistency: bool = False) -> torch.nn.Module:
    """Trajectory distillation: at each native sigma, the student's Euler step lands on the teacher's next state.
    With `consistency` (`traj` from restart_rollouts), its x0 prediction lands on the endpoint of the teacher's
    remaining steps instead: one step does what they did, and the student samples with restarts."""
    gen = torch.Generator().manual_seed(seed + 71)
    sig = traj["sigmas"].to(bb.device)

    def loss_of(idx: torch.Tensor, use_ref: bool) -> torch.Tensor:
        k = torch.randint(4, (len(idx),), generator=gen)
        x, s = traj["states"][idx, k].to(bb.device), sig[k.to(bb.device)]
        cond = cond_for(bb, [traj["captions"][i] for i in idx.tolist()],
                        traj["refs"][idx].to(bb.device) if use_ref else None)
        if consistency:  # an x0 loss: each step's x0 prediction is the sample the restart noises afresh
            v = bb.predict_velocity(x, s, cond)
            return F.mse_loss(flow.x0_from_velocity(x, v, s), traj["ends"][idx, k].to(bb.device))
        x_next, s_next = traj["states"][idx, k + 1].to(bb.device), sig[(k + 1).to(bb.device)]
        target = (x_next - x) / (s_next - s).view(-1, 1, 1, 1)
        return F.mse_loss(bb.predict_velocity(x, s, cond), target)

    return _distill_loop(bb, steps, batch, lr, gen, traj["has_ref"], "distill", loss_of)


def distill_guidance(bb, data: dict, steps: int, batch: int, lr: float, seed: int, guidance: float
                     ) -> torch.nn.Module:
    """Guidance distillation for restart sampling: at each native sigma, the student's one-pass x0 prediction lands
    on the frozen base's CFG x0 prediction (two passes, scale `guidance`; the unconditional one without a reference,
    as in `make_trajectories`), at pretraining latents noised to that sigma, half the batch with its reference.
    A turbo sampled with restarts (each step's x0 prediction noised afresh to the next sigma) then draws what the
    base draws with its stochastic sampler at the native steps, in one pass a step."""
    student = bb.denoiser
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(seed + 91)
    sig = bb.sigmas(4)[:4].to(bb.device)

    def loss_of(idx: torch.Tensor, use_ref: bool) -> torch.Tensor:
        s = sig[torch.randint(4, (len(idx),), generator=gen).to(bb.device)]
        x0 = data["latents"][idx].to(bb.device)
        x = flow.add_noise(x0, torch.randn(x0.shape, generator=gen).to(bb.device), s)
        cond = cond_for(bb, [data["captions"][i] for i in idx.tolist()],
                        data["refs"][idx].to(bb.device) if use_ref else None)
        with torch.no_grad():
            bb.denoiser = bb.pipe.transformer = teacher
            vc = bb.predict_velocity(x, s, cond)
            vu = bb.predict_velocity(x, s, cond_for(bb, [""] * len(idx), None))
            bb.denoiser = bb.pipe.transformer = student
            target = flow.x0_from_velocity(x, vu + guidance * (vc - vu), s)
        return F.mse_loss(flow.x0_from_velocity(x, bb.predict_velocity(x, s, cond), s), target)

    return _distill_loop(bb, steps, batch, lr, gen, data["has_ref"], "guidance distill", loss_of)


TEACHER_VL = "teacher_vl"  # a Z-Image world's folder for its teacher's VL model, inside the model dir


def save_pipeline(bb, settings: dict, out: Path) -> None:
    """The backbone's pipeline in diffusers format with its adapter sidecar (and a Z-Image teacher's VL model)."""
    out.mkdir(parents=True, exist_ok=True)
    bb.pipe.save_pretrained(out)
    if "vl_model" in settings:
        bb.teacher.save_pretrained(out / TEACHER_VL)
        settings = {**settings, "vl_model": TEACHER_VL}
    (out / "dopsd_bench.json").write_text(json.dumps(settings, indent=1))


def world_backbone(pipe, settings: dict, device: torch.device, teacher=None):
    """The adapter over a world pipeline under construction: FLUX.2-klein's, or Z-Image's with its VL teacher."""
    from diffusers import ZImagePipeline

    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.zimage import ZImageBackbone

    if isinstance(pipe, ZImagePipeline):
        return ZImageBackbone(pipe, settings, model_id="glyphworld-build", device=device, teacher=teacher)
    return Flux2KleinBackbone(pipe, settings, model_id="glyphworld-build", device=device)


@torch.no_grad()
def standardize_latents(vae, seed: int, device) -> None:
    """Fold per-channel latent statistics (of world renders) into the VAE's 1x1 quant convs, so that its latents
    are zero-mean, unit-variance per channel and decode to the same images: Z-Image's pipeline normalises latents
    by one shift and scale (set to 0 and 1 here), Flux2's by per-channel statistics (`set_latent_stats`)."""
    rng = np.random.default_rng(seed + 31)
    lat = torch.cat([vae.encode(batch_tensor([judge_scene(rng) for _ in range(256)]).to(device)).latent_dist.mode()
                     for _ in range(8)])
    mean, std = lat.mean(dim=(0, 2, 3)), lat.std(dim=(0, 2, 3))
    c = len(mean)
    q, post = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * std.log()  # the log-variance of the scaled latent
    post.bias += post.weight[:, :, 0, 0] @ mean  # z = z' std + mean, then the same 1x1 conv
    post.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)


def autoencoder_kl_of(flux_vae):
    """A Flux2 VAE's network as an AutoencoderKL: the same weights, without the batch-norm latent statistics that
    only Flux2's pipelines read."""
    from diffusers import AutoencoderKL

    shared = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
              "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
    vae = AutoencoderKL(**{k: flux_vae.config[k] for k in shared})
    vae.load_state_dict({k: v for k, v in flux_vae.state_dict().items() if not k.startswith("bn.")})
    return vae


def z_image_world_pipeline(seed: int, width: int, blocks: tuple[int, int], vae_source: Path, device,
                           teacher: str = "omni"):
    """A new Z-Image-architecture world model (ZImagePipeline and its in-context teacher) on the VAE of the saved
    glyphworld pipeline `vae_source`: the Flux2 VAE's weights as an AutoencoderKL (the same network without the
    batch-norm statistics), its latents standardised per channel. The DiT has `width` / 32 heads, `blocks` =
    (refiner, main) blocks; the text encoder is Qwen3 2 x 64 at unit-scale token embeddings, as glyphworld's; the
    `teacher` "omni": the DiT reads the reference's latents (no VL model); "vl": a Qwen3-VL whose vision tower is
    2 x 64, patch 2 with a 2x2 merge: 64 reference tokens, as glyphworld's DiT reads. Returns (pipe, settings, the
    VL teacher or None)."""
    from diffusers import AutoencoderKLFlux2

    from dopsd_bench.backbones.tiny import tiny_z_image_pipeline

    vae = autoencoder_kl_of(AutoencoderKLFlux2.from_pretrained(vae_source / "vae"))
    standardize_latents(vae.to(device), seed, device)
    torch.manual_seed(seed)
    pipe, settings, vl_teacher = tiny_z_image_pipeline(
        seed, dim=width, latent_channels=vae.config.latent_channels, n_layers=blocks[1], n_refiner_layers=blocks[0],
        n_heads=width // 32, axes_dims=(16, 8, 8), text_hidden=64, text_layers=2, vae=vae, shift=1.0,
        vision={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 2})
    torch.nn.init.normal_(pipe.text_encoder.embed_tokens.weight, std=1.0)  # as glyphworld's encoder (tiny.py)
    settings = {**settings, "max_sequence_length": 48, "teacher_max_length": 128}
    if teacher == "omni":
        settings = {k: v for k, v in settings.items() if not k.startswith("vl_")} | {"teacher": "omni"}
        return pipe, settings, None
    return pipe, settings | {"vl_model": TEACHER_VL, "teacher": "vl"}, vl_teacher


RECIPE = {  # the shipped model's recipe; --scale multiplies every entry but the batch sizes (smoke builds)
    "judge_steps": 6000, "vae_steps": 10_000, "vae_batch": 64, "vae_pool": 65_536,
    "examples": 65_536, "base_steps": 10_000, "tune_steps": 0, "batch": 64, "trajectories": 4096,
    "distill_steps": 1500, "consistency_examples": 8192, "consistency_steps": 0, "consistency_batch": 64,
}  # distill_steps: the shipped guidance turbo's (the trajectory turbo before it had 2000); consistency_steps 0: no
# consistency turbo ships (docs/world.md, "Restart sampling", has the 1000s tried)
BASE_LR = 1e-3  # the base stage's learning rate (a second phase uses TUNE_LR)
TUNE_LR = 3e-4
CONSISTENCY_LR = 3e-4  # a fine-tune of the trajectory-distilled turbo (1e-4 gained less in 1000 steps)
PLAN_AFTER = 100  # steps timed before a budgeted schedule is fitted (train_base's budget_s)


def new_dit_like(transformer, width: int, blocks: tuple[int, int] = (1, 3)) -> torch.nn.Module:
    """A random-init DiT of `width` and `blocks` that reads what `transformer` reads (latent channels, text dim)."""
    config = transformer.config
    return tiny_flux2_transformer(config.in_channels, config.joint_attention_dim, width, blocks)


def tune(bb, data: dict, steps: int, batch: int, seed: int, object_weight: float, text_frac: float,
         lr: float = TUNE_LR, budget_s: float | None = None) -> tuple[torch.nn.Module, int]:
    """The base's second phase: flow matching continued from the first phase's DiT under another loss setting
    (scripts/tune_base.py compares settings). Returns the EMA of the continued DiT and the steps it took."""
    return train_base(bb, data, steps, batch, lr, seed + 1, object_weight=object_weight, text_frac=text_frac,
                      budget_s=budget_s)


def parse_unsaid(text: str) -> dict[str, float]:
    """'angle=0,scale=0' -> {'angle': 0.0, 'scale': 0.0}; ValueError on a key render.UNSAID does not have or a
    value that is not a number >= 0."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(item) from None
        if key not in render.UNSAID or out[key] < 0:
            raise ValueError(item)
    return out


def recorded_recipe(recipe: dict, earlier: dict, stages: set[str]) -> dict:
    """The models' recipe for build_summary.json: a resumed turbo keeps the base's entries from the record of the
    invocation that built it and adds its own."""
    if stages & {"models", "base"}:
        return {k: v for k, v in recipe.items() if k != "judge_steps"}
    own = [k for k in recipe if k.startswith("consistency_")]
    if "turbo" in stages:
        own += ["examples", "batch", "trajectories", "distill_steps"]
    return {**earlier, **{k: recipe[k] for k in own}}


def load_saved(model_dir: Path):
    """A saved world pipeline (FLUX.2-klein or Z-Image) and its adapter settings, as a turbo's (4 native steps, no
    base-only keys); a Z-Image world's teacher loads from its folder when first used."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    saved = json.loads((model_dir / "dopsd_bench.json").read_text())
    if "vl_model" in saved:
        saved["vl_model"] = str(model_dir / saved["vl_model"])
    drop = ("guidance_scale", "role", "guidance_baked")
    return pipe, {k: v for k, v in saved.items() if k not in drop} | {"native_steps": 4}


class _Laps:
    """Each stage's wall time, from the end of the one before; a stage's end is logged."""

    def __init__(self):
        self.walls: dict[str, float] = {}
        self.t = time.time()

    def __call__(self, stage: str) -> None:
        self.walls[stage] = round(time.time() - self.t, 1)
        self.t = time.time()
        log(f"{stage} done in {self.walls[stage]} s")


def build_models(args: argparse.Namespace, recipe: dict, device: torch.device, stages: set[str]) -> dict[str, float]:
    """VAE -> base -> trajectories -> turbo -> consistency turbo, saving base and turbo under args.out; stage 'turbo'
    alone resumes from a saved base (same seed and recipe: the dataset is re-made, deterministically), stage
    'consistency' alone from a saved Euler turbo. Returns each stage's wall time."""
    lap = _Laps()
    train_new_base = bool(stages & {"models", "base"})  # else resume from the saved base (or turbo)
    turbo_dir = args.out / "glyphworld-turbo"
    pipe, settings, teacher = _starting_pipeline(args, recipe, device, stages, turbo_dir)
    bb = world_backbone(pipe, settings, device, teacher)
    lap("vae" if train_new_base and not args.init_from and args.arch != "z-image" else "load")

    if stages & {"models", "base", "turbo"}:
        data = make_dataset(bb, max(512, recipe["examples"]), args.seed, args.data_cache)
    else:  # the consistency stage alone renders only its examples (the first ones of the build's: same seed)
        data = make_dataset(bb, max(512, recipe["consistency_examples"]), args.seed)
    log(f"dataset: {len(data['captions'])} examples, {int(data['has_ref'].sum())} with a reference")
    lap("dataset")
    if train_new_base:
        _base_stage(bb, pipe, settings, data, recipe, args)
        lap("base")
    if stages & {"models", "turbo"}:
        settings = _turbo_stage(bb, pipe, settings, data, recipe, args, turbo_dir, lap)
        lap("distill")
    if recipe["consistency_steps"] and stages & {"models", "turbo", "consistency"}:
        bb.stochastic_sampling, bb.guidance_scale = False, 1.0  # the turbo's Euler steps, guidance baked in
        rolls = restart_rollouts(bb, data, min(len(data["captions"]), max(256, recipe["consistency_examples"])),
                                 args.seed)
        lap("restart_rollouts")
        bb.denoiser = pipe.transformer = distill(bb, rolls, recipe["consistency_steps"], recipe["consistency_batch"],
                                                 args.consistency_lr, args.seed, consistency=True)
        pipe.scheduler.register_to_config(stochastic_sampling=True)
        save_pipeline(bb, {**settings, "role": "4-step turbo, consistency-distilled (restart sampling)"}, turbo_dir)
        lap("consistency")
    return lap.walls


def _starting_pipeline(args: argparse.Namespace, recipe: dict, device: torch.device, stages: set[str],
                       turbo_dir: Path):
    """The pipeline, adapter settings and teacher (a new Z-Image world's; else None) the stages start from: a new
    one (its VAE trained here), a saved one's VAE and text encoder under a new DiT (--init-from), a new Z-Image
    world on a saved glyphworld's VAE (--arch z-image), or a saved base (--stages turbo) or turbo (consistency)."""
    if stages & {"models", "base"} and args.arch == "z-image":
        source = args.init_from or assets_dir() / "glyphworld-base"
        log(f"a new Z-Image world ({args.teacher} teacher): {args.width}-wide DiT, {args.blocks} (refiner, main) "
            f"blocks, on the VAE of {source}")
        return z_image_world_pipeline(args.seed, args.width, args.blocks, source, device, args.teacher)
    if stages & {"models", "base"} and args.init_from:
        # a new DiT on a saved pipeline's VAE (with its latent stats), tokenizer and text encoder: width experiments
        # and rebuilds of the DiT alone skip the VAE stage; --keep-dit keeps its DiT too
        pipe, settings = load_saved(args.init_from)
        torch.manual_seed(args.seed)
        if args.keep_dit:
            log(f"continuing the DiT of {args.init_from}")
        else:
            pipe.transformer = new_dit_like(pipe.transformer, args.width, args.blocks)
            log(f"a new {args.width}-wide DiT with {args.blocks} blocks on the VAE and text encoder of "
                f"{args.init_from}")
        return pipe, settings, None
    if stages & {"models", "base"}:
        # a 2x-down VAE: 16x16x8 latents, 8x8 tokens after the pipeline's 2x2 patchify. At 4x down (4x4 tokens) a
        # 5x5 glyph or a 4-px fill pattern did not survive the round trip (judge accuracy 0.25 / 0.0 on zorb / dotted)
        pipe, settings = tiny_flux2_klein_pipeline(seed=args.seed, width=args.width, vae_channels=(16, 32),
                                                   dit_layers=args.blocks)
        judge_dir = args.out / "judge" if (args.out / "judge").exists() else assets_dir() / "judge"
        judge = WorldJudge.load(judge_dir).to(device).eval() if judge_dir.exists() else None
        train_vae(pipe.vae, recipe["vae_steps"], recipe["vae_batch"], recipe["vae_pool"], args.seed, device,
                  judge=judge)
        set_latent_stats(pipe, args.seed, device)
        return pipe, settings, None
    if not stages & {"turbo"}:  # --stages consistency
        if not (turbo_dir / "model_index.json").exists():
            raise SystemExit(f"--stages consistency re-distils a saved turbo, but {turbo_dir} has none: build it "
                             "first (--stages turbo) or use --stages models")
        pipe, settings = load_saved(turbo_dir)
        settings["guidance_baked"] = json.loads((turbo_dir / "dopsd_bench.json").read_text())["guidance_baked"]
        if pipe.scheduler.config.get("stochastic_sampling"):
            raise SystemExit(f"{turbo_dir} samples with restarts already (its scheduler's stochastic_sampling): it "
                             "is a consistency or guidance turbo. The stage starts from the Euler turbo of --stages "
                             "turbo --turbo trajectory")
        log(f"resuming from the turbo in {turbo_dir}")
        return pipe, settings, None
    base_dir = args.out / "glyphworld-base"
    if not (base_dir / "model_index.json").exists():
        raise SystemExit(f"--stages turbo resumes from a saved base, but {base_dir} has none: build it first "
                         "(--stages base) or use --stages models")
    log(f"resuming from the base in {base_dir}")
    return (*load_saved(base_dir), None)


def _base_stage(bb, pipe, settings: dict, data: dict, recipe: dict, args: argparse.Namespace) -> None:
    """The base: flow matching (unless --keep-dit), an optional second phase, saved with its sampler."""
    checkpoint = None
    if args.checkpoint_every:
        same = {k: recipe[k] for k in ("base_steps", "batch", "examples")} | {
            "arch": args.arch, "teacher": args.teacher if args.arch == "z-image" else None, "seed": args.seed,
            "width": args.width, "blocks": list(args.blocks),
            "init_from": str(args.init_from), "learn_text": args.learn_text, "object_weight": args.object_weight,
            "learn_text_encoder": args.learn_text_encoder,
            "sigma_loc": args.sigma_loc, "unsaid": dict(render.UNSAID)}
        checkpoint = BaseCheckpoint(args.out / "base-checkpoint.pt", args.checkpoint_every, same)
    if not args.keep_dit:
        bb.denoiser = pipe.transformer = train_base(bb, data, recipe["base_steps"], recipe["batch"], BASE_LR,
                                                    args.seed, args.sigma_loc, object_weight=args.object_weight,
                                                    learn_text=args.learn_text, probe_every=args.probe_every,
                                                    probe=BaseProbe(args.probe_prompts, args.guidance, data)
                                                    if args.probe_every else None, checkpoint=checkpoint,
                                                    learn_encoder=args.learn_text_encoder)[0]
    if recipe["tune_steps"]:
        bb.denoiser = pipe.transformer = tune(bb, data, recipe["tune_steps"], recipe["batch"], args.seed,
                                              args.tune_object_weight, args.tune_text_frac)[0]
    base_settings = {**settings, "native_steps": 32, "guidance_scale": args.guidance, "role": "multi-step base"}
    pipe.scheduler.register_to_config(stochastic_sampling=args.base_sampler == "stochastic")
    save_pipeline(bb, base_settings, args.out / "glyphworld-base")
    log("saved base")
    if checkpoint is not None:
        checkpoint.finish()


def _turbo_stage(bb, pipe, settings: dict, data: dict, recipe: dict, args: argparse.Namespace, turbo_dir: Path,
                 lap: _Laps) -> dict:
    """The 4-step turbo from the base in `bb` (--turbo trajectory or guidance), saved; returns its settings."""
    if args.turbo == "guidance":
        turbo = distill_guidance(bb, data, recipe["distill_steps"], recipe["batch"], 3e-4, args.seed, args.guidance)
        role = "4-step turbo, guidance-distilled (restart sampling)"
    else:
        traj = make_trajectories(bb, data, max(256, recipe["trajectories"]), args.guidance, args.seed)
        lap("trajectories")
        turbo = distill(bb, traj, recipe["distill_steps"], recipe["batch"], 3e-4, args.seed)
        role = "4-step turbo"
    bb.denoiser = pipe.transformer = turbo
    # a resumed base may have the stochastic sampler; the guidance-distilled turbo samples with restarts
    pipe.scheduler.register_to_config(stochastic_sampling=args.turbo == "guidance")
    settings = {**settings, "native_steps": 4, "role": role, "guidance_baked": args.guidance}
    save_pipeline(bb, settings, turbo_dir)  # what --stages consistency resumes from
    return settings


