"""Backbone adapters over the real diffusers pipelines, on tiny random-config models built in-process (no hub).

Each architecture is built, saved with save_pretrained to a temp dir and loaded back through its adapter's
from_pretrained, then checked against the pipeline itself: the adapter's sampler, schedule and latent
normalisation must reproduce the pipeline's own images; the teacher context must reach the DiT; a LoRA must train
only its own parameters and round-trip through the pipeline's load_lora_weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dopsd_bench import flow
from dopsd_bench.backbones.base import cat_conds, index_cond, repeat_cond, step_noise_seed
from dopsd_bench.errors import UserError
from dopsd_bench.registry import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on the left", "a small blue square"]
SEEDS = [3, 11]


def _save_flux2(path: Path) -> None:
    from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline

    pipe, settings = tiny_flux2_klein_pipeline(seed=0)
    pipe.save_pretrained(path)
    (path / "dopsd_bench.json").write_text(json.dumps(settings))


def _save_zimage(path: Path) -> None:
    from dopsd_bench.backbones.tiny import tiny_z_image_pipeline

    pipe, settings, teacher = tiny_z_image_pipeline(seed=0)
    pipe.save_pretrained(path)
    teacher.save_pretrained(path / settings["vl_model"])
    (path / "dopsd_bench.json").write_text(json.dumps(settings))


def _flux2_call(backbone) -> dict:
    s = backbone.settings
    return {"max_sequence_length": s["max_sequence_length"],
            "text_encoder_out_layers": tuple(s["text_encoder_out_layers"])}


def _zimage_call(backbone) -> dict:
    return {"max_sequence_length": backbone.max_sequence_length, "guidance_scale": 0.0}


SPECS = {"flux2-klein": (_save_flux2, _flux2_call), "z-image": (_save_zimage, _zimage_call)}


@pytest.fixture(scope="module", params=sorted(SPECS))
def model_dir(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    SPECS[name][0](path)
    return name, path


def _load(model_dir):
    name, path = model_dir
    return BACKBONES.get(name).from_pretrained(str(path), device="cpu")


def _fresh_pipeline(backbone, path: Path):
    pipe = type(backbone.pipe).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(backbone, pipe) -> torch.Tensor:
    """The pipeline's own generation from the backbone's fixed noise at native steps, in [-1, 1]."""
    call = SPECS[backbone.name][1](backbone)
    out = pipe(prompt=list(PROMPTS), height=backbone.resolution, width=backbone.resolution,
               num_inference_steps=backbone.native_steps, latents=backbone.noise(SEEDS), output_type="pt", **call)
    return out.images * 2 - 1


def _references(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def test_loads_through_registry(model_dir):
    name, path = model_dir
    backbone = _load(model_dir)
    assert backbone.name == name and backbone.model_id.startswith(f"{path}@")  # tagged with a weights digest
    assert backbone.native_steps == json.loads((path / "dopsd_bench.json").read_text())["native_steps"]


def test_generation_matches_pipeline(model_dir):
    """Sampling through the adapter (suite convention) gives the pipeline's own images, deterministically."""
    backbone = _load(model_dir)
    images = backbone.sample(PROMPTS, SEEDS)
    assert images.shape == (2, 3, backbone.resolution, backbone.resolution)
    assert torch.isfinite(images).all()
    assert torch.equal(images, backbone.sample(PROMPTS, SEEDS))
    assert not torch.allclose(images[0], images[1])  # different seeds and prompts, different images

    pipe = _fresh_pipeline(backbone, model_dir[1])
    expected = _pipeline_images(backbone, pipe)
    torch.testing.assert_close(images, expected, atol=2e-4, rtol=0)
    # the schedule the pipeline's scheduler used is the adapter's
    sig = backbone.sigmas(backbone.native_steps)
    torch.testing.assert_close(sig, pipe.scheduler.sigmas.float().cpu())
    assert len(sig) == backbone.native_steps + 1 and sig[0] == 1 and sig[-1] == 0 and (sig.diff() < 0).all()


