"""The runner and the run dir: complete run dirs, skip-if-done and --force, atomic writes, failures leave no
result.json, bad user input fails before any heavy work, `eval` of a saved adapter, resume after a failure.

Most tests use a fake backbone (tests/helpers_train.py) and a fake scorer, so they check the runner itself; the one
end-to-end test on the tiny FLUX.2-klein pipeline with the real scoring is marked slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import TINY_WORLD_TASK, FakeBackbone, cell_held_elsewhere

from dopsd_bench import rundir, runner
from dopsd_bench.errors import ConfigError, TaskError, UnknownNameError, UserError
from dopsd_bench.result import BUDGET_KEYS
from dopsd_bench.runconfig import RunConfig
from dopsd_bench.train import DEFAULT_BUDGET


def fake_evaluate(calls: list):
    """Scores from the method's own samples (so a different adapter gives different numbers)."""

    def evaluate(backbone, data, method, features, cache_dir, timings, step_curve=(1, 2, 4, 8), progress=None,
                 batch_size=None):
        calls.append(method)
        if progress is not None:
            progress("sampling")
        images = method.sample(data.eval_prompts, data.eval_seeds, backbone.native_steps)
        per = images.double().mean(dim=(1, 2, 3)).tolist()
        timings.update({"sample_tuned": 0.01, "score": 0.02})
        return {"fidelity": {"mean": sum(per) / len(per), "per_sample": per, "higher_is_better": True},
                "retention_fd_ratio": {"mean": 1.0, "per_sample": None, "higher_is_better": False}}

    return evaluate


@pytest.fixture
def world_task(tmp_path) -> str:
    path = tmp_path / "tiny_style.yaml"
    path.write_text(TINY_WORLD_TASK)
    return str(path)


@pytest.fixture
def fakes(monkeypatch):
    """Fake backbone, features and scorer; returns the list of methods the scorer was called with."""
    calls: list = []
    loads: list = []

    def load(cfg, device):
        loads.append(cfg)
        return FakeBackbone()

    monkeypatch.setattr(runner, "_load_backbone", load)
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *args: None)
    monkeypatch.setattr(runner, "_evaluate", fake_evaluate(calls))
    return {"evaluate": calls, "loads": loads}


def cfg_for(task: str, out: Path, **kw) -> RunConfig:
    base = {"method": "sft", "task": task, "backbone": "fake", "steps": 2, "batch_size": 2, "out_dir": str(out),
            "device": "cpu"}
    base.update(kw)
    return RunConfig(**base)


# ---- run dir helpers ----------------------------------------------------------------------------------------
def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    rundir.atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError, match="cannot write"):
        rundir.atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_killed_writers_temporary_files_are_removed_and_nothing_else(tmp_path):
    """What a SIGKILL between an atomic write's temporary file and its rename leaves, in a run dir and below it."""
    run_dir = tmp_path / "cell"
    (run_dir / "checkpoints" / ".tmp_step_000050").mkdir(parents=True)
    (run_dir / "checkpoints" / ".tmp_step_000050" / "state.pt").write_bytes(b"half")
    (run_dir / ".teacher.png.ab12cd.tmp").write_bytes(b"half a png")
    (run_dir / ".adapter.xy.tmp").mkdir()
    kept = [run_dir / "result.json", run_dir / "train_log.jsonl", run_dir / ".hidden_but_ours"]
    for path in kept:
        path.write_text("{}")
    removed = rundir.remove_dead_writers_temps(run_dir)
    assert len(removed) == 3
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == \
        [".hidden_but_ours", "checkpoints", "result.json", "train_log.jsonl"]
    assert rundir.remove_dead_writers_temps(tmp_path / "missing") == []


def test_atomic_dir_replaces_old_contents(tmp_path):
    target = tmp_path / "adapter"
    with rundir.atomic_dir(target) as d:
        (d / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), rundir.atomic_dir(target) as d:
        (d / "half.txt").write_text("x")
        raise RuntimeError("crash while writing")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with rundir.atomic_dir(target) as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_read_result_requires_current_schema_and_all_keys(tmp_path):
    full = {k: None for k in rundir.RESULT_KEYS} | {"schema_version": rundir.SCHEMA_VERSION}
    rundir.atomic_write_json(tmp_path / "result.json", full)
    assert rundir.is_complete(tmp_path)
    rundir.atomic_write_json(tmp_path / "result.json", full | {"schema_version": 0})
    assert not rundir.is_complete(tmp_path)
    (tmp_path / "result.json").write_text('{"schema_version": 1, "meth')  # truncated by a crash
    assert not rundir.is_complete(tmp_path)


