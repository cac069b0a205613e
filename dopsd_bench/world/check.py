"""`dopsd-bench world check`: recompute the embedded world's figures (its goals R1-R4) on fixed seeds.

Every number is measured now by the world judge: nothing is read from a file. `requirements` restates each goal
of the testbed's goals with its verdict; the retention figures' goals (R1, R2, R4) carry 95% paired-bootstrap
intervals over the retention prompts, since at 256 prompts another draw of prompts and seeds moves an FD by
several percent.

    dopsd-bench world check --json                 # full check (a few minutes on 2 CPU cores)
    dopsd-bench world check --json --quick         # fewer samples and SFT steps (a smoke test)
    dopsd-bench world check --models /tmp/gw       # a candidate build (scripts/build_world.py --out /tmp/gw)
    dopsd-bench world check --prompts 1024         # firmer retention figures (about 6 minutes)
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer

from dopsd_bench.backbones import load_backbone
from dopsd_bench.errors import UserError
from dopsd_bench.metrics.frechet import frechet_distance
from dopsd_bench.metrics.scores import attribute_accuracy, attribute_alignment, label_index
from dopsd_bench.stats import Interval, bootstrap_ci, bootstrap_statistics
from dopsd_bench.world import datasets, render
from dopsd_bench.world.judge import WorldJudge
from dopsd_bench.world.mixtures import family_glyph, family_style, judge_scene


@torch.no_grad()
def judge_all(judge: WorldJudge, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-attribute probabilities and embeddings of `images`, on the CPU (the judge may sit on a GPU in a build)."""
    device = next(judge.parameters()).device
    probs = {k: [] for k in render.ATTRIBUTES}
    feats = []
    for chunk in images.split(256):
        emb, logits = judge.embed_and_logits(chunk.to(device))  # one pass for both
        for k, v in logits.items():
            probs[k].append(v.softmax(-1).cpu())
        feats.append(emb.cpu())
    return {k: torch.cat(v) for k, v in probs.items()}, torch.cat(feats)


def _batched_sample(bb, prompts, seeds, steps=None, references=None, batch=128) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        refs = None if references is None else references[i:i + batch]
        out.append(bb.sample(prompts[i:i + batch], seeds[i:i + batch], steps, references=refs))
    return torch.cat(out)


def judge_accuracy(judge: WorldJudge, scenes: list[render.Scene]) -> dict[str, float]:
    """Per attribute, the fraction of fresh renders of `scenes` the judge labels right (4 decimals)."""
    probs, _ = judge_all(judge, render.to_tensor_batch([render.render(s) for s in scenes]))
    out = {}
    for k in render.ATTRIBUTES:
        want = torch.tensor([s.judge_labels()[k] for s in scenes])
        out[k] = round(float((probs[k].argmax(-1) == want).double().mean()), 4)
    return out


def target_accuracy(judge: WorldJudge, images: torch.Tensor, attr: str, value: str) -> float:
    """The fraction of `images` in which the judge finds `attr` == `value` (e.g. shape zorb, style dotted)."""
    probs, _ = judge_all(judge, images)
    return float((probs[attr].argmax(-1) == label_index(attr, value)).double().mean())


def teacher_figures(bb, judge: WorldJudge, family: str, n: int, seed: int) -> dict[str, float]:
    """In-context accuracy of the teacher path, averaged over the family's held-out instances."""
    attr = "shape" if family == "concept" else "style"
    instances = list(render.HELD_OUT_GLYPHS) if family == "concept" else list(render.HELD_OUT_STYLES)
    same, new, text = [], [], []
    for j, inst in enumerate(instances):
        images, captions = datasets.training_set(family, inst, n, seed + j)
        seeds = list(range(seed, seed + n))
        # D-OPSD's training setting: the prompt is a training image's caption, the reference that image
        same.append(target_accuracy(judge, bb.sample(captions, seeds, references=images), attr, inst))
        prompts, _ = datasets.eval_prompts(family, inst, n, seed + 100 + j)
        new.append(target_accuracy(judge, bb.sample(prompts, seeds, references=images.roll(1, 0)), attr, inst))
        text.append(target_accuracy(judge, bb.sample(prompts, seeds), attr, inst))
    return {f"teacher_{family}_acc": float(np.mean(same)), f"teacher_{family}_acc_new_context": float(np.mean(new)),
            f"text_only_{family}_acc": float(np.mean(text))}


