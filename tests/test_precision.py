"""Real models on a GPU, tested on the CPU with tiny random-config pipelines: weights in bf16 with fp32 LoRA state
(mixed precision), gradient checkpointing, batched evaluation, and `plan` (sizes and checks before any training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_train import FakeBackbone
from test_backbones import _save_flux2, _save_zimage
from test_runner import TINY_WORLD_TASK, cfg_for, fake_evaluate
from typer.testing import CliRunner

from dopsd_bench import flow, runner
from dopsd_bench.backbones.base import module_dtype
from dopsd_bench.errors import ConfigError, UserError
from dopsd_bench.method import Batch
from dopsd_bench.registry import BACKBONES
from dopsd_bench.runconfig import RunConfig, resolve_dtype, torch_dtype
from dopsd_bench.train import TrainConfig, checkpoint_dirs, train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on the left", "a small blue square", "a green triangle", "a big yellow star"]
SEEDS = [3, 11, 5, 7]
SAVERS = {"flux2-klein": _save_flux2, "z-image": _save_zimage}


@pytest.fixture(scope="module", params=sorted(SAVERS))
def model_dir(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param)
    SAVERS[request.param](path)
    return request.param, path


@pytest.fixture
def world_task(tmp_path) -> str:
    path = tmp_path / "tiny_style.yaml"
    path.write_text(TINY_WORLD_TASK)
    return str(path)


def _load(model_dir, dtype: str = "fp32"):
    name, path = model_dir
    return BACKBONES.get(name).from_pretrained(str(path), device="cpu", dtype=torch_dtype(dtype))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- dtype ---------------------------------------------------------------------------------------------------
def test_dtype_is_validated_defaults_by_device_and_names_its_own_cell():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == "fp32" and resolve_dtype("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="dtype must be one of bf16, fp16, fp32"):
        RunConfig(method="sft", task="style", dtype="float8")
    with pytest.raises(ConfigError, match="eval_batch_size"):
        RunConfig(method="sft", task="style", eval_batch_size=0)
    default = RunConfig(method="sft", task="style", instance="dotted")
    assert default.cell_id() == "flux2-klein/style-dotted/sft/seed0"  # unchanged by the new fields' defaults
    bf16 = RunConfig(method="sft", task="style", instance="dotted", dtype="bf16")
    assert bf16.cell_id() != default.cell_id()  # bf16 weights train and sample another model
    memory = RunConfig(method="sft", task="style", instance="dotted", gradient_checkpointing=True, eval_batch_size=2)
    assert memory.cell_id() == default.cell_id()  # the same results, computed with less memory


def test_bf16_and_fp32_training_steps(model_dir, tmp_path):
    """Both dtypes train a couple of SFT steps: bf16 frozen weights, fp32 adapter and optimiser state, a first loss
    close to fp32's, finite samples."""
    from dopsd_bench.runner import build_method

    batch = Batch(images=_images(4), captions=PROMPTS, token="")
    losses = {}
    for dtype in ("fp32", "bf16"):
        backbone = _load(model_dir, dtype)
        assert module_dtype(backbone.denoiser) == torch_dtype(dtype)
        assert module_dtype(backbone.pipe.text_encoder) == torch_dtype(dtype)
        method = build_method("sft", {})
        cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, rank=4, precision=dtype, checkpoint_every=2)
        train(method, backbone, batch, cfg, tmp_path / dtype)
        params = method.trainable_parameters()
        assert params and all(p.dtype == torch.float32 for p in params)
        state = torch.load(checkpoint_dirs(tmp_path / dtype)[-1] / "state.pt", weights_only=True)
        moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
        assert moments and all(m.dtype == torch.float32 and m.abs().sum() > 0 for m in moments)
        losses[dtype] = [json.loads(line)["loss"] for line in (tmp_path / dtype / "train_log.jsonl").open()]
        images = backbone.sample(PROMPTS[:2], SEEDS[:2])
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.05)


def test_a_bf16_model_has_its_own_untuned_sample_cache(model_dir):
    from dopsd_bench.metrics.cache import SampleCache

    assert SampleCache(None, _load(model_dir)).identity != SampleCache(None, _load(model_dir, "bf16")).identity


