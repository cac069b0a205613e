"""The backbone contract: what methods, the training loop and scoring may ask of a model.

Everything here speaks the suite's flow convention (dopsd_bench/flow.py). Latents are the backbone's own
normalised latents in a 4-D (B, C, h, w) layout; methods only do element-wise maths on them. A conditioning
(`Cond`) is a dict of tensors whose first dimension is the batch, so it can be sliced, repeated and
concatenated without knowing the architecture (see `repeat_cond`, `cat_conds`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from dopsd_bench import flow

Cond = dict[str, torch.Tensor]


def repeat_cond(cond: Cond, k: int) -> Cond:
    """Tile a conditioning k times along the batch: [c0, c1] -> [c0, c1, c0, c1] for k=2."""
    return {key: torch.cat([v] * k, dim=0) for key, v in cond.items()}


def cat_conds(conds: list[Cond]) -> Cond:
    """Concatenate conditionings of the same kind (same keys and sequence lengths) along the batch."""
    return {key: torch.cat([c[key] for c in conds], dim=0) for key in conds[0]}


def index_cond(cond: Cond, index) -> Cond:
    return {key: v[index] for key, v in cond.items()}


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point base weights (diffusers' `.dtype` scans every parameter on each call).
    LoRA weights are skipped: they stay fp32 on bf16/fp16 weights (mixed precision)."""
    return next(p.dtype for n, p in module.named_parameters() if p.is_floating_point() and "lora_" not in n)


def model_identity(model: str, path: str | Path) -> str:
    """`model` tagged with a digest of the local denoiser weights, so caches of untuned samples never outlive a
    rebuild or an edit of the model. Small weight files are hashed whole; large ones (real checkpoints) by size
    and modification time. A scheduler set to sample stochastically changes every sample as new weights would,
    so it enters the digest too (an Euler model's digest is its weights' alone). A hub id (no local dir) is
    returned as is."""
    import hashlib
    import json

    files = sorted(Path(path).glob("transformer/*.safetensors"))
    if not files:
        return model
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.read_bytes() if st.st_size <= 64 * 2**20 else f"{st.st_size}:{st.st_mtime_ns}".encode())
    scheduler = Path(path) / "scheduler" / "scheduler_config.json"
    if scheduler.exists() and json.loads(scheduler.read_text()).get("stochastic_sampling"):
        h.update(b"stochastic_sampling")
    return f"{model}@{h.hexdigest()[:10]}"


def step_noise_seed(seed: int, sigma_next: torch.Tensor | float) -> int:
    """The seed of a sample's fresh noise for the stochastic step that ends at `sigma_next`."""
    return (int(seed) * 1_000_003 + round(float(sigma_next) * 1e6)) % 2**63


