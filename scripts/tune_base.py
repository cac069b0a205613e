"""Compare training settings for the glyphworld base: each arm continues a saved base's DiT for the same steps
under one loss setting (object weight : text-only fraction, see build_world.tune), or with --fresh trains a new DiT
(--width) from scratch as the build's base stage does, on the saved base's VAE and text encoder; then it is
measured as `world check` measures the base (judge alignment and FD on retention prompts, at 32 steps and at the
turbo's 4). --unsaid narrows the world (data and measurement). --budget-s fits the run to a time limit (a device
call's): training ends that many seconds after the script starts, each arm's schedule fitted to an equal share of
the time left (measuring an arm takes seconds on a GPU and is not counted).

Each arm is saved as OUT/<arm>/glyphworld-base with a build_summary.json, so that `python scripts/build_world.py
--stages turbo --out OUT/<arm>` (with the arm's --unsaid) distils its turbo. OUT/arms.json holds every arm's figures
(the untouched base as arm "start" unless --fresh; rewritten after each arm) and names the arm with the best 32-step
alignment.

    python scripts/tune_base.py --arms 0:0.5,8:0.5,8:0.75 --steps 1000 --out /tmp/arms   # GPU: ~2 min per arm
    python scripts/tune_base.py --fresh --width 192 --batch 1024 --arms 0:0.5 --steps 4000 --budget-s 300 \
        --unsaid angle=0,scale=0 --out /tmp/arms                                        # GPU: a new base in 5 min
    python scripts/tune_base.py --arms 0:0.5,8:0.5 --steps 3 --examples 512 --prompts 8 --out /tmp/arms  # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.paths import assets_dir
from dopsd_bench.world import build as W  # the build's own stages, so an arm is what the build would make
from dopsd_bench.world import render
from dopsd_bench.world.check import retention_figures, retention_setup
from dopsd_bench.world.judge import WorldJudge


def parse_arms(text: str) -> list[tuple[float, float]]:
    """'0:0.5,8:0.75' -> [(0.0, 0.5), (8.0, 0.75)] (object weight, text-only fraction); ValueError if malformed."""
    arms = []
    for part in text.split(","):
        weight, _, frac = part.partition(":")
        arms.append((float(weight), float(frac or 0.5)))
        if arms[-1][0] < 0 or not 0 <= arms[-1][1] <= 1:
            raise ValueError(part)
    return arms


@torch.no_grad()
def measure(bb, judge, prompts, targets, real_feats, seeds) -> dict:
    bb.denoiser.eval()
    out = {}
    for steps in (32, 4):
        alignment, fd, per_attr = retention_figures(bb, judge, prompts, targets, real_feats, seeds, steps)
        out[f"alignment_{steps}"], out[f"fd_{steps}"], out[f"accuracy_{steps}"] = alignment, fd, per_attr
    out["fd_ratio_4_vs_32"] = out["fd_4"] / out["fd_32"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=assets_dir() / "glyphworld-base")
    ap.add_argument("--arms", default="0:0.5,8:0.5,8:0.75", help="object weight:text-only fraction, comma-separated")
    ap.add_argument("--steps", type=int, default=1000, help="training steps per arm")
    ap.add_argument("--fresh", action="store_true",
                    help=f"train each arm's DiT from scratch (lr {W.BASE_LR:g}, as the base stage), not continue "
                         "--base's")
    ap.add_argument("--width", type=int, default=128, help="with --fresh: the new DiT's width (attention heads x 32)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="end all training this many seconds after the start, arms sharing the time left equally "
                         "(each at most --steps steps)")
    ap.add_argument("--batch", type=int, default=W.RECIPE["batch"])
    ap.add_argument("--examples", type=int, default=W.RECIPE["examples"])
    ap.add_argument("--prompts", type=int, default=256, help="retention prompts measured per arm")
    ap.add_argument("--unsaid", default="",
                    help="narrow the world's unsaid spread for this run's data and measurement, e.g. "
                         "angle=0,scale=0 (render.UNSAID; the judge stays the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-cache", type=Path, default=None, help="as build_world.py's")
    ap.add_argument("--workers", type=int, default=1, help="render worker processes")
    args = ap.parse_args()
    try:
        arms = parse_arms(args.arms)
    except ValueError:
        ap.error(f"--arms {args.arms!r}: expected WEIGHT:TEXT_FRAC pairs such as 0:0.5,8:0.75 (weight >= 0, "
                 "fraction in [0, 1])")
    try:
        render.UNSAID.update(W.parse_unsaid(args.unsaid))
    except ValueError:
        ap.error(f"--unsaid {args.unsaid!r}: expected KEY=VALUE pairs with keys {list(render.UNSAID)} and values >= 0")
    if args.width != 128 and not args.fresh:
        ap.error(f"--width {args.width}: a width is for a new DiT; add --fresh (without it, arms continue --base's)")
    if args.width % 32 or args.width <= 0 or (args.budget_s is not None and args.budget_s <= 0):
        ap.error(f"--width {args.width} / --budget-s {args.budget_s}: expected a positive multiple of 32 (heads of "
                 "32) and a positive number of seconds")
    if not (args.base / "model_index.json").exists():
        ap.error(f"--base {args.base}: expected a saved glyphworld base folder (with model_index.json)")
    W.start_render_pool(args.workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(args.base)
    settings = json.loads((args.base / "dopsd_bench.json").read_text())  # the base's own: 32 steps, its CFG
    bb = Flux2KleinBackbone(pipe, settings, model_id="glyphworld-tune", device=device)
    judge = WorldJudge.load().to(device).eval()
    prompts, targets, real_feats, seeds = retention_setup(judge, args.prompts, args.seed)  # world check's

    t = time.time()
    data = W.make_dataset(bb, args.examples, args.seed, args.data_cache)
    data_wall = round(time.time() - t, 1)
    start = pipe.transformer
    results = {}
    if not args.fresh:  # the base every arm continues
        results["start"] = {"steps": 0, **measure(bb, judge, prompts, targets, real_feats, seeds)}
        W.log(f"start: {results['start']}")
    setting = [f"fresh-d{args.width}-b{args.batch}"] if args.fresh else []
    setting += [item.replace("=", "") for item in args.unsaid.split(",") if item]
    lr = W.BASE_LR if args.fresh else W.TUNE_LR
    best = None
    for i, (weight, frac) in enumerate(arms):
        name = "-".join([f"w{weight:g}-t{frac:g}", *setting])
        t = time.time()
        budget = None if args.budget_s is None else (args.budget_s - (t - W.T0)) / (len(arms) - i)
        if budget is not None and budget <= 0:
            W.log(f"{name}: the budget of {args.budget_s:g} s is spent, not trained")
            break
        if args.fresh:
            torch.manual_seed(args.seed)
            bb.denoiser = pipe.transformer = W.new_dit_like(start, args.width).to(device)
            bb.denoiser, steps = W.train_base(bb, data, args.steps, args.batch, lr, args.seed,
                                              object_weight=weight, text_frac=frac, budget_s=budget)
        else:
            bb.denoiser = pipe.transformer = copy.deepcopy(start)
            bb.denoiser, steps = W.tune(bb, data, args.steps, args.batch, args.seed, weight, frac,
                                        budget_s=budget)
        pipe.transformer = bb.denoiser
        wall = round(time.time() - t, 1)
        results[name] = {"steps": steps, "object_weight": weight, "text_frac": frac, "fresh": args.fresh,
                         "width": pipe.transformer.config.num_attention_heads * 32, "batch": args.batch, "lr": lr,
                         "wall_s": wall, **measure(bb, judge, prompts, targets, real_feats, seeds)}
        W.log(f"{name}: {results[name]}")
        W.save_pipeline(bb, settings, args.out / name / "glyphworld-base")
        # the record build_world.py --stages turbo appends its own invocation to
        stage = "base" if args.fresh else "tune"
        invocation = {**W.where_built(device, args.workers), "stage_wall_s": {"dataset": data_wall, stage: wall},
                      "wall_s": round(data_wall + wall, 1)}
        recipe = ({"examples": args.examples, "base_steps": steps, "batch": args.batch, "width": args.width}
                  if args.fresh else
                  {"examples": args.examples, "tune_steps": steps, "batch": args.batch, "tune_object_weight": weight,
                   "tune_text_frac": frac, "tune_lr": W.TUNE_LR})
        summary = {"seed": args.seed, "models": {
            ("init_from" if args.fresh else "first_phase_from"): str(args.base),
            "stage_wall_s": invocation["stage_wall_s"], "unsaid": dict(render.UNSAID), "recipe": recipe,
            "invocations": [invocation], "wall_s": invocation["wall_s"]}}
        (args.out / name / "build_summary.json").write_text(json.dumps(summary, indent=1))
        # after every arm, so that a run stopped by a time limit keeps the arms it finished
        best = max((n for n in results if n != "start"), key=lambda n: results[n]["alignment_32"])
        (args.out / "arms.json").write_text(json.dumps({"best": best, "unsaid": render.UNSAID, "arms": results},
                                                       indent=1))
    print(f"{'arm':<40}{'steps':>6}{'align@32':>9}{'shape@32':>9}{'fill@32':>8}{'FD@32':>8}{'FD@4':>8}{'4/32':>6}")
    for name, r in results.items():
        print(f"{name:<40}{r['steps']:>6}{r['alignment_32']:>9.3f}{r['accuracy_32']['shape']:>9.3f}"
              f"{r['accuracy_32']['style']:>8.3f}{r['fd_32']:>8.1f}{r['fd_4']:>8.1f}{r['fd_ratio_4_vs_32']:>6.2f}")
    if best:
        print(f"best: {best}")


if __name__ == "__main__":
    main()