def test_env_info(tmp_path):
    env = rundir.env_info("cpu")
    assert {"python", "torch", "diffusers", "transformers", "peft", "accelerate", "device", "git_sha",
            "hostname"} <= set(env)
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"].startswith(torch.__version__[:4])
    assert rundir.git_sha(tmp_path) is None  # not a git checkout


def test_samples_grid_is_a_png_of_the_right_size():
    from PIL import Image

    rows = [torch.zeros(3, 3, 32, 32), torch.ones(5, 3, 32, 32)]
    png = runner.samples_grid(rows, pad=2)
    import io

    img = Image.open(io.BytesIO(png))
    assert img.size == (5 * (128 + 2) + 2, 2 * (128 + 2) + 2)


def test_comparison_table_marks_better_and_worse():
    from rich.console import Console

    result = {"method": "sft", "task": "style", "instance": "dotted", "backbone": "fake", "seed": 0,
              "metrics": {"fidelity": {"mean": 0.5, "higher_is_better": True},
                          "retention_fd_ratio": {"mean": 2.0, "higher_is_better": False}}}
    base = {"fidelity": {"mean": 0.25}, "retention_fd_ratio": {"mean": 1.0}}
    console = Console(record=True, width=120)
    console.print(runner.comparison_table(result, base, "test"))
    text = console.export_text()
    assert "+0.2500" in text and "+1.0000" in text and "alignment" not in text


# ---- run_cell -----------------------------------------------------------------------------------------------
def test_run_cell_writes_a_complete_run_dir(tmp_path, world_task, fakes, capsys):
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs", checkpoint_every=1))
    assert "s  sampling" in capsys.readouterr().out  # each scoring phase has its line: no silent minute
    assert run_dir == tmp_path / "runs" / "fake" / "tiny_style-dotted" / "sft" / run_dir.name
    result = json.loads((run_dir / "result.json").read_text())
    assert set(rundir.RESULT_KEYS) <= set(result)
    assert result["method"] == "sft" and result["task"] == "tiny_style" and result["instance"] == "dotted"
    assert result["budget"] == {"steps": 2, "batch_size": 2, "lr": DEFAULT_BUDGET["lr"], "rank": 8}
    assert {"train_s", "sample_s", "score_s", "total_s", "step_s"} <= set(result["timings"])
    assert all(isinstance(v, float) for v in result["timings"].values())
    assert result["metrics"]["fidelity"]["per_sample"] and result["adapter"] == "adapter"
    assert {"torch", "diffusers", "git_sha", "device"} <= set(result["env"])
    assert "rounds" not in result and "sequence" not in result  # a sequence's parts only
    assert result["precision"]["dtype"] == "fp32" and result["scorer"] == {"name": "judge"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["method"] == "sft" and config["train"]["steps"] == 2
    assert config["method"]["config"]["weighting_scheme"] == "none"
    assert (run_dir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 2
    assert not (run_dir / "checkpoints").exists()  # resume state is dropped once the cell is complete
    assert not list(run_dir.glob(".*"))  # no temp files
    # scored twice: the run, and the untuned model for the comparison row (through the sample cache)
    assert len(fakes["evaluate"]) == 2 and isinstance(fakes["evaluate"][1], runner._CachedUntuned)


def test_finished_cell_is_skipped_unless_forced(tmp_path, world_task, fakes, capsys):
    cfg = cfg_for(world_task, tmp_path / "runs")
    run_dir = runner.run_cell(cfg)
    first = (run_dir / "result.json").read_text()
    assert runner.run_cell(cfg) == run_dir
    assert "already done" in capsys.readouterr().out
    assert len(fakes["loads"]) == 1  # the skip loaded no model
    runner.run_cell(cfg_for(world_task, tmp_path / "runs", force=True))
    assert len(fakes["loads"]) == 2
    assert (run_dir / "result.json").read_text() != first  # timings differ: it really ran again


def test_a_cell_finished_on_other_weights_runs_again(tmp_path, world_task, fakes, monkeypatch, capsys):
    """A rebuilt model (new weights digest in its model id) makes every finished cell of the old one stale."""
    cfg = cfg_for(world_task, tmp_path / "runs")
    run_dir = runner.run_cell(cfg)
    made_on = json.loads((run_dir / "result.json").read_text())["model"]
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: "fake@rebuilt")
    runner.run_cell(cfg)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"made on {made_on}, the weights are now fake@rebuilt: running it again" in out
    assert len(fakes["loads"]) == 2  # it ran again instead of being skipped


def test_failure_in_scoring_leaves_no_result(tmp_path, world_task, fakes, monkeypatch):
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scorer crashed")))
    with pytest.raises(RuntimeError, match="scorer crashed"):
        runner.run_cell(cfg_for(world_task, tmp_path / "runs"))
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("config.json")]
    assert not (run_dir / "result.json").exists() and not rundir.is_complete(run_dir)
    assert not list(run_dir.glob(".*"))