# ---- gradient checkpointing ------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_lora_gradients(model_dir):
    backbone = _load(model_dir)
    backbone.add_lora("student", rank=4)
    with torch.no_grad():  # a LoRA that is not a no-op, so every gradient path is exercised
        for p in backbone.lora_parameters("student"):
            p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    cond = backbone.encode_prompts(PROMPTS[:2])
    x0 = backbone.encode_images(_images(2))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 0.8])
    xt, target = flow.add_noise(x0, eps, sigma), flow.velocity_target(x0, eps)

    def grads() -> dict[str, torch.Tensor]:
        backbone.denoiser.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(backbone.predict_velocity(xt, sigma, cond), target)
        loss.backward()
        return {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.grad is not None}

    plain = grads()
    backbone.enable_gradient_checkpointing()
    calls = []
    recompute = backbone.denoiser._gradient_checkpointing_func
    backbone.denoiser._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or recompute(*a, **k)
    checkpointed = grads()
    assert calls  # the blocks did go through the checkpoint
    assert plain.keys() == checkpointed.keys() and len(plain) == len(backbone.lora_parameters("student"))
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)


# ---- batched evaluation ----------------------------------------------------------------------------------------
def test_batched_evaluation_gives_the_unbatched_scores(tmp_path, world_task):
    """A sample's noise comes from its seed alone, so scoring in batches of 3 (an uneven split) gives the scores of
    one batch of all."""
    from dopsd_bench.metrics.evaluate import evaluate
    from dopsd_bench.metrics.features import JudgeFeatures
    from dopsd_bench.runner import build_method
    from dopsd_bench.tasks import load_task
    from dopsd_bench.world.judge import WorldJudge

    backbone = _load(("flux2-klein", _flux2_dir(tmp_path)))
    whole = backbone.sample(PROMPTS, SEEDS)
    parts = torch.cat([backbone.sample(PROMPTS[:3], SEEDS[:3]), backbone.sample(PROMPTS[3:], SEEDS[3:])])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)

    data = load_task(world_task).build("dotted", 0, resolution=backbone.resolution)
    torch.manual_seed(0)
    features = JudgeFeatures(WorldJudge(), device="cpu")  # untrained: the protocol is what is compared
    method = build_method("base", {})
    method.setup(backbone, Batch(images=data.train_images, captions=list(data.train_captions)), 4,
                 torch.Generator().manual_seed(0))
    scores = [evaluate(backbone, data, method, features=features, cache_dir=None, step_curve=(1,), batch_size=bs)
              for bs in (None, 3)]
    whole, batched = _flat(scores[0]), _flat(scores[1])
    assert whole.keys() == batched.keys() and len(whole) > 20
    for name, value in whole.items():
        assert batched[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics dict (means and per-sample values, nested entries too), by path."""
    out = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path + "."))
        elif isinstance(value, list):
            out.update({f"{path}.{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = float(value)
    return out


def _flux2_dir(tmp_path: Path) -> Path:
    path = tmp_path / "flux2"
    path.mkdir()
    _save_flux2(path)
    return path


def test_the_runner_passes_the_eval_batch_size_and_records_the_precision(tmp_path, world_task, monkeypatch):
    seen = []
    fake = fake_evaluate([])
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: FakeBackbone())
    monkeypatch.setattr(runner, "_model_identity", lambda cfg: FakeBackbone().model_id)
    monkeypatch.setattr(runner, "_features", lambda *args: None)
    monkeypatch.setattr(runner, "_evaluate", lambda *a, **k: seen.append(k.get("batch_size")) or fake(*a, **k))
    run_dir = runner.run_cell(cfg_for(world_task, tmp_path / "runs", eval_batch_size=3))
    assert seen and set(seen) == {3}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["precision"] == {"dtype": "fp32", "adapter_dtype": "fp32", "autocast": False,
                                   "gradient_checkpointing": False, "eval_batch_size": 3}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["precision"] == result["precision"] and config["run"]["eval_batch_size"] == 3


# ---- plan ------------------------------------------------------------------------------------------------------
def test_plan_counts_the_real_modules_parameters_from_configs_alone(model_dir, world_task):
    from dopsd_bench.plan import make_plan, saved_activation_bytes

    name, path = model_dir
    plan = make_plan(name, str(path), "sft", world_task, dtype="bf16", batch_size=2, rank=4)
    real = _load(model_dir)
    for component in ("transformer", "text_encoder", "vae"):
        assert plan.params[component] == sum(p.numel() for p in getattr(real.pipe, component).parameters())
    assert plan.weight_bytes == 2 * sum(plan.params[c] for c in ("transformer", "text_encoder", "vae")) + \
        2 * plan.params.get("teacher_vision", 0)
    real.add_lora("plan", rank=4)
    assert plan.trainable == sum(p.numel() for p in real.lora_parameters("plan"))
    assert plan.problems == [] and plan.graph_rows == 2
    # the activation count on the meta device is what the real tensors' forward saves (to a few views' aliasing)
    real_bf16 = _load(model_dir, "bf16")
    real_bf16.add_lora("plan", rank=4)
    assert plan.activation_bytes == pytest.approx(saved_activation_bytes(real_bf16, 2, text_tokens=plan.text_tokens),
                                                  rel=0.01)
    assert plan.peak_bytes == plan.weight_bytes + plan.trainable * 16 + plan.activation_bytes


def test_the_checkpointed_estimate_keeps_block_inputs_and_one_block(model_dir, world_task):
    """Under real checkpointing the forward saves what the estimate's first two parts count; one block's own
    tensors come on top while it is recomputed."""
    from dopsd_bench.plan import make_plan, saved_activation_bytes

    name, path = model_dir
    plain = make_plan(name, str(path), "sft", world_task, batch_size=2, rank=4)
    checkpointed = make_plan(name, str(path), "sft", world_task, batch_size=2, rank=4, gradient_checkpointing=True)
    assert 0 < checkpointed.activation_bytes < plain.activation_bytes
    real = _load(model_dir)
    real.add_lora("plan", rank=4)
    real.enable_gradient_checkpointing()
    kept = _saved_bytes_under_real_checkpointing(real, 2, plain.text_tokens)
    assert kept < checkpointed.activation_bytes
    assert checkpointed.activation_bytes - kept < plain.activation_bytes / 2  # about one block's worth on top
    assert saved_activation_bytes(real, 2, text_tokens=plain.text_tokens) == pytest.approx(plain.activation_bytes,
                                                                                          rel=0.01)


def test_plan_reads_the_task_captions_as_long_as_the_model_reads_them(model_dir, world_task):
    """The text part of a training forward is the task's longest caption as the backbone encodes it: Z-Image cuts
    each prompt to its real length, FLUX.2 pads every prompt to its maximum."""
    from dopsd_bench.plan import make_plan
    from dopsd_bench.tasks import load_task

    name, path = model_dir
    plan = make_plan(name, str(path), "sft", world_task, batch_size=2, rank=4)
    real = _load(model_dir)
    captions = load_task(world_task).training_captions()
    encoded = [real.encode_prompts([c]) for c in captions]
    lengths = [int(c["prompt_mask"].sum()) if "prompt_mask" in c else c["prompt_embeds"].shape[1] for c in encoded]
    assert plan.text_tokens == max(lengths) == real.text_tokens(captions)
    if name == "z-image":  # so that the count is the captions', not the maximum's
        assert plan.text_tokens < real.text_tokens()
    else:
        assert plan.text_tokens == real.text_tokens()
    assert f"({plan.text_tokens} of text)" in "\n".join(plan.lines())


def _saved_bytes_under_real_checkpointing(backbone, rows: int, text_tokens: int | None = None) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen.setdefault(id(t), t.numel() * t.element_size())
        return t

    x = torch.zeros((rows, *backbone.latent_shape()))
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone.predict_velocity(x, torch.full((rows,), 0.5), backbone.blank_cond(rows, text_tokens))
    del out
    return sum(seen.values())


def test_plan_counts_the_teacher_pass_that_runs_while_no_graph_is_alive(model_dir, world_task):
    """D-OPSD's no-grad teacher forward (all K states at once in the batched schedule, one state's batch in the
    sequential one) is counted on the meta device as on real tensors, and the step's peak is the larger of it and
    the student's saved activations; SFT runs no such pass."""
    from dopsd_bench.plan import make_plan, teacher_forward_bytes

    name, path = model_dir
    sft = make_plan(name, str(path), "sft", world_task, batch_size=2, rank=4)
    assert sft.teacher_rows == 0 and sft.teacher_bytes is None
    batched = make_plan(name, str(path), "dopsd", world_task, batch_size=2, rank=4)
    sequential = make_plan(name, str(path), "dopsd", world_task, batch_size=2, rank=4,
                           overrides={"schedule": "sequential"})
    real = _load(model_dir)
    k = real.native_steps
    assert (batched.teacher_rows, sequential.teacher_rows) == (2 * k, 2)
    assert batched.teacher_bytes == pytest.approx(teacher_forward_bytes(real, 2 * k, batched.text_tokens), rel=0.01)
    assert batched.teacher_bytes > sequential.teacher_bytes  # K states at once against one
    for plan in (batched, sequential):
        assert plan.peak_bytes == plan.weight_bytes + plan.trainable * 16 + max(plan.activation_bytes,
                                                                                 plan.teacher_bytes)
    shown = "rows, no gradient, with the reference"
    assert shown in "\n".join(batched.lines()) and shown not in "\n".join(sft.lines())


