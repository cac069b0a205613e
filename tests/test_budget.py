"""Budgets in cost: a FLOP budget becomes steps (one step counted once), a wall-seconds budget stops the loop after the
step that reaches it (resume continues its clock), bad budgets are one line and exit 2, and the cost spent reaches
result.json and the store's table. Tiny fakes (tests/helpers_train.py) and a fake clock keep it fast and exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import FakeBackbone, FakeSFT, fake_batch
from synth_runs import make_result, write_run
from test_cli import assert_user_error, fake_runner, invoke  # noqa: F401 -- fake_runner is a fixture
from test_runner import TINY_WORLD_TASK, cfg_for, fake_evaluate

from dopsd_bench import flow, runner
from dopsd_bench import train as train_module
from dopsd_bench.errors import ConfigError
from dopsd_bench.method import Batch
from dopsd_bench.runconfig import RunConfig
from dopsd_bench.store import budget_label, load_results
from dopsd_bench.train import TrainConfig, checkpoint_dirs, minibatch_indices, seed_for, train


def small(**kw) -> TrainConfig:
    base = {"batch_size": 4, "lr": 1e-2, "rank": 2, "checkpoint_every": 0, "seed": 3}
    return TrainConfig(**{**base, **kw})


def registered(name: str):
    return runner.build_method(name, {})


def log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# ---- FLOPs ----------------------------------------------------------------------------------------------------
def test_recorded_flops_per_step_are_what_the_flop_counter_measures_on_one_step(tmp_path):
    cfg = small(steps=3)
    spent = train(registered("sft"), FakeBackbone(), fake_batch(), cfg, tmp_path)
    # the same step measured here by hand: a fresh model and method, one loss_and_backward under the counter
    method, batch = registered("sft"), fake_batch()
    method.setup(FakeBackbone(), batch, cfg.rank, torch.Generator().manual_seed(0))
    idx = minibatch_indices(len(batch.captions), cfg.batch_size, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        method.loss_and_backward(Batch(images=batch.images[idx], captions=[batch.captions[i] for i in idx]),
                                 torch.Generator().manual_seed(seed_for(cfg.seed, "loss")))
    assert spent["flops_per_step"] == counter.get_total_flops() > 0
    assert spent["train_flops"] == 3 * spent["flops_per_step"] and spent["train_steps"] == 3


class CachingBackbone(FakeBackbone):
    """Prompts encoded through a matmul (counted FLOPs) once each, then cached, as the real backbones do."""

    def __init__(self):
        super().__init__()
        self.cache: dict[str, torch.Tensor] = {}
        self.encoder = torch.randn(64, 64)

    def encode_prompts(self, prompts):
        for p in dict.fromkeys(p for p in prompts if p not in self.cache):
            self.cache[p] = torch.randn(1, 64) @ self.encoder
        return super().encode_prompts(prompts)


def test_the_count_is_a_steady_step_whatever_the_prompt_cache_holds():
    from dopsd_bench.cost import step_flops

    bb, batch = CachingBackbone(), fake_batch()
    method = registered("sft")
    method.setup(bb, batch, 2, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as cold:  # a first step encodes its captions
        method.loss_and_backward(batch, torch.Generator().manual_seed(1))
    counted_warm = step_flops(method, batch)
    with FlopCounterMode(display=False) as warm:  # every later step finds them cached
        method.loss_and_backward(batch, torch.Generator().manual_seed(1))
    fresh = registered("sft")
    fresh.setup(CachingBackbone(), batch, 2, torch.Generator().manual_seed(0))
    counted_cold = step_flops(fresh, batch)  # counted before any step has filled the cache
    assert counted_cold == counted_warm == warm.get_total_flops() < cold.get_total_flops()


class GlobalNoiseSFT(FakeSFT):
    """Flow matching with its noise drawn from torch's global RNG (as a method may), which the count must not move."""

    def loss(self, batch, generator):
        bb = self.backbone
        x0 = bb.encode_images(batch.images)
        eps, sigma = torch.randn(x0.shape), torch.rand(x0.shape[0])
        v = bb.predict_velocity(flow.add_noise(x0, eps, sigma), sigma, bb.encode_prompts(batch.captions))
        return torch.nn.functional.mse_loss(v, flow.velocity_target(x0, eps))


