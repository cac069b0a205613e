"""Two turbos on the same draws of retention prompts and seeds: each one's FD and alignment, and the FD ratio
candidate / reference with its 95% paired-bootstrap interval (world check's `fd_ratio_interval`). Draw 0 is world
check's own (seeds 10,000 + i); draw s > 0 uses retention_setup(seed=s) and seeds 10,000 + 100,000 s + i, as
prompt_sets.py does.

    python reports/world-check-noise-2026-11-28/compare_turbos.py --candidate /tmp/gw_c3/glyphworld-turbo
    python reports/world-check-noise-2026-11-28/compare_turbos.py --candidate glyphworld-turbo --draws 1 --n 16
        # tiny CPU example: the shipped turbo against itself (ratio 1)
"""

import argparse

from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
from dopsd_bench.world.check import _batched_sample, fd_ratio_interval, judge_retention, retention_setup
from dopsd_bench.world.judge import WorldJudge

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--candidate", required=True, help="a turbo: embedded name or saved pipeline folder")
ap.add_argument("--reference", default="glyphworld-turbo")
ap.add_argument("--draws", type=int, default=5)
ap.add_argument("--n", type=int, default=256, help="retention prompts per draw (world check: 256)")
args = ap.parse_args()
judge = WorldJudge.load()
reference = Flux2KleinBackbone.from_pretrained(args.reference)
candidate = Flux2KleinBackbone.from_pretrained(args.candidate)
for s in range(args.draws):
    prompts, targets, real, _ = retention_setup(judge, args.n, s)
    first = 10_000 + 100_000 * s
    seeds = list(range(first, first + args.n))
    ref, cand = (judge_retention(judge, _batched_sample(bb, prompts, seeds), targets, real)
                 for bb in (reference, candidate))
    ci = fd_ratio_interval(real, cand, ref, 300)
    print(f"draw {s}: reference FD {ref.fd:.1f} alignment {ref.alignment.mean():.3f} | candidate FD {cand.fd:.1f} "
          f"alignment {cand.alignment.mean():.3f} | candidate / reference {ci.mean:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]",
          flush=True)
