"""The report's views: continual tuning (accuracy-matrix heatmap, retention per round), cost across budgets (with
the Pareto front) and the in-context teacher's images beside the student's; plus the runner's teacher.png.

Result dirs are synthetic (tests/synth_runs.py) except the teacher.png tests, which run a cell on the fake backbone.
"""

from __future__ import annotations

import base64
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import TINY_WORLD_TASK, FakeBackbone
from synth_runs import make_result, write_run
from test_runner import cfg_for, fake_evaluate

from dopsd_bench import runner
from dopsd_bench.leaderboard import build_table
from dopsd_bench.metrics.teacher import references_for
from dopsd_bench.report import TEACHER_LABEL, render_html
from dopsd_bench.report_views import cost_section, pareto_front, sequence_section
from dopsd_bench.result import TEACHER_SAMPLES_FILE
from dopsd_bench.store import load_results

NONE = {"steps": None, "batch_size": None, "lr": None, "rank": None}
LABELS = ["concept:zorb", "style:dotted", "concept:kwel"]


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


# ---- Pareto front -------------------------------------------------------------------------------------------
def test_pareto_front_of_a_hand_made_set():
    points = [(0.5, 1.0, 10),   # 0: front
              (0.6, 1.2, 20),   # 1: front (most fidelity)
              (0.4, 1.1, 20),   # 2: dominated by 0 (less fidelity, more damage, more cost)
              (0.5, 1.0, 10),   # 3: equal to 0: neither dominates the other
              (0.2, 1.5, 1),    # 4: front (cheapest)
              (0.6, 1.3, 20),   # 5: dominated by 1 (worse only in retention)
              (math.nan, 0.1, 1)]  # 6: a NaN is never on the front
    assert pareto_front(points, (True, False, False)) == [0, 1, 3, 4]
    # without the cost objective point 4 is dominated by 0 too
    assert pareto_front([p[:2] for p in points], (True, False)) == [0, 1, 3]
    # the directions matter: with every objective maximised, 5 dominates 1, and 4 has the largest ratio
    assert pareto_front(points, (True, True, True)) == [4, 5]
    assert pareto_front([], (True,)) == []


# ---- continual tuning ---------------------------------------------------------------------------------------
def _sequence_result(method: str, seed: int, matrix: list[list[float]], ratios: list[float]) -> dict:
    res = make_result(method, "sequence", "mixed", seed,
                      {"acc": (None, float(np.mean(matrix[-1])), True),
                       "retention_fd_ratio": (None, ratios[-1], False)},
                      budget=NONE if method == "base" else None)
    res["schema_version"], res["family"] = 2, "sequence"
    res["sequence"] = {"name": "mixed", "carry": "continue", "replay": False, "rounds": LABELS,
                       "accuracy_matrix": matrix,
                       "per_round": [{"round": k + 1, "label": LABELS[k], "retention_fd_ratio": r}
                                     for k, r in enumerate(ratios)]}
    return res


def _cells(svg: str) -> tuple[dict[tuple[int, int], float], set[tuple[int, int]]]:
    """A heatmap's printed values by (row, column), and its blank cells."""
    values = {(int(i), int(j)): float(v) for i, j, v in
              re.findall(r'<g class="cell" data-row="(\d+)" data-col="(\d+)">.*?<text[^>]*>([^<]+)</text>', svg)}
    blanks = {(int(i), int(j)) for i, j in re.findall(r'<g class="cell blank" data-row="(\d+)" data-col="(\d+)">', svg)}
    return values, blanks


@pytest.fixture
def sequence_results(tmp_path):
    seeds = {0: [[0.2], [0.1, 0.5], [0.3, 0.4, 0.6]], 1: [[0.4], [0.3, 0.7], [0.1, 0.2, 0.8]]}
    for seed, matrix in seeds.items():
        write_run(tmp_path, _sequence_result("sft", seed, matrix, [1.0 + seed, 1.5, 2.0 + 2 * seed]))
        write_run(tmp_path, _sequence_result("base", seed, [[0.01], [0.01, 0.02], [0.01, 0.02, 0.03]],
                                             [1.0, 1.0, 1.0]))
    return tmp_path


