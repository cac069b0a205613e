"""Every method on the real tiny Flux2 backbone (random config, built in-process): configs, one training step each,
D-OPSD's adapters and EMA, and the gradient parity of the optimised D-OPSD step against the released plain loop."""

from __future__ import annotations

import copy

import pytest
import torch

from dopsd_bench.method import Batch, MethodConfig, config_from_overrides
from dopsd_bench.registry import METHODS

ALL = ["base", "sft", "sft-full", "dreambooth", "sft-teacher", "offpolicy", "dopsd", "icl", "base-transfer"]


@pytest.fixture(scope="module")
def tiny():
    from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline

    torch.set_num_threads(2)
    return tiny_flux2_klein_pipeline(0)


def make_backbone(tiny, model_id="tiny"):
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone

    pipe, settings = tiny
    return Flux2KleinBackbone(copy.deepcopy(pipe), settings, model_id, device="cpu")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return Batch(images=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
                 captions=["a red zorb glyph on a blue background", "a small green zorb glyph"], token="zorb")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


# ---- registry and configs ------------------------------------------------------------------------------------
def test_all_methods_registered_with_descriptions():
    described = METHODS.describe()
    for name in ALL:
        assert described.get(name), name
        cls = METHODS.get(name)
        assert issubclass(cls.Config, MethodConfig)
        cls.Config()  # defaults validate


def test_config_from_overrides_converts_by_type():
    cfg = config_from_overrides(METHODS.get("dopsd").Config,
                                {"teacher": "frozen", "ema_decay": "0.99", "k": "2", "state_subset": "none"})
    assert (cfg.teacher, cfg.ema_decay, cfg.k, cfg.state_subset) == ("frozen", 0.99, 2, None)
    cfg = config_from_overrides(METHODS.get("dreambooth").Config, {"class_word": "glyph", "prior_loss_weight": "0.5"})
    assert cfg.class_word == "glyph" and cfg.prior_loss_weight == 0.5
    assert config_from_overrides(METHODS.get("sft").Config, {}) == METHODS.get("sft").Config()


@pytest.mark.parametrize("overrides, message", [
    ({"teachr": "ema"}, "did you mean 'teacher'"),
    ({"teacher": "old"}, "allowed values: ema, frozen, self"),
    ({"ema_decay": "high"}, "not a number"),
    ({"ema_decay": "1.5"}, r"ema_decay must be in \[0, 1\]"),
    ({"k": "0"}, "k must be >= 1"),
    ({"target": "eps"}, "allowed values: x0, velocity"),
])
def test_config_from_overrides_errors_say_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_overrides(METHODS.get("dopsd").Config, overrides)


def test_sft_config_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="allowed values: none, sigma_sqrt, logit_normal, mode, cosmap"):
        config_from_overrides(METHODS.get("sft").Config, {"weighting_scheme": "uniform"})


def test_class_prompts():
    from dopsd_bench.methods.dreambooth import class_prompts

    caps = ["a zorb glyph, red", "zorb on blue", "a zorbish thing"]
    assert class_prompts(caps, "zorb", "glyph") == ["a glyph glyph, red", "glyph on blue", "a zorbish thing"]
    assert class_prompts(caps, "zorb", "") == ["a glyph, red", "on blue", "a zorbish thing"]


def test_sft_sigmas_follow_diffusers_schemes():
    from dopsd_bench.methods.sft import SFTConfig, sample_sigmas

    for scheme in ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap"):
        s = sample_sigmas(SFTConfig(weighting_scheme=scheme), 512, gen())
        assert s.min() >= 1e-3 and s.max() <= 1.0, scheme
    # logit-normal concentrates around sigma = 0.5; uniform does not
    ln = sample_sigmas(SFTConfig(weighting_scheme="logit_normal"), 4096, gen())
    un = sample_sigmas(SFTConfig(weighting_scheme="none"), 4096, gen())
    assert ((ln - 0.5).abs() < 0.25).float().mean() > ((un - 0.5).abs() < 0.25).float().mean() + 0.1