def test_counting_a_step_leaves_training_unchanged(tmp_path, monkeypatch):
    """The count runs a step's forward and backward before training: RNG and gradients must come out as they went in,
    so a run trains the same weights as it would without the count."""
    counted_bb, plain_bb = FakeBackbone(), FakeBackbone()
    train(GlobalNoiseSFT(), counted_bb, fake_batch(), small(steps=3), tmp_path / "a")
    monkeypatch.setattr(train_module, "step_flops", lambda method, batch, generator: 1)
    train(GlobalNoiseSFT(), plain_bb, fake_batch(), small(steps=3), tmp_path / "b")
    for (name, p), q in zip(counted_bb.denoiser.named_parameters(), plain_bb.denoiser.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_flop_budget_stops_sft_and_dopsd_at_the_same_flops_within_one_step(tmp_path, capsys):
    per_step = {}
    for name in ("sft", "dopsd"):
        per_step[name] = train(registered(name), FakeBackbone(), fake_batch(), small(steps=1), tmp_path / name)[
            "flops_per_step"]
    assert per_step["dopsd"] > 1.5 * per_step["sft"]  # a roll-out step costs more: the budget buys fewer steps
    budget = 5.5 * per_step["dopsd"]
    spent = {}
    for name in ("sft", "dopsd"):
        run_dir = tmp_path / f"budget-{name}"
        spent[name] = train(registered(name), FakeBackbone(), fake_batch(), small(budget_flops=budget), run_dir)
        s = spent[name]
        assert s["flops_per_step"] == per_step[name]
        assert s["train_steps"] == int(budget // per_step[name]) == len(log_steps(run_dir))
        assert s["train_flops"] <= budget < s["train_flops"] + s["flops_per_step"]  # within one step's cost
        assert f"{s['train_steps']} steps" in capsys.readouterr().out  # the conversion is said in the log
    assert spent["sft"]["train_steps"] > spent["dopsd"]["train_steps"] == 5
    assert abs(spent["sft"]["train_flops"] - spent["dopsd"]["train_flops"]) < max(per_step.values())


def test_a_flop_budget_below_one_step_trains_one_step(tmp_path):
    spent = train(FakeSFT(), FakeBackbone(), fake_batch(), small(budget_flops=1.0), tmp_path)
    assert spent["train_steps"] == 1 and spent["train_flops"] == spent["flops_per_step"] > 1.0


# ---- wall seconds ---------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class OneSecondSFT(FakeSFT):
    """Each loss call takes exactly one second of the fake clock; `crash_after` raises after that optimiser step."""

    def __init__(self, clock: FakeClock, crash_after: int | None = None):
        super().__init__()
        self.clock, self.crash_after = clock, crash_after

    def loss(self, batch, generator):
        self.clock.now += 1.0
        return super().loss(batch, generator)

    def after_step(self, step: int) -> None:
        if step == self.crash_after:
            raise KeyboardInterrupt


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(train_module, "clock", fake)
    return fake


def test_a_seconds_budget_stops_after_the_step_that_reaches_it(tmp_path, clock):
    cfg = small(steps=None, budget_seconds=3.5, checkpoint_every=2)
    spent = train(OneSecondSFT(clock), FakeBackbone(), fake_batch(), cfg, tmp_path)
    # steps 1-3 end at 1, 2, 3 s (under 3.5); step 4 ends at 4 s and is the last: the budget held within one step
    assert spent["train_steps"] == 4 == len(log_steps(tmp_path)) and spent["train_seconds"] == 4.0
    assert spent["train_seconds"] - 3.5 < spent["step_s"] == 1.0  # the FLOP count before the loop is not counted
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_000004"]  # the last step is checkpointed


def test_a_resumed_seconds_budget_continues_the_clock_of_its_checkpoint(tmp_path, clock):
    whole_bb = FakeBackbone()
    whole = train(OneSecondSFT(clock), whole_bb, fake_batch(), small(budget_seconds=5.5), tmp_path / "whole")
    assert whole["train_steps"] == 6
    cfg = small(budget_seconds=5.5, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):  # killed during step 5: its checkpoint is at step 4, 4 s spent
        train(OneSecondSFT(clock, crash_after=5), FakeBackbone(), fake_batch(), cfg, tmp_path / "cut")
    resumed_bb = FakeBackbone()
    resumed = train(OneSecondSFT(clock), resumed_bb, fake_batch(), cfg, tmp_path / "cut", resume=True)
    assert resumed["start_step"] == 4 and resumed["steps_run"] == 2 and resumed["train_steps"] == 6
    assert resumed["train_seconds"] == 6.0  # the lost step 5 is run again, its first run is not counted
    for p, q in zip(whole_bb.denoiser.parameters(), resumed_bb.denoiser.parameters(), strict=True):
        assert torch.equal(p, q)  # the same steps as the uninterrupted run
    again = train(OneSecondSFT(clock), FakeBackbone(), fake_batch(), cfg, tmp_path / "cut", resume=True)
    assert again["steps_run"] == 0 and again["train_steps"] == 6  # a spent budget trains no further


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kw", "match"), [
    ({"budget_flops": -1.0}, "budget_flops"), ({"budget_seconds": 0}, "budget_seconds"),
    ({"budget_flops": float("nan")}, "budget_flops"), ({"budget_seconds": True}, "budget_seconds"),
    ({"steps": 5, "budget_flops": 1e12}, "one unit"), ({"budget_flops": 1e12, "budget_seconds": 10}, "one unit"),
])
def test_run_config_refuses_bad_budgets(kw, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(method="sft", task="style", **kw)
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(budget_flops=1e12, budget_seconds=1.0)
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=None)  # no length at all