def test_heatmap_holds_the_seed_mean_in_each_cell_and_blanks_the_upper_triangle(sequence_results):
    cells = load_results(sequence_results).cells
    html = sequence_section(cells, "glyph-tiny", "sequence", "steps=10,batch_size=2,lr=0.0001,rank=4",
                            ["base", "sft"], {"sft": "#123456"})
    sft = next(s for s in re.findall(r"<svg.*?</svg>", html, re.DOTALL) if "sft: R[i][j] (2 seeds)" in s)
    values, blanks = _cells(sft)
    expected = {(0, 0): 0.3, (1, 0): 0.2, (1, 1): 0.6, (2, 0): 0.2, (2, 1): 0.3, (2, 2): 0.7}  # mean of seeds 0, 1
    assert values.keys() == expected.keys() and all(values[k] == pytest.approx(v) for k, v in expected.items())
    assert blanks == {(0, 1), (0, 2), (1, 2)}  # instance j not learned yet after round i < j
    assert "after 2: style:dotted" in sft and "3 concept:kwel" in sft
    # one colour scale for every method of the sequence: sft's 0.7 is its darkest end, base's 0.01 its lightest
    fill = r'<g class="cell" data-row="{}" data-col="{}"><rect[^>]*fill="(#[0-9a-f]+)"'
    assert re.search(fill.format(2, 2), sft)[1] == "#08306b"
    base = next(s for s in re.findall(r"<svg.*?</svg>", html, re.DOTALL) if "base: R[i][j]" in s)
    assert re.search(fill.format(0, 0), base)[1] == "#f7fbff"
    svgs = re.findall(r"<svg.*?</svg>", html, re.DOTALL)
    retention = next(s for s in svgs if "retention FD ratio after each" in s)
    for k, mean in ((1, 1.5), (2, 1.5), (3, 3.0)):  # sft's retention, mean over seeds
        assert f"sft: ({k}, {mean:g})" in retention
    assert retention.count('stroke="#123456"/>') == 2  # min-max bars where the seeds differ: rounds 1 and 3


def test_heatmap_shows_forward_transfer_where_every_seed_scored_it(tmp_path):
    matrices = {0: [[0.2], [0.1, 0.5], [0.3, 0.4, 0.6]], 1: [[0.4], [0.3, 0.7], [0.1, 0.2, 0.8]]}
    before = {0: [None, 0.05, 0.10], 1: [None, 0.15, 0.30]}
    untuned = [0.01, 0.02, 0.03]
    for seed, matrix in matrices.items():
        res = _sequence_result("sft", seed, matrix, [1.0, 1.5, 2.0])
        res["sequence"] |= {"fidelity_before": before[seed], "fidelity_untuned": untuned}
        write_run(tmp_path / "both", res)
        if seed == 0:  # the other dir: one seed scored forward transfer, the other did not
            write_run(tmp_path / "mixed", res)
        else:
            write_run(tmp_path / "mixed", _sequence_result("sft", seed, matrix, [1.0, 1.5, 2.0]))

    def heatmap(root: Path) -> str:
        html = sequence_section(load_results(root).cells, "glyph-tiny", "sequence",
                                "steps=10,batch_size=2,lr=0.0001,rank=4", ["sft"], {"sft": "#123456"})
        return next(s for s in re.findall(r"<svg.*?</svg>", html, re.DOTALL) if "sft: R[i][j]" in s)

    svg = heatmap(tmp_path / "both")
    values, blanks = _cells(svg)
    expected = {(0, 0): 0.01, (0, 1): 0.02, (0, 2): 0.03,  # the untuned model's row
                (1, 0): 0.3, (1, 1): 0.1,  # after round 1: R, then instance 2 before its round (mean 0.05, 0.15)
                (2, 0): 0.2, (2, 1): 0.6, (2, 2): 0.2,
                (3, 0): 0.2, (3, 1): 0.3, (3, 2): 0.7}
    assert values.keys() == expected.keys() and all(values[k] == pytest.approx(v) for k, v in expected.items())
    assert blanks == {(1, 2)} and ">untuned</text>" in svg
    values, blanks = _cells(heatmap(tmp_path / "mixed"))  # R alone, the mean of both seeds
    assert values[(0, 0)] == pytest.approx(0.3) and values[(2, 2)] == pytest.approx(0.7) and len(values) == 6


