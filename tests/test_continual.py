"""Continual tuning (dopsd_bench/continual.py): ACC/BWT/forgetting/FWT on hand-computed matrices, sequence task specs,
and sequence runs on the fake backbone: round-level resume that never re-trains a finished round and ends where an
uninterrupted run ends, merge vs continue, D-OPSD's teacher across rounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import FakeBackbone
from test_runner import fake_evaluate

from dopsd_bench import continual, runner
from dopsd_bench.continual import average_accuracy, backward_transfer, forgetting, forward_transfer
from dopsd_bench.errors import ConfigError, TaskError, UnknownNameError
from dopsd_bench.method import Batch
from dopsd_bench.runconfig import RunConfig
from dopsd_bench.tasks import load_task


# ---- the metrics -------------------------------------------------------------------------------------------------
def test_metrics_on_a_hand_computed_matrix():
    matrix = [[0.5],
              [0.3, 0.6],
              [0.4, 0.2, 0.9]]
    assert average_accuracy(matrix) == pytest.approx((0.4 + 0.2 + 0.9) / 3)
    assert backward_transfer(matrix) == pytest.approx(((0.4 - 0.5) + (0.2 - 0.6)) / 2)  # -0.25
    # j=0: best before the end max(0.5, 0.3) = 0.5, now 0.4; j=1: best 0.6, now 0.2
    assert forgetting(matrix) == pytest.approx(((0.5 - 0.4) + (0.6 - 0.2)) / 2)  # 0.25


def test_metrics_when_later_rounds_help_and_for_one_round():
    matrix = [[0.2, 0.0], [0.5, 0.7]]  # full rows are fine: only j <= i is read
    assert average_accuracy(matrix) == pytest.approx(0.6)
    assert backward_transfer(matrix) == pytest.approx(0.3)  # positive: round 2 improved instance 1
    assert forgetting(matrix) == pytest.approx(-0.3)  # nothing forgotten: the best before the end is below the end
    assert average_accuracy([[0.8]]) == 0.8
    assert backward_transfer([[0.8]]) is None and forgetting([[0.8]]) is None
    with pytest.raises(ValueError, match="row 1"):
        average_accuracy([[0.1], [0.2]])
    with pytest.raises(ValueError, match="empty"):
        forgetting([])


def test_forward_transfer_on_hand_computed_terms():
    # before[j] = R[j-1][j]: fidelity on round j's instance after round j-1; untuned[j]: the untuned model's
    before = [None, 0.30, 0.10, 0.25]
    untuned = [0.05, 0.20, 0.15, 0.05]
    assert forward_transfer(before, untuned) == pytest.approx(((0.30 - 0.20) + (0.10 - 0.15) + (0.25 - 0.05)) / 3)
    assert forward_transfer([0.9, 0.2], [0.1, 0.2]) == 0.0  # before[0] is never read: round 0 starts untuned
    assert forward_transfer([None], [0.4]) is None  # one round: nothing came before
    assert forward_transfer([None, None], [0.1, 0.2]) is None  # a term not measured (a result made without it)
    with pytest.raises(ValueError, match="one untuned fidelity per round"):
        forward_transfer([None, 0.1], [0.1])


# ---- sequence task specs -----------------------------------------------------------------------------------------
def test_builtin_sequences():
    spec = load_task("sequence")
    assert spec.family == "sequence" and spec.carry == "continue" and spec.default_instance == "mixed"
    assert [r.label for r in spec.rounds()] == ["concept:zorb", "style:dotted", "concept:kwel", "style:checkered"]
    assert [r.label for r in spec.rounds("concepts")] == ["concept:zorb", "concept:kwel", "concept:fenx",
                                                          "concept:drup"]
    for r in spec.rounds():  # every round is an instance the shipped tasks really have
        assert r.instance in r.spec().instances


@pytest.mark.parametrize("body, error, match", [
    ("instances: {s: [concept:zorb, concept:zrob]}", UnknownNameError, "did you mean 'zorb'"),
    ("instances: {s: [concept:zorb, concept:zorb]}", TaskError, "repeats concept:zorb"),
    ("instances: {s: [concept:zorb]}", TaskError, "at least two rounds"),
    ("instances: {s: [concept:zorb, zorb]}", TaskError, "task:instance"),
    ("instances: {s: [concept:zorb, sequence:mixed]}", TaskError, "is itself a sequence"),
    ("instances: {s: [concept:zorb, style:dotted]}\ncarry: fold", TaskError, "carry must be one of"),
    ("instances: {s: [concept:zorb, style:dotted]}\nrounds: 3", UnknownNameError, "key in task"),
])
def test_bad_sequences_are_one_clear_error(tmp_path, body, error, match):
    path = tmp_path / "seq.yaml"
    path.write_text(f"family: sequence\n{body}\n")
    with pytest.raises(error, match=match):
        load_task(str(path))


# ---- sequence runs on the fake backbone --------------------------------------------------------------------------
TINY = """\
family: {family}
source: world
instances: {instances}
n_train: 4
eval_prompts: {{count: 4}}
n_samples: 4
eval_seeds: {{range: [0, 4]}}
retention_prompts: {{count: 4}}
n_retention: 4
retention_seeds: {{range: [100000, 4]}}
"""


@pytest.fixture
def sequence_task(tmp_path) -> str:
    (tmp_path / "tiny_concept.yaml").write_text(TINY.format(family="concept", instances="[zorb, kwel]"))
    (tmp_path / "tiny_style.yaml").write_text(TINY.format(family="style", instances="[dotted, checkered]"))
    path = tmp_path / "tiny_seq.yaml"
    path.write_text("family: sequence\ninstances:\n  four: [tiny_concept.yaml:zorb, tiny_style.yaml:dotted, "
                    "tiny_concept.yaml:kwel, tiny_style.yaml:checkered]\n")
    return str(path)


@pytest.fixture
def fakes(monkeypatch):
    """The fake backbone and scorer of the runner tests; fidelity on earlier instances scored the same way."""
    calls: list = []
    loads: list = []
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: loads.append(cfg) or FakeBackbone())
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *args: None)
    evaluate = fake_evaluate(calls)
    monkeypatch.setattr(runner, "_evaluate", evaluate)
    monkeypatch.setattr(continual, "score_fidelity",
                        lambda backbone, data, method, features, batch_size=None: evaluate(
                            backbone, data, method, features, None, {})["fidelity"])
    return {"evaluate": calls, "loads": loads}


def counting_train(monkeypatch, fail_in_round: int | None = None) -> list:
    """Wrap the loop: count its calls (one per trained round) and optionally fail inside a round, after its steps
    ran and before it is finished (as a kill would)."""
    calls: list = []
    real = continual.train

    def train(method, backbone, batch, cfg, run_dir, **kw):
        calls.append(Path(run_dir).name)
        out = real(method, backbone, batch, cfg, run_dir, **kw)
        if len(calls) == fail_in_round:
            raise RuntimeError("killed in the middle of a round")
        return out

    monkeypatch.setattr(continual, "train", train)
    return calls


def seq_cfg(task: str, out: Path, **kw) -> RunConfig:
    base = {"method": "sft", "task": task, "backbone": "fake", "steps": 3, "batch_size": 2, "out_dir": str(out),
            "device": "cpu", "lr": 0.05}
    return RunConfig(**(base | kw))


def without_timings(result: dict) -> dict:
    """The result without what the clock measures (timings, training seconds)."""
    rounds = [{k: v for k, v in r.items() if k != "timings"} | {"cost": {k: v for k, v in r["cost"].items()
                                                                          if k != "train_seconds"}}
              for r in result["rounds"]]
    per_round = [{k: v for k, v in r.items() if k != "cumulative_train_s"} for r in result["sequence"]["per_round"]]
    return {"rounds": rounds, "sequence": result["sequence"] | {"per_round": per_round}, "metrics": result["metrics"]}


def test_a_sequence_run_scores_every_learned_instance_after_every_round(tmp_path, sequence_task, fakes, capsys):
    run_dir = runner.run_cell(seq_cfg(sequence_task, tmp_path / "runs"))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["schema_version"] == 2 and result["family"] == "sequence" and result["instance"] == "four"
    labels = ["tiny_concept:zorb", "tiny_style:dotted", "tiny_concept:kwel", "tiny_style:checkered"]
    seq = result["sequence"]
    assert seq["rounds"] == labels and seq["carry"] == "continue" and seq["replay"] is False
    matrix = seq["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3, 4]
    for i, rec in enumerate(result["rounds"]):
        assert rec["round"] == i + 1 and list(rec["fidelity"]) == labels[:i + 1]
        assert rec["fidelity"][labels[i]]["mean"] == rec["metrics"]["fidelity"]["mean"] == matrix[i][i]
        assert (run_dir / rec["adapter"] / "pytorch_lora_weights.safetensors").exists()
        assert rec["training"]["steps_run"] == 3
    assert matrix[1][0] != matrix[0][0]  # round 2 changed the model that round 1 left
    assert seq["acc"] == pytest.approx(average_accuracy(matrix)) == result["metrics"]["acc"]["mean"]
    assert seq["bwt"] == pytest.approx(backward_transfer(matrix))
    assert seq["forgetting"] == pytest.approx(forgetting(matrix))
    # forward transfer: round i also scored round i+1's instance, and each round the untuned model on its own
    before, untuned = seq["fidelity_before"], seq["fidelity_untuned"]
    assert before[0] is None and all(isinstance(v, float) for v in before[1:] + untuned)
    for i, rec in enumerate(result["rounds"]):
        ahead = rec["next_fidelity"]
        assert (ahead is None) if i == 3 else (ahead["label"] == labels[i + 1] and ahead["mean"] == before[i + 1])
        assert rec["untuned_fidelity"]["mean"] == untuned[i]
    assert seq["fwt"] == pytest.approx(forward_transfer(before, untuned)) == result["metrics"]["fwt"]["mean"]
    assert seq["fwt"] != 0.0  # the tuned adapter samples differently from the untuned model
    assert [r["fwt"] is None for r in seq["per_round"]] == [True, False, False, False]
    cumulative = [r["cumulative_train_s"] for r in seq["per_round"]]
    assert cumulative == sorted(cumulative) and result["timings"]["train_s"] == cumulative[-1] > 0
    assert result["metrics"]["retention_fd_ratio"]["mean"] == 1.0  # the last round's drift, at the top
    assert (run_dir / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "teacher.png").read_bytes()[:4] == b"\x89PNG"  # the last round's references and teachers
    out = " ".join(capsys.readouterr().out.split())
    assert "fidelity on instance j after round i" in out and "j=4" in out
    assert "ACC" in out and "BWT" in out and "forgetting" in out and "FWT" in out and "untuned" in out
    # 4 full scorings (one per round); the earlier instances are scored by score_fidelity (1 + 2 + 3 calls) and
    # the next round's instance once after each round but the last (3 calls)
    assert sum(1 for m in fakes["evaluate"] if not isinstance(m, runner._CachedUntuned)) == 4 + 6 + 3
    assert sum(1 for m in fakes["evaluate"] if isinstance(m, runner._CachedUntuned)) >= 4  # one per instance


@pytest.mark.parametrize("carry", ["continue", "merge"])
def test_the_untuned_model_transfers_nothing_forward(tmp_path, sequence_task, fakes, carry):
    run_dir = runner.run_cell(seq_cfg(sequence_task, tmp_path / "runs", method="base", overrides={"carry": carry}))
    seq = json.loads((run_dir / "result.json").read_text())["sequence"]
    assert seq["fwt"] == 0.0 and seq["fidelity_before"][1:] == seq["fidelity_untuned"][1:]


@pytest.mark.parametrize("carry", ["continue", "merge"])
def test_a_killed_sequence_resumes_at_its_unfinished_round(tmp_path, sequence_task, fakes, monkeypatch, carry):
    overrides = {"carry": carry}
    whole = runner.run_cell(seq_cfg(sequence_task, tmp_path / "a", overrides=overrides))
    expected = json.loads((whole / "result.json").read_text())

    counting_train(monkeypatch, fail_in_round=3)
    cfg = seq_cfg(sequence_task, tmp_path / "b", overrides=overrides)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run_cell(cfg)
    run_dir = cfg.run_dir()
    assert not (run_dir / "result.json").exists()  # kept (two rounds are finished), but not complete
    finished = sorted(p.parent.name for p in run_dir.glob("rounds/*/round.json"))
    assert finished == ["01-tiny_concept-zorb", "02-tiny_style-dotted"]
    logs = {name: (run_dir / "rounds" / name / "train_log.jsonl").read_bytes() for name in finished}
    stamps = {name: (run_dir / "rounds" / name / "round.json").stat().st_mtime_ns for name in finished}

    calls = counting_train(monkeypatch)
    assert runner.run_cell(cfg) == run_dir
    assert calls == ["03-tiny_concept-kwel", "04-tiny_style-checkered"]  # rounds 1-2 are not trained again
    for name in finished:
        assert (run_dir / "rounds" / name / "train_log.jsonl").read_bytes() == logs[name]
        assert (run_dir / "rounds" / name / "round.json").stat().st_mtime_ns == stamps[name]
    resumed = json.loads((run_dir / "result.json").read_text())
    assert without_timings(resumed) == without_timings(expected)  # the same seed ends where it would have


def test_merge_equals_continue_in_the_first_round(tmp_path, sequence_task, fakes):
    results = {}
    for carry in ("continue", "merge"):
        run_dir = runner.run_cell(seq_cfg(sequence_task, tmp_path / carry, overrides={"carry": carry}))
        results[carry] = without_timings(json.loads((run_dir / "result.json").read_text()))
        assert (run_dir / "teacher.png").read_bytes()[:4] == b"\x89PNG", carry
    first = [{k: v for k, v in r["rounds"][0].items() if k not in ("carry", "adapter")} for r in results.values()]
    assert first[0] == first[1]
    matrices = [r["sequence"]["accuracy_matrix"] for r in results.values()]
    assert matrices[0][0] == matrices[1][0]
    assert matrices[0][1] != matrices[1][1]  # from round 2 on, a fresh adapter on merged weights trains differently


def test_merging_an_adapter_keeps_the_model_and_frees_its_name():
    bb = FakeBackbone()
    bb.add_lora("student", rank=4)
    bb.add_lora("teacher", rank=4)
    with torch.no_grad():
        for p in bb.lora_parameters("student"):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, sigma, cond = torch.randn(3, 3, 4, 4), torch.rand(3), bb.encode_prompts(["a b", "c", "d e f"])
    bb.set_adapter("student")
    before = bb.predict_velocity(x, sigma, cond)
    continual.merge_adapter(bb, "student")
    continual.drop_adapters(bb)
    assert not any("lora_" in n for n, _ in bb.denoiser.named_parameters())
    torch.testing.assert_close(bb.predict_velocity(x, sigma, cond), before)
    bb.add_lora("student", rank=4)  # a fresh adapter (B = 0) under the same name: the merged model unchanged
    torch.testing.assert_close(bb.predict_velocity(x, sigma, cond), before)


@pytest.mark.parametrize("teacher", ["ema", "frozen"])
def test_dopsd_teacher_across_rounds(teacher):
    """carry=continue: the EMA teacher goes on from where the last round left it; `frozen` is the model at the
    start of the round (a copy of the carried student)."""
    from dopsd_bench.registry import METHODS

    bb = FakeBackbone()
    batch = Batch(images=torch.zeros(2, 3, 16, 16), captions=["a", "b"], token="a")
    first = METHODS.get("dopsd")(METHODS.get("dopsd").Config(teacher=teacher))
    first.setup(bb, batch, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():  # as after a round of training: student and teacher apart
        for s, t in zip(first.student_params, first.teacher_params, strict=True):
            s.add_(1.0)
            t.add_(0.5)
    teacher_before = [t.detach().clone() for t in first.teacher_params]
    second = METHODS.get("dopsd")(METHODS.get("dopsd").Config(teacher=teacher))
    second.setup(bb, batch, 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(second.student_params, first.student_params, strict=True))
    expected = teacher_before if teacher == "ema" else [s.detach() for s in second.student_params]
    assert all(torch.equal(t, e) for t, e in zip(second.teacher_params, expected, strict=True))


@pytest.mark.parametrize("kw, match", [
    ({"method": "sft-full"}, "cannot be tuned round after round"),
    ({"method": "icl"}, "cannot be tuned round after round"),
    ({"overrides": {"carry": "fold"}}, "carry='fold'"),
    ({"overrides": {"replay": "maybe"}}, "replay='maybe' is not a boolean"),
    ({"overrides": {"techer": "ema"}, "method": "dopsd"}, "did you mean 'teacher'"),
])
def test_bad_sequence_settings_fail_before_loading_anything(tmp_path, sequence_task, fakes, kw, match):
    with pytest.raises(ConfigError, match=match):
        runner.run_cell(seq_cfg(sequence_task, tmp_path / "runs", **kw))
    assert fakes["loads"] == [] and not (tmp_path / "runs").exists()


def test_replay_trains_a_round_on_every_earlier_round_too(tmp_path, sequence_task, fakes, monkeypatch):
    sizes: list[int] = []
    real = continual.train
    monkeypatch.setattr(continual, "train", lambda method, backbone, batch, *a, **k: sizes.append(
        batch.images.shape[0]) or real(method, backbone, batch, *a, **k))
    runner.run_cell(seq_cfg(sequence_task, tmp_path / "runs", overrides={"replay": "true"}))
    assert sizes == [4, 8, 12, 16]  # n_train 4 per round, and every earlier round's set


def test_sequence_and_version_1_results_load_in_the_store(tmp_path, sequence_task, fakes):
    from dopsd_bench import rundir
    from dopsd_bench.store import load_results

    out = tmp_path / "runs"
    run_dir = runner.run_cell(seq_cfg(sequence_task, out))
    old = json.loads((run_dir / "result.json").read_text())
    old = {k: v for k, v in old.items() if k not in ("rounds", "sequence")} | {"schema_version": 1, "seed": 7}
    rundir.atomic_write_json(out / "old" / "result.json", old)
    assert rundir.is_complete(out / "old")  # a finished version-1 cell stays finished (skipped, not re-run)
    res = load_results(out)
    assert not res.skipped and sorted(res.cells["seed"]) == [0, 7]
    means = res.summary[res.summary["seed"] == 0].set_index("metric")["mean"]
    result = json.loads((run_dir / "result.json").read_text())
    for name in ("acc", "bwt", "forgetting"):
        assert means[name] == pytest.approx(result["sequence"][name])


def test_untuned_samples_are_cached_in_the_batches_scoring_reads(tmp_path, sequence_task):
    """After merging, the untuned model is read only from the cache, in batches of the eval batch size: the cache
    must hold those batches, or a sequence with more evaluation prompts than one batch stops in round 2."""
    from dopsd_bench.metrics.evaluate import _in_batches

    backbone = FakeBackbone()
    data = load_task(str(tmp_path / "tiny_style.yaml")).build("dotted", 0, resolution=backbone.resolution)
    runner._prefill_untuned(backbone, data, tmp_path / "cache", batch_size=2)
    merged = runner._CachedUntuned(backbone, tmp_path / "cache", weights_changed=True)  # refuses to sample
    images = _in_batches(lambda p, s, _: merged.sample(p, s), data.eval_prompts, data.eval_seeds, None, 2)
    assert images.shape[0] == len(data.eval_prompts) == 4
    tuned = runner.build_method("base", {})
    tuned.backbone = backbone
    rows = runner._grid_rows(tuned, runner._Recorder(tuned), backbone, data, tmp_path / "cache", True, batch_size=2)
    assert torch.equal(rows[1], images)  # samples.png's untuned row, from the same cached batches
