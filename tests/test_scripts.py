"""The scripts users run by hand still run: smoke builds of the embedded world (base, then turbo resumed from it,
then its consistency stage; a new DiT on the shipped VAE), the world diagnostics and the benchmarks' CPU paths.
Most are slow (about a minute each on 2 cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dopsd_bench.world import render as R

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--scale", "0.002", "--batch", "16", "--vae-batch", "16", "--consistency-batch", "8", "--workers", "1",
         "--threads", "2"]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, check=False)  # the tests read the exit code


@pytest.mark.slow
def test_build_world_smoke_base_then_resumed_turbo_then_consistency(tmp_path):
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone

    base = _script("build_world.py", "--stages", "base", "--out", str(tmp_path), *SMOKE)
    assert base.returncode == 0, base.stderr[-2000:]
    assert (tmp_path / "glyphworld-base" / "model_index.json").exists()
    assert not (tmp_path / "glyphworld-turbo").exists()
    # the base samples with its better sampler (docs/world.md), the turbo with the Euler steps it was distilled for
    assert Flux2KleinBackbone.from_pretrained(str(tmp_path / "glyphworld-base"), device="cpu").stochastic_sampling

    turbo = _script("build_world.py", "--stages", "turbo", "--turbo", "trajectory", "--out", str(tmp_path), *SMOKE)
    assert turbo.returncode == 0, turbo.stderr[-2000:]
    assert "resuming from the base" in turbo.stdout
    # the trajectory-distilled turbo samples with the Euler steps it was distilled for
    bb = Flux2KleinBackbone.from_pretrained(str(tmp_path / "glyphworld-turbo"), device="cpu")
    assert bb.native_steps == 4 and not bb.stochastic_sampling

    consistency = _script("build_world.py", "--stages", "consistency", "--consistency-steps", "1000", "--out",
                          str(tmp_path), *SMOKE)
    assert consistency.returncode == 0, consistency.stderr[-2000:]
    assert "resuming from the turbo" in consistency.stdout
    summary = json.loads((tmp_path / "build_summary.json").read_text())
    recipe = summary["models"]["recipe"]
    assert recipe["distill_steps"] == 3  # 1500 x 0.002
    assert recipe["consistency_steps"] == 2 and recipe["consistency_lr"] == 3e-4
    # the resumed runs keep the base's record: all three invocations, every stage
    assert [set(i["stage_wall_s"]) for i in summary["models"]["invocations"]] == [
        {"vae", "dataset", "base"}, {"load", "dataset", "trajectories", "distill"},
        {"load", "dataset", "restart_rollouts", "consistency"}]
    assert set(summary["models"]["stage_wall_s"]) == {"vae", "load", "dataset", "base", "trajectories", "distill",
                                                      "restart_rollouts", "consistency"}

    # the consistency turbo samples with restarts, reproducibly per seed
    bb = Flux2KleinBackbone.from_pretrained(str(tmp_path / "glyphworld-turbo"), device="cpu")
    assert bb.native_steps == 4 and bb.stochastic_sampling
    prompt = "a small solid red circle at the top, dark background"
    images = bb.sample([prompt, prompt], [0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert torch.allclose(bb.sample([prompt], [1]), images[1:], atol=1e-5)

    # its stage does not run twice on one turbo: it starts from the Euler turbo of --stages turbo
    again = _script("build_world.py", "--stages", "consistency", "--consistency-steps", "1000", "--out",
                    str(tmp_path), *SMOKE)
    assert again.returncode != 0 and "samples with restarts already" in again.stderr

    # the guidance-distilled turbo (the default): from the saved base, no trajectories, sampled with restarts
    guided = _script("build_world.py", "--stages", "turbo", "--out", str(tmp_path), *SMOKE)
    assert guided.returncode == 0, guided.stderr[-2000:]
    assert "guidance distill step" in guided.stdout and not re.search(r"trajectories \d+/\d+", guided.stdout)
    summary = json.loads((tmp_path / "build_summary.json").read_text())
    assert summary["models"]["recipe"]["turbo"] == "guidance"
    assert "trajectories" not in summary["models"]["stage_wall_s"]  # that turbo had none
    bb = Flux2KleinBackbone.from_pretrained(str(tmp_path / "glyphworld-turbo"), device="cpu")
    assert bb.native_steps == 4 and bb.stochastic_sampling
    assert "guidance" in json.loads((tmp_path / "glyphworld-turbo" / "dopsd_bench.json").read_text())["role"]


@pytest.mark.slow
def test_build_world_new_dit_on_the_shipped_vae(tmp_path):
    """--init-from trains a new base DiT at another width on a saved pipeline's VAE and text encoder (no VAE
    stage): how a wider DiT is tried without re-training the VAE."""
    from diffusers import Flux2KleinPipeline

    shipped = ROOT / "dopsd_bench" / "assets" / "glyphworld-base"
    result = _script("build_world.py", "--stages", "base", "--init-from", str(shipped), "--width", "96",
                     "--blocks", "1,4", "--out", str(tmp_path), *SMOKE)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "build_summary.json").read_text())["models"]
    assert summary["init_from"] == str(shipped) and "vae" not in summary["stage_wall_s"]
    new, old = (Flux2KleinPipeline.from_pretrained(d) for d in (tmp_path / "glyphworld-base", shipped))
    config = new.transformer.config
    assert config.num_attention_heads * config.attention_head_dim == 96 and config.num_single_layers == 4
    for a, b in zip(new.vae.state_dict().values(), old.vae.state_dict().values()):  # latent stats included
        assert torch.equal(a, b)
    # the encoder's layers are the shipped ones; its token embeddings train with the new base (--learn-text)
    embed = "model.embed_tokens.weight"
    new_text, old_text = new.text_encoder.state_dict(), old.text_encoder.state_dict()
    assert all(torch.equal(new_text[k], old_text[k]) for k in old_text if k != embed and "lm_head" not in k)
    assert not torch.equal(new_text[embed], old_text[embed])


@pytest.mark.slow
def test_build_world_z_image_base_then_resumed_turbo(tmp_path):
    """--arch z-image: the same stages build a Z-Image world (its VL teacher saved beside it) on the shipped VAE."""
    from dopsd_bench.backbones.zimage import ZImageBackbone

    base = _script("build_world.py", "--arch", "z-image", "--teacher", "vl", "--stages", "base", "--out",
                   str(tmp_path), *SMOKE)
    assert base.returncode == 0, base.stderr[-2000:]
    turbo = _script("build_world.py", "--stages", "turbo", "--out", str(tmp_path), *SMOKE)
    assert turbo.returncode == 0, turbo.stderr[-2000:]
    assert "resuming from the base" in turbo.stdout
    assert json.loads((tmp_path / "build_summary.json").read_text())["models"]["arch"] == "z-image"
    from dopsd_bench.world.check import _architecture  # what `world check --models` loads the folders as

    assert _architecture(str(tmp_path / "glyphworld-turbo")) == "z-image"
    assert _architecture("glyphworld-turbo") == "flux2-klein"  # the shipped model, by name
    models = {name: ZImageBackbone.from_pretrained(str(tmp_path / f"glyphworld-{name}"), device="cpu")
              for name in ("base", "turbo")}
    for name, bb in models.items():  # each folder holds its teacher, named relative to it
        assert json.loads((tmp_path / f"glyphworld-{name}" / "dopsd_bench.json").read_text())["vl_model"] == \
            "teacher_vl"
        assert bb.settings["vl_model"] == str(tmp_path / f"glyphworld-{name}" / "teacher_vl")
    turbo_bb, base_bb = models["turbo"], models["base"]
    assert turbo_bb.native_steps == 4 and turbo_bb.stochastic_sampling
    # the vision tower trained with the base (it left its init) and the turbo stage left it as it was
    from dopsd_bench.world.build import z_image_world_pipeline

    vision = {name: bb.teacher.model.model.visual.state_dict() for name, bb in models.items()}
    assert all(torch.equal(vision["base"][k], vision["turbo"][k]) for k in vision["base"])
    _, _, fresh = z_image_world_pipeline(0, 128, (1, 3), ROOT / "dopsd_bench" / "assets" / "glyphworld-base", "cpu",
                                         teacher="vl")
    init = fresh.model.model.visual.state_dict()
    assert not torch.equal(init["patch_embed.proj.weight"], vision["base"]["patch_embed.proj.weight"])
    prompt = "a small solid red circle at the top, dark background"
    reference = base_bb.decode_latents(base_bb.encode_images(torch.zeros(1, 3, 32, 32)))
    images = turbo_bb.sample([prompt, prompt], [0, 1], references=torch.cat([reference, reference]))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    bad = _script("build_world.py", "--arch", "z-image", "--stages", "base", "--keep-dit", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--keep-dit has no DiT to keep" in bad.stderr


@pytest.mark.slow
def test_build_world_z_image_omni_teacher_base(tmp_path):
    """--arch z-image's default teacher: the DiT reads the reference's latents; no VL model is built or saved."""
    from dopsd_bench.backbones.zimage import ZImageBackbone

    base = _script("build_world.py", "--arch", "z-image", "--stages", "base", "--out", str(tmp_path), *SMOKE)
    assert base.returncode == 0, base.stderr[-2000:]
    assert "omni teacher" in base.stdout
    folder = tmp_path / "glyphworld-base"
    assert json.loads((folder / "dopsd_bench.json").read_text())["teacher"] == "omni"
    assert not (folder / "teacher_vl").exists()
    bb = ZImageBackbone.from_pretrained(str(folder), device="cpu")
    reference = bb.decode_latents(bb.encode_images(torch.zeros(1, 3, 32, 32)))
    images = bb.sample(["a small solid red circle at the top, dark background"], [0], steps=2, references=reference)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_build_world_init_from_needs_a_saved_pipeline_and_a_new_base(tmp_path):
    missing = _script("build_world.py", "--stages", "base", "--init-from", str(tmp_path), "--out", str(tmp_path))
    assert missing.returncode == 2 and "expected a saved pipeline folder" in missing.stderr
    shipped = str(ROOT / "dopsd_bench" / "assets" / "glyphworld-base")
    turbo = _script("build_world.py", "--stages", "turbo", "--init-from", shipped, "--out", str(tmp_path))
    assert turbo.returncode == 2 and "use it with --stages base or models" in turbo.stderr
    blocks = _script("build_world.py", "--stages", "base", "--blocks", "3", "--out", str(tmp_path))
    assert blocks.returncode == 2 and "expected two counts" in blocks.stderr
    consistency = _script("build_world.py", "--stages", "consistency", "--out", str(tmp_path))
    assert consistency.returncode == 2 and "give --consistency-steps N" in consistency.stderr
    no_turbo = _script("build_world.py", "--stages", "base,consistency", "--consistency-steps", "9", "--out",
                       str(tmp_path))
    assert no_turbo.returncode == 2 and "starts from the turbo" in no_turbo.stderr
    guided = _script("build_world.py", "--stages", "models", "--consistency-steps", "9", "--out", str(tmp_path))
    assert guided.returncode == 2 and "add --turbo trajectory" in guided.stderr


@pytest.mark.slow
def test_diagnose_world_probes_the_shipped_base(tmp_path):
    result = _script("diagnose_world.py", "--n", "8", "--threads", "2", "--grid", str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    # 6 shapes x 3 fills of 32-px samples, a gap of 8, the true renders; enlarged 4x
    assert Image.open(tmp_path / "grid.png").size == (4 * (3 * 32 + 8 + 3 * 32), 4 * 6 * 32)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) >= {"latent_noise", "from_partial", "cfg", "sampler", "word_sensitivity",
                            "word_signal_in_renders"}
    # both samplers are measured, the model's own being the cfg probe's samples at its guidance
    sampler = figures["sampler"]
    assert sampler["own"] == "stochastic" and sampler["stochastic"] == figures["cfg"]["2.0"]
    assert sampler["euler"] != sampler["stochastic"]
    # the shipped VAE keeps the attributes of true renders through a clean round trip (the judge itself misreads
    # about 1 in 40 true renders' shape or fill: one of the 8 may miss, not more)
    assert min(figures["latent_noise"]["0.0"]["accuracy"].values()) >= 7 / 8
    # the more of the true latent a sample starts from, the closer it ends to true renders
    partial = figures["from_partial"]
    assert partial["0.250"]["fd"] < partial["0.875"]["fd"]
    # every swapped word moves the prediction a little at least (the caption reaches the DiT)
    assert all(v > 0 for row in figures["word_sensitivity"].values() for v in row.values())
    # in the world itself a saturated colour moves the mean render far more than an outline does
    signal = figures["word_signal_in_renders"]
    assert set(signal) == {"spread", "shape", "colour", "size", "style", "position"}
    assert signal["colour"] > signal["shape"] > 0 and signal["spread"] > 0
    assert 0 <= figures["latent_gap"]["true"] < 0.2  # the shipped VAE reproduces its own latents closely
    assert figures["latent_gap"]["generated"] > 0
    # every sample is labelled once: each row of the confusion is a distribution over the judge's labels
    for attr, rows in figures["confusion"].items():
        for row in rows.values():
            assert set(row) <= set(R.ATTRIBUTES[attr]) and 0.8 <= sum(row.values()) <= 1.0 + 1e-6


def test_diagnose_world_rejects_too_few_prompts():
    result = _script("diagnose_world.py", "--n", "2")
    assert result.returncode == 2 and "expected at least 8 prompts" in result.stderr


def _build_world():
    from dopsd_bench.world import build

    return build


def test_object_map_is_the_mean_channel_spread_per_latent_cell():
    W = _build_world()
    image = torch.full((1, 3, 32, 32), -0.4)  # grey: no spread
    image[0, :, 0:4, 4:8] = torch.tensor([0.8, -0.76, -0.8]).view(3, 1, 1)  # red, filling one 4x4 cell
    image[0, :, 8:10, 8:12] = torch.tensor([0.2, 0.2, -0.2]).view(3, 1, 1)  # half of another cell, spread 0.4
    grid = W.object_map(image, 8)
    expected = torch.zeros(1, 1, 8, 8)
    expected[0, 0, 0, 1] = 1.6 / 2
    expected[0, 0, 2, 2] = 0.4 / 2 / 2
    assert torch.allclose(grid, expected)


def test_a_resumed_turbo_records_the_base_recipe_it_continues():
    W = _build_world()
    recipe = {"judge_steps": 6, "examples": 512, "base_steps": 9, "tune_steps": 0, "batch": 16, "trajectories": 256,
              "distill_steps": 4, "consistency_examples": 256, "consistency_steps": 3, "consistency_batch": 8}
    earlier = {"examples": 512, "base_steps": 4000, "tune_steps": 1000, "tune_object_weight": 8.0, "batch": 256}
    consistency = {"consistency_examples": 256, "consistency_steps": 3, "consistency_batch": 8}
    assert W.recorded_recipe(recipe, earlier, {"turbo"}) == {
        "examples": 512, "base_steps": 4000, "tune_steps": 1000, "tune_object_weight": 8.0, "batch": 16,
        "trajectories": 256, "distill_steps": 4} | consistency
    assert W.recorded_recipe(recipe, earlier, {"models"}) == {k: v for k, v in recipe.items() if k != "judge_steps"}
    # a consistency stage resumed from a saved turbo keeps the turbo's record (its batch, its examples)
    assert W.recorded_recipe(recipe, earlier, {"consistency"}) == earlier | consistency


@pytest.mark.slow
def test_build_world_second_phase_continues_the_saved_dit(tmp_path):
    from diffusers import Flux2Transformer2DModel

    shipped = ROOT / "dopsd_bench" / "assets" / "glyphworld-base"
    result = _script("build_world.py", "--stages", "base", "--init-from", str(shipped), "--keep-dit",
                     "--tune-steps", "1000", "--tune-object-weight", "4", "--out", str(tmp_path), *SMOKE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "continuing the DiT of" in result.stdout and "base step 1/2" in result.stdout  # 1000 x 0.002 steps
    summary = json.loads((tmp_path / "build_summary.json").read_text())["models"]
    assert summary["first_phase_from"] == str(shipped)
    assert summary["recipe"]["tune_steps"] == 2 and summary["recipe"]["tune_object_weight"] == 4.0
    new, old = (Flux2Transformer2DModel.from_pretrained(d / "transformer") for d in (tmp_path / "glyphworld-base",
                                                                                      shipped))
    assert {k: v for k, v in new.config.items() if k != "_name_or_path"} == {
        k: v for k, v in old.config.items() if k != "_name_or_path"}
    moved = [not torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values())]
    assert any(moved)


@pytest.mark.slow
def test_tune_base_measures_each_arm_and_reuses_its_data(tmp_path):
    from diffusers import Flux2Transformer2DModel

    cache, out = tmp_path / "data.pt", tmp_path / "arms"
    common = ["--steps", "2", "--batch", "8", "--examples", "512", "--prompts", "8", "--data-cache", str(cache),
              "--out", str(out)]
    result = _script("tune_base.py", "--arms", "0:0.5,4:0.75", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "arms.json").read_text())
    assert set(report["arms"]) == {"start", "w0-t0.5", "w4-t0.75"} and report["best"] in {"w0-t0.5", "w4-t0.75"}
    for figures in report["arms"].values():
        assert 0 <= figures["alignment_32"] <= 1 and figures["fd_32"] > 0
        assert figures["fd_ratio_4_vs_32"] == pytest.approx(figures["fd_4"] / figures["fd_32"])
    a, b = (Flux2Transformer2DModel.from_pretrained(out / arm / "glyphworld-base" / "transformer")
            for arm in ("w0-t0.5", "w4-t0.75"))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    summary = json.loads((out / "w4-t0.75" / "build_summary.json").read_text())["models"]
    assert summary["recipe"]["tune_object_weight"] == 4.0 and summary["recipe"]["tune_text_frac"] == 0.75

    again = _script("tune_base.py", "--arms", "0:1", *common)  # same world: the cached data
    assert again.returncode == 0 and "dataset: loaded from" in again.stdout
    rotated = _script("tune_base.py", "--arms", "0:1", "--unsaid", "angle=10", *common)  # another world
    assert rotated.returncode == 0 and "making it again" in rotated.stdout
    assert (out / "w0-t1-angle10" / "glyphworld-base" / "model_index.json").exists()

    # a new DiT from scratch, its schedule fitted to a time budget (counted from the script's start)
    common[common.index("--steps") + 1] = "100000"
    fresh = _script("tune_base.py", "--fresh", "--width", "64", "--arms", "0:0.5", "--unsaid", "angle=10",
                    "--budget-s", "45", *common)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "steps fit the budget of" in fresh.stdout and "dataset: loaded from" in fresh.stdout
    report = json.loads((out / "arms.json").read_text())
    arm = report["arms"]["w0-t0.5-fresh-d64-b8-angle10"]
    assert "start" not in report["arms"] and arm["fresh"] and arm["width"] == 64 and arm["lr"] == 1e-3
    assert 100 < arm["steps"] < 100000 and arm["wall_s"] < 45
    dit = Flux2Transformer2DModel.from_pretrained(out / "w0-t0.5-fresh-d64-b8-angle10" / "glyphworld-base"
                                                  / "transformer")
    assert dit.config.num_attention_heads == 2  # 64 wide
    summary = json.loads((out / "w0-t0.5-fresh-d64-b8-angle10" / "build_summary.json").read_text())["models"]
    assert summary["recipe"]["base_steps"] == arm["steps"] and summary["unsaid"]["angle"] == 10


def test_tune_base_rejects_malformed_arms_and_unknown_unsaid_factors(tmp_path):
    arms = _script("tune_base.py", "--arms", "8:1.5", "--out", str(tmp_path))
    assert arms.returncode == 2 and "expected WEIGHT:TEXT_FRAC pairs" in arms.stderr
    width = _script("tune_base.py", "--width", "192", "--out", str(tmp_path))
    assert width.returncode == 2 and "add --fresh" in width.stderr
    unsaid = _script("tune_base.py", "--unsaid", "hue=0", "--out", str(tmp_path))
    assert unsaid.returncode == 2 and "expected KEY=VALUE pairs with keys ['angle', 'scale', 'shift']" in unsaid.stderr
    keep = _script("build_world.py", "--stages", "base", "--keep-dit", "--out", str(tmp_path))
    assert keep.returncode == 2 and "--keep-dit continues the DiT of --init-from" in keep.stderr


def test_build_world_rejects_an_unknown_stage_and_a_negative_spread(tmp_path):
    result = _script("build_world.py", "--stages", "judge,vae", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "expected a comma-separated list of judge, models, base, turbo" in result.stderr
    result = _script("build_world.py", "--unsaid", "angle=-5", "--out", str(tmp_path))
    assert result.returncode == 2 and "angle=-5 is not KEY=VALUE with a key of ['angle'" in result.stderr


def test_parse_unsaid_reads_key_value_pairs():
    W = _build_world()
    assert W.parse_unsaid("angle=0,scale=0.05") == {"angle": 0.0, "scale": 0.05}
    assert W.parse_unsaid("") == {}
    for bad in ("hue=0", "angle", "angle=x", "shift=-1"):
        with pytest.raises(ValueError, match=bad):
            W.parse_unsaid(bad)


@pytest.mark.slow
def test_bench_gpu_cpu_path_reports_both_methods_and_the_plans_estimate():
    result = _script("bench_gpu.py", "--device", "cpu", "--size", "tiny", "--repeats", "1", "--arch", "flux2-klein",
                     "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["dtype"] == "fp32" and figures["gradient_checkpointing"] == ["off"]  # the CPU's default
    arch = figures["archs"]["flux2-klein"]["checkpointing"]["off"]
    # a faithful D-OPSD step is K student passes plus teacher forwards on a longer sequence: several SFT steps
    assert arch["ratios"]["flops"] > 2 and arch["dopsd"]["gflop"] > arch["sft"]["gflop"] > 0
    for m in (arch["sft"], arch["dopsd"]):
        assert m["ms"] > 0 and m["peak_total_mib"] is None  # no allocator statistics on the CPU
        parts = m["estimate_parts_mib"]
        assert m["estimate_mib"] > 0 and parts["weights"] > 0 and parts["activations"] > 0
        # weights + trainable state + the larger of the saved activations and the teacher pass (D-OPSD's)
        largest = max(parts["activations"], parts["teacher_pass"])
        assert m["estimate_mib"] == pytest.approx(parts["weights"] + parts["trainable"] + largest, abs=0.2)
        # the measured peak holds at least the weights; the estimate is the plan's, in the same units
        assert m["measured_mib"] > parts["weights"]
        assert m["estimate_ratio"] == pytest.approx(m["estimate_mib"] / m["measured_mib"], rel=0.01)
    assert arch["dopsd"]["estimate_parts_mib"]["activations"] > arch["sft"]["estimate_parts_mib"]["activations"]


def test_bench_gpu_cpu_peak_counts_live_tensor_bytes_above_the_start(monkeypatch):
    """The CPU meter, on tensors of known size: the peak inside the window over what was live on entering the meter,
    including what was allocated before the window and still lives (a model's weights)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_gpu import PeakMemory

    before = torch.zeros(250_000)  # 1 MB live before the meter: not counted
    with PeakMemory(torch.device("cpu")) as memory:
        weights = torch.zeros(1_000_000)  # 4 MB before the window, alive through it
        with memory.window():
            a = torch.zeros(500_000)  # +2 MB
            b = torch.zeros(250_000, dtype=torch.float64)  # +2 MB: 8 MB, the peak
            del a, b
            c = torch.zeros(100_000)  # 4.4 MB
        del before
    assert memory.peak_bytes == 8_000_000
    assert weights.numel() + c.numel() > 0


@pytest.mark.slow
def test_bench_step_on_a_wider_random_dit_reports_the_three_ratios():
    small = _script("bench_step.py", "--model", "random", "--width", "32", "--batch", "2", "--repeats", "1",
                    "--mem-batch", "2", "--levers")
    wide = _script("bench_step.py", "--model", "random", "--width", "64", "--batch", "2", "--repeats", "1",
                   "--mem-batch", "2")
    assert small.returncode == 0 and wide.returncode == 0, (small.stderr + wide.stderr)[-2000:]
    small_f, wide_f = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (small, wide))
    assert small_f["model"] == "random-width32" and wide_f["model"] == "random-width64"
    # K = 4 student passes plus teacher forwards: several SFT steps in FLOPs; the memory-saving schedule saves memory
    assert wide_f["flop_ratio"] > 2 and 0 < wide_f["memory_ratio"] < 1
    assert all(f["sft_ms"] > 0 and f["dopsd_ms"] > 0 for f in (small_f, wide_f))
    assert wide_f["dopsd_gflop"] > 1.5 * small_f["dopsd_gflop"]  # --width reaches the DiT: 2x width, >1.5x FLOPs
    # --levers: bf16, compiled and both, each a positive time over the same method's fp32 eager step
    for name in ("sft", "dopsd"):
        lever = small_f["levers"][name]
        assert set(lever["ratio_to_fp32"]) == {"bf16", "compile", "bf16+compile"}
        assert all(r > 0 for r in lever["ratio_to_fp32"].values()) and lever["ms"]["fp32"] > 0


