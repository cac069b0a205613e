"""The scoring protocol end to end: result keys and shape, `base` retention ratio 1, the untuned-sample cache."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_train import FakeBackbone
from test_metrics import FakeJudge, _tiny_clip, _tiny_dino

from dopsd_bench.method import Method
from dopsd_bench.metrics.evaluate import METRIC_INFO, evaluate, prepare_untuned, teacher_adapter
from dopsd_bench.metrics.features import ClipFeatures, DinoFeatures, JudgeFeatures, RealImageFeatures
from dopsd_bench.registry import METHODS, METRICS
from dopsd_bench.taskdata import TaskData
from dopsd_bench.tasks import load_task
from dopsd_bench.world.render import ATTRIBUTES

REQUIRED = ["fidelity", "alignment", "retention_fd", "retention_fd_ratio", "retention_alignment", "step_curve",
            "diversity", "copying", "teacher_fidelity_before", "teacher_fidelity_after",
            "teacher_student_divergence"]
STEPS = (1, 2)  # FakeBackbone's native count is 2


@pytest.fixture(scope="module")
def task() -> TaskData:
    return _shrink(load_task("concept").build(resolution=FakeBackbone.resolution), 8, 16)


def _shrink(t: TaskData, n_eval: int, n_retention: int) -> TaskData:
    """The built-in task with fewer samples (same prompts, seeds and true renders), to keep the tests fast."""
    t.eval_prompts, t.eval_seeds, t.eval_targets = t.eval_prompts[:n_eval], t.eval_seeds[:n_eval], \
        t.eval_targets[:n_eval]
    t.retention_prompts, t.retention_seeds = t.retention_prompts[:n_retention], t.retention_seeds[:n_retention]
    t.retention_targets, t.retention_real = t.retention_targets[:n_retention], t.retention_real[:n_retention]
    return t


@pytest.fixture(scope="module")
def features() -> JudgeFeatures:
    return JudgeFeatures(FakeJudge())


class Tuned(Method):
    """A trained stand-in: a LoRA with random non-zero weights."""

    name = "tuned"

    def setup_random(self, backbone, seed: int = 0):
        self.backbone = backbone
        backbone.add_lora(self.adapter, rank=2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in backbone.lora_parameters(self.adapter):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return self


class FullFineTune(Method):
    name = "full"
    adapter = None  # trains without an adapter: changes the base weights


def _base(backbone):
    method = METHODS.get("base")()
    method.backbone = backbone
    return method


def _check_entry(name, e):
    assert set(e) >= {"mean", "per_sample", "higher_is_better"}, name
    assert isinstance(e["mean"], float) and math.isfinite(e["mean"]), name
    assert isinstance(e["higher_is_better"], bool), name
    if e["per_sample"] is not None:
        assert e["mean"] == pytest.approx(sum(e["per_sample"]) / len(e["per_sample"])), name


def test_base_scores_every_key_and_keeps_retention_ratio_one(task, features, tmp_path):
    bb = FakeBackbone()
    timings: dict[str, float] = {}
    m = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=STEPS, timings=timings)
    for key in REQUIRED:
        assert key in m, key
    for name, e in m.items():
        if name == "step_curve":
            assert set(e) == {f"{q}@{k}" for k in STEPS for q in
                              ("fd", "fd_untuned", "fd_ratio", "alignment", "alignment_untuned")}
            for sub, se in e.items():
                _check_entry(sub, se)
        elif name == "retention_attributes":  # a group: every attribute, tuned and untuned, one value per sample
            assert set(e) == {f"{a}{u}" for a in ATTRIBUTES for u in ("", "_untuned")}
            for sub, se in e.items():
                _check_entry(sub, se)
                assert len(se["per_sample"]) == len(task.retention_prompts), sub
        else:
            _check_entry(name, e)
            assert name in METRIC_INFO and METRIC_INFO[name].higher_is_better == e["higher_is_better"], name
    n = len(task.eval_prompts)
    for key in ("fidelity", "alignment", "diversity", "copying", "teacher_fidelity_before",
                "teacher_student_divergence"):
        assert len(m[key]["per_sample"]) == n, key
    assert len(m["retention_alignment"]["per_sample"]) == len(task.retention_prompts)
    # the untuned model scored as a method: identical samples on the same seeds -> exactly the untuned figures
    assert m["retention_fd_ratio"]["mean"] == 1.0
    assert m["retention_fd"]["mean"] == m["retention_fd_untuned"]["mean"] > 0
    assert all(m["step_curve"][f"fd_ratio@{k}"]["mean"] == 1.0 for k in STEPS)
    assert m["retention_alignment"]["per_sample"] == m["retention_alignment_untuned"]["per_sample"]
    assert m["teacher_fidelity_before"] == m["teacher_fidelity_after"]
    assert m["teacher_student_divergence"] == m["teacher_student_divergence_untuned"]
    for figure in ("scale", "offset"):  # one reconstruction per training image; untuned = tuned for `base`
        before, after = m[f"teacher_{figure}_drift_before"], m[f"teacher_{figure}_drift_after"]
        assert len(before["per_sample"]) == len(task.train_images) and before == after
    assert "signed_mean" in m["teacher_scale_drift_before"]
    assert m["retention_kid"]["mean"] == m["retention_kid_untuned"]["mean"]
    assert 0 <= m["fidelity"]["mean"] <= 1 and 0 <= m["alignment"]["mean"] <= 1
    assert timings["cache_misses"] > 0 and list(tmp_path.glob("*.safetensors"))
    # a second scoring reads the untuned outputs from disk and gives the same numbers
    again: dict[str, float] = {}
    assert evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=STEPS,
                    timings=again) == m
    assert again["cache_misses"] == 0 and again["cache_hits"] > 0


def test_tuned_model_moves_retention_and_reuses_the_untuned_cache(task, features, tmp_path):
    bb = FakeBackbone()
    base = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=STEPS)
    tuned = Tuned().setup_random(bb)
    timings: dict[str, float] = {}
    m = evaluate(bb, task, tuned, features=features, cache_dir=tmp_path, step_curve=STEPS, timings=timings)
    assert timings["cache_misses"] == 0  # every untuned output came from the base run's cache
    assert m["retention_fd_untuned"] == base["retention_fd_untuned"]
    assert m["retention_fd"]["mean"] != base["retention_fd"]["mean"]
    assert m["retention_fd_ratio"]["mean"] == pytest.approx(m["retention_fd"]["mean"] / base["retention_fd"]["mean"])
    assert m["teacher_fidelity_before"] == base["teacher_fidelity_before"]
    assert m["teacher_fidelity_after"]["per_sample"] != m["teacher_fidelity_before"]["per_sample"]
    assert m["teacher_student_divergence"]["per_sample"] != m["teacher_student_divergence_untuned"]["per_sample"]
    assert m["teacher_scale_drift_before"] == base["teacher_scale_drift_before"]
    assert m["teacher_scale_drift_after"]["per_sample"] != m["teacher_scale_drift_before"]["per_sample"]


def test_full_fine_tune_needs_the_untuned_outputs_cached_first(task, features, tmp_path):
    bb = FakeBackbone()
    bb.model_id = "fake-v1"  # the cache key must not follow the weights the fine-tune changes
    method = FullFineTune()
    method.backbone = bb
    with pytest.raises(RuntimeError, match="prepare_untuned"):
        evaluate(bb, task, method, features=features, cache_dir=tmp_path / "empty", step_curve=STEPS)
    ref = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path / "ref", step_curve=STEPS)
    prepare_untuned(bb, task, cache_dir=tmp_path, step_curve=STEPS)  # alone: every untuned output evaluate reads
    with torch.no_grad():  # "train": change the base weights
        bb.denoiser.fc2.bias.add_(0.3)
    m = evaluate(bb, task, method, features=features, cache_dir=tmp_path, step_curve=STEPS)
    assert m["retention_fd_untuned"] == ref["retention_fd_untuned"]
    assert m["teacher_fidelity_before"] == ref["teacher_fidelity_before"]
    assert m["teacher_scale_drift_before"] == ref["teacher_scale_drift_before"]
    assert m["retention_fd_ratio"]["mean"] != 1.0
    assert m["teacher_fidelity_after"]["per_sample"] != ref["teacher_fidelity_after"]["per_sample"]


def test_teacher_adapter_prefers_an_existing_teacher():
    class Denoiser:
        def __init__(self):
            self.peft_config = {"student": None, "teacher": None}

    class BB:
        denoiser = Denoiser()

    class WithTeacher(Method):
        teacher_adapter = "teacher"

    class SelfTeacher(Method):
        teacher_adapter = "missing"  # e.g. dopsd with teacher="self": no teacher adapter was created

    assert teacher_adapter(WithTeacher(), BB()) == "teacher"
    assert teacher_adapter(SelfTeacher(), BB()) == "student"
    assert teacher_adapter(METHODS.get("base")(), BB()) is None


def test_folder_task_with_dino_and_clip(tmp_path):
    bb = FakeBackbone()
    g = torch.Generator().manual_seed(0)
    task = TaskData(task="dog", family="concept", instance="dog", token="sks",
                    train_images=torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, train_captions=["a sks dog"] * 4,
                    eval_prompts=["a sks dog on a beach", "a sks dog in snow"] * 2, eval_seeds=[0, 1, 2, 3],
                    retention_prompts=["a cat", "a house", "a tree", "a car"], retention_seeds=[10, 11, 12, 13])
    clip_model, tok = _tiny_clip()
    feats = RealImageFeatures(DinoFeatures(_tiny_dino(), resolution=32), ClipFeatures(clip_model, tok))
    m = evaluate(bb, task, _base(bb), features=feats, cache_dir=tmp_path, step_curve=(1, 2))
    for key in REQUIRED + ["fidelity_dino", "fidelity_clip_i", "fidelity_dino_oracle"]:
        assert key in m, key
    assert m["fidelity"] == m["fidelity_dino"]
    assert all(0 <= v <= 100 for v in m["alignment"]["per_sample"])  # CLIP-T
    assert m["retention_fd_ratio"]["mean"] == 1.0 and m["retention_fd_untuned"]["mean"] > 0
    assert len(m["diversity"]["per_sample"]) == 4  # grouped by prompt: 2 seeds each


def test_metric_names_are_registered():
    for name in REQUIRED:
        assert name in METRICS


@pytest.mark.slow
def test_tiny_flux2_with_the_world_judge(tmp_path):
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline
    from dopsd_bench.world.judge import WorldJudge

    pipe, settings = tiny_flux2_klein_pipeline(0)
    bb = Flux2KleinBackbone(pipe, settings, model_id="tiny-test", device="cpu")
    task = _shrink(load_task("style").build(), 4, 8)
    features = JudgeFeatures(WorldJudge(width=8, embed_dim=16))
    m = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=(1, 2))
    assert m["retention_fd_ratio"]["mean"] == 1.0
    for key in REQUIRED:
        assert key in m


def test_a_model_that_samples_nan_fails_with_one_clear_message(task, features, tmp_path):
    from dopsd_bench.errors import NonFiniteError

    bb = FakeBackbone()
    method = Tuned().setup_random(bb)
    with torch.no_grad():
        for p in bb.lora_parameters(method.adapter):
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"tuned model's samples hold NaN or inf \(8 of 8\).*--lr"):
        evaluate(bb, task, method, features=features, cache_dir=tmp_path, step_curve=STEPS)