class Backbone(ABC):
    """A text-to-image flow model behind one adapter. Subclasses hide their architecture's conventions."""

    name: str = ""
    native_steps: int = 4  # the few-step count the model was distilled for
    guidance_scale: float = 1.0  # CFG used by `sample` (1 = none: distilled models have guidance baked in)
    stochastic_sampling: bool = False  # the scheduler's setting: each step re-noises the x0 prediction (`step`)
    resolution: int = 32  # square sample size in pixels
    denoiser: nn.Module  # the module LoRA adapters attach to (a diffusers transformer)
    device: torch.device = torch.device("cpu")
    default_model: str = ""
    model_id: str = ""  # the model's name with its weights digest (`model_identity`), set by each adapter

    @staticmethod
    def resolve(model: str) -> tuple[str, dict]:
        """A model name, local dir or hub id -> (path or id, adapter settings); each adapter sets its own."""
        raise NotImplementedError

    @classmethod
    def identity(cls, model: str | None = None) -> str:
        """The model id (with a weights digest) that a run on `model` records, without loading the weights: a
        finished result.json that records another one was made on other weights and is stale."""
        model = model or cls.default_model
        return model_identity(model, cls.resolve(model)[0])

    # ---- conditioning -------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text-only conditioning (the student's view)."""

    def text_tokens(self, prompts: list[str] | None = None) -> int:
        """How many text tokens a forward on these prompts reads (the longest of them; None: the longest prompt
        the model reads), counted from the tokenizer alone, so that it works on the meta device."""
        raise NotImplementedError(f"{type(self).__name__} has no text_tokens: `plan` cannot estimate its activations")

    def blank_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        """A text conditioning of `text_tokens` tokens (default: the longest prompt the model reads), all zeros, on
        `device` (which may be the meta device): the shapes a training forward sees, for `plan`'s memory estimate."""
        raise NotImplementedError(f"{type(self).__name__} has no blank_cond: `plan` cannot estimate its activations")

    def blank_teacher_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        """`blank_cond` for the teacher's view (prompt and reference): the shapes its forward sees. By default the
        text conditioning's; a backbone whose teacher reads more tokens says so."""
        return self.blank_cond(rows, text_tokens)

    @abstractmethod
    def encode_teacher(self, prompts: list[str], images: torch.Tensor) -> Cond:
        """Multimodal conditioning: prompt + reference image(s) (B, 3, H, W) in [-1, 1] (the teacher's view)."""

    # ---- latents ------------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> clean latents x0."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> pixels (B, 3, H, W) in [-1, 1]."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent at `resolution`."""

    # ---- the model ----------------------------------------------------------------------------------
    @abstractmethod
    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v = eps - x0 at noise level sigma (B,) for noisy latents x, in the suite's convention."""

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        return flow.x0_from_velocity(x, self.predict_velocity(x, sigma, cond), sigma)

    @abstractmethod
    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampling schedule for `steps` steps: steps + 1 values from 1 down to 0, as the pipeline uses it."""

    # ---- sampling -----------------------------------------------------------------------------------
    def noise(self, seeds: list[int]) -> torch.Tensor:
        """One fixed latent noise per seed, so every method is evaluated from the same starting points."""
        shape = self.latent_shape()
        out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(out).to(self.device)

    def step(self, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             seeds: list[int] | None = None) -> torch.Tensor:
        """One sampling step from sigma to sigma_next, as the model's scheduler takes it: Euler, or with
        `stochastic_sampling` (diffusers' FlowMatchEulerDiscreteScheduler) the x0 prediction noised afresh to
        sigma_next. Fresh noise is drawn per sample from its seed and sigma_next (`step_noise_seed`), so a sample
        depends neither on its batch nor on where a schedule was stopped and resumed."""
        if not self.stochastic_sampling or float(sigma_next) == 0:
            return flow.euler_step(x, v, sigma, sigma_next)
        if seeds is None or len(seeds) != x.shape[0]:
            raise ValueError(f"{self.model_id} samples stochastically (its scheduler's stochastic_sampling): "
                             f"expected one seed per latent ({x.shape[0]}), got {seeds!r}")
        fresh = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(step_noise_seed(s, sigma_next)))
                 for s in seeds]
        return flow.add_noise(flow.x0_from_velocity(x, v, sigma), torch.stack(fresh).to(x), sigma_next)

    @torch.no_grad()
    def denoise_latents(self, x: torch.Tensor, cond: Cond, sigmas: torch.Tensor,
                        seeds: list[int] | None = None) -> torch.Tensor:
        """Sampling steps (`step`) from latents `x` at noise level sigmas[0] down the schedule `sigmas` (any tail of
        one); `seeds` (one per latent) are needed only by a model that samples stochastically.

        With guidance_scale > 1, classifier-free guidance against the empty prompt (no reference), as the
        pipelines do for undistilled models.
        """
        uncond = self.encode_prompts([""] * x.shape[0]) if self.guidance_scale > 1 else None
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(x.shape[0])
            v = self.predict_velocity(x, s, cond)
            if uncond is not None:
                v_uncond = self.predict_velocity(x, s, uncond)
                v = v_uncond + self.guidance_scale * (v - v_uncond)
            x = self.step(x, v, sigmas[i], sigmas[i + 1], seeds)
        return x

    def sample_latents(self, cond: Cond, seeds: list[int], steps: int | None = None) -> torch.Tensor:
        """Sampling from the fixed noise of `seeds` at `steps` (default: native) steps."""
        sigmas = self.sigmas(steps or self.native_steps).to(self.device)
        return self.denoise_latents(self.noise(seeds), cond, sigmas, seeds)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               references: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]; with `references`, through the teacher (in-context) path."""
        cond = self.encode_prompts(prompts) if references is None else self.encode_teacher(prompts, references)
        return self.decode_latents(self.sample_latents(cond, seeds, steps)).clamp(-1, 1)

    # ---- LoRA adapters (peft, saved in the diffusers LoRA format) ------------------------------------
    @abstractmethod
    def add_lora(self, name: str, rank: int, alpha: float | None = None) -> None:
        """Attach a fresh LoRA adapter called `name` to the denoiser and make it active."""

    @abstractmethod
    def set_adapter(self, name: str | None) -> None:
        """Activate one adapter by name; None disables all adapters (the untuned model)."""

    @abstractmethod
    def save_lora(self, path: str | Path, name: str) -> None:
        """Write adapter `name` in the diffusers LoRA format (readable by `pipe.load_lora_weights`)."""

    @abstractmethod
    def load_lora(self, path: str | Path, name: str) -> None:
        """Load a diffusers-format LoRA from `path` as adapter `name` and activate it."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's block activations in backward instead of keeping them (diffusers' own switch):
        less memory per training step for about one more forward pass. Gradients are unchanged."""
        if not getattr(self.denoiser, "_supports_gradient_checkpointing", False):
            from dopsd_bench.errors import UserError

            raise UserError(f"{type(self.denoiser).__name__} does not support gradient checkpointing; "
                            "run without --gradient-checkpointing")
        self.denoiser.enable_gradient_checkpointing()

    def lora_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter `name` (for optimisers and the EMA teacher)."""
        return [p for n, p in self.denoiser.named_parameters() if f".{name}." in n and "lora_" in n]