def test_plan_prints_the_figures(world_task):
    cli = CliRunner()
    done = cli.invoke(_app(), ["plan", "--method", "dopsd", "--task", world_task, "--batch-size", "2"])
    assert done.exit_code == 0, done.output
    for part in ("transformer", "text_encoder", "vae", "weights", "trainable", "activations", "peak (est.)",
                 "scoring: world judge at 32 px"):
        assert part in done.output, part
    assert "2 rows x" not in done.output and "4 rows x" in done.output  # D-OPSD: batch x 2 states per forward


def _app():
    from dopsd_bench.cli import app

    return app


def _zimage_without_teacher(tmp_path: Path) -> Path:
    path = tmp_path / "z-image-no-teacher"
    path.mkdir()
    from dopsd_bench.backbones.tiny import tiny_z_image_pipeline

    pipe, settings, _ = tiny_z_image_pipeline(seed=0)
    pipe.save_pretrained(path)
    settings["vl_model"] = str(tmp_path / "missing-vl")  # scoring needs the teacher: nothing to load it from
    (path / "dopsd_bench.json").write_text(json.dumps(settings))
    return path


def test_plan_and_run_refuse_an_impossible_combination_before_training(tmp_path, world_task, monkeypatch):
    model = _zimage_without_teacher(tmp_path)
    cli = CliRunner()
    done = cli.invoke(_app(), ["plan", "--backbone", "z-image", "--model", str(model), "--method", "sft",
                               "--task", world_task])
    assert done.exit_code == 2
    assert "missing-vl" in done.output and "problem:" in done.output

    loads = []
    monkeypatch.setattr(runner, "_load_backbone", lambda cfg, device: loads.append(cfg))
    cfg = cfg_for(world_task, tmp_path / "runs", backbone="z-image", model=str(model))
    with pytest.raises(UserError, match="cannot finish: the in-context teacher's VL model"):
        runner.run_cell(cfg)
    assert loads == [] and not cfg.run_dir().exists()


