"""stats: bootstrap intervals against closed forms, pairing, determinism."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import make_result, write_grid, write_run

from dopsd_bench.stats import bootstrap_ci, bootstrap_statistic, compare, paired_delta_ci
from dopsd_bench.store import load_results


def test_constant_shift_gives_interval_equal_to_shift():
    rng = np.random.default_rng(0)
    b = rng.normal(size=200)
    ci = paired_delta_ci(b + 0.37, b, n_boot=500)
    assert ci.mean == pytest.approx(0.37)
    assert ci.lo == pytest.approx(0.37) and ci.hi == pytest.approx(0.37)
    assert ci.excludes_zero


def test_symmetric_data_covers_zero():
    x = np.concatenate([np.linspace(0.1, 2, 50), -np.linspace(0.1, 2, 50)])
    ci = bootstrap_ci(x, n_boot=1000)
    assert ci.mean == pytest.approx(0.0, abs=1e-12)
    assert ci.lo < 0 < ci.hi and not ci.excludes_zero


def test_interval_matches_normal_theory_for_large_iid_sample():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, 4000)
    ci = bootstrap_ci(x, n_boot=2000, seed=3)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert (ci.hi - ci.lo) / 2 == pytest.approx(half, rel=0.1)


def test_seeded_determinism():
    x = np.random.default_rng(2).normal(size=30)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)


def test_cluster_bootstrap_is_wider_than_iid_when_clusters_share_an_offset():
    rng = np.random.default_rng(3)
    offsets = rng.normal(0, 1.0, 6)
    units = np.repeat(np.arange(6), 50)
    x = offsets[units] + rng.normal(0, 0.1, len(units))
    iid = bootstrap_ci(x)
    clustered = bootstrap_ci(x, units=units)
    assert clustered.n_units == 6 and iid.n_units == 300
    assert (clustered.hi - clustered.lo) > 3 * (iid.hi - iid.lo)


def test_statistic_bootstrap_of_the_mean_is_the_mean_bootstrap():
    """With the mean as the statistic, the generic bootstrap gives the same point and about the same interval as
    bootstrap_ci (both resample single values); a statistic that ignores the resample has no width."""
    x = np.random.default_rng(4).normal(1.0, 2.0, 400)
    generic = bootstrap_statistic(lambda idx: x[idx].mean(), len(x), n_boot=1000, seed=1)
    direct = bootstrap_ci(x, n_boot=1000, seed=1)
    assert generic.mean == pytest.approx(x.mean()) and generic.n_units == 400
    assert generic.lo == pytest.approx(direct.lo, abs=0.05) and generic.hi == pytest.approx(direct.hi, abs=0.05)
    flat = bootstrap_statistic(lambda idx: 3.0, 10, n_boot=50)
    assert (flat.mean, flat.lo, flat.hi) == (3.0, 3.0, 3.0)
    assert bootstrap_statistic(lambda idx: x[idx].mean(), 400, seed=2) == bootstrap_statistic(
        lambda idx: x[idx].mean(), 400, seed=2)
    with pytest.raises(ValueError, match="n >= 2"):
        bootstrap_statistic(lambda idx: 0.0, 1)


def test_single_unit_has_no_interval():
    ci = bootstrap_ci([1.0, 1.0, 1.0], units=[0, 0, 0])
    assert ci.mean == 1.0 and np.isnan(ci.lo) and not ci.excludes_zero
    assert bootstrap_ci([np.nan]).n_units == 0


def test_compare_pairs_by_instance_seed_sample(tmp_path):
    write_grid(tmp_path, {"base": 0.0, "sft": 0.1, "dopsd": 0.1}, noise=0.01)
    cmp = compare(load_results(tmp_path).samples, n_boot=500).set_index(["task", "method", "metric"])
    row = cmp.loc[("concept", "sft", "fidelity")]
    assert row["unit"] == "run" and row["n_cells"] == 6 and row["n_units"] == 6
    assert row["d_base"] == pytest.approx(0.1, abs=0.01)
    assert row["sig_base"] and row["better_base"] == 1
    assert row["d_base_n"] == 2 * 3 * 8
    assert row["lo"] < row["mean"] < row["hi"]
    # dopsd equals sft up to noise: no significant difference
    d = cmp.loc[("concept", "dopsd", "fidelity")]
    assert d["d_sft_lo"] < 0 < d["d_sft_hi"] and not d["sig_sft"] and d["better_sft"] == 0
    # lower-is-better metric: a higher ratio than base is significantly worse
    r = cmp.loc[("concept", "sft", "retention_fd_ratio")]
    assert r["d_base"] > 0 and r["better_base"] == -1
    # a method is not compared with itself
    assert np.isnan(cmp.loc[("concept", "base", "fidelity")]["d_base"])


def test_reference_run_at_one_seed_stands_in_for_all_seeds(tmp_path):
    for seed in (0, 1, 2):
        write_run(tmp_path, make_result("sft", "style", "dotted", seed, {"fidelity": ([0.5, 0.7], None, True)}))
    write_run(tmp_path, make_result("base", "style", "dotted", 0, {"fidelity": ([0.25, 0.45], None, True)}))
    row = compare(load_results(tmp_path).samples, n_boot=200).set_index("method").loc["sft"]
    assert row["d_base_n"] == 6
    assert row["d_base"] == pytest.approx(0.25)


# ---- rank agreement (Kendall's tau) ------------------------------------------------------------------------------

def test_kendall_tau_is_one_for_the_same_order_and_minus_one_reversed():
    from dopsd_bench.stats import kendall_tau

    x = [0.3, 1.2, 2.5, 0.9, 4.0]
    assert kendall_tau(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)  # any increasing map keeps the order
    assert kendall_tau(x, [-v for v in x]) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant list orders nothing


def test_kendall_tau_matches_scipy_tau_b_with_ties():
    from scipy.stats import kendalltau

    from dopsd_bench.stats import kendall_tau

    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, size=9).astype(float), rng.integers(0, 4, size=9).astype(float)
        expected = kendalltau(x, y).statistic
        assert kendall_tau(x, y) == pytest.approx(expected, nan_ok=True)


def test_rank_agreement_interval_is_tight_for_separated_items_and_wide_for_noise():
    from dopsd_bench.stats import rank_agreement

    rng = np.random.default_rng(1)
    means = [1.0, 2.0, 3.0, 4.0]
    separated = [m + 0.01 * rng.standard_normal(3) for m in means]
    same = rank_agreement(separated, [2 * r for r in separated], n_boot=300)
    assert same.mean == pytest.approx(1.0) and same.lo == pytest.approx(1.0) and same.n_units == 4
    noisy_a = [rng.standard_normal(3) for _ in means]
    noisy_b = [rng.standard_normal(3) for _ in means]
    unrelated = rank_agreement(noisy_a, noisy_b, n_boot=300)
    assert unrelated.hi - unrelated.lo > 0.5  # independent noise: the order is not determined
    with pytest.raises(ValueError, match="same items and runs"):
        rank_agreement([np.ones(2)], [np.ones(3)])


def test_agreement_table_reads_the_store_summary_per_task():
    import pandas as pd

    from dopsd_bench.agreement import agreement_markdown, agreement_table

    rows = []
    for method, ratio, other in [("base", 1.0, 1.0), ("sft", 2.0, 1.3), ("dopsd", 1.8, 1.2), ("offpolicy", 2.2, 1.1)]:
        for seed in range(3):
            cell = f"{method}-{seed}"
            common = {"backbone": "flux2-klein", "task": "style", "instance": "dotted", "method": method,
                      "seed": seed, "budget": "steps=600", "cell": cell}
            rows.append({**common, "metric": "retention_fd_ratio", "mean": ratio + 0.001 * seed})
            rows.append({**common, "metric": "retention_fd_ratio_effnet_lite0", "mean": other + 0.001 * seed})
    table = agreement_table(pd.DataFrame(rows), n_boot=200)
    assert list(table["space"]) == ["effnet_lite0"] and table["n_methods"].tolist() == [4]
    # orders: base < dopsd < sft < offpolicy vs base < offpolicy < dopsd < sft: 4 of 6 pairs agree
    assert table["tau"].iloc[0] == pytest.approx((4 - 2) / 6)
    assert "| style | effnet_lite0 | 0.33" in agreement_markdown(table)
    assert agreement_markdown(agreement_table(pd.DataFrame(rows[::2]))) == ""  # no second space: no section