# ---- one step of every method on the tiny backbone ------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_method_runs_one_step_and_samples(name, tiny, batch, monkeypatch):
    from dopsd_bench import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda n, model, device: make_backbone(tiny, model))
    bb = make_backbone(tiny)
    cls = METHODS.get(name)
    method = cls(cls.Config(num_class_images=2) if name == "dreambooth" else None)  # few, for speed
    method.setup(bb, batch, 4, gen())
    if method.trains:
        params = method.trainable_parameters()
        assert params
        before = [p.detach().clone() for p in params]
        loss = method.loss_and_backward(batch, gen(1))
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no gradient reached the params"
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 1e-2 * p.grad
        method.after_step(1)
        method.finish()
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
    images = method.sample(["a red zorb glyph", "a blue square"], [1, 2])
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1


def test_base_transfer_moves_the_base_lora_onto_the_turbo(tiny, batch, monkeypatch):
    from dopsd_bench import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda n, model, device: make_backbone(tiny, model))
    turbo = make_backbone(tiny)
    method = METHODS.get("base-transfer")()
    method.setup(turbo, batch, 4, gen())
    assert method.base is not turbo and method.base.model_id == "glyphworld-base"
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.1)
    method.finish()
    base_lora = {n.replace(".student", ""): p for n, p in method.base.denoiser.named_parameters() if "lora_" in n}
    turbo_lora = {n.replace(".student", ""): p for n, p in turbo.denoiser.named_parameters() if "lora_" in n}
    assert base_lora.keys() == turbo_lora.keys() and base_lora
    for n, p in base_lora.items():
        torch.testing.assert_close(turbo_lora[n], p)


def test_icl_cycles_training_images_as_references(tiny, batch):
    bb = make_backbone(tiny)
    method = METHODS.get("icl")()
    method.setup(bb, batch, 4, gen())
    prompts = ["a red zorb glyph"] * 3
    out = method.sample(prompts, [5, 6, 7])
    refs = batch.images[[0, 1, 0]]
    torch.testing.assert_close(out, bb.sample(prompts, [5, 6, 7], references=refs))


def test_sft_full_trains_every_denoiser_weight(tiny, batch):
    bb = make_backbone(tiny)
    method = METHODS.get("sft-full")()
    method.setup(bb, batch, 4, gen())
    assert len(method.trainable_parameters()) == len(list(bb.denoiser.parameters()))
    assert type(method).default_lr is not None and type(method).default_lr < 1e-4


# ---- D-OPSD --------------------------------------------------------------------------------------------------
def dopsd_method(tiny, batch, name="dopsd", perturb=True, **overrides):
    bb = make_backbone(tiny)
    method = METHODS.get(name)(METHODS.get(name).Config(**overrides))
    method.setup(bb, batch, 4, gen())
    if perturb:  # LoRA B starts at zero, which would make A's gradient zero and the student equal the teacher
        g = gen(7)
        with torch.no_grad():
            for p in method.student_params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return method


def test_dopsd_teacher_adapter_is_frozen_and_gets_no_gradient(tiny, batch):
    method = dopsd_method(tiny, batch)
    teacher = method.teacher_params
    assert teacher and len(teacher) == len(method.student_params)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher}
    method.loss_and_backward(batch, gen(1))
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(p.requires_grad and p.grad is not None for p in method.student_params)


def test_dopsd_teacher_modes_after_step(tiny, batch):
    ema = dopsd_method(tiny, batch, ema_decay=0.5)
    t0 = [p.detach().clone() for p in ema.teacher_params]
    ema.after_step(1)
    for t, before, s in zip(ema.teacher_params, t0, ema.student_params):
        torch.testing.assert_close(t, 0.5 * before + 0.5 * s.detach())
    frozen = dopsd_method(tiny, batch, teacher="frozen")
    t0 = [p.detach().clone() for p in frozen.teacher_params]
    frozen.after_step(1)
    assert all(torch.equal(a, b) for a, b in zip(t0, frozen.teacher_params))
    self_teacher = dopsd_method(tiny, batch, teacher="self")
    assert self_teacher.teacher_params == []


