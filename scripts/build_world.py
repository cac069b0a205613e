"""Build the embedded "glyphworld" models from one seed: world judge, VAE, multi-step base, 4-step turbo.

All four are trained here on renders of dopsd_bench/world, in real diffusers formats (Flux2KleinPipeline:
Qwen3 text encoder (random layers, learned token embeddings), AutoencoderKLFlux2, Flux2Transformer2DModel), and
written to dopsd_bench/assets/{judge,glyphworld-base,glyphworld-turbo}. Progress goes to stdout (redirect it to a log).

    python scripts/build_world.py                                    # full build (2 CPU cores: ~5.5 h; MODEL_CARD.md)
    python scripts/build_world.py --scale 0.01 --out /tmp/gw         # smoke build, a few minutes on CPU

The recipe (steps, batch sizes, data sizes) is the same on every device and is written to build_summary.json;
renders are drawn in parallel worker processes (--workers), the networks train on the GPU when there is one.

Stages: judge -> VAE -> base (flow matching, with in-context examples: references of random glyphs/styles with
made-up names, half the time the target itself, through the pipeline's reference tokens), optionally continued by
a second phase under another loss setting (--tune-steps; scripts/tune_base.py compares settings) -> the 4-step
turbo: by default (--turbo guidance) its one-pass x0 prediction at each of the 4 native sigmas is
distilled onto the base's CFG prediction, and it samples with restarts; --turbo trajectory distils 32-step Euler
trajectories of the base instead (samples with Euler), which a consistency stage can then re-distil
(--consistency-steps N; 0 in the shipped recipe). The base is saved with the stochastic sampler (--base-sampler), the
better of its two (docs/world.md).

    python scripts/build_world.py --stages turbo --turbo trajectory --out DIR   # DIR holds a base
    python scripts/build_world.py --stages consistency --consistency-steps 1000 --out DIR   # then its Euler turbo

`--arch z-image` builds the same world's models in Z-Image's architecture instead (ZImagePipeline: Qwen3 text
encoder, Z-Image DiT, AutoencoderKL), on the VAE of a saved glyphworld (--init-from, default the shipped one), with
the judge of --out or the shipped one. Its teacher (--teacher) is the DiT's omni mode reading the reference's
latents, or a Qwen3-VL whose language model is the text encoder and whose vision tower trains with the base (at this
size that path does not learn to read its references: docs/world.md):

    python scripts/build_world.py --arch z-image --stages models --scale 0.01 --out /tmp/zw   # smoke build
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dopsd_bench.paths import assets_dir
from dopsd_bench.world import render
from dopsd_bench.world.build import (
    CONSISTENCY_LR,
    RECIPE,
    TUNE_LR,
    build_models,
    log,
    parse_unsaid,
    recorded_recipe,
    start_render_pool,
    train_judge,
    where_built,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=assets_dir())
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every step count and data size (0.01 = smoke test)")
    for key, value in RECIPE.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"recipe (default {value})")
    ap.add_argument("--arch", choices=["flux2-klein", "z-image"], default="flux2-klein",
                    help="the models' architecture (z-image: on the VAE of --init-from or the shipped glyphworld)")
    ap.add_argument("--teacher", choices=["omni", "vl"], default="omni",
                    help="a Z-Image world's in-context teacher: omni (default), the DiT reads the reference's latents "
                         "as a clean condition image (ZImageOmniPipeline's path); vl, a Qwen3-VL reads its pixels "
                         "into the caption stream (the paper's Z-Image-Turbo teacher), whose vision tower trains "
                         "with the base")
    ap.add_argument("--width", type=int, default=128, help="DiT width (attention heads x 32)")
    ap.add_argument("--blocks", default="1,3", help="DiT blocks: double-stream,single-stream (default 1,3)")
    ap.add_argument("--sigma-loc", type=float, default=0.0,
                    help="location of the base's logit-normal noise levels (> 0 trains more at high noise)")
    ap.add_argument("--learn-text", action=argparse.BooleanOptionalAction, default=True,
                    help="train the text encoder's token embeddings with the base DiT (the rest of the encoder stays "
                         "at its random init; default on); the turbo and every later user read the trained table")
    ap.add_argument("--learn-text-encoder", action="store_true",
                    help="the base trains the whole text encoder, not only its token embeddings (a Z-Image world's "
                         "VL teacher reads through the same layers)")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="base: extra loss weight on the object's latent cells (0 = plain flow matching)")
    ap.add_argument("--probe-every", type=int, default=0,
                    help="base: every N steps, log the world judge's accuracy and alignment of the EMA base's "
                         "32-step samples on retention prompts (0 = off; the shipped judge must exist)")
    ap.add_argument("--probe-prompts", type=int, default=128, help="retention prompts per probe (default 128)")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save the base stage's state to OUT/base-checkpoint.pt every N steps; the same command "
                         "resumes from it after a stop (0: none)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="a saved glyphworld pipeline (e.g. dopsd_bench/assets/glyphworld-base) whose VAE, latent "
                         "stats and text encoder a new base reuses: skips the VAE stage, trains a new --width DiT")
    ap.add_argument("--keep-dit", action="store_true",
                    help="with --init-from: keep its DiT as the base's first phase and run only the second "
                         "(--tune-steps)")
    ap.add_argument("--tune-object-weight", type=float, default=0.0,
                    help="second phase: extra loss weight on the object's latent cells (0 = plain flow matching)")
    ap.add_argument("--tune-text-frac", type=float, default=0.5,
                    help="second phase: fraction of each batch without a reference (the first phase's is 0.5)")
    ap.add_argument("--data-cache", type=Path, default=None,
                    help="save the pretraining dataset here, or load it if it holds the same seed and size "
                         "(repeated builds on one machine skip re-rendering)")
    ap.add_argument("--unsaid", default="",
                    help="narrow the world's unsaid spread for every stage this invocation runs, e.g. angle=0,scale=0 "
                         f"(render.UNSAID: {', '.join(f'{k}={v:g}' for k, v in render.UNSAID.items())}); a resumed "
                         "--stages turbo needs the same value as its base")
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale baked into the turbo")
    ap.add_argument("--turbo", choices=["trajectory", "guidance"], default="guidance",
                    help="how the turbo is distilled: 'trajectory' (Euler steps onto the base's 32-step ODE "
                         "trajectories; samples with Euler) or 'guidance' (one-pass x0 predictions onto the base's "
                         "CFG ones at the native sigmas; samples with restarts; the shipped turbo). docs/world.md "
                         "compares them")
    ap.add_argument("--consistency-lr", type=float, default=CONSISTENCY_LR,
                    help=f"learning rate of the consistency stage (default {CONSISTENCY_LR})")
    ap.add_argument("--base-sampler", choices=["stochastic", "euler"], default="stochastic",
                    help="the saved base's sampler (its scheduler's stochastic_sampling; docs/world.md compares "
                         "them). --turbo trajectory's trajectories always follow the ODE (Euler)")
    ap.add_argument("--stages", default="judge,models",
                    help="comma-separated: 'judge', 'models' (VAE, base, turbo), or 'base' (VAE and base) then "
                         "'turbo' (the turbo from the saved base), or 'consistency' (re-distil a saved "
                         "Euler turbo into the restart-sampled one); the judge is independent")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch default; 1 is fastest on a loaded machine)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="render worker processes")
    args = ap.parse_args()
    try:
        render.UNSAID.update(parse_unsaid(args.unsaid))  # scenes are jittered in this process, never in the workers
    except ValueError as e:
        ap.error(f"--unsaid {args.unsaid!r}: {e} is not KEY=VALUE with a key of {list(render.UNSAID)} and a value >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    start_render_pool(args.workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    recipe = {k: getattr(args, k) if k.endswith("batch") or getattr(args, k) == 0
              else max(2, int(getattr(args, k) * args.scale)) for k in RECIPE}

    log(f"building glyphworld: seed {args.seed}, device {device}, out {args.out}, recipe {recipe}")
    stages = set(args.stages.split(","))
    if stages - {"judge", "models", "base", "turbo", "consistency"}:
        ap.error(f"--stages {args.stages!r}: expected a comma-separated list of judge, models, base, turbo, "
                 "consistency")
    if "base" in stages and "consistency" in stages and not stages & {"models", "turbo"}:
        ap.error("--stages base,consistency: the consistency stage starts from the turbo, which --stages base does "
                 "not make: add turbo (--stages base,turbo with --consistency-steps N) or use --stages models")
    if recipe["consistency_steps"] and stages & {"models", "turbo"} and args.turbo == "guidance":
        ap.error(f"--consistency-steps {recipe['consistency_steps']}: the consistency stage re-distils a trajectory "
                 "turbo (sampled with Euler), and this invocation builds a guidance-distilled one: add --turbo "
                 "trajectory")
    if "consistency" in stages and not recipe["consistency_steps"]:
        ap.error("--stages consistency trains for --consistency-steps steps, 0 in the shipped recipe: give "
                 "--consistency-steps N (e.g. 1000)")
    try:
        blocks = tuple(int(b) for b in args.blocks.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 2 or min(blocks) < 0 or max(blocks) == 0:
        ap.error(f"--blocks {args.blocks!r}: expected two counts, double-stream,single-stream (e.g. 1,3; with "
                 "--arch z-image: refiner,main)")
    args.blocks = blocks
    if args.init_from and not (args.init_from / "model_index.json").exists():
        ap.error(f"--init-from {args.init_from}: expected a saved pipeline folder (with model_index.json), such as "
                 "dopsd_bench/assets/glyphworld-base")
    if args.init_from and not stages & {"models", "base"}:
        ap.error("--init-from starts a new base: use it with --stages base or models")
    if args.arch == "z-image" and args.keep_dit:
        ap.error("--arch z-image starts a new Z-Image world on a glyphworld's VAE: --keep-dit has no DiT to keep")
    if args.keep_dit and not (args.init_from and recipe["tune_steps"]):
        ap.error("--keep-dit continues the DiT of --init-from: give both --init-from and --tune-steps N (N > 0)")
    if not 0 <= args.tune_text_frac <= 1 or args.tune_object_weight < 0:
        ap.error(f"--tune-text-frac {args.tune_text_frac} / --tune-object-weight {args.tune_object_weight}: expected "
                 "a fraction in [0, 1] and a weight >= 0")
    summary_path = args.out / "build_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    where = where_built(device, args.workers)
    summary["seed"] = args.seed
    if "judge" in stages:
        t = time.time()
        judge, accuracy = train_judge(recipe["judge_steps"], args.seed, device)
        judge.cpu().save(args.out / "judge")
        summary["judge"] = {**where, "steps": recipe["judge_steps"], "accuracy": accuracy,
                            "wall_s": round(time.time() - t, 1)}
    if stages & {"models", "base", "turbo", "consistency"}:
        t = time.time()
        walls = build_models(args, recipe, device, stages)
        wall = round(time.time() - t, 1)
        # a resumed turbo keeps the record of the invocation that built its base
        earlier = summary.get("models", {}) if not stages & {"models", "base"} else {}
        reused = {"init_from": str(args.init_from)} if args.init_from else {}  # its VAE stage did not run
        if stages & {"models", "base"}:  # a resumed stage builds on the saved base's architecture
            reused["arch"] = args.arch
        if args.keep_dit:  # and its first base phase is the DiT of init_from
            reused["first_phase_from"] = str(args.init_from)
        tuned = {"tune_object_weight": args.tune_object_weight, "tune_text_frac": args.tune_text_frac,
                 "tune_lr": TUNE_LR} if recipe["tune_steps"] else {}
        if recipe["consistency_steps"] and stages & {"models", "turbo", "consistency"}:
            tuned["consistency_lr"] = args.consistency_lr
        if stages & {"models", "base"}:
            tuned |= {"learn_text": args.learn_text, "object_weight": args.object_weight,
                      "learn_text_encoder": args.learn_text_encoder}
        if stages & {"models", "turbo"}:
            tuned["turbo"] = args.turbo
        invocations = earlier.get("invocations", []) + [{**where, "stage_wall_s": walls, "wall_s": wall}]
        stage_walls = {**earlier.get("stage_wall_s", {}), **walls}
        if stages & {"models", "turbo"} and args.turbo == "guidance":
            stage_walls.pop("trajectories", None)  # an earlier turbo's: this one is distilled without them
        summary["models"] = {**earlier, **where, **reused, "unsaid": dict(render.UNSAID),
                             "recipe": recorded_recipe(recipe, earlier.get("recipe", {}), stages) | tuned,
                             "stage_wall_s": stage_walls,
                             "invocations": invocations, "wall_s": round(earlier.get("wall_s", 0.0) + wall, 1)}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    log(f"done: {summary}")



if __name__ == "__main__":
    main()