def test_denoising_a_schedule_tail_continues_the_sample(model_dir):
    """denoise_latents runs any tail of a schedule: stopping half-way and resuming gives the same sample (how
    scripts/diagnose_world.py starts from partially noised latents)."""
    backbone = _load(model_dir)
    cond = backbone.encode_prompts(PROMPTS)
    sig = backbone.sigmas(backbone.native_steps).to(backbone.device)
    half = len(sig) // 2
    mid = backbone.denoise_latents(backbone.noise(SEEDS), cond, sig[: half + 1])
    assert not torch.allclose(mid, backbone.noise(SEEDS))
    resumed = backbone.denoise_latents(mid, cond, sig[half:])
    torch.testing.assert_close(resumed, backbone.sample_latents(cond, SEEDS), atol=1e-6, rtol=0)


def _stochastic_copy(model_dir, tmp_path: Path) -> Path:
    """The saved model with its scheduler's `stochastic_sampling` switched on."""
    name, path = model_dir
    copy = tmp_path / name
    shutil.copytree(path, copy)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "stochastic_sampling": True}))
    return copy


def test_stochastic_sampling_follows_the_scheduler(model_dir, tmp_path):
    """A model whose scheduler samples stochastically is sampled so by its adapter: the same sample for a seed
    whatever its batch, the same after stopping half-way and resuming, and not the Euler sampler's."""
    name, _ = model_dir
    euler = _load(model_dir)
    backbone = BACKBONES.get(name).from_pretrained(str(_stochastic_copy(model_dir, tmp_path)), device="cpu")
    assert backbone.stochastic_sampling and not euler.stochastic_sampling
    assert backbone.model_id.split("@")[1] != euler.model_id.split("@")[1]  # no cached Euler samples are reused
    cond = backbone.encode_prompts(PROMPTS)
    full = backbone.sample_latents(cond, SEEDS)
    torch.testing.assert_close(backbone.sample_latents(cond, SEEDS), full, atol=0, rtol=0)
    alone = backbone.sample_latents(index_cond(cond, slice(1, 2)), SEEDS[1:])
    torch.testing.assert_close(alone, full[1:], atol=1e-5, rtol=0)
    sig = backbone.sigmas(backbone.native_steps).to(backbone.device)
    half = len(sig) // 2
    mid = backbone.denoise_latents(backbone.noise(SEEDS), cond, sig[: half + 1], SEEDS)
    torch.testing.assert_close(backbone.denoise_latents(mid, cond, sig[half:], SEEDS), full, atol=1e-5, rtol=0)
    assert (full - euler.sample_latents(euler.encode_prompts(PROMPTS), SEEDS)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one seed per latent"):
        backbone.denoise_latents(backbone.noise(SEEDS), cond, sig)


def test_stochastic_step_is_the_diffusers_schedulers():
    """`Backbone.step` with stochastic sampling is FlowMatchEulerDiscreteScheduler.step(stochastic_sampling=True)
    given the same fresh noise, at every step of a schedule (the last one lands on the x0 prediction)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from helpers_train import FakeBackbone

    backbone = FakeBackbone()
    backbone.stochastic_sampling = True
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *backbone.latent_shape()), generator=gen)
    sig, seed = scheduler.sigmas, 7
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        noise_gen = torch.Generator().manual_seed(step_noise_seed(seed, sig[i + 1]))
        expected = scheduler.step(v, t, x, generator=noise_gen, return_dict=False)[0]
        x = backbone.step(x, v, sig[i], sig[i + 1], [seed])
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert sig[-1] == 0


def test_convention_translation(model_dir):
    """The adapter speaks the suite's flow convention: x0 = x - sigma v, and latents round-trip through the VAE."""
    backbone = _load(model_dir)
    cond = backbone.encode_prompts(PROMPTS)
    x = backbone.noise(SEEDS)
    torch.testing.assert_close(backbone.predict_x0(x, torch.zeros(2), cond), x)
    sigma = torch.full((2,), 0.6)
    v = backbone.predict_velocity(x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    torch.testing.assert_close(backbone.predict_x0(x, sigma, cond), flow.x0_from_velocity(x, v, sigma))
    latents = backbone.encode_images(_references(2, 0))
    assert latents.shape == (2, *backbone.latent_shape())
    assert backbone.decode_latents(latents).shape == (2, 3, backbone.resolution, backbone.resolution)


def test_teacher_context_reaches_the_dit(model_dir):
    backbone = _load(model_dir)
    x, sigma = backbone.noise(SEEDS), torch.full((2,), 0.8)
    text = backbone.encode_prompts(PROMPTS)
    teacher_a = backbone.encode_teacher(PROMPTS, _references(2, 0))
    teacher_b = backbone.encode_teacher(PROMPTS, _references(2, 1))
    v_text = backbone.predict_velocity(x, sigma, text)
    v_a = backbone.predict_velocity(x, sigma, teacher_a)
    v_b = backbone.predict_velocity(x, sigma, teacher_b)
    assert v_a.shape == v_text.shape and torch.isfinite(v_a).all()
    assert (v_a - v_text).abs().max() > 1e-4  # the teacher's view is not the text-only view
    assert (v_a - v_b).abs().max() > 1e-4  # and the image itself, not only a template, reaches the DiT
    # conds are batch-first dicts: slicing, repeating and concatenating them keeps per-sample predictions
    both = cat_conds([repeat_cond(index_cond(teacher_a, slice(0, 1)), 2), teacher_b])
    v_both = backbone.predict_velocity(torch.cat([x[:1], x[:1], x]), sigma.repeat(2), both)
    torch.testing.assert_close(v_both[:2], v_a[:1].expand(2, -1, -1, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_both[2:], v_b, atol=1e-5, rtol=1e-4)


def test_lora_trains_only_its_parameters_and_round_trips(model_dir, tmp_path):
    backbone = _load(model_dir)
    cond = backbone.encode_prompts(PROMPTS)
    x0 = backbone.encode_images(_references(2, 0))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.7])
    xt, target = flow.add_noise(x0, eps, sigma), flow.velocity_target(x0, eps)
    base_v = backbone.predict_velocity(xt, sigma, cond)

    backbone.add_lora("student", rank=4, alpha=8)  # alpha != rank: the scale must survive saving
    params = backbone.lora_parameters("student")
    trainable = [p for p in backbone.denoiser.parameters() if p.requires_grad]
    assert params and {id(p) for p in trainable} == {id(p) for p in params}
    torch.testing.assert_close(backbone.predict_velocity(xt, sigma, cond), base_v)  # a fresh LoRA is a no-op
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(backbone.predict_velocity(xt, sigma, cond), target)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in backbone.denoiser.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n and ".student." in n for n in grads)
        assert any(g.abs().sum() > 0 for g in grads.values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    tuned = backbone.sample(PROMPTS, SEEDS)
    backbone.set_adapter(None)
    assert (backbone.sample(PROMPTS, SEEDS) - tuned).abs().max() > 1e-4
    backbone.set_adapter("student")

    backbone.save_lora(tmp_path / "lora", "student")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    # the real pipeline method reads it and gives the same images
    pipe = _fresh_pipeline(backbone, model_dir[1])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_pipeline_images(backbone, pipe), tuned, atol=2e-4, rtol=0)
    # and so does the adapter's own loader
    other = _load(model_dir)
    other.load_lora(tmp_path / "lora", "loaded")
    torch.testing.assert_close(other.predict_velocity(xt, sigma, cond), backbone.predict_velocity(xt, sigma, cond),
                               atol=1e-5, rtol=1e-4)


