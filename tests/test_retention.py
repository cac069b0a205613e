"""Retention split into its parts: leakage, attribute retention, few-step capacity, sharpness (closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_train import FakeBackbone
from test_evaluate import Tuned, _base, _shrink
from test_metrics import FakeJudge

from dopsd_bench.metrics import retention as RT
from dopsd_bench.metrics.evaluate import evaluate
from dopsd_bench.metrics.features import JudgeFeatures, load_judge
from dopsd_bench.metrics.scores import label_index
from dopsd_bench.paths import assets_dir
from dopsd_bench.tasks import load_task
from dopsd_bench.world import datasets as D
from dopsd_bench.world import render as R
from dopsd_bench.world.render import ATTRIBUTES

DOTTED = label_index("style", "dotted")


def _probs(n: int, attr: str, label: int, p: float) -> torch.Tensor:
    """(n, L) probabilities with mass p on `label` and the rest spread evenly over the other labels."""
    n_labels = len(ATTRIBUTES[attr])
    out = torch.full((n, n_labels), (1 - p) / (n_labels - 1), dtype=torch.float64)
    out[:, label] = p
    return out


# ---- leakage -----------------------------------------------------------------------------------------------

def test_leakage_is_zero_for_the_untuned_model_by_construction():
    probs = torch.rand(7, len(ATTRIBUTES["style"]), generator=torch.Generator().manual_seed(0)).softmax(1)
    leak = RT.paired_shift(RT.label_probability(probs, DOTTED), RT.label_probability(probs, DOTTED))
    assert leak.tolist() == [0.0] * 7


def test_leakage_rises_on_a_set_that_always_paints_the_fill():
    untuned = _probs(5, "style", label_index("style", "solid"), 0.9)  # fill probability 0.1 / 7 each
    always = _probs(5, "style", DOTTED, 0.8)
    leak = RT.paired_shift(RT.label_probability(always, DOTTED), RT.label_probability(untuned, DOTTED))
    assert leak.tolist() == pytest.approx([0.8 - 0.1 / (len(ATTRIBUTES["style"]) - 1)] * 5)
    assert RT.label_rate(always, DOTTED).tolist() == [1.0] * 5
    assert RT.label_rate(untuned, DOTTED).tolist() == [0.0] * 5


def test_leakage_rises_when_true_renders_carry_the_held_out_fill():
    """With the shipped judge: retention renders, then the same scenes painted 'dotted' (every attribute else kept)."""
    if not (assets_dir() / "judge" / "judge.safetensors").exists():
        pytest.skip("no shipped world judge")
    _, targets, _ = D.retention_prompts(16, seed=0)
    rng = np.random.default_rng(0)
    scenes = [R.Scene(**t).jitter(rng) for t in targets]
    painted = [R.Scene(**{**t, "style": "dotted"}) for t in targets]
    painted = [p.jitter(np.random.default_rng(i)) for i, p in enumerate(painted)]
    judge = JudgeFeatures(load_judge())
    p_true = judge.attributes(R.to_tensor_batch([R.render(s) for s in scenes]))["style"]
    p_fill = judge.attributes(R.to_tensor_batch([R.render(s) for s in painted]))["style"]
    leak = RT.paired_shift(RT.label_probability(p_fill, DOTTED), RT.label_probability(p_true, DOTTED))
    assert float(leak.mean()) > 0.5
    assert float(RT.label_rate(p_fill, DOTTED).mean()) > float(RT.label_rate(p_true, DOTTED).mean()) + 0.5


def test_leakage_refuses_unpaired_sets():
    with pytest.raises(ValueError, match="same N"):
        RT.paired_shift(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="label in"):
        RT.label_probability(torch.zeros(3, 4), 4)


# ---- attribute retention -------------------------------------------------------------------------------------

def test_attribute_retention_scores_each_attribute_per_sample():
    targets = [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "red"}]
    probs = {a: torch.zeros(2, len(v)) for a, v in ATTRIBUTES.items()}
    probs["shape"][0, label_index("shape", "circle")] = 1  # sample 0 right, sample 1 reads as a circle: wrong
    probs["shape"][1, label_index("shape", "circle")] = 1
    probs["colour"][:, label_index("colour", "red")] = 1
    hits = RT.attribute_retention(probs, targets)
    assert set(hits) == {"shape", "colour"}
    assert hits["shape"].tolist() == [1.0, 0.0] and hits["colour"].tolist() == [1.0, 1.0]


def test_attribute_retention_leaves_out_an_attribute_some_prompt_does_not_state():
    targets = [{"shape": "circle", "size": "small"}, {"shape": "circle"}]
    probs = {a: torch.ones(2, len(v)) / len(v) for a, v in ATTRIBUTES.items()}
    assert set(RT.attribute_retention(probs, targets)) == {"shape"}


# ---- few-step capacity ---------------------------------------------------------------------------------------

UNTUNED_CURVE = {4: 60.0, 8: 50.0}  # the untuned turbo is a little better at 8 steps than at its native 4


def _gap(tuned: dict[int, float]) -> float:
    return RT.few_step_gap_ratio(tuned[4], tuned[8], UNTUNED_CURVE[4], UNTUNED_CURVE[8])


def test_few_step_gap_ratio_is_one_for_the_untuned_model():
    assert _gap(UNTUNED_CURVE) == pytest.approx(1.0)


def test_few_step_gap_ratio_ignores_a_degradation_of_every_step_count_alike():
    for factor in (1.5, 3.0, 0.7):
        assert _gap({k: factor * v for k, v in UNTUNED_CURVE.items()}) == pytest.approx(1.0)


def test_few_step_gap_ratio_moves_when_only_the_native_steps_degrade():
    worse_native = {4: UNTUNED_CURVE[4] * 1.5, 8: UNTUNED_CURVE[8]}
    assert _gap(worse_native) == pytest.approx(1.5)
    leaked_and_worse = {k: 2.0 * v for k, v in worse_native.items()}  # leakage on top changes nothing
    assert _gap(leaked_and_worse) == pytest.approx(1.5)


def test_few_step_gap_ratio_refuses_non_positive_distances():
    with pytest.raises(ValueError, match="positive"):
        RT.few_step_gap_ratio(1.0, 0.0, 1.0, 1.0)


# ---- sharpness -----------------------------------------------------------------------------------------------

def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k1 = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).view(1, 1, 2 * radius + 1, 2 * radius + 1).repeat(3, 1, 1, 1)
    return F.conv2d(F.pad(images, (radius,) * 4, mode="reflect"), k, groups=3)


def test_laplacian_energy_closed_forms():
    flat = torch.full((1, 3, 8, 8), 0.3)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = (0.1 * xx - 0.05 * yy).expand(1, 3, 8, 8)
    checker = ((xx + yy) % 2 * 2 - 1).expand(1, 3, 8, 8)
    assert RT.laplacian_energy(flat).item() == 0.0
    assert RT.laplacian_energy(ramp).item() == pytest.approx(0.0, abs=1e-12)  # float32 ramp values
    assert RT.laplacian_energy(checker).item() == pytest.approx(64.0)  # each pixel: -8 x


def test_sharpness_is_one_for_the_untuned_model_and_falls_under_a_gaussian_blur():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    energy = RT.laplacian_energy(images)
    same = RT.relative_to_reference(energy, energy)
    assert float(same.mean()) == pytest.approx(1.0)
    previous = 1.0
    for sigma in (0.5, 1.0, 2.0):  # more blur, less high-frequency energy
        blurred = float(RT.relative_to_reference(RT.laplacian_energy(_blur(images, sigma)), energy).mean())
        assert blurred < previous
        previous = blurred
    assert previous < 0.05


def test_sharpness_per_sample_values_pair_and_average_to_the_ratio():
    g = torch.Generator().manual_seed(1)
    tuned, untuned = torch.rand(5, generator=g), torch.rand(5, generator=g) + 0.1
    rel = RT.relative_to_reference(tuned, untuned)
    assert float(rel.mean()) == pytest.approx(float(tuned.mean() / untuned.mean()))
    with pytest.raises(ValueError, match="positive"):
        RT.relative_to_reference(tuned, torch.zeros(5))


# ---- through evaluate ------------------------------------------------------------------------------------------

CURVE = (1, 2, 4)  # FakeBackbone's native count is 2: 4 steps is the few-step gap's reference


def test_evaluate_reports_the_parts_and_the_untuned_model_scores_neutral(tmp_path):
    bb = FakeBackbone()
    task = _shrink(load_task("style").build(resolution=FakeBackbone.resolution), 4, 8)
    features = JudgeFeatures(FakeJudge())
    base = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=CURVE)
    assert base["retention_leakage"]["per_sample"] == [0.0] * 8
    assert base["retention_leakage"]["rate"] == base["retention_leakage"]["rate_untuned"]
    assert base["retention_sharpness"]["mean"] == pytest.approx(1.0)
    assert base["few_step_gap_ratio"]["mean"] == pytest.approx(1.0)
    assert base["few_step_gap_ratio"]["reference_steps"] == 4
    attrs = base["retention_attributes"]
    assert all(attrs[a]["per_sample"] == attrs[f"{a}_untuned"]["per_sample"] for a in ATTRIBUTES)

    tuned = evaluate(bb, task, Tuned().setup_random(bb), features=features, cache_dir=tmp_path, step_curve=CURVE)
    assert any(v != 0.0 for v in tuned["retention_leakage"]["per_sample"])
    curve = tuned["step_curve"]
    assert tuned["few_step_gap_ratio"]["mean"] == pytest.approx(curve["fd_ratio@2"]["mean"]
                                                                 / curve["fd_ratio@4"]["mean"])
    assert tuned["retention_sharpness"]["mean"] != pytest.approx(1.0)
    # without a step count above the native one there is no few-step gap to measure
    native_only = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=(1, 2))
    assert "few_step_gap_ratio" not in native_only


def test_probe_script_separates_leakage_from_blur():
    """scripts/probe_retention_parts.py on a few prompts: leakage moves FD and p(fill), blur moves FD and sharpness."""
    import importlib.util
    from pathlib import Path

    if not (assets_dir() / "judge" / "judge.safetensors").exists():
        pytest.skip("no shipped world judge")
    path = Path(__file__).resolve().parent.parent / "scripts" / "probe_retention_parts.py"
    spec = importlib.util.spec_from_file_location("probe_retention_parts", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = {r["case"]: r for r in probe.main(16, "dotted", 0)}
    clean, leaked, blurred = rows["dotted on 0%"], rows["dotted on 50%"], rows["blur sigma 1.0"]
    assert leaked["fd"] > clean["fd"] and blurred["fd"] > clean["fd"]
    assert leaked["p_fill"] > clean["p_fill"] + 0.3 and blurred["p_fill"] < 0.1
    assert blurred["sharpness"] < 0.2 and leaked["sharpness"] > 0.8
