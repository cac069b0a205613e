"""Tiny fakes for the training-loop and runner tests: a Backbone with a real peft LoRA on a small MLP, and methods.

They follow the contracts in dopsd_bench/backbones/base.py and dopsd_bench/method.py, so the loop and the runner
are tested without the diffusers models (those are covered with the real tiny pipelines where present).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from dopsd_bench import flow
from dopsd_bench.backbones.base import Backbone, Cond
from dopsd_bench.method import Batch, Method

TEXT_DIM = 16


class _Denoiser(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim + TEXT_DIM + 1, 64)
        self.fc2 = nn.Linear(64, latent_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), text, sigma[:, None]], dim=1)
        return self.fc2(F.silu(self.fc1(h))).view_as(x)


class FakeBackbone(Backbone):
    """Latents are 4x average-pooled pixels; text is a hashed bag of words; the denoiser is a LoRA-able MLP."""

    name = "fake"
    native_steps = 2
    resolution = 16

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.denoiser = _Denoiser(3 * 4 * 4)
        self.denoiser.requires_grad_(False)
        self.device = torch.device("cpu")
        self.model_id = f"fake-{seed}"  # the sample cache keys untuned outputs by it

    def encode_prompts(self, prompts: list[str]) -> Cond:
        text = torch.zeros(len(prompts), TEXT_DIM)
        for i, p in enumerate(prompts):
            for w in p.split():
                text[i, zlib.crc32(w.encode()) % TEXT_DIM] += 1.0
        return {"text": text}

    def encode_teacher(self, prompts: list[str], images: torch.Tensor) -> Cond:
        cond = self.encode_prompts(prompts)
        cond["text"] = cond["text"] + self.encode_images(images).flatten(1)[:, :TEXT_DIM]
        return cond

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 4)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents, scale_factor=4, mode="nearest")

    def latent_shape(self) -> tuple[int, int, int]:
        return (3, 4, 4)

    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(x, sigma.to(x.dtype), cond["text"])

    def sigmas(self, steps: int) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, steps + 1)

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]

    def add_lora(self, name: str, rank: int, alpha: float | None = None) -> None:
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=["fc1", "fc2"], init_lora_weights=True)
        inject_adapter_in_model(cfg, self.denoiser, adapter_name=name)
        for n, p in self.denoiser.named_parameters():
            p.requires_grad_(f".{name}." in n and "lora_" in n)
        self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        for layer in self._tuner_layers():
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
                # peft's set_adapter marks the active adapter trainable; the loop decides what trains
        for n, p in self.denoiser.named_parameters():
            if "lora_" in n:
                p.requires_grad_(name is not None and f".{name}." in n)

    def save_lora(self, path: str | Path, name: str) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {n.replace(f".{name}", ""): p.detach().contiguous()
                 for n, p in self.denoiser.named_parameters() if f".{name}." in n and "lora_" in n}
        save_file(state, str(path / "pytorch_lora_weights.safetensors"))

    def load_lora(self, path: str | Path, name: str) -> None:
        path = Path(path)
        file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        state = load_file(str(file))
        rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
        self.add_lora(name, rank)
        params = dict(self.denoiser.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k.replace(".weight", f".{name}.weight")].copy_(v)
        self.set_adapter(name)


class FakeSFT(Method):
    """Flow-matching loss on the training images (what `sft` does), with noise from the loop's generator."""

    name = "fake-sft"

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        bb = self.backbone
        x0 = bb.encode_images(batch.images)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigma = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        v = bb.predict_velocity(flow.add_noise(x0, eps, sigma), sigma, bb.encode_prompts(batch.captions))
        return F.mse_loss(v, flow.velocity_target(x0, eps))


class FakeEMA(FakeSFT):
    """SFT plus a second adapter kept as an EMA of the student: state outside the trainable parameters."""

    name = "fake-ema"

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        self.backbone = backbone
        backbone.add_lora("teacher", rank=rank)
        backbone.add_lora(self.adapter, rank=rank)
        self.calls = 0

    def after_step(self, step: int) -> None:
        self.calls += 1
        student = self.backbone.lora_parameters(self.adapter)
        teacher = [p for n, p in self.backbone.denoiser.named_parameters() if ".teacher." in n and "lora_" in n]
        with torch.no_grad():
            for t, s in zip(teacher, student, strict=True):
                t.lerp_(s, 0.5)

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class FakeBase(Method):
    name = "fake-base"
    trains = False


def fake_batch(n: int = 6, size: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return Batch(images=images, captions=[f"a red thing number {i}" for i in range(n)])


@contextlib.contextmanager
def cell_held_elsewhere(run_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the cell lock of `run_dir` while the block runs; killed (releasing it) after."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from dopsd_bench.rundir import cell_lock\n"
        f"with cell_lock({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# a world style task small enough for a test run: 4 training images, 4 evaluation and 4 retention prompts
TINY_WORLD_TASK = """\
description: a tiny style task for tests
family: style
source: world
instances: [dotted]
n_train: 4
eval_prompts: {count: 4}
n_samples: 4
eval_seeds: {range: [0, 4]}
retention_prompts: {count: 4}
n_retention: 4
retention_seeds: {range: [100000, 4]}
"""