def test_sequence_view_only_with_sequence_results(sequence_results, tmp_path):
    res = load_results(sequence_results)
    assert "Continual tuning" in render_html(res, build_table(res, n_boot=50))
    other = tmp_path / "single"
    write_run(other, make_result("sft", "style", "dotted", 0, {"fidelity": ([0.1, 0.2], None, True)}))
    res = load_results(other)
    assert "Continual tuning" not in render_html(res, build_table(res, n_boot=50))


# ---- cost across budgets ------------------------------------------------------------------------------------
# (method, steps): (fidelity, retention FD ratio, training FLOPs); the front is sft@5, sft@10 and dopsd@5
BUDGETS = {("sft", 5): (0.2, 1.1, 1e12), ("sft", 10): (0.3, 1.3, 2e12), ("sft", 20): (0.25, 1.5, 4e12),
           ("dopsd", 5): (0.15, 1.0, 3e12), ("dopsd", 10): (0.15, 1.2, 6e12)}


def _cost_results(root: Path, budgets: dict) -> None:
    for seed in (0, 1):
        write_run(root, make_result("base", "style", "dotted", seed, {"fidelity": ([0.1, 0.1], None, True),
                                                                      "retention_fd_ratio": (None, 1.0, False)},
                                    budget=NONE), name=f"base/seed{seed}")
        for (method, steps), (fid, ratio, flops) in budgets.items():
            res = make_result(method, "style", "dotted", seed, {"fidelity": ([fid, fid], None, True),
                                                                "retention_fd_ratio": (None, ratio, False)},
                              budget={"steps": steps})
            res["cost"] = {"train_steps": steps, "train_flops": flops, "flops_per_step": flops / steps,
                           "train_seconds": steps / 10}
            write_run(root, res, name=f"{method}{steps}/seed{seed}")


def test_cost_view_rings_the_pareto_front_and_joins_budgets_in_cost_order(tmp_path):
    _cost_results(tmp_path, BUDGETS)
    res = load_results(tmp_path)
    table = build_table(res, n_boot=50)
    html = cost_section(res.cells, table, "glyph-tiny", "style", ["base", "sft", "dopsd"], {"sft": "#aa0000"})
    assert "sft at steps=5, sft at steps=10, dopsd at steps=5" in html  # the front, as the note lists it
    flops_chart, retention_chart = re.findall(r"<svg.*?</svg>", html, re.DOTALL)
    assert "training FLOPs (log scale)" in flops_chart and ">1e12</text>" in flops_chart
    for chart in (flops_chart, retention_chart):
        ringed = re.findall(r'class="front"><title>(\w+): \(([^,]+), ([^)]+)\)', chart)
        assert sorted((m, float(y)) for m, _, y in ringed) == [("dopsd", 0.15), ("sft", 0.2), ("sft", 0.3)]
    assert "base" not in flops_chart  # trained nothing: no cost to place it at
    # sft's line joins its budgets in order of cost: x rises along the polyline on the FLOPs chart
    sft_line = re.search(r'<polyline points="([^"]+)" fill="none" stroke="#aa0000"', flops_chart)[1]
    xs = [float(p.split(",")[0]) for p in sft_line.split()]
    assert len(xs) == 3 and xs == sorted(xs)
    # on the retention chart the same line keeps the budget order, whatever the x order (fid 0.3 then 0.25)
    sft_line = re.search(r'<polyline points="([^"]+)" fill="none" stroke="#aa0000"', retention_chart)[1]
    assert len(sft_line.split()) == 3
    # a larger retention ratio, a larger point (sft@20 has the largest ratio of all: 1.5)
    radii = {float(y): float(r) for r, y in re.findall(r'r="([\d.]+)"[^>]*><title>sft: \([^,]+, ([^)]+)\)',
                                                        flops_chart)}
    assert radii[0.25] > radii[0.3] > radii[0.2]


def test_cost_view_appears_only_with_several_budgets(tmp_path):
    one = {k: v for k, v in BUDGETS.items() if k[1] == 5}  # each method at one budget
    _cost_results(tmp_path / "one", one)
    _cost_results(tmp_path / "many", BUDGETS)
    for name, shown in (("one", False), ("many", True)):
        res = load_results(tmp_path / name)
        page = render_html(res, build_table(res, n_boot=50))
        assert ("cost across budgets" in page) == shown, name
        assert ("fidelity vs training FLOPs" in page) == shown, name