@torch.no_grad()
def vae_figures(bb, judge: WorldJudge, renders, targets, real_feats, n_instance: int, seed: int) -> dict[str, float]:
    """What the VAE keeps: every sample passes through its decoder, so a round trip of true renders bounds
    alignment, FD and fidelity from above (encode_images -> decode_latents, as scoring sees samples). `renders`
    are true renders of `targets` independent of the ones `real_feats` come from."""
    probs, feats = judge_all(judge, bb.decode_latents(bb.encode_images(renders)))
    out = {"vae_roundtrip_alignment": float(attribute_alignment(probs, targets).mean()),
           "vae_roundtrip_fd": frechet_distance(real_feats, feats)}
    for family, attr, instances in (("concept", "shape", render.HELD_OUT_GLYPHS),
                                    ("style", "style", render.HELD_OUT_STYLES)):
        accs = []
        for j, inst in enumerate(instances):
            images, _ = datasets.training_set(family, inst, n_instance, seed + j)
            accs.append(target_accuracy(judge, bb.decode_latents(bb.encode_images(images)), attr, inst))
        out[f"vae_roundtrip_{family}_acc"] = float(np.mean(accs))
    return out


@torch.no_grad()
def family_copy_figures(bb, judge: WorldJudge, n: int, seed: int) -> dict[str, float]:
    """Copying on the build's procedural family (glyphs and fill styles the in-context path was trained on), checked
    before the held-out ones: a two-alternative choice per sample. The teacher is given a reference that is the
    target itself; it scores when its output's judge embedding is closer (cosine) to that reference than to the
    same scene with another family glyph/style. Chance is 0.5."""
    rng = np.random.default_rng(seed + 50)
    out = {}
    for family in ("glyph", "style"):
        targets, others, captions = [], [], []
        for _ in range(n):
            s = render.random_scene(rng)
            a, b = (int(v) for v in rng.integers(1_000_000, size=2))
            if family == "glyph":
                t, name = family_glyph(rng, s, a)
                other, caption = replace(t, shape=f"glyph:{b}"), render.caption(t, name=name)
            else:
                t, name = family_style(rng, s, a, size="large")
                other, caption = replace(t, style=f"tile:{b}"), render.caption(t, style_name=name)
            targets.append(render.render(t))
            others.append(render.render(other))
            captions.append(caption)
        refs, alts = render.to_tensor_batch(targets), render.to_tensor_batch(others)
        gen = bb.sample(captions, list(range(seed, seed + n)), references=refs)
        e_gen, e_ref, e_alt = (F.normalize(judge.embed(x), dim=-1) for x in (gen, refs, alts))
        closer = (e_gen * e_ref).sum(-1) > (e_gen * e_alt).sum(-1)
        out[f"teacher_family_{family}_2afc"] = float(closer.double().mean())
    return out


@dataclass(frozen=True)
class Retention:
    """The judge's reading of samples made for retention prompts: per-sample attribute alignment, judge features,
    FD of those features to true renders of the same prompts, and accuracy per attribute."""

    alignment: torch.Tensor  # (N,)
    features: torch.Tensor  # (N, D), row i for prompt i: resampling rows keeps samples paired across models
    fd: float
    accuracy: dict[str, float]


def judge_retention(judge: WorldJudge, images, targets, real_feats) -> Retention:
    """`Retention` of `images` made for retention prompts with attributes `targets` (FD against `real_feats`)."""
    probs, feats = judge_all(judge, images)
    return Retention(attribute_alignment(probs, targets), feats, frechet_distance(real_feats, feats),
                     {k: round(v, 4) for k, v in attribute_accuracy(probs, targets).items()})


def retention_scores(judge: WorldJudge, images, targets, real_feats) -> tuple[float, float, dict[str, float]]:
    """(attribute alignment, judge-feature FD to true renders, accuracy per attribute) of `images` made for
    retention prompts with attributes `targets`."""
    r = judge_retention(judge, images, targets, real_feats)
    return float(r.alignment.mean()), r.fd, r.accuracy