def test_a_run_that_fails_before_any_checkpoint_leaves_no_run_dir(tmp_path, world_task, fakes, monkeypatch):
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scorer crashed")))
    with pytest.raises(RuntimeError, match="scorer crashed"):
        runner.run_cell(cfg_for(world_task, tmp_path / "runs", checkpoint_every=0))
    assert not list((tmp_path / "runs").rglob("config.json"))  # nothing half-made is left to mistake for a cell


def test_a_forced_run_that_fails_keeps_the_finished_cell(tmp_path, world_task, fakes, monkeypatch):
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs"))  # a complete cell ...
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scorer crashed")))
    with pytest.raises(RuntimeError, match="scorer crashed"):
        runner.run_cell(cfg_for(world_task, tmp_path / "runs", force=True))  # ... forced again, and failing
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing lost
    assert {p.name for p in run_dir.parent.iterdir()} == {run_dir.name, f".{run_dir.name}.lock"}


def test_a_forced_run_replaces_the_cell_only_when_it_is_complete(tmp_path, world_task, fakes):
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs"))
    first = json.loads((run_dir / "result.json").read_text())
    again = runner.run_cell(cfg_for(world_task, tmp_path / "runs", force=True))
    assert again == run_dir and rundir.is_complete(run_dir)
    assert json.loads((run_dir / "result.json").read_text())["timings"] != first["timings"]
    assert {p.name for p in run_dir.parent.iterdir()} == {run_dir.name, f".{run_dir.name}.lock"}


def test_a_second_writer_of_a_running_cell_is_refused_naming_the_holder(tmp_path, world_task, fakes):
    from dopsd_bench.errors import CellBusy

    cfg = cfg_for(world_task, tmp_path / "runs")
    with cell_held_elsewhere(cfg.run_dir()) as holder:
        with pytest.raises(CellBusy, match=f"being run by pid {holder.pid} on "):
            runner.run_cell(cfg)
        assert rundir.lock_holder(cfg.run_dir()).startswith(f"pid {holder.pid} ")
        assert not (cfg.run_dir() / "config.json").exists()  # refused before touching anything
    assert rundir.lock_holder(cfg.run_dir()) is None  # the kernel released the dead holder's lock
    assert rundir.is_complete(runner.run_cell(cfg))  # and the next run takes it over


def test_resume_after_a_failure_skips_finished_training(tmp_path, world_task, fakes, monkeypatch):
    good = runner._evaluate
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        runner.run_cell(cfg_for(world_task, tmp_path / "runs", checkpoint_every=1))
    monkeypatch.setattr(runner, "_evaluate", good)
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs", checkpoint_every=1, resume=True))
    result = json.loads((run_dir / "result.json").read_text())
    # the training record survives the resume from the final checkpoint: the loss and step time of its steps
    assert result["training"]["steps_run"] == 0 and result["training"]["start_step"] == 2
    assert result["training"]["final_loss"] is not None and result["timings"]["step_s"] > 0


@pytest.mark.parametrize("method", ["dopsd", "sft-full", "icl"])
def test_registered_methods_run_through_the_runner(tmp_path, world_task, fakes, method):
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs", method=method))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == method
    # a LoRA method saves its adapter; a full fine-tune and a method without training have none
    assert (result["adapter"] == "adapter") == (method == "dopsd")
    steps = 0 if method == "icl" else 2
    assert result["training"]["steps_run"] == steps


def test_method_without_training_has_no_adapter(tmp_path, world_task, fakes):
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs", method="base"))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["adapter"] is None and not (run_dir / "adapter").exists()
    # no budget either, so the leaderboard shows the row in every budget's section rather than in the default's
    assert result["budget"] == dict.fromkeys(BUDGET_KEYS)
    assert len(fakes["evaluate"]) == 1  # base is its own comparison row


def test_base_row_comes_from_a_finished_base_cell(tmp_path, world_task, fakes):
    runner.run_cell(cfg_for(world_task, tmp_path / "runs", method="base"))
    runner.run_cell(cfg_for(world_task, tmp_path / "runs"))
    assert len(fakes["evaluate"]) == 2  # base once, sft once: the base row was read, not scored again