# ---- the teacher beside the student ------------------------------------------------------------------------
def test_teacher_images_appear_beside_the_students_when_stored(tmp_path):
    student, teacher = _png((200, 0, 0)), _png((0, 0, 200))
    for method in ("base", "sft"):
        run_dir = write_run(tmp_path, make_result(method, "style", "dotted", 0, {"fidelity": ([0.1, 0.2], None, True)},
                                                  budget=NONE if method == "base" else None))
        (run_dir / "samples.png").write_bytes(student)
        if method == "sft":
            (run_dir / TEACHER_SAMPLES_FILE).write_bytes(teacher)
    res = load_results(tmp_path)
    page = render_html(res, build_table(res, n_boot=50))
    images = [base64.b64decode(s) for s in re.findall(r'data:image/png;base64,([^"]+)"', page)]
    assert images.count(student) == 2 and images.count(teacher) == 1
    grid = page.split("<table class='grid'>")[1]
    sft_row = re.search(r"<tr><td>sft</td>(.*?)</tr>", grid, re.DOTALL)[1]
    assert TEACHER_LABEL in sft_row and base64.b64encode(teacher).decode() in sft_row  # beside sft's samples
    base_row = re.search(r"<tr><td>base</td>(.*?)</tr>", grid, re.DOTALL)[1]
    assert TEACHER_LABEL not in base_row  # none stored for base
    assert "teacher before tuning" in page and "teacher after tuning" in page  # the rows are named
    for p in tmp_path.rglob(TEACHER_SAMPLES_FILE):
        p.unlink()
    res = load_results(tmp_path)
    assert TEACHER_LABEL not in render_html(res, build_table(res, n_boot=50))


# ---- the runner's teacher.png -------------------------------------------------------------------------------
@pytest.fixture
def fake_cell(tmp_path, monkeypatch):
    """A cell config on the fake backbone and a fake scorer (no real metrics: the runner itself is under test)."""
    task = tmp_path / "tiny_style.yaml"
    task.write_text(TINY_WORLD_TASK)
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: FakeBackbone())
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *a, **k: None)
    monkeypatch.setattr(runner, "_evaluate", fake_evaluate([]))
    return lambda **kw: cfg_for(str(task), tmp_path / "runs", **kw)


def _png_rows(path: Path, n_rows: int) -> list[np.ndarray]:
    """The rows of a runner.samples_grid PNG (pad 2), each (H, W, 3) without the padding around it."""
    from PIL import Image

    grid = np.asarray(Image.open(path))
    h = (grid.shape[0] - 2) // n_rows - 2
    return [grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2:-2] for r in range(n_rows)]


def _tiles_row(images: torch.Tensor) -> np.ndarray:
    """What samples_grid draws for one row of images (without the padding around it)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(runner.samples_grid([images]))))[2:-2, 2:-2]


def test_runner_stores_the_untuned_and_the_tuned_teacher(fake_cell):
    cfg = fake_cell(lr=0.05)
    run_dir = runner.run_cell(cfg)
    refs_row, before, after = _png_rows(run_dir / TEACHER_SAMPLES_FILE, 3)
    spec, instance = runner._task(cfg)
    data = spec.build(instance, cfg.seed, resolution=FakeBackbone.resolution)
    refs = references_for(data.train_images, len(data.eval_prompts))
    assert np.array_equal(refs_row, _tiles_row(refs))  # the reference each prompt's teacher was given
    untuned = FakeBackbone().sample(data.eval_prompts, data.eval_seeds, FakeBackbone.native_steps, references=refs)
    assert np.array_equal(before, _tiles_row(untuned))  # the untuned model's in-context teacher
    assert not np.array_equal(after, before)  # the tuned teacher (lr 0.05 moved the adapter)
    # a method that trains nothing: the tuned teacher is the untuned one
    _, before, after = _png_rows(runner.run_cell(fake_cell(method="base")) / TEACHER_SAMPLES_FILE, 3)
    assert np.array_equal(after, before) and np.array_equal(before, _tiles_row(untuned))