def test_dopsd_loss_is_zero_when_teacher_sees_what_the_student_sees(tiny, batch, monkeypatch):
    method = dopsd_method(tiny, batch, teacher="self")
    bb = method.backbone
    monkeypatch.setattr(bb, "encode_teacher", lambda prompts, images: bb.encode_prompts(prompts))
    assert method.loss(batch, gen(1)).item() == pytest.approx(0.0, abs=1e-12)


def _parity(tiny, batch, name, variants, stochastic=False, **common):
    method = dopsd_method(tiny, batch, name=name, **common)
    method.backbone.stochastic_sampling = stochastic
    params = method.student_params
    reference = method.loss(batch, gen(3))
    reference.backward()
    ref_grads = grads(params)
    assert sum(g.abs().sum() for g in ref_grads) > 0
    for overrides in variants:
        method.config = type(method.config)(**{**common, **overrides})
        for p in params:
            p.grad = None
        value = method.loss_and_backward(batch, gen(3))
        torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-8)
        for g, r in zip(grads(params), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=lambda m, o=overrides: f"{o}: {m}")


# K = 3 with chunks of 2 covers an uneven last chunk
VARIANTS = [{"schedule": "sequential"}, {"schedule": "batched"}, {"schedule": "batched", "chunk": 2}]


def test_dopsd_gradient_parity_with_the_plain_loop(tiny, batch):
    _parity(tiny, batch, "dopsd", VARIANTS, k=3)


def test_dopsd_gradient_parity_velocity_target_and_state_subset(tiny, batch):
    _parity(tiny, batch, "dopsd", VARIANTS[::2], k=3, target="velocity", state_subset=2)


def test_dopsd_gradient_parity_when_the_student_samples_stochastically(tiny, batch):
    _parity(tiny, batch, "dopsd", VARIANTS, stochastic=True, k=3)


def test_dopsd_rolls_out_with_the_students_own_sampler(tiny, batch):
    """A student whose scheduler samples stochastically rolls out as it samples: the states after the first
    step, and so the loss, differ from the Euler roll-out's from the same noise, reproducibly."""
    method = dopsd_method(tiny, batch, k=3)
    euler = method.loss(batch, gen(3)).item()
    method.backbone.stochastic_sampling = True
    stochastic = method.loss(batch, gen(3)).item()
    assert stochastic != pytest.approx(euler, rel=1e-3)
    assert method.loss(batch, gen(3)).item() == stochastic


def test_offpolicy_gradient_parity(tiny, batch):
    _parity(tiny, batch, "offpolicy", VARIANTS[:2], k=3)


def test_dopsd_plain_loop_is_the_released_algorithm(tiny, batch):
    """`loss` written out by hand for K = 2 from the backbone's primitives, as train_dopsd.py does it."""
    from dopsd_bench import flow

    method = dopsd_method(tiny, batch, k=2)
    bb = method.backbone
    g = gen(3)
    value = method.loss(batch, g)
    g = gen(3)
    x = torch.randn((2, *bb.latent_shape()), generator=g)
    cond_s, cond_t = bb.encode_prompts(batch.captions), bb.encode_teacher(batch.captions, batch.images)
    sig = bb.sigmas(2)
    total = 0.0
    for k in range(2):
        s = sig[k].expand(2)
        with torch.no_grad():
            bb.set_adapter("teacher")
            v_t = bb.predict_velocity(x, s, cond_t)
        bb.set_adapter("student")
        v_s = bb.predict_velocity(x, s, cond_s)
        total = total + torch.nn.functional.mse_loss(x - s.view(-1, 1, 1, 1) * v_s, x - s.view(-1, 1, 1, 1) * v_t)
        x = flow.euler_step(x, v_s, sig[k], sig[k + 1]).detach()
    torch.testing.assert_close(value, total / 2, rtol=1e-5, atol=1e-9)


def test_dopsd_state_subset_beyond_the_rollout_is_refused_at_setup(tiny, batch):
    from dopsd_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"state_subset=5 exceeds the roll-out's K = 4 states"):
        dopsd_method(tiny, batch, state_subset=5)
