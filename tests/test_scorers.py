"""Which scorer scores a task (`--scorer`, `--dino`, `--clip`), and the world judge on image folders: the embedded
default's offline scorer for a folder task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import FakeBackbone
from PIL import Image
from test_evaluate import _base
from test_metrics import FakeJudge
from typer.testing import CliRunner

from dopsd_bench.cli import app
from dopsd_bench.errors import ConfigError
from dopsd_bench.metrics.evaluate import evaluate
from dopsd_bench.metrics.features import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    JudgeFeatures,
    choose_scorer,
    features_for_task,
    load_judge,
    scorer_record,
)
from dopsd_bench.metrics.scores import reference_similarity
from dopsd_bench.runconfig import RunConfig
from dopsd_bench.taskdata import TaskData
from dopsd_bench.world import render as R

cli = CliRunner()


def test_the_default_scorer_follows_the_data_and_the_backbone_resolution():
    assert choose_scorer(None, "world", 1024) == "judge"  # world renders: the judge, at any resolution
    assert choose_scorer(None, "folder", 32) == "judge"  # the embedded world's 32 px: offline, and DINO would read 7x
    assert choose_scorer(None, "folder", 512) == "dino-clip"
    assert choose_scorer(None, "folder", None) == "dino-clip"
    assert choose_scorer("dino-clip", "world", 32) == "dino-clip"  # the flag wins
    assert choose_scorer("judge", "folder", 1024) == "judge"
    assert choose_scorer(None, "world", 32, weights_given=True) == "dino-clip"  # --dino/--clip name that scorer
    with pytest.raises(ConfigError, match="scorer must be one of judge, dino-clip.*got 'clip'"):
        choose_scorer("clip", "folder", 32)


def test_the_recorded_scorer_names_its_weights(monkeypatch):
    monkeypatch.delenv("DOPSD_BENCH_DINO", raising=False)
    monkeypatch.delenv("DOPSD_BENCH_CLIP", raising=False)
    assert scorer_record(None, "folder", 32) == {"name": "judge"}
    assert scorer_record(None, "folder", 512) == {"name": "dino-clip", "dino": DEFAULT_DINO, "clip": DEFAULT_CLIP}
    assert scorer_record(None, "folder", 512, dino="/w/dino", clip="none") == {"name": "dino-clip",
                                                                                "dino": "/w/dino", "clip": None}
    monkeypatch.setenv("DOPSD_BENCH_DINO", "/env/dino")
    assert scorer_record("dino-clip", "world", 32)["dino"] == "/env/dino"
    assert scorer_record("dino-clip", "world", 32, dino="/flag/dino")["dino"] == "/flag/dino"  # the flag wins


def test_a_chosen_scorer_is_part_of_the_cell_and_validated():
    default = RunConfig(method="sft", task="style")
    judged = RunConfig(method="sft", task="style", scorer="judge")
    other = RunConfig(method="sft", task="style", scorer="dino-clip", dino="/w/dino")
    assert default.cell_id().endswith("seed0")  # unset: the same cell as before the option existed
    assert len({default.cell_id(), judged.cell_id(), other.cell_id()}) == 3
    with pytest.raises(ConfigError, match="scorer must be one of judge, dino-clip"):
        RunConfig(method="sft", task="style", scorer="dino")
    with pytest.raises(ConfigError, match="--dino/--clip choose the dino-clip scorer's weights"):
        RunConfig(method="sft", task="style", scorer="judge", clip="/w/clip")


def _folder_task(images: torch.Tensor) -> TaskData:
    return TaskData(task="mine", family="concept", instance="mine", token="sks",
                    train_images=images, train_captions=["a sks glyph"] * len(images),
                    eval_prompts=["a sks glyph at the top", "a sks glyph at the left"] * 2, eval_seeds=[0, 1, 2, 3],
                    retention_prompts=["a blue circle", "a red square", "a green ring", "a cross"],
                    retention_seeds=[10, 11, 12, 13])


def test_the_judge_scores_a_folder_task_by_similarity_and_measures_no_alignment(tmp_path):
    task = _folder_task(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    bb = FakeBackbone()
    m = evaluate(bb, task, _base(bb), features=JudgeFeatures(FakeJudge()), cache_dir=tmp_path, step_curve=(1, 2))
    assert m["fidelity"] == m["fidelity_judge"] and -1 <= m["fidelity"]["mean"] <= 1
    # the judge reads world attributes, which a folder's captions do not state: alignment is absent, not made up
    assert not {"alignment", "retention_alignment", "retention_alignment_untuned"} & set(m)
    curve = m["step_curve"]
    assert {"fd@1", "fd@2", "fd_ratio@2"} <= set(curve) and not any(k.startswith("alignment") for k in curve)
    assert m["retention_fd_ratio"]["mean"] == 1.0  # the untuned model against itself


def _renders(rng: np.random.Generator, n: int, **which) -> torch.Tensor:
    return R.to_tensor_batch([R.render(R.random_scene(rng, **which)) for _ in range(n)])


@pytest.mark.parametrize("glyph", ["zorb", "kwel"])
def test_the_shipped_judge_tells_a_folder_glyph_from_others(glyph):
    """Folder fidelity on the embedded default is the cosine to the references in the judge's features: renders of
    the folder's glyph in new contexts must score clearly above renders of every other shape."""
    rng = np.random.default_rng(0)
    features = JudgeFeatures(load_judge())
    refs = features.embed(_renders(rng, 8, shapes=[glyph]))
    same = reference_similarity(features.embed(_renders(rng, 48, shapes=[glyph])), refs)
    others = [s for s in [*R.SHAPES, *R.HELD_OUT_GLYPHS] if s != glyph]
    other = reference_similarity(features.embed(_renders(rng, 48, shapes=others)), refs)
    assert same.mean() > other.mean() + 0.2, (same.mean(), other.mean())
    pairs = (same[:, None] > other[None, :]).float().mean()  # AUROC of same vs other
    assert pairs > 0.9, pairs