# ---- z-image: the teacher's VL encoder ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("z-image-teacher")
    _save_zimage(path)
    return path


def test_zimage_teacher_language_model_is_the_text_encoder(zimage_dir):
    backbone = BACKBONES.get("z-image").from_pretrained(str(zimage_dir), device="cpu")
    teacher, text_encoder = backbone.teacher, backbone.pipe.text_encoder
    lm = teacher.model.model.language_model
    assert lm.embed_tokens.weight.data_ptr() == text_encoder.embed_tokens.weight.data_ptr()  # shared, not copied
    assert lm.layers[0].mlp.up_proj.weight is text_encoder.layers[0].mlp.up_proj.weight  # one Parameter, one .grad
    ids = backbone.pipe.tokenizer(["a green triangle"], return_tensors="pt")
    with torch.no_grad():
        want = text_encoder(**ids, output_hidden_states=True).hidden_states[-2]
        got = teacher.model.model(**ids, output_hidden_states=True, use_cache=False).hidden_states[-2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_zimage_teacher_inputs_follow_the_vl_chat_format(zimage_dir):
    backbone = BACKBONES.get("z-image").from_pretrained(str(zimage_dir), device="cpu")
    teacher = backbone.teacher
    inputs = teacher.inputs("a red circle", (_references(1, 0)[0] + 1) / 2)
    n_image = int(inputs["image_grid_thw"][0].prod()) // teacher.image_processor.merge_size ** 2
    n_pad = int((inputs["input_ids"] == teacher.image_token_id).sum())
    assert int(inputs["mm_token_type_ids"].sum()) == n_image == n_pad
    text = teacher.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>a red circle<|im_end|>\n<|im_start|>assistant\n")
    cond = backbone.encode_teacher(["a red circle"], _references(1, 0))
    assert int(cond["prompt_mask"].sum()) == min(inputs["input_ids"].shape[1], backbone.teacher_max_length)


def test_zimage_teacher_encodes_a_batch_as_it_encodes_each_sample_and_passes_gradients(zimage_dir):
    backbone = BACKBONES.get("z-image").from_pretrained(str(zimage_dir), device="cpu")
    teacher = backbone.teacher
    prompts = ["a red circle", "a big blue square at the top left on a striped background", ""]  # unequal lengths
    images = (_references(3, 0) + 1) / 2
    with torch.no_grad():
        batch = teacher.hidden_states(prompts, images, max_length=512)
        alone = [teacher.hidden_states([p], images[i:i + 1], max_length=512)[0] for i, p in enumerate(prompts)]
    assert len({len(b) for b in batch}) == 3  # the padding is dropped again
    for b, a in zip(batch, alone):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    vision = teacher.model.model.visual.requires_grad_(True)
    sum(h.pow(2).sum() for h in teacher.hidden_states(prompts, images, max_length=512)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.patch_embed.parameters())


def test_a_merged_adapter_computes_what_the_active_adapter_does_and_restores_the_weights(model_dir):
    backbone = _load(model_dir)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn((2, *backbone.latent_shape()), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.4, 0.9])
    backbone.add_lora("student", rank=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in backbone.lora_parameters("student"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    before = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters()}
    with torch.no_grad():
        active = backbone.predict_velocity(x, sigma, cond)
        with backbone.merged_adapter("student"):
            folded = backbone.predict_velocity(x, sigma, cond)
        again = backbone.predict_velocity(x, sigma, cond)
    backbone.set_adapter(None)
    with torch.no_grad():
        assert (backbone.predict_velocity(x, sigma, cond) - active).abs().max() > 1e-3  # the adapter does something
    backbone.set_adapter("student")
    torch.testing.assert_close(folded, active, rtol=1e-4, atol=1e-5)  # the same function, up to rounding
    assert torch.equal(again, active)  # the adapter is active again afterwards
    for n, p in backbone.denoiser.named_parameters():
        assert torch.equal(p, before[n]), n  # every weight restored bit for bit


def test_a_second_adapter_is_added_without_a_warning(model_dir):
    import warnings

    backbone = _load(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        backbone.add_lora("student", rank=2)
        backbone.add_lora("teacher", rank=2)


# ---- z-image: the omni teacher (the DiT reads the reference's latents) -------------------------------------------
@pytest.fixture(scope="module")
def zimage_omni_dir(tmp_path_factory) -> Path:
    from dopsd_bench.backbones.tiny import tiny_z_image_pipeline

    path = tmp_path_factory.mktemp("z-image-omni")
    pipe, settings, _ = tiny_z_image_pipeline(seed=0)
    pipe.save_pretrained(path)
    settings = {k: v for k, v in settings.items() if not k.startswith("vl_")} | {"teacher": "omni"}
    (path / "dopsd_bench.json").write_text(json.dumps(settings))
    return path


def test_zimage_omni_teacher_calls_the_dit_as_the_stock_omni_pipeline_does(zimage_omni_dir):
    from diffusers import ZImageOmniPipeline

    backbone = BACKBONES.get("z-image").from_pretrained(str(zimage_omni_dir), device="cpu")
    images = _references(2, 0)
    cond = backbone.encode_teacher(PROMPTS, images)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *backbone.latent_shape()), generator=g)
    sigma = torch.tensor([0.3, 0.8])
    pipe = backbone.pipe
    with torch.no_grad():
        got = backbone.predict_velocity(x, sigma, cond)
        # the omni pipeline's own caption segments and transformer call (ZImageOmniPipeline.__call__)
        segments = ZImageOmniPipeline._encode_prompt(pipe, list(PROMPTS), device="cpu",
                                                     max_sequence_length=backbone.max_sequence_length,
                                                     num_condition_images=1)
        refs = backbone.encode_images(images).unsqueeze(2)
        out = pipe.transformer([[r, xi] for r, xi in zip(refs, x.unsqueeze(2))], 1 - sigma, segments,
                               siglip_feats=[None, None], image_noise_mask=[[0, 1], [0, 1]], return_dict=False)[0]
        want = -torch.stack(out).squeeze(2)
        other = backbone.predict_velocity(x, sigma, backbone.encode_teacher(PROMPTS, images.flip(0)))
        text_only = backbone.predict_velocity(x, sigma, backbone.encode_prompts(PROMPTS))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - other).abs().max() > 1e-3 and (got - text_only).abs().max() > 1e-3  # it reads the reference
    blank = backbone.blank_teacher_cond(2)
    assert set(blank) == set(cond) and blank["ref_latents"].shape == cond["ref_latents"].shape
    with torch.no_grad():
        assert backbone.predict_velocity(x, sigma, blank).shape == x.shape
    assert backbone.reference_encoder() is None