def test_teacher_model_points_z_image_at_its_teacher_and_is_refused_elsewhere(tmp_path, world_task):
    from dopsd_bench.backbones.tiny import tiny_z_image_pipeline

    model = _zimage_without_teacher(tmp_path)  # its dopsd_bench.json names a teacher that is not there
    _, _, teacher = tiny_z_image_pipeline(seed=0)
    teacher.save_pretrained(tmp_path / "my-vl")
    cli = CliRunner()
    args = ["plan", "--backbone", "z-image", "--model", str(model), "--method", "sft", "--task", world_task]
    assert cli.invoke(_app(), args).exit_code == 2  # the model's own teacher is missing
    done = cli.invoke(_app(), [*args, "--teacher-model", str(tmp_path / "my-vl")])
    assert done.exit_code == 0, done.output
    assert "teacher_vision" in done.output  # the given teacher's vision tower is counted
    done = cli.invoke(_app(), ["plan", "--method", "sft", "--task", world_task, "--teacher-model", "x"])
    assert done.exit_code == 2 and "flux2-klein does not have" in " ".join(done.output.split())

    cfg = cfg_for(world_task, tmp_path / "runs", backbone="z-image", model=str(model),
                  teacher_model=str(tmp_path / "my-vl"))
    assert cfg.cell_id() != cfg_for(world_task, tmp_path / "runs", backbone="z-image", model=str(model)).cell_id()
    backbone = runner._load_backbone(cfg, torch.device("cpu"))
    assert backbone.settings["vl_model"] == str(tmp_path / "my-vl")


def test_plan_refuses_a_base_model_of_another_shape(tmp_path, world_task):
    """base-transfer trains on `base_model` and moves its LoRA onto the model: shapes must match."""
    from dopsd_bench.plan import make_plan

    model = _flux2_dir(tmp_path)  # the tiny test model, not glyphworld's shape
    plan = make_plan("flux2-klein", str(model), "base-transfer", world_task, activations=False)
    assert any("another denoiser shape" in p for p in plan.problems)
    assert make_plan("flux2-klein", None, "base-transfer", world_task, activations=False).problems == []
