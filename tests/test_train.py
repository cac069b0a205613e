"""The shared training loop: budget validation, loss log, checkpoints, bit-exact resume, non-training methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import FakeBackbone, FakeBase, FakeEMA, FakeSFT, fake_batch

from dopsd_bench.train import (
    DEFAULT_BUDGET,
    TrainConfig,
    checkpoint_dirs,
    minibatch_indices,
    train,
)


def lora_state(backbone: FakeBackbone) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if "lora_" in n}


def small(**kw) -> TrainConfig:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-2, "rank": 2, "checkpoint_every": 2, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)


def test_defaults_come_from_default_budget():
    cfg = TrainConfig()
    assert cfg.budget() == DEFAULT_BUDGET


@pytest.mark.parametrize("bad", [{"steps": -1}, {"batch_size": 0}, {"lr": 0.0}, {"rank": 0},
                                 {"grad_clip": -1.0}, {"warmup": -2}, {"checkpoint_every": -1}])
def test_config_rejects_bad_values(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        TrainConfig(**bad)


def test_minibatch_indices():
    g = torch.Generator().manual_seed(0)
    idx = minibatch_indices(6, 4, g)
    assert len(set(idx.tolist())) == 4 and max(idx.tolist()) < 6  # without replacement when possible
    idx = minibatch_indices(3, 8, g)
    assert idx.shape == (8,) and max(idx.tolist()) < 3


def test_loss_logged_and_params_move(tmp_path):
    bb = FakeBackbone()
    method = FakeSFT()
    timings = train(method, bb, fake_batch(), small(steps=3, checkpoint_every=0), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(set(r) >= {"step", "loss", "lr", "time"} and r["loss"] > 0 for r in lines)
    assert timings["steps_run"] == 3 and timings["train_s"] >= timings["step_s"] * 3 > 0
    assert timings["final_loss"] == lines[-1]["loss"]
    # lora_B starts at zero; training must have moved it
    assert any(p.abs().sum() > 0 for n, p in lora_state(bb).items() if "lora_B.student" in n)
    assert checkpoint_dirs(tmp_path) == []


def test_warmup_schedule_logged(tmp_path):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=3, warmup=2, lr=0.1, checkpoint_every=0), tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.1, 0.1])


def test_checkpoints_written_and_only_newest_kept(tmp_path):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=5, checkpoint_every=2), tmp_path)
    ckpts = checkpoint_dirs(tmp_path)
    # every 2 steps and at the last one; older ones pruned
    assert [c.name for c in ckpts] == ["step_000005"]
    state = torch.load(ckpts[0] / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["optimizer"]["state"]
    assert (ckpts[0] / "rng_0.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


@pytest.mark.parametrize("method_cls", [FakeSFT, FakeEMA])
def test_resume_is_bit_exact(tmp_path, method_cls):
    cfg = small(steps=4, checkpoint_every=2, warmup=3)
    straight = FakeBackbone()
    train(method_cls(), straight, fake_batch(), cfg, tmp_path / "a")

    # 2 steps, then a new process (fresh model + method) resumes to 4
    first = FakeBackbone()
    train(method_cls(), first, fake_batch(), small(steps=2, checkpoint_every=2, warmup=3), tmp_path / "b")
    resumed_bb, resumed = FakeBackbone(), method_cls()
    t = train(resumed, resumed_bb, fake_batch(), cfg, tmp_path / "b", resume=True)
    assert t["start_step"] == 2 and t["steps_run"] == 2

    a, b = lora_state(straight), lora_state(resumed_bb)
    assert a.keys() == b.keys() and any("teacher" in k for k in a) == (method_cls is FakeEMA)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if method_cls is FakeEMA:
        assert resumed.calls == 4  # method state came back with the checkpoint
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2, checkpoint_every=2), tmp_path)
    # a crash after step 3 was logged but before it was checkpointed
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0, "lr": 0.0, "time": 0.0}) + "\n")
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=4, checkpoint_every=2), tmp_path, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and 9.0 not in [r["loss"] for r in rows]


def test_resume_without_checkpoint_starts_fresh_and_fresh_start_clears(tmp_path):
    t = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path, resume=True)
    assert t["start_step"] == 0 and checkpoint_dirs(tmp_path)
    t = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=1, checkpoint_every=0), tmp_path)
    assert t["start_step"] == 0 and checkpoint_dirs(tmp_path) == []
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 1


def test_resume_starts_over_from_a_checkpoint_written_on_other_weights(tmp_path, capsys):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path)
    rebuilt = FakeBackbone()
    rebuilt.model_id = "fake-rebuilt"
    t = train(FakeSFT(), rebuilt, fake_batch(), small(steps=4), tmp_path, resume=True)
    assert t["start_step"] == 0 and t["steps_run"] == 4
    assert "was written on fake-0, not fake-rebuilt: starting over" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the old run's log lines are gone
    # the same weights still resume
    t = train(FakeSFT(), rebuilt, fake_batch(), small(steps=6), tmp_path, resume=True)
    assert t["start_step"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupt_checkpoint_is_named_removed_and_training_starts_over(tmp_path, capsys, damage):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path)
    (ckpt,) = checkpoint_dirs(tmp_path)
    state = ckpt / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "flip":  # bit rot: readable, not what was written
        data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data[: len(data) // 3]) if damage == "truncate" else b"" if damage == "empty"
                      else bytes(data))
    straight = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=4), tmp_path / "straight")
    t = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=4), tmp_path, resume=True)
    assert t["start_step"] == 0 and t["final_loss"] == straight["final_loss"]  # a clean start, as if fresh
    out = capsys.readouterr().out
    assert f"checkpoint {ckpt}" in out and "removing it and training from the start" in out
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_000004"]


def test_resuming_from_the_final_checkpoint_keeps_the_training_record(tmp_path):
    first = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path)
    again = train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path, resume=True)
    assert again["steps_run"] == 0 and again["final_loss"] == first["final_loss"]
    assert again["step_s"] == pytest.approx(first["step_s"], rel=0.5) and again["step_s"] > 0


def test_resume_with_changed_budget_is_refused(tmp_path):
    train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=2), tmp_path)
    with pytest.raises(ValueError, match="budget changed"):
        train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=4, lr=0.5), tmp_path, resume=True)
    with pytest.raises(ValueError, match="past --steps"):
        train(FakeSFT(), FakeBackbone(), fake_batch(), small(steps=1), tmp_path, resume=True)


def test_method_without_training_skips_the_loop(tmp_path):
    method = FakeBase()
    t = train(method, FakeBackbone(), fake_batch(), small(), tmp_path)
    assert t["steps_run"] == 0 and method.backbone is not None
    assert not (tmp_path / "train_log.jsonl").exists()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    class Exploding(FakeSFT):
        def loss(self, batch, generator):
            return super().loss(batch, generator) * float("nan")

    with pytest.raises(FloatingPointError, match="lower --lr"):
        train(Exploding(), FakeBackbone(), fake_batch(), small(), tmp_path)
