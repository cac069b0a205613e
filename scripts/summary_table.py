"""Print the README's leaderboard summary from a sweep's results: one row per method, fidelity / alignment /
retention FD ratio per task family (mean [95% interval] from the leaderboard CSV), time per training step relative
to `sft` (median `timings.step_s` over the sweep's runs), and the "is the default budget meaningful" check: does
each tuned method raise fidelity over `base` by more than the seed-to-seed spread?

    python scripts/summary_table.py --results runs/leaderboard --csv leaderboards/embedded.csv
    python scripts/summary_table.py --results runs/ci --csv leaderboards/ci.csv --methods base,sft,dopsd  # tiny

With several budgets per method (a budget sweep) it prints one table and check per budget, then each method's
paired difference between each budget and the reference budget (`--vs-budget`, default: the CSV's last), on
fidelity and the retention FD ratio: the same instance, seed and prompt at both budgets, run-level bootstrap.
The spread of a method on a task is max - min of its per-seed fidelity; a gain counts when the mean gain over
`base` exceeds the larger of the two methods' spreads (base has none: its samples do not depend on the run seed).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from dopsd_bench.stats import compare
from dopsd_bench.store import NO_BUDGET, Results, load_results

COLUMNS = ("fidelity", "alignment", "retention_fd_ratio")
ORDER = ("base", "icl", "sft", "sft-full", "dreambooth", "sft-teacher", "offpolicy", "dopsd", "base-transfer")


def runs_of(res: Results) -> pd.DataFrame:
    """One row per run: method, family, budget, seed, fidelity (mean over samples) and step time."""
    fidelity = (res.samples[res.samples["metric"] == "fidelity"].groupby("cell")["value"].mean()
                .rename("fidelity"))
    runs = res.cells.join(fidelity, on="cell")
    return runs.rename(columns={"time_step_s": "step_s"})


def fmt(x: float) -> str:
    return f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True, help="the sweep's output dir (holds result.json files)")
    ap.add_argument("--csv", type=Path, required=True, help="`dopsd-bench leaderboard --csv` output for them")
    ap.add_argument("--methods", default="", help="comma-separated subset and order (default: the CSV's order)")
    ap.add_argument("--vs-budget", default="", help="a budget sweep's reference budget, as the CSV writes it "
                    "(default: its last)")
    args = ap.parse_args()

    for path, what in ((args.csv, "run `dopsd-bench leaderboard --results DIR --csv` first"),
                       (args.results, "pass the --out dir of a sweep")):
        if not path.exists():
            ap.error(f"{path} does not exist: {what}")
    board = pd.read_csv(args.csv)
    res = load_results(args.results)
    if res.empty:
        raise SystemExit(f"no result.json under {args.results}: run the sweep first")
    runs = runs_of(res)
    present = list(dict.fromkeys(board["method"]))
    methods = (args.methods.split(",") if args.methods
               else [m for m in ORDER if m in present] + [m for m in present if m not in ORDER])
    families = list(dict.fromkeys(board["task"]))
    trained = runs[runs["budget"] != NO_BUDGET]
    if trained.groupby("method")["budget"].nunique().max() <= 1:
        # each method at its own (default) budget, e.g. sft-full at its lower lr: one table, one check
        print_table(board.drop_duplicates(["method", "task", "metric"]), runs, methods, families)
        print_budget_check(runs, None, methods, families)
        return
    budgets = [b for b in dict.fromkeys(board["budget"]) if b != NO_BUDGET]
    for budget in budgets:
        print(f"\n### budget {budget}\n")
        print_table(board[board["budget"] == budget], runs[runs["budget"] == budget], methods, families)
        print_budget_check(runs, budget, methods, families)
    reference = args.vs_budget or budgets[-1]
    if reference not in budgets:
        raise SystemExit(f"--vs-budget {reference!r} is not a budget of {args.csv}; it has: {', '.join(budgets)}")
    print(f"\n### each budget vs {reference} (paired: same instance, seed and prompt; 95% interval)\n")
    deltas = budget_deltas(res.samples, reference)
    for _, d in deltas[deltas["method"].isin(methods)].iterrows():
        print(f"  {d['task']:8s} {d['metric']:20s} {d['method']:10s} {d['budget']}: {fmt(d['mean'])} vs "
              f"{fmt(d['reference_mean'])}  Δ {d['delta']:+.3g} [{d['lo']:+.3g}, {d['hi']:+.3g}]")


def budget_deltas(samples: pd.DataFrame, reference: str,
                  metrics: tuple[str, ...] = ("fidelity", "retention_fd_ratio"), n_boot: int = 2000) -> pd.DataFrame:
    """Per (task, metric, method, budget other than `reference`): the method's mean there, at `reference`, and
    their paired difference with its interval (the leaderboard's paired bootstrap, with the two budgets of one
    method as its two rows)."""
    s = samples[(samples["budget"] != NO_BUDGET) & samples["metric"].isin(metrics)].copy()
    s["method"] = s["method"] + "\t" + s["budget"]  # one row per method and budget, in one section
    s["budget"] = "all"
    refs = tuple(sorted({m for m in s["method"] if m.endswith("\t" + reference)}))
    table = compare(s, references=refs, n_boot=n_boot).set_index(["task", "metric", "method"])
    rows = []
    for (task, metric, label), r in table.iterrows():
        method, budget = label.split("\t")
        ref = f"{method}\t{reference}"
        if budget == reference or (task, metric, ref) not in table.index:
            continue
        rows.append({"task": task, "metric": metric, "method": method, "budget": budget, "mean": r["mean"],
                     "reference_mean": table.loc[(task, metric, ref), "mean"], "delta": r[f"d_{ref}"],
                     "lo": r[f"d_{ref}_lo"], "hi": r[f"d_{ref}_hi"]})
    return pd.DataFrame(rows)


def print_table(board: pd.DataFrame, runs: pd.DataFrame, methods: list[str], families: list[str]) -> None:
    step = runs[runs["step_s"] > 0].groupby("method")["step_s"].median()  # untrained methods have none
    header = ["method"] + [f"{fam} {col.replace('_', ' ')}" for fam in families for col in COLUMNS]
    header.append("time/step vs sft")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    by = board.set_index(["method", "task", "metric"])
    for method in methods:
        row = [method]
        for fam in families:
            for col in COLUMNS:
                if (method, fam, col) not in by.index:
                    row.append("–")
                    continue
                r = by.loc[(method, fam, col)]
                row.append(f"{fmt(r['mean'])} [{fmt(r['lo'])}, {fmt(r['hi'])}]")
        row.append(f"{step[method] / step['sft']:.2f}" if method in step and "sft" in step else "no training")
        print("| " + " | ".join(row) + " |")


def print_budget_check(runs: pd.DataFrame, budget: str | None, methods: list[str], families: list[str]) -> None:
    """budget None: every trained run counts (each method ran at one budget, its own)."""
    print(f"\nIs the budget meaningful? (fidelity gain over base vs seed-to-seed spread; "
          f"{budget or 'each method at its own budget'})")
    fid = runs.dropna(subset=["fidelity"])
    for fam in families:
        # base trains nothing: its runs count at every budget (older ones may carry the budget they ran beside)
        base = fid[(fid["method"] == "base") & (fid["family"] == fam)]["fidelity"]
        for method in methods:
            if method == "base":
                continue
            mine = fid[(fid["method"] == method) & (fid["family"] == fam)]
            per_seed = (mine if budget is None else mine[mine["budget"] == budget])["fidelity"]
            if per_seed.empty or base.empty:
                continue
            gain = per_seed.mean() - base.mean()
            spread = max(per_seed.max() - per_seed.min(), base.max() - base.min())
            verdict = "yes" if gain > spread else "no"
            print(f"  {fam:8s} {method:14s} gain {gain:+.4f}  spread {spread:.4f}  ({len(per_seed)} seeds: "
                  f"{', '.join(fmt(v) for v in per_seed)}; median {statistics.median(per_seed):.3g})  -> {verdict}")


if __name__ == "__main__":
    main()
