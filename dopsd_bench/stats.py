"""Paired bootstrap confidence intervals over instances x prompts x seeds (pure functions, numpy + pandas).

Resampling unit. Samples of one run share one trained adapter, so they are not independent: the default unit is the
run (a cluster bootstrap over (instance, seed): a resample draws whole runs with all their prompts). When a group has
a single run, the unit falls back to the sample (prompts x eval seeds) and the table says so in its `unit` column.
Set-level metrics (one value per run, e.g. a Frechet distance) are always resampled by run.

Pairing. A method's delta against a reference method (`base`, `sft`) is taken per (task, instance, seed, sample
index), the same prompt and eval seed in both runs, then bootstrapped like any other value. The reference is taken
at the same budget when it was run at that budget, else at its only budget (e.g. `base`, which trains nothing), and
at the same seed when it was run at that seed, else at its only seed per instance.

A difference is significant when its 95% interval excludes 0.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

GROUP_KEYS = ["backbone", "task", "budget", "method", "metric"]
REFERENCES = ("base", "sft")


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n_units: int  # how many independent units were resampled

    @property
    def excludes_zero(self) -> bool:
        return self.n_units >= 2 and (self.lo > 0 or self.hi < 0)


def bootstrap_ci(
    values: np.ndarray | list[float],
    units: np.ndarray | list | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean of `values`.

    `units` labels which values are resampled together (a cluster bootstrap; None = every value is its own unit).
    The statistic is the pooled mean (sum / count over the drawn units), so unequal cluster sizes are weighted by size.
    With fewer than 2 units there is no interval: lo = hi = nan.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64)
    u = np.arange(len(v)) if units is None else np.asarray(units)
    if len(u) != len(v):
        raise ValueError(f"values and units differ in length: {len(v)} vs {len(u)}")
    keep = ~np.isnan(v)
    v, u = v[keep], u[keep]
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    _, inverse = np.unique(u, return_inverse=True)
    sums = np.bincount(inverse, weights=v)
    counts = np.bincount(inverse).astype(np.float64)
    n_units = len(sums)
    mean = float(sums.sum() / counts.sum())
    if n_units < 2:
        return Interval(mean, float("nan"), float("nan"), n_units)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n_units)  # bound memory of the (n_boot, n_units) index matrix
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n_units, size=(stop - start, n_units))
        stats[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    # all-equal resamples give quantiles that differ from the mean only by rounding; keep the interval around it
    return Interval(mean, float(min(lo, mean)), float(max(hi, mean)), n_units)


def bootstrap_statistics(statistics: Callable[[np.ndarray], list[float]], n: int, n_boot: int = 500,
                         level: float = 0.95, seed: int = 0) -> list[Interval]:
    """Bootstrap intervals of several statistics of n paired samples, all on the same resamples: `statistics(idx)`
    returns their values on the samples idx (an int array drawn with replacement from range(n)), so work they share
    (e.g. one model's Fréchet distance in two ratios) is done once per resample. Each Interval's `mean` holds the
    statistic on all n samples. For set-level figures such as ratios of Fréchet distances on the same prompts, whose
    resamples keep each prompt's samples together.

    Each interval is the resamples' percentile spread around their median, placed around the full-sample statistic:
    repeated samples bias a Fréchet distance upwards, which would shift raw percentiles off the estimate."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1 or n < 2:
        raise ValueError(f"expected n >= 2 samples and n_boot >= 1, got n={n}, n_boot={n_boot}")
    point = np.asarray(statistics(np.arange(n)), dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = np.array([statistics(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    a = (1 - level) / 2
    lo, median, hi = np.quantile(stats.reshape(n_boot, -1), [a, 0.5, 1 - a], axis=0)
    return [Interval(float(p), float(p + lo[j] - median[j]), float(p + hi[j] - median[j]), n)
            for j, p in enumerate(point.reshape(-1))]


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], n: int, n_boot: int = 500, level: float = 0.95,
                        seed: int = 0) -> Interval:
    """`bootstrap_statistics` of one statistic."""
    return bootstrap_statistics(lambda idx: [statistic(idx)], n, n_boot, level, seed)[0]


def paired_delta_ci(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    units: np.ndarray | list | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of mean(a - b) where a[i] and b[i] are the same prompt/seed under two methods."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, units=units, n_boot=n_boot, level=level, seed=seed)


def _group_seed(seed: int, key: tuple) -> int:
    # a per-group stream, so adding a method to the results does not move any other row's interval
    return (seed * 1_000_003 + zlib.crc32(repr(key).encode())) % (2**32)


@dataclass
class _Part:
    """One (backbone, task, metric, budget, method) block of samples, as plain arrays (pandas per-row work is slow)."""

    instance: list[str]
    seed: list[int]
    sample: list[int]
    value: np.ndarray
    higher_is_better: bool

    @classmethod
    def of(cls, frame: pd.DataFrame) -> _Part:
        return cls(frame["instance"].astype(str).tolist(), frame["seed"].astype(int).tolist(),
                   frame["sample"].astype(int).tolist(), frame["value"].to_numpy(dtype=np.float64),
                   bool(frame["higher_is_better"].iloc[0]))

    @property
    def runs(self) -> list[tuple[str, int]]:
        return list(zip(self.instance, self.seed, strict=True))

    @property
    def set_level(self) -> bool:
        return all(s < 0 for s in self.sample)


def _codes(keys: list) -> np.ndarray:
    index: dict = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def _unit_codes(instance: list[str], seed: list[int], sample: list[int], unit: str) -> tuple[np.ndarray, str]:
    """Resampling units: runs (instance, seed) by default; samples when there is a single run (see module doc)."""
    if unit not in ("run", "sample"):
        raise ValueError(f"unit must be 'run' or 'sample', got {unit!r}")
    runs = list(zip(instance, seed, strict=True))
    set_level = all(s < 0 for s in sample)
    if set_level or (unit == "run" and len(set(runs)) >= 2):
        return _codes(runs), "run"
    return _codes(list(zip(instance, seed, sample, strict=True))), "sample"


def pair(method: _Part, ref: _Part) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(method values, reference values, indices into method rows) paired on (instance, seed, sample).

    When the reference was run at one seed per instance and not at all of the method's seeds, that seed stands in
    for every seed (e.g. `base` run once: it trains nothing). Duplicate reference rows are averaged.
    """
    ref_seeds: dict[str, set[int]] = {}
    for inst, sd in ref.runs:
        ref_seeds.setdefault(inst, set()).add(sd)
    broadcast = not set(method.seed) <= set(ref.seed) and all(len(v) == 1 for v in ref_seeds.values())
    sums: dict[tuple, list[float]] = {}
    for inst, sd, smp, v in zip(ref.instance, ref.seed, ref.sample, ref.value, strict=True):
        key = (inst, smp) if broadcast else (inst, sd, smp)
        acc = sums.setdefault(key, [0.0, 0])
        acc[0] += v
        acc[1] += 1
    a, b, idx = [], [], []
    for i, (inst, sd, smp, v) in enumerate(zip(method.instance, method.seed, method.sample, method.value,
                                               strict=True)):
        acc = sums.get((inst, smp) if broadcast else (inst, sd, smp))
        if acc is not None:
            a.append(v)
            b.append(acc[0] / acc[1])
            idx.append(i)
    return np.array(a, dtype=np.float64), np.array(b, dtype=np.float64), idx


def _reference_part(parts: dict[tuple[str, str], _Part], reference: str, budget: str) -> _Part | None:
    if (budget, reference) in parts:
        return parts[(budget, reference)]
    budgets = [b for b, m in parts if m == reference]
    return parts[(budgets[0], reference)] if len(budgets) == 1 else None


def compare(
    samples: pd.DataFrame,
    references: tuple[str, ...] = REFERENCES,
    unit: str = "run",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (backbone, task, budget, method, metric): mean with its interval, and paired deltas vs references.

    `samples` is `store.Results.samples`. For each reference r the columns d_r, d_r_lo, d_r_hi, d_r_n (paired
    values used), sig_r (interval excludes 0) and better_r (+1 significantly better, -1 significantly worse, 0 not
    significant, by the metric's direction) are added; they are NaN/False/0 where r is missing or r is the method.
    The reference is taken at the same budget when it was run at it, else at its only budget.
    """
    if samples.empty:
        return pd.DataFrame(columns=GROUP_KEYS)
    rows = []
    for (backbone, task, metric), g in samples.groupby(["backbone", "task", "metric"], sort=True):
        parts = {(b, m): _Part.of(h) for (b, m), h in g.groupby(["budget", "method"], sort=True)}
        for (budget, method), part in parts.items():
            key = (backbone, task, budget, method, metric)
            codes, used_unit = _unit_codes(part.instance, part.seed, part.sample, unit)
            ci = bootstrap_ci(part.value, codes, n_boot, level, _group_seed(seed, key))
            hib = part.higher_is_better
            row = {**dict(zip(GROUP_KEYS, key, strict=True)), "higher_is_better": hib,
                   "n_cells": len(set(part.runs)), "n_units": ci.n_units, "unit": used_unit,
                   "mean": ci.mean, "lo": ci.lo, "hi": ci.hi}
            for r in references:
                d = {f"d_{r}": np.nan, f"d_{r}_lo": np.nan, f"d_{r}_hi": np.nan, f"d_{r}_n": 0,
                     f"sig_{r}": False, f"better_{r}": 0}
                ref = _reference_part(parts, r, budget) if method != r else None
                a, b, idx = pair(part, ref) if ref is not None else (np.array([]), np.array([]), [])
                if len(idx):
                    pcodes, _ = _unit_codes([part.instance[i] for i in idx], [part.seed[i] for i in idx],
                                            [part.sample[i] for i in idx], unit)
                    dci = paired_delta_ci(a, b, pcodes, n_boot, level, _group_seed(seed, (*key, r)))
                    sig = dci.excludes_zero
                    sign = 1 if dci.mean > 0 else -1
                    d = {f"d_{r}": dci.mean, f"d_{r}_lo": dci.lo, f"d_{r}_hi": dci.hi, f"d_{r}_n": len(idx),
                         f"sig_{r}": sig, f"better_{r}": (sign if hib else -sign) if sig else 0}
                row.update(d)
            rows.append(row)
    return pd.DataFrame(rows)


def kendall_tau(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Kendall's tau-b of two paired score lists: +1 when they order the items alike, -1 when reversed; ties count
    neither way (and shrink the denominator, as scipy's tau-b). nan with fewer than 2 items or a constant list."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-d lists of the same length, got shapes {x.shape} and {y.shape}")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    denominator = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def rank_agreement(runs_a: list[np.ndarray], runs_b: list[np.ndarray], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Kendall's tau between items' means in two measures, with a percentile bootstrap interval. runs_a[k] and
    runs_b[k] hold item k's per-run values in the two measures, run for run (the same runs), so a resample draws
    each item's runs with replacement and keeps both measures of a run together. n_units: the number of items."""
    if len(runs_a) != len(runs_b) or any(len(a) != len(b) for a, b in zip(runs_a, runs_b, strict=True)):
        raise ValueError("expected the same items and runs in both measures")
    runs_a = [np.asarray(a, dtype=np.float64) for a in runs_a]
    runs_b = [np.asarray(b, dtype=np.float64) for b in runs_b]
    point = kendall_tau([a.mean() for a in runs_a], [b.mean() for b in runs_b])
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(n_boot):
        draws = [rng.integers(0, len(a), size=len(a)) for a in runs_a]
        taus.append(kendall_tau([a[d].mean() for a, d in zip(runs_a, draws, strict=True)],
                                [b[d].mean() for b, d in zip(runs_b, draws, strict=True)]))
    taus = np.asarray(taus)
    taus = taus[~np.isnan(taus)]
    if len(taus) == 0 or len(runs_a) < 2:
        return Interval(point, float("nan"), float("nan"), len(runs_a))
    a = (1 - level) / 2
    lo, hi = np.quantile(taus, [a, 1 - a])
    return Interval(point, float(min(lo, point)), float(max(hi, point)), len(runs_a))