def test_zimage_omni_teacher_trains_the_token_embeddings_and_samples_with_references(zimage_omni_dir):
    backbone = BACKBONES.get("z-image").from_pretrained(str(zimage_omni_dir), device="cpu")
    table = backbone.pipe.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    refs = backbone.reference_inputs(_references(2, 0))
    assert refs.shape == (2, *backbone.latent_shape())  # latents, as the DiT reads them
    x = torch.randn((2, *backbone.latent_shape()), generator=torch.Generator().manual_seed(1))
    cond = backbone.trainable_cond(PROMPTS, refs)
    backbone.predict_velocity(x, torch.tensor([0.5, 0.5]), cond).pow(2).mean().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    images = backbone.sample(PROMPTS, SEEDS, steps=2, references=_references(2, 0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_zimage_refuses_an_unknown_teacher(zimage_omni_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(zimage_omni_dir, path)
    (path / "dopsd_bench.json").write_text(json.dumps(json.loads((path / "dopsd_bench.json").read_text())
                                                      | {"teacher": "siglip"}))
    with pytest.raises(UserError, match="expected one of vl, omni"):
        BACKBONES.get("z-image").from_pretrained(str(path), device="cpu")


def test_plan_reads_an_omni_z_image_model_without_a_vl_model(zimage_omni_dir):
    """No VL model to find for the omni teacher, and its teacher pass is counted on the meta device as it runs."""
    from dopsd_bench.plan import make_plan, teacher_forward_bytes

    plan = make_plan("z-image", str(zimage_omni_dir), "dopsd", "style", batch_size=2, rank=4)
    assert plan.problems == [] and "teacher_vision" not in plan.params
    real = BACKBONES.get("z-image").from_pretrained(str(zimage_omni_dir), device="cpu")
    assert plan.teacher_bytes == pytest.approx(teacher_forward_bytes(real, plan.teacher_rows, plan.text_tokens),
                                               rel=0.01)
    with pytest.raises(UserError, match="does not have"):
        make_plan("z-image", str(zimage_omni_dir), "dopsd", "style", teacher_model="some/vl-model")