def test_eval_cell_scores_a_saved_adapter_like_the_run(tmp_path, world_task, fakes):
    out = tmp_path / "runs"
    base = json.loads((runner.run_cell(cfg_for(world_task, out, method="base")) / "result.json").read_text())
    run_dir = runner.run_cell(cfg_for(world_task, out, lr=0.05))
    trained = json.loads((run_dir / "result.json").read_text())
    eval_dir = runner.eval_cell(cfg_for(world_task, out, method="eval", lora=str(run_dir / "adapter")))
    scored = json.loads((eval_dir / "result.json").read_text())
    assert scored["method"] == "eval:adapter" and "eval-adapter" in str(eval_dir)
    assert scored["budget"] == dict.fromkeys(BUDGET_KEYS)
    assert scored["adapter"] is None  # nothing new was trained
    per = scored["metrics"]["fidelity"]["per_sample"]
    assert per == pytest.approx(trained["metrics"]["fidelity"]["per_sample"])
    assert per != pytest.approx(base["metrics"]["fidelity"]["per_sample"])  # the adapter does change the model


def test_eval_cell_with_missing_lora_fails_early(tmp_path, world_task, fakes):
    with pytest.raises(UserError, match="does not exist"):
        runner.eval_cell(cfg_for(world_task, tmp_path / "runs", lora=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="--lora"):
        runner.eval_cell(cfg_for(world_task, tmp_path / "runs"))
    assert fakes["loads"] == []


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"method": "nosuch"}, UnknownNameError, "valid"),
    ({"task": "nosuch"}, UnknownNameError, "valid"),
    ({"instance": "plaid"}, UnknownNameError, "dotted"),
    ({"overrides": {"weighting_scheme": "bogus"}}, ConfigError, "allowed"),
    ({"overrides": {"no_such_field": "1"}}, ConfigError, "unknown setting"),
    ({"lora": "x"}, ConfigError, "eval"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:999"}, ConfigError, "--device"),
])
def test_bad_input_fails_before_loading_anything(tmp_path, world_task, fakes, kw, error, match):
    kw = dict(kw)
    with pytest.raises(error, match=match):
        runner.run_cell(cfg_for(kw.pop("task", world_task), tmp_path / "runs", **kw))
    assert fakes["loads"] == [] and not (tmp_path / "runs").exists()


def test_corrupt_image_fails_before_training_and_names_the_file(tmp_path, fakes):
    from PIL import Image

    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 50, 50)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    task = tmp_path / "mydog.yaml"
    task.write_text("family: concept\nsource: folder\n"
                    "instances: {dog: {path: dog, token: sks, prompt: 'a photo of sks dog'}}\n"
                    "eval_prompts: ['a photo of {token} dog on a beach', 'a {token} dog in snow']\n"
                    "retention_prompts: ['a photo of a cat', 'a red car']\n")
    with pytest.raises(TaskError, match="broken.png"):
        runner.run_cell(cfg_for(str(task), tmp_path / "runs"))
    assert fakes["loads"] == [] and not list(tmp_path.glob("runs/**/result.json"))


# ---- end to end on the tiny FLUX.2-klein pipeline with the real scoring ------------------------------------------
@pytest.mark.slow
def test_run_cell_end_to_end_tiny_flux2(tmp_path, world_task, monkeypatch):
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline
    from dopsd_bench.metrics.features import JudgeFeatures
    from dopsd_bench.world.judge import WorldJudge

    pipe, settings = tiny_flux2_klein_pipeline(0)
    monkeypatch.setattr(runner, "_load_backbone",
                        lambda cfg, device: Flux2KleinBackbone(pipe, settings, model_id="tiny-test", device="cpu"))
    torch.manual_seed(0)
    judge = WorldJudge()  # untrained: the numbers mean nothing, the protocol is what is tested
    monkeypatch.setattr(runner, "_features", lambda *args: JudgeFeatures(judge, device="cpu"))
    cfg = cfg_for(world_task, tmp_path / "runs", backbone="flux2-klein", steps=1, batch_size=2)
    run_dir = runner.run_cell(cfg)
    result = json.loads((run_dir / "result.json").read_text())
    for name in ("fidelity", "alignment", "retention_fd", "retention_fd_ratio", "step_curve"):
        assert name in result["metrics"]
    assert len(result["metrics"]["fidelity"]["per_sample"]) == 4
    # diffusers can read the adapter the run saved
    pipe.load_lora_weights(str(run_dir / "adapter"), adapter_name="reloaded")


def test_loading_a_backbone_hides_the_loading_bars_of_diffusers_and_transformers(monkeypatch):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dopsd_bench.backbones import load_backbone

    monkeypatch.delenv("DOPSD_BENCH_VERBOSE", raising=False)
    try:
        load_backbone("flux2-klein", device="cpu")
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def test_an_out_dir_that_cannot_hold_results_is_refused_first(tmp_path, world_task, fakes):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "runs"):
        with pytest.raises(UserError, match="results cannot be written there"):
            runner.run_cell(cfg_for(world_task, out))
    assert fakes["loads"] == []
