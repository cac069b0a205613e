"""`sft`: flow-matching LoRA fine-tune on the training images, with diffusers' timestep densities and weightings.

Follows diffusers' train_dreambooth_lora_flux2.py: u ~ compute_density_for_timestep_sampling(weighting_scheme),
sigma = the scheduler's training sigma at index floor(u * 1000) (unshifted: FLUX.2 uses dynamic shifting, which
training ignores), eps ~ N(0, I), x = (1 - sigma) x0 + sigma eps, target v = eps - x0, per-sample weight
compute_loss_weighting_for_sd3(weighting_scheme, sigma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dopsd_bench import flow
from dopsd_bench.backbones.base import Backbone, Cond
from dopsd_bench.losses import flow_matching_loss, per_sample_mse
from dopsd_bench.method import Batch, Method, MethodConfig
from dopsd_bench.registry import METHODS

WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's default, as diffusers' scripts index it


@dataclass
class SFTConfig(MethodConfig):
    # diffusers' --weighting_scheme: "logit_normal" and "mode" change how sigma is drawn, "sigma_sqrt" and "cosmap"
    # weight the loss per sample, "none" draws sigma uniformly with weight 1 (the scripts' default)
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = "none"
    logit_mean: float = 0.0  # logit_normal only
    logit_std: float = 1.0  # logit_normal only
    mode_scale: float = 1.29  # mode only

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme={self.weighting_scheme!r}; allowed: {', '.join(WEIGHTING_SCHEMES)}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def sample_sigmas(config: SFTConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Training sigmas (B,) in [1/1000, 1], drawn as diffusers' training scripts draw them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling  # heavy: only when training

    u = compute_density_for_timestep_sampling(config.weighting_scheme, batch_size, config.logit_mean,
                                              config.logit_std, config.mode_scale, generator=generator)
    index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    return (NUM_TRAIN_TIMESTEPS - index).float() / NUM_TRAIN_TIMESTEPS  # timesteps run from 1000 down to 1


def flow_matching_objective(backbone: Backbone, x0: torch.Tensor, cond: Cond, config: SFTConfig,
                            generator: torch.Generator, per_sample: bool = False) -> torch.Tensor:
    """The weighted flow-matching loss of `backbone` on clean latents x0 under `cond` (one forward);
    with per_sample, the (B,) weighted per-sample losses whose mean is the loss."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3  # heavy: only when training

    sigma = sample_sigmas(config, x0.shape[0], generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x = flow.add_noise(x0, eps, sigma)
    v_pred = backbone.predict_velocity(x, sigma, cond)
    weights = compute_loss_weighting_for_sd3(config.weighting_scheme, sigma)
    if per_sample:
        return per_sample_mse(v_pred, flow.velocity_target(x0, eps)) * weights.float()
    return flow_matching_loss(v_pred, flow.velocity_target(x0, eps), weights)


@METHODS.register("sft", description="flow-matching LoRA fine-tune on the training images (diffusers weightings)")
class SFT(Method):
    name = "sft"
    description = "flow-matching LoRA fine-tune on the training images (diffusers weightings)"
    Config = SFTConfig

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        self.backbone.set_adapter(self.adapter)
        x0 = self.backbone.encode_images(batch.images)
        cond = self.backbone.encode_prompts(batch.captions)
        return flow_matching_objective(self.backbone, x0, cond, self.config, generator)
