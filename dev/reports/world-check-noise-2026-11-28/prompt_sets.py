"""World check's retention figures (R1's FD ratio, R2) on other draws of retention prompts and seeds, beside the
bootstrap interval world check gives for its own draw: is the interval about as wide as a redraw moves the figure?

    python reports/world-check-noise-2026-11-28/prompt_sets.py --sets 1,2,3        # ~1 min per set, 2 CPU threads
    python reports/world-check-noise-2026-11-28/prompt_sets.py --sets 1 --n 16     # tiny CPU example
"""

import argparse

import torch

from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world.check import _batched_sample, judge_retention, retention_setup
from dopsd_bench.world.judge import WorldJudge

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--sets", default="1,2,3", help="retention_setup seeds (world check's own draw is 0)")
ap.add_argument("--n", type=int, default=256, help="retention prompts per set (world check: 256)")
args = ap.parse_args()
judge = WorldJudge.load()
turbo = Flux2KleinBackbone.from_pretrained("glyphworld-turbo")
base = Flux2KleinBackbone.from_pretrained("glyphworld-base")
print(f"{'set':>4}{'turbo FD':>10}{'base FD@32':>11}{'base FD@4':>10}{'R1 FD ratio':>12}{'R2':>7}")
for s in (int(v) for v in args.sets.split(",")):
    prompts, targets, real_feats, _ = retention_setup(judge, args.n, s)
    seeds = list(range(10_000 + 100_000 * s, 10_000 + 100_000 * s + args.n))  # world check's are 10,000 + i
    with torch.no_grad():
        fd = {key: judge_retention(judge, _batched_sample(bb, prompts, seeds, steps), targets, real_feats).fd
              for key, bb, steps in (("turbo", turbo, None), ("b32", base, 32), ("b4", base, 4))}
    print(f"{s:>4}{fd['turbo']:>10.1f}{fd['b32']:>11.1f}{fd['b4']:>10.1f}{fd['turbo'] / fd['b32']:>12.3f}"
          f"{fd['b4'] / fd['b32']:>7.3f}", flush=True)