@pytest.mark.parametrize(("args", "needle"), [
    (["--budget-flops", "-1"], "budget_flops"),
    (["--budget-seconds", "0"], "budget_seconds"),
    (["--budget-seconds", "inf"], "budget_seconds"),
    (["--steps", "5", "--budget-flops", "2e13"], "--budget-flops"),
    (["--budget-flops", "2e13", "--budget-seconds", "120"], "one unit"),
])
def test_bad_budget_through_the_cli_is_one_line_and_exit_2(fake_runner, tmp_path, args, needle):  # noqa: F811
    assert_user_error(invoke("run", "--method", "sft", "--task", "style", "--out", str(tmp_path), *args), needle)
    assert fake_runner == []


def test_a_budget_in_cost_reaches_the_run_config(fake_runner, tmp_path):  # noqa: F811
    result = invoke("run", "--method", "sft", "--task", "style", "--out", str(tmp_path), "--budget-flops", "2e13")
    assert result.exit_code == 0, result.output
    assert fake_runner[0].budget_flops == 2e13 and fake_runner[0].steps is None


def test_sweep_budget_keys_in_cost(tmp_path):
    from dopsd_bench.sweep import SweepSpec, expand, parse_budget

    assert parse_budget("budget_flops=2e13") == {"budget_flops": 2e13}
    spec = SweepSpec(methods=["base", "sft"], tasks=["style:dotted"], out=tmp_path,
                     budgets=[{"budget_flops": 2e13}, {"budget_seconds": 120}])
    configs = [c.run_config() for c in expand(spec)]
    assert {(c.method, c.budget_flops, c.budget_seconds) for c in configs} == {
        ("base", None, None), ("sft", None, 120.0), ("sft", 2e13, None)}  # base trains nothing: one cell for both
    bad = invoke("sweep", "--methods", "sft", "--tasks", "style:dotted", "--out", str(tmp_path), "--dry-run",
                 "--budget", "steps=5,budget_seconds=60")
    assert bad.exit_code == 2 and "one unit" in bad.output and "Traceback" not in bad.output


# ---- the record: result.json and the store --------------------------------------------------------------------
@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: FakeBackbone())
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *args: None)
    monkeypatch.setattr(runner, "_evaluate", fake_evaluate([]))


def test_run_cell_records_the_budget_asked_and_the_cost_spent(tmp_path, fakes):
    task = tmp_path / "tiny_style.yaml"
    task.write_text(TINY_WORLD_TASK)
    out = tmp_path / "runs"
    run_dir = runner.run_cell(cfg_for(str(task), out, steps=None, budget_flops=1e6))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["budget"]["budget_flops"] == 1e6 and result["budget"]["steps"] is None
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] is None  # no count it would ignore
    cost = result["cost"]
    assert cost["train_flops"] == cost["train_steps"] * cost["flops_per_step"] <= 1e6
    assert cost["train_steps"] == len(log_steps(run_dir)) >= 1 and cost["train_seconds"] > 0
    base = json.loads((runner.run_cell(cfg_for(str(task), out, method="base")) / "result.json").read_text())
    assert base["cost"] is None  # nothing trained, nothing spent

    res = load_results(out)
    row = res.cells.set_index("method").loc["sft"]
    assert row["train_flops"] == cost["train_flops"] and row["train_seconds"] == pytest.approx(cost["train_seconds"])
    assert row["budget"].startswith("budget_flops=") and row["budget_flops"] == 1e6


def test_budget_labels_of_cost_budgets_are_short_and_step_labels_unchanged():
    assert budget_label({"steps": None, "budget_flops": 1.4e13, "batch_size": 8, "lr": 5e-4, "rank": 8}) == \
        "budget_flops=1.4e+13,batch_size=8,lr=0.0005,rank=8"
    assert budget_label({"steps": None, "budget_seconds": 120.0, "batch_size": 8}) == \
        "budget_seconds=120.0,batch_size=8"
    assert budget_label({"steps": 600, "batch_size": 8, "lr": 5e-4, "rank": 8}) == \
        "steps=600,batch_size=8,lr=0.0005,rank=8"


def test_results_without_a_cost_record_still_load(tmp_path):
    old = make_result("sft", "style", "dotted", 0, {"fidelity": ([0.5, 0.6], None, True)})
    new = make_result("dopsd", "style", "dotted", 0, {"fidelity": ([0.7, 0.8], None, True)})
    new["cost"] = {"train_steps": 10, "train_flops": 3e10, "flops_per_step": 3e9, "train_seconds": 12.5}
    write_run(tmp_path, old)
    write_run(tmp_path, new)
    cells = load_results(tmp_path).cells.set_index("method")
    assert cells.loc["dopsd", "train_flops"] == 3e10 and cells.loc["dopsd", "train_seconds"] == 12.5
    assert cells.loc["sft", ["train_steps", "train_flops", "flops_per_step", "train_seconds"]].isna().all()