def test_folder_tasks_on_the_embedded_default_load_no_hub_scorer(monkeypatch):
    monkeypatch.setenv("DOPSD_BENCH_DINO", "/nowhere/dino")  # would fail if the judge were not chosen
    task = _folder_task(torch.zeros(2, 3, 32, 32))
    assert isinstance(features_for_task(task, resolution=32, judge=FakeJudge()), JudgeFeatures)


def _write_folder_task(root: Path) -> Path:
    """The README's folder task, on 32 px renders of a held-out glyph (a stand-in for the user's own images)."""
    folder = root / "images" / "mine"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        image = R.render(R.random_scene(rng, shapes=["zorb"]))
        Image.fromarray((image * 255).round().astype("uint8")).save(folder / f"{i}.png")
    task = root / "mine.yaml"
    task.write_text(f"""\
family: concept
source: folder
instances:
  mine:
    path: {folder}
    token: sks
    class: glyph
    prompt: "a red {{token}} {{class}}"
eval_prompts: ["a {{token}} {{class}} at the top", "a {{token}} {{class}} at the left"]
retention_prompts: ["a blue circle", "a green square"]
n_samples: 4
n_retention: 4
""")
    return task


def test_plan_says_how_a_folder_task_is_scored_and_refuses_missing_scorer_weights(tmp_path):
    task = _write_folder_task(tmp_path)
    result = cli.invoke(app, ["plan", "--method", "sft", "--task", str(task)])
    assert result.exit_code == 0, result.output
    assert "world judge" in result.output and "prompt alignment is not measured" in result.output
    result = cli.invoke(app, ["plan", "--method", "sft", "--task", str(task), "--scorer", "dino-clip",
                              "--dino", str(tmp_path / "no-dino")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pass --dino PATH to a saved model folder" in " ".join(result.stderr.split())
    result = cli.invoke(app, ["run", "--method", "sft", "--task", str(task), "--scorer", "judge", "--dino", "x"])
    assert result.exit_code == 2 and "--dino/--clip choose the dino-clip scorer's weights" in result.stderr


@pytest.mark.slow
def test_the_readme_folder_example_runs_offline_on_the_embedded_default(tmp_path):
    task = _write_folder_task(tmp_path)
    out = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("DOPSD_BENCH_DINO", None)
    proc = subprocess.run([sys.executable, "-m", "dopsd_bench", "run", "--method", "sft", "--task", str(task),
                           "--steps", "2", "--out", str(out)], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result_file,) = out.glob("flux2-klein/mine-mine/sft/*/result.json")
    result = json.loads(result_file.read_text())
    assert result["scorer"] == {"name": "judge"}
    metrics = result["metrics"]
    assert metrics["fidelity"]["mean"] == metrics["fidelity_judge"]["mean"]
    assert len(metrics["fidelity"]["per_sample"]) == 4 and "alignment" not in metrics