def retention_setup(judge: WorldJudge, n: int, seed: int = 0) -> tuple[list[str], list[dict], torch.Tensor,
                                                                           list[int]]:
    """World check's retention evaluation: `n` prompts, their target attributes, the judge's features of true
    renders of them (the FD reference) and the sampling seeds, so that scripts measure on exactly its figures."""
    prompts, targets, _ = datasets.retention_prompts(n, seed)
    real_feats = judge_all(judge, datasets.true_renders(targets, seed))[1]
    return prompts, targets, real_feats, list(range(10_000, 10_000 + n))


def retention_figures(bb, judge: WorldJudge, prompts, targets, real_feats, seeds,
                      steps=None) -> tuple[float, float, dict[str, float]]:
    """`retention_scores` of samples of `bb` on retention prompts (`steps`: default native)."""
    return retention_scores(judge, _batched_sample(bb, prompts, seeds, steps), targets, real_feats)


def sft_retention_ratio(turbo, judge, prompts, targets, real_feats, seeds, steps: int | None, fd_before: float,
                        family: str = "concept", instance: str = "zorb") -> tuple[dict[str, float], Retention]:
    """Train the default `sft` LoRA on a held-out concept (or style) and compare native-step retention FD with the
    untuned turbo's (`fd_before`, the same prompts and seeds). Keys are `sft_retention_*` for the concept (R4's
    figure) and `sft_{family}_retention_*` for any other family; the tuned turbo's retention samples come with
    them."""
    from dopsd_bench.method import Batch
    from dopsd_bench.registry import METHODS
    from dopsd_bench.train import TrainConfig, train

    images, captions = datasets.training_set(family, instance, 8, 0)
    method = METHODS.get("sft")()
    cfg = TrainConfig() if steps is None else TrainConfig(steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        train(method, turbo, Batch(images, captions), replace(cfg, checkpoint_every=0), tmp)
    turbo.set_adapter(method.adapter)
    after = judge_retention(judge, _batched_sample(turbo, prompts, seeds), targets, real_feats)
    turbo.set_adapter(None)
    key = "sft" if family == "concept" else f"sft_{family}"
    return {f"{key}_retention_fd_before": fd_before, f"{key}_retention_fd_after": after.fd,
            f"{key}_retention_fd_ratio": after.fd / fd_before, f"{key}_steps": cfg.steps}, after


def fd_ratio_intervals(real_feats: torch.Tensor, retention: dict[str, Retention], pairs: list[tuple[str, str]],
                       n_boot: int, seed: int = 0) -> dict[tuple[str, str], Interval]:
    """FD(num) / FD(den) for each (num, den) of `pairs` (keys of `retention`), all to the same true renders, with 95%
    paired-bootstrap intervals over the retention prompts: a resample keeps each prompt's true render and every
    model's sample together, and each model's FD is computed once per resample however many ratios use it."""
    names = sorted({name for pair in pairs for name in pair})

    def ratios(idx: np.ndarray) -> list[float]:
        real = real_feats[idx]
        fd = {name: frechet_distance(real, retention[name].features[idx]) for name in names}
        return [fd[num] / fd[den] for num, den in pairs]

    return dict(zip(pairs, bootstrap_statistics(ratios, len(real_feats), n_boot, seed=seed), strict=True))


def fd_ratio_interval(real_feats: torch.Tensor, num: Retention, den: Retention, n_boot: int, seed: int = 0
                      ) -> Interval:
    """FD(num) / FD(den) with its interval, as `fd_ratio_intervals` gives it."""
    pair = ("num", "den")
    return fd_ratio_intervals(real_feats, {"num": num, "den": den}, [pair], n_boot, seed)[pair]


def _goal(value: float, goal: str, holds, ci: Interval | None = None, on_interval: bool = False) -> dict:
    """One requirement: its figure, goal and verdict. With an interval, `clear` says whether the whole interval is
    on one side of the goal (a verdict another draw of prompts and seeds would likely keep); with `on_interval`
    the goal must hold over the whole interval ("measurably")."""
    entry = {"value": round(value, 4), "goal": goal,
             "holds": bool(holds(ci.lo) and holds(ci.hi) if on_interval else holds(value))}
    if ci is not None:
        entry["ci95"] = [round(ci.lo, 4), round(ci.hi, 4)]
        entry["clear"] = bool(holds(ci.lo) == holds(ci.hi))
    return entry


def requirements(figures: dict, real_feats: torch.Tensor, retention: dict[str, Retention], n_boot: int = 300,
                 seed: int = 0) -> dict[str, dict]:
    """The testbed's goals (R1-R4 and the judge's), each checked on `figures`; the retention figures get
    paired-bootstrap intervals from the samples in `retention` (turbo, base_32, base_native, sft, sft_style)."""
    r4 = {"sft": "R4_sft_retention_fd_ratio", "sft_style": "R4_sft_style_retention_fd_ratio"}
    ratio = fd_ratio_intervals(real_feats, retention, [("turbo", "base_32"), ("base_native", "base_32")]
                               + [(key, "turbo") for key in r4], n_boot, seed)
    alignment = bootstrap_ci(retention["turbo"].alignment.numpy(), n_boot=n_boot, seed=seed)
    r1_fd, r2 = ratio["turbo", "base_32"], ratio["base_native", "base_32"]
    out = {"judge_accuracy_min": _goal(min(figures["judge_accuracy"].values()), ">= 0.98", lambda v: v >= 0.98),
           "R1_turbo_alignment": _goal(figures["turbo_alignment"], ">= 0.90", lambda v: v >= 0.90, alignment),
           "R1_turbo_fd_vs_base_32": _goal(r1_fd.mean, "<= 1.5", lambda v: v <= 1.5, r1_fd),
           "R2_base_fd_native_vs_32": _goal(r2.mean, ">= 2, measurably", lambda v: v >= 2, r2, on_interval=True)}
    accuracy = figures.get("turbo_attribute_accuracy")
    if accuracy:  # the untuned turbo draws what its prompts name: the shape first, then everything else
        out["R1_turbo_shape_accuracy"] = _goal(accuracy["shape"], ">= 0.80", lambda v: v >= 0.80)
        out["R1_turbo_other_attributes_min"] = _goal(min(v for k, v in accuracy.items() if k != "shape"), ">= 0.90",
                                                     lambda v: v >= 0.90)
    for family in ("concept", "style"):
        out[f"R3_teacher_{family}_acc"] = _goal(figures[f"teacher_{family}_acc"], ">= 0.8", lambda v: v >= 0.8)
        out[f"R3_text_only_{family}_acc"] = _goal(figures[f"text_only_{family}_acc"], "<= 0.15",
                                                  lambda v: v <= 0.15)
    for key, name in r4.items():
        ci = ratio[key, "turbo"]
        out[name] = _goal(ci.mean, "> 1.1, measurably", lambda v: v > 1.1, ci, on_interval=True)
    return out


def _architecture(model: str) -> str:
    """The backbone of a world model: a build's folder may hold a Z-Image world (`build_world.py --arch z-image`)."""
    index = Path(model) / "model_index.json"
    if index.exists() and json.loads(index.read_text()).get("_class_name") == "ZImagePipeline":
        return "z-image"
    return "flux2-klein"


def world_check(quick: bool = False, seed: int = 0, models: Path | None = None, prompts: int | None = None) -> dict:
    """Every figure, on the shipped glyphworld models or on a build's output folder `models` (which holds
    glyphworld-base/ and glyphworld-turbo/, as `scripts/build_world.py --out` writes them). The judge is always the
    shipped one: it is the instrument, not the thing measured. `prompts` overrides the number of retention prompts
    (256; 64 with `quick`)."""
    turbo_name, base_name = ("glyphworld-turbo", "glyphworld-base") if models is None else (
        str(models / "glyphworld-turbo"), str(models / "glyphworld-base"))
    t0 = time.time()
    torch.manual_seed(seed)
    judge = WorldJudge.load()
    n_ret, n_teach = (64, 4) if quick else (256, 16)
    n_ret = prompts or n_ret
    rng = np.random.default_rng(seed + 1)
    out: dict = {"judge_accuracy": judge_accuracy(judge, [judge_scene(rng) for _ in range(200 if quick else 1000)])}
    texts, targets, real_feats, seeds = retention_setup(judge, n_ret, seed)

    retention: dict[str, Retention] = {}

    def measure(name: str, suffix: str, bb, steps: int | None = None) -> None:
        r = judge_retention(judge, _batched_sample(bb, texts, seeds, steps), targets, real_feats)
        retention[name + suffix] = r  # turbo, base_32, base_native
        out[f"{name}_alignment{suffix}"], out[f"{name}_fd{suffix}"] = float(r.alignment.mean()), r.fd
        out[f"{name}_attribute_accuracy{suffix}"] = r.accuracy

    arch = _architecture(turbo_name)
    turbo = load_backbone(arch, turbo_name)
    out["turbo_native_steps"] = turbo.native_steps
    measure("turbo", "", turbo)
    base = load_backbone(arch, base_name)
    measure("base", "_32", base, 32)
    measure("base", "_native", base, turbo.native_steps)
    del base
    # same-prompt real-vs-real floor: what FD two independent sets of true renders reach at this N
    other_renders = datasets.true_renders(targets, seed + 7)
    out["real_fd_floor"] = frechet_distance(real_feats, judge_all(judge, other_renders)[1])
    out.update(vae_figures(turbo, judge, other_renders, targets, real_feats, n_teach, seed))
    out.update(family_copy_figures(turbo, judge, 4 * n_teach, seed))
    out.update(teacher_figures(turbo, judge, "concept", n_teach, seed))
    out.update(teacher_figures(turbo, judge, "style", n_teach, seed))
    # R4 at the default budget: on the concept (the goal's figure) and on the style, where the fill is learnt
    for family, instance in (("concept", "zorb"), ("style", "dotted")):
        fresh = load_backbone(arch, turbo_name)  # each run starts from the untuned turbo
        figures, retention["sft" if family == "concept" else "sft_style"] = sft_retention_ratio(
            fresh, judge, texts, targets, real_feats, seeds, 20 if quick else None, out["turbo_fd"], family,
            instance)
        out.update(figures)
    out["requirements"] = requirements(out, real_feats, retention, n_boot=100 if quick else 300, seed=seed)
    out["n_retention_prompts"] = n_ret
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def check_command(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    quick: bool = typer.Option(False, "--quick", help="Fewer samples and SFT steps: a smoke test, not the figures."),
    seed: int = typer.Option(0, help="Seed of prompts, noise and the SFT run."),
    models: Annotated[Path | None, typer.Option(
        help="A build's output folder (scripts/build_world.py --out) holding glyphworld-base/ and "
             "glyphworld-turbo/: check a candidate before it replaces the shipped models.")] = None,
    prompts: Annotated[int | None, typer.Option(
        help="Retention prompts (default 256, 64 with --quick): more give firmer R1, R2 and R4 figures; each 256 "
             "more add about a minute on 2 CPU cores. FDs are comparable only at the same number.")] = None,
) -> None:
    """Recompute the embedded world's figures on fixed seeds, each goal with its verdict.

    Judge accuracy, few-step quality, distillation, the in-context teacher and SFT's effect on retention."""
    if prompts is not None and prompts < 16:
        raise UserError(f"--prompts {prompts}: expected at least 16 retention prompts (a Fréchet distance needs "
                        "many samples; the default is 256)")
    if models is not None:
        missing = [d for d in ("glyphworld-base", "glyphworld-turbo") if not (models / d / "model_index.json").exists()]
        if missing:
            raise UserError(f"--models {models}: expected a build folder with glyphworld-base/ and glyphworld-turbo/ "
                            f"(saved pipelines); missing: {', '.join(missing)}. Build one with "
                            f"`python scripts/build_world.py --out {models}`")
    with contextlib.redirect_stdout(sys.stderr):  # progress lines (the SFT run's) must not break --json
        figures = world_check(quick=quick, seed=seed, models=models, prompts=prompts)
    if as_json:
        print(json.dumps(figures))
        return
    from rich.console import Console
    from rich.table import Table

    goals = figures.pop("requirements")
    table = Table(title="glyphworld check")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else f"{value:.4g}")
    verdicts = Table(title="the testbed's goals (95% interval: paired bootstrap over the retention prompts)")
    verdicts.add_column("goal", no_wrap=True)
    for column in ("figure", "95% interval", "wanted", "verdict"):
        verdicts.add_column(column, justify="right" if column in ("figure", "95% interval") else "left")
    for name, g in goals.items():
        # not clear: the interval straddles the goal, so another draw of prompts and seeds could flip the verdict
        verdict = ("[green]holds" if g["holds"] else "[red]misses") + ("" if g.get("clear", True) else ", in noise")
        interval = f"{g['ci95'][0]:.3g}-{g['ci95'][1]:.3g}" if "ci95" in g else ""
        verdicts.add_row(name, f"{g['value']:.4g}", interval, g["goal"], verdict)
    Console().print(table, verdicts)
