"""Compare second-phase settings for the glyphworld base: each arm continues a saved base's DiT for the same steps
under one loss setting (object weight : text-only fraction, see build_world.tune), then is measured as
`world check` measures the base (judge alignment and FD on retention prompts, at 32 steps and at the turbo's 4).

Each arm is saved as OUT/<arm>/glyphworld-base with a build_summary.json, so that `python scripts/build_world.py
--stages turbo --out OUT/<arm>` distils its turbo (from data of the default world: it has no --unsaid). OUT/arms.json
holds every arm's figures (the untouched base as arm "start"; rewritten after each arm) and names the arm with the
best 32-step alignment.

    python scripts/tune_base.py --arms 0:0.5,8:0.5,8:0.75 --steps 1000 --out /tmp/arms   # GPU: ~2 min per arm
    python scripts/tune_base.py --arms 0:0.5,8:0.5 --steps 3 --examples 512 --prompts 8 --out /tmp/arms  # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_world as W  # the build's own stages, so an arm is what the build would make

from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world import datasets as D
from dopsd_bench.world import render as R
from dopsd_bench.world.check import judge_all, retention_figures
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


def parse_unsaid(text: str) -> dict[str, float]:
    """'angle=0,scale=0' -> {'angle': 0.0, 'scale': 0.0}; ValueError on a key render.UNSAID does not have."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in R.UNSAID:
            raise ValueError(key)
        out[key] = float(value)
    return out


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
    ap.add_argument("--base", type=Path, default=W.ROOT / "dopsd_bench" / "assets" / "glyphworld-base")
    ap.add_argument("--arms", default="0:0.5,8:0.5,8:0.75", help="object weight:text-only fraction, comma-separated")
    ap.add_argument("--steps", type=int, default=1000, help="second-phase steps per arm")
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
        R.UNSAID.update(parse_unsaid(args.unsaid))
    except ValueError:
        ap.error(f"--unsaid {args.unsaid!r}: expected KEY=VALUE pairs with keys {list(R.UNSAID)}")
    if not (args.base / "model_index.json").exists():
        ap.error(f"--base {args.base}: expected a saved glyphworld base folder (with model_index.json)")
    W.start_render_pool(args.workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(args.base)
    settings = json.loads((args.base / "dopsd_bench.json").read_text())  # the base's own: 32 steps, its CFG
    bb = Flux2KleinBackbone(pipe, settings, model_id="glyphworld-tune", device=device)
    judge = WorldJudge.load().to(device).eval()
    prompts, targets, _ = D.retention_prompts(args.prompts, args.seed)  # world check's prompts and seeds
    real_feats = judge_all(judge, D.true_renders(targets, args.seed))[1]
    seeds = list(range(10_000, 10_000 + args.prompts))

    t = time.time()
    data = W.make_dataset(bb, args.examples, args.seed, args.data_cache)
    data_wall = round(time.time() - t, 1)
    start = pipe.transformer
    results = {"start": {"steps": 0, **measure(bb, judge, prompts, targets, real_feats, seeds)}}
    W.log(f"start: {results['start']}")
    for weight, frac in arms:
        name = f"w{weight:g}-t{frac:g}" + "".join(f"-{item.replace('=', '')}" for item in args.unsaid.split(",")
                                                     if item)
        t = time.time()
        bb.denoiser = pipe.transformer = copy.deepcopy(start)
        bb.denoiser = pipe.transformer = W.tune(bb, data, args.steps, args.batch, args.seed, weight, frac)
        wall = round(time.time() - t, 1)
        results[name] = {"steps": args.steps, "object_weight": weight, "text_frac": frac, "wall_s": wall,
                         **measure(bb, judge, prompts, targets, real_feats, seeds)}
        W.log(f"{name}: {results[name]}")
        W.save_pipeline(pipe, settings, args.out / name / "glyphworld-base")
        # the record build_world.py --stages turbo appends its own invocation to
        invocation = {**W.where_built(device, args.workers), "stage_wall_s": {"dataset": data_wall, "tune": wall},
                      "wall_s": round(data_wall + wall, 1)}
        summary = {"seed": args.seed, "models": {
            "first_phase_from": str(args.base), "stage_wall_s": invocation["stage_wall_s"],
            "unsaid": dict(R.UNSAID),
            "recipe": {"examples": args.examples, "tune_steps": args.steps, "batch": args.batch,
                       "tune_object_weight": weight, "tune_text_frac": frac, "tune_lr": W.TUNE_LR},
            "invocations": [invocation], "wall_s": invocation["wall_s"]}}
        (args.out / name / "build_summary.json").write_text(json.dumps(summary, indent=1))
        # after every arm, so that a run stopped by a time limit keeps the arms it finished
        best = max((n for n in results if n != "start"), key=lambda n: results[n]["alignment_32"])
        (args.out / "arms.json").write_text(json.dumps({"best": best, "unsaid": R.UNSAID, "arms": results},
                                                       indent=1))
    print(f"{'arm':<14}{'align@32':>9}{'shape@32':>9}{'fill@32':>8}{'FD@32':>8}{'FD@4':>8}{'4/32':>6}")
    for name, r in results.items():
        print(f"{name:<14}{r['alignment_32']:>9.3f}{r['accuracy_32']['shape']:>9.3f}{r['accuracy_32']['style']:>8.3f}"
              f"{r['fd_32']:>8.1f}{r['fd_4']:>8.1f}{r['fd_ratio_4_vs_32']:>6.2f}")
    print(f"best: {best}")


if __name__ == "__main__":
    main()