@pytest.mark.slow
def test_bench_run_reports_the_split_the_ratios_and_the_fraction_of_peak(tmp_path):
    result = _script("bench_run.py", "--out", str(tmp_path), "--", "--steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    run, peaks = summary["runs"][0], summary["peak_gflops_per_s"]
    assert summary["method"] == "dopsd" and summary["vs"]["method"] == "sft"
    assert run["wall_s"] >= run["total_s"] >= run["train_s"] > 0 and run["sample_s"] > 0
    assert 0 < peaks["fp32"] and 0 < peaks["bf16"]
    assert run["fraction_of_fp32_peak"] == pytest.approx(run["train_gflops_per_s"] / peaks["fp32"], abs=2e-3)
    # D-OPSD's step: K = 4 roll-out states, a teacher pass and a student pass per state (docs/budgets.md: 7.7x)
    assert 5 < summary["flop_ratio"] < 12 and summary["step_time_ratio"] > 1


def test_bench_run_achieved_rate_is_recorded_flops_over_recorded_seconds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_run

    assert bench_run.achieved_gflops({"train_flops": 2e10, "train_seconds": 4.0, "train_steps": 2}) == 5.0
    assert bench_run.achieved_gflops({}) is None  # a method that trains nothing records no cost
    assert bench_run.matmul_gflops(torch.float32, side=64, seconds=0.01) > 0


def test_bench_step_rejects_a_width_for_a_trained_model():
    result = _script("bench_step.py", "--model", "glyphworld", "--width", "128")
    assert result.returncode == 2 and "--width applies to --model random only" in result.stderr


@pytest.mark.slow
def test_flop_count_repeats_kv_heads_without_changing_the_count(monkeypatch):
    """bench_step.flops counts with transformers' grouped-query attention turned off (older torch's counter rejects
    its shapes); on this torch, whose counter accepts them, both counts agree for z-image, whose VL teacher and
    text encoder use fewer key/value heads than query heads."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.integrations import sdpa_attention

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_gpu import factory
    from bench_step import flops, make_batch, make_method, step

    make, resolution = factory("z-image", "tiny", torch.device("cpu"), torch.float32)
    batch = make_batch(2, resolution)
    method = make_method("dopsd", make, batch, 4, {})
    step(method, batch, 0)  # warm-up, as bench_gpu measures
    grouped = []
    real = sdpa_attention.use_gqa_in_sdpa
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *a: grouped.append(real(*a)) or grouped[-1])
    with FlopCounterMode(display=False) as counter:
        step(method, batch, 0)
    assert any(grouped)  # the unpatched step does run grouped-query attention
    assert flops(method, batch) == counter.get_total_flops() > 0


def test_summary_table_pairs_each_budget_with_the_reference_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import pandas as pd
    import summary_table

    from dopsd_bench.store import NO_BUDGET

    rows = []
    for seed in (0, 1):
        for sample in range(4):
            value = 0.1 * sample + seed
            common = {"backbone": "b", "task": "style", "metric": "fidelity", "instance": "dotted", "seed": seed,
                      "sample": sample, "higher_is_better": True}
            rows.append(common | {"method": "sft", "budget": "short", "value": value})
            rows.append(common | {"method": "sft", "budget": "long", "value": value + 0.1 * (seed + 1)})
            rows.append(common | {"method": "base", "budget": NO_BUDGET, "value": 0.0})
    deltas = summary_table.budget_deltas(pd.DataFrame(rows), "long", n_boot=200)
    assert len(deltas) == 1  # sft at its one other budget; base trains nothing, the reference is not its own row
    d = deltas.iloc[0]
    assert (d["method"], d["budget"], d["metric"]) == ("sft", "short", "fidelity")
    assert d["delta"] == pytest.approx(-(0.1 + 0.2) / 2)  # seed 0 is 0.1 lower at the short budget, seed 1 0.2
    assert d["mean"] - d["reference_mean"] == pytest.approx(d["delta"])
    assert d["lo"] == pytest.approx(-0.2) and d["hi"] == pytest.approx(-0.1)  # two runs: the bootstrap's extremes


def test_summary_table_says_which_input_is_missing_without_a_traceback(tmp_path):
    board = tmp_path / "board.csv"
    done = _script("summary_table.py", "--results", str(tmp_path / "no-runs"), "--csv", str(board))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{board} does not exist" in done.stderr  # the CSV is checked first: it names what to run
    board.write_text("method,task,metric\n")
    done = _script("summary_table.py", "--results", str(tmp_path / "no-runs"), "--csv", str(board))
    assert done.returncode == 2 and "no-runs does not exist: pass the --out dir of a sweep" in done.stderr
